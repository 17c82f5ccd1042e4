"""Rewrite the first cell of every notebook to ``booktools.setup_cell_source()``.

Only that cell's source changes; everything else is kept as nbformat writes it (outputs, metadata,
execution counts). Run it after changing the setup cell or the book's repository or branch in
_config.yml; tests/test_book_structure.py checks that every notebook's first cell is up to date.

    python scripts/sync_setup_cells.py                  # pinned to _config.yml's branch
    python scripts/sync_setup_cells.py --ref COMMIT     # pinned to a commit (publishing)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from booktools import notebook_paths, setup_cell_source


def sync(paths: list[Path], ref: str | None = None) -> list[Path]:
    """Set the setup cell of each notebook; returns the notebooks that changed."""
    source = setup_cell_source(ref)
    changed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        cell = nb.cells[0]
        if cell.cell_type != "code":
            raise SystemExit(f"{path}: the first cell is not the setup (code) cell")
        if cell.source != source:
            cell.source = source
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--ref", help="the git ref to install qlora_edu from (default: the branch)")
    args = parser.parse_args(argv)
    for path in sync(args.notebooks or notebook_paths(), args.ref):
        print(f"updated {path}")


if __name__ == "__main__":
    main()
