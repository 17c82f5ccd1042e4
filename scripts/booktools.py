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


def colab_url(notebook: str) -> str:
    """The Colab link of a notebook (a path relative to the repository root)."""
    config = book_config()
    repo = repository_url().removeprefix("https://github.com/")
    branch = config["repository"].get("branch", "main")
    return f"https://colab.research.google.com/github/{repo}/blob/{branch}/{notebook}"


def setup_cell_source() -> str:
    """The first cell of every notebook: installs qlora_edu on Colab, does nothing elsewhere."""
    return f"""# Setup: on Google Colab, install qlora_edu (and bitsandbytes) from the book's
# repository, keeping Colab's own PyTorch. Anywhere else this cell does nothing.
import sys

if "google.colab" in sys.modules:
    import subprocess

    package = "qlora-edu @ git+{repository_url()}@main"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)"""


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
