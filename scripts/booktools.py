"""Helpers shared by the book's scripts and tests: the notebook list, the setup cell, solutions."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOLUTION_START = re.compile(r"^\s*```\{solution-start\}", re.MULTILINE)
SOLUTION_END = re.compile(r"^\s*```\{solution-end\}", re.MULTILINE)


def book_config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def repository_url() -> str:
    return book_config()["repository"]["url"].rstrip("/")


# The branch the publishing workflow (.github/workflows/pages.yml) writes the notebooks to, each
# with its setup cell pinned to the commit the book was built from: `notebooks/` (the full book)
# and `student/notebooks/` (the student edition, without solutions). The published books' launch
# buttons open them there.
PUBLISHED_BRANCH = "published"
STUDENT_PATH = "student"

# What the setup cell reports after installing (distribution names).
SETUP_REPORTS = ("qlora-edu", "torch", "bitsandbytes", "transformers", "peft", "accelerate")


def declared_floors() -> dict[str, str]:
    """The floors pyproject.toml declares (``name>=version``), by lower-case name."""
    import tomllib

    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = (re.fullmatch(r"([\w.-]+)\s*>=\s*([\w.]+)", r) for r in requirements)
    return {m[1].lower(): m[2] for m in found if m}


def book_ref() -> str:
    """The git ref that launch buttons open notebooks at and the setup cell installs qlora_edu
    from: `repository.branch` in _config.yml, the one source for both."""
    return str(book_config()["repository"].get("branch", "main"))


def colab_url(notebook: str, ref: str | None = None) -> str:
    """The Colab link of a notebook (a path relative to the repository root) at ``ref``."""
    repo = repository_url().removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{repo}/blob/{ref or book_ref()}/{notebook}"


def student_colab_url(name: str) -> str:
    """Where the student edition's launch button opens the notebook ``name`` (a file name)."""
    return colab_url(f"{STUDENT_PATH}/notebooks/{name}", PUBLISHED_BRANCH)


def setup_cell_source(ref: str | None = None, package: str | None = None) -> str:
    """The first cell of every notebook: on Colab, installs qlora_edu at ``ref`` (default
    :func:`book_ref`) and upgrades what is older than its floors; everywhere, it imports
    qlora_edu (which quiets a CPU-dependent notice of bitsandbytes) and prints nothing else.

    ``package`` replaces the pip requirement (the tests install from a local folder)."""
    package = package or f"qlora-edu @ git+{repository_url()}@{ref or book_ref()}"
    names = ", ".join(f'"{name}"' for name in SETUP_REPORTS)
    return f"""# Setup for Google Colab: installs this book's qlora_edu and the libraries it needs.
# pip upgrades any library older than the book's floors (pyproject.toml) and keeps the rest,
# Colab's PyTorch included when it is new enough. Anywhere else it only imports qlora_edu.
import importlib
import sys

if "google.colab" in sys.modules:
    import subprocess
    from importlib.metadata import version

    book = "{package}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", book], check=True)
    for name in ({names}):
        print(name, version(name))

# Imported before bitsandbytes, qlora_edu quiets a bitsandbytes notice only some CPUs print.
_ = importlib.import_module("qlora_edu")"""


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def toc_files() -> list[str]:
    """Every file the table of contents lists, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part["chapters"]]
    return files


def solution_spans(nb) -> list[tuple[int, int]]:
    """Index ranges [start, end] of the cells that make up each gated solution."""
    spans, start = [], None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        if SOLUTION_START.search(cell.source):
            start = i
        if SOLUTION_END.search(cell.source) and start is not None:
            spans.append((start, i))
            start = None
    return spans


def strip_solutions(nb):
    """A copy of the notebook without its solution cells."""
    drop = {i for a, b in solution_spans(nb) for i in range(a, b + 1)}
    copy = nbformat.from_dict(nb)
    copy.cells = [c for i, c in enumerate(nb.cells) if i not in drop]
    return copy


def solution_texts(nb) -> list[str]:
    """The distinctive lines of the solution cells (those that appear nowhere else in the
    chapter): what must never reach a student."""
    inside = {i for a, b in solution_spans(nb) for i in range(a, b + 1)}
    elsewhere = "\n".join(cell.source for i, cell in enumerate(nb.cells) if i not in inside)
    return [
        line.strip()
        for i in sorted(inside)
        for line in nb.cells[i].source.splitlines()
        if len(line.strip()) > 25
        and line.strip() not in elsewhere
        and "solution-" not in line
        and ":class:" not in line
    ]
