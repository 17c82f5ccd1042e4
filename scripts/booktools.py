"""Helpers shared by the book's scripts and tests: the notebook list, the setup cell, solutions."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# A ```{solution-start}``` or ```{solution-end}``` fence, from its first line to its closing ```.
SOLUTION_FENCE = re.compile(r"^[ \t]*```\{solution-(start|end)\}.*?^[ \t]*```[ \t]*$", re.M | re.S)


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


def solution_parts(nb) -> list[list[tuple[str, bool]]]:
    """Each cell's source cut at the solution fences, as (text, inside a solution) pieces. A
    solution runs from a `{solution-start}` fence to the next `{solution-end}` fence, both included:
    over whole cells (code cells too) and over the parts of the cells that hold the fences."""
    cells, inside = [], False
    for cell in nb.cells:
        parts, pos = [], 0
        fences = SOLUTION_FENCE.finditer(cell.source) if cell.cell_type == "markdown" else ()
        for fence in fences:
            parts += [(cell.source[pos : fence.start()], inside), (fence[0], True)]
            inside, pos = fence[1] == "start", fence.end()
        cells.append([*parts, (cell.source[pos:], inside)])
    return cells


def strip_solutions(nb):
    """A copy of the notebook without its solutions and nothing else: a cell that holds a fence
    keeps its text outside the solution (a Summary after the last `{solution-end}`, say), and is
    dropped only if nothing is left."""
    copy = nbformat.from_dict(nb)
    cells = []
    for cell, parts in zip(copy.cells, solution_parts(nb), strict=True):
        kept = [text.strip("\n") for text, inside in parts if not inside and text.strip()]
        if len(parts) == 1:  # no fence: the cell is wholly inside a solution or wholly outside
            kept = [] if parts[0][1] else [cell.source]
        if kept:
            cell.source = "\n\n".join(kept)
            cells.append(cell)
    copy.cells = cells
    return copy


def solution_texts(nb) -> list[str]:
    """The distinctive lines of the solutions (those that appear nowhere else in the chapter):
    what must never reach a student."""
    parts = [part for cell in solution_parts(nb) for part in cell]
    elsewhere = "\n".join(text for text, inside in parts if not inside)
    return [
        line.strip()
        for text, inside in parts
        if inside
        for line in text.splitlines()
        if len(line.strip()) > 25
        and line.strip() not in elsewhere
        and "solution-" not in line
        and ":class:" not in line
    ]
