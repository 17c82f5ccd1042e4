"""The chapters are the source of the package modules they teach, as in d2l.ai (`#@save` there).

A code cell whose first line is `# @save qlora_edu/<module>.py` (d2l's mark, spaced as ruff
formats comments) is part of that module: the module is the concatenation, in reading order, of
every such cell (without that line) under a comment that names the chapter it comes from. The
reader runs each cell where the chapter explains it; later chapters import it from the package.

    python scripts/export_package.py          # write the modules (`make save`)
    python scripts/export_package.py --check  # exit 1 if a committed module differs

tests/test_export.py runs the check in `make test`, so a chapter and the package cannot drift.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

import nbformat
from booktools import ROOT, notebook_paths

SAVE = re.compile(r"# @save (qlora_edu/\w+\.py)\n")
HEADER = (
    "# Written in {chapters}\n"
    "# (the cells marked # @save). Edit the chapter and run `make save`, not this file.\n"
)


def saved_cells() -> dict[str, list[tuple[str, str]]]:
    """Module path -> [(notebook name, cell body)] in reading order."""
    modules = defaultdict(list)
    for path in notebook_paths():
        for cell in nbformat.read(path, as_version=4).cells:
            match = SAVE.match(cell.source) if cell.cell_type == "code" else None
            if match:
                body = cell.source[match.end() :].strip("\n")
                modules[match[1]].append((path.name, body))
    return dict(modules)


def render() -> dict[str, str]:
    """Module path -> the text the chapters export for it."""
    rendered = {}
    for module, cells in saved_cells().items():
        chapters = list(dict.fromkeys(f"notebooks/{name}" for name, _ in cells))
        header = HEADER.format(chapters=" and ".join(chapters))
        rendered[module] = header + "\n\n\n".join(body for _, body in cells) + "\n"
    return rendered


def stale() -> list[str]:
    """The modules whose committed text differs from what the chapters export."""
    return [m for m, text in render().items() if (ROOT / m).read_text() != text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args()
    if args.check:
        differing = stale()
        for module in differing:
            print(f"{module} differs from its chapter's # @save cells: run `make save`")
        sys.exit(1 if differing else 0)
    for module, text in render().items():
        (ROOT / module).write_text(text)
        print(f"wrote {module}")


if __name__ == "__main__":
    main()
