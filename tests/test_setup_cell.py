"""The notebooks' Colab setup cell, run as on Colab: a faked ``google.colab`` module, a fresh
virtual environment holding an old bitsandbytes and a current torch, and a local package index of
small stand-in wheels (nothing is downloaded)."""

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from booktools import (
    SETUP_REPORTS,
    book_ref,
    colab_url,
    declared_floors,
    repository_url,
    setup_cell_source,
)

FLOORS = declared_floors()


def wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A minimal pure-Python wheel: one module that knows its version, and its metadata."""
    module, info = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": "\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
            + [f"Requires-Dist: {r}" for r in requires]
        )
        + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name_in_zip, text in files.items():
            archive.writestr(name_in_zip, text)
    return path


def bump(version: str, by: int = 1) -> str:
    major, *rest = version.split(".")
    return ".".join([str(int(major) + by), *rest])


@pytest.fixture
def colab(tmp_path):
    """A Python environment that looks like a Colab runtime, and a local index; returns a function
    that runs code there and the environment variables pip sees."""
    tmp = tmp_path
    index, fake = tmp / "index", tmp / "fake"
    index.mkdir()
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "__init__.py").write_text("")
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
    python = str(tmp / "venv" / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {
        "PIP_CONFIG_FILE": os.devnull,  # no machine's pip configuration
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(index),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONPATH": str(fake),
    }
    # What Colab already has: a torch newer than the floor, a bitsandbytes older than it.
    installed = {"torch": bump(FLOORS["torch"]), "bitsandbytes": "0.1.0"}
    old = [wheel(tmp, name, v) for name, v in installed.items()]
    subprocess.run([python, "-m", "pip", "install", "-q", *map(str, old)], check=True, env=env)
    # The index: every dependency at its floor and newer, torch even newer than Colab's.
    for name, floor in FLOORS.items():
        for version in (floor, bump(floor), bump(floor, 2)):
            wheel(index, name, version)
    wheel(index, "accelerate", "1.0.0")
    book = wheel(tmp, "qlora-edu", "0.1.0", [f"{n}>={v}" for n, v in FLOORS.items()])

    def run(code):
        result = subprocess.run(
            [python, "-c", code], env=env, cwd=tmp, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        return result

    return run, book, installed


def test_on_colab_the_cell_upgrades_what_is_too_old_and_keeps_a_current_torch(colab):
    run, book, installed = colab
    cell = setup_cell_source(package=f"qlora-edu @ {book.as_uri()}")
    out = run("import google.colab\n" + cell).stdout
    ended = dict(line.split(" ", 1) for line in out.splitlines())
    assert list(ended) == list(SETUP_REPORTS)  # it says what it ended with
    assert ended["torch"] == installed["torch"]  # Colab's torch meets the floor: kept
    assert ended["bitsandbytes"] == bump(FLOORS["bitsandbytes"], 2)  # too old: upgraded
    assert ended["qlora-edu"] == "0.1.0"
    for name in FLOORS.keys() & ended.keys():
        assert [int(n) for n in ended[name].split(".")] >= [int(n) for n in FLOORS[name].split(".")]


def test_off_colab_the_cell_installs_nothing_and_prints_nothing(colab):
    run, book, _ = colab
    pip = "import subprocess, sys; subprocess.run([sys.executable, '-m', 'pip', 'install', '-q',"
    run(f"{pip} '--no-deps', {str(book)!r}], check=True)")  # a reader's own install
    cell = setup_cell_source(package=f"qlora-edu @ {book.as_uri()}")
    result = run(cell + "\nfrom importlib.metadata import version\nprint(version('bitsandbytes'))")
    assert result.stdout == "0.1.0\n" and result.stderr == ""  # no output, nothing upgraded


def test_the_cell_installs_from_where_the_launch_buttons_point():
    """One source, _config.yml's repository branch, for the launch links and the install."""
    cell = setup_cell_source()
    assert f'book = "qlora-edu @ git+{repository_url()}@{book_ref()}"' in cell
    assert f"/blob/{book_ref()}/" in colab_url("notebooks/01_memory_wall.ipynb")
    assert "@0123abc" in setup_cell_source("0123abc")
    assert all(len(line) <= 100 for line in cell.splitlines())
