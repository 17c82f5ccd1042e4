"""What the publishing workflow (.github/workflows/pages.yml) publishes besides the web book.

Colab opens notebooks from GitHub, not from the web site. So the workflow publishes, on the branch
``booktools.PUBLISHED_BRANCH``, the notebooks of the commit it builds, each with its setup cell
pinned to that commit (a reader gets the qlora_edu the book was built with, whatever main becomes):

    python scripts/publish.py pin COMMIT   # in CI's checkout only: setup cells install qlora_edu
                                           # at COMMIT; launch buttons open the published branch
    make book student
    python scripts/publish.py tree OUT     # OUT/notebooks (full book), OUT/student/notebooks

OUT then becomes the published branch. Never run ``pin`` in a working copy you commit from.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from booktools import PUBLISHED_BRANCH, ROOT, STUDENT_PATH, notebook_paths
from sync_setup_cells import sync

STUDENT_NOTEBOOKS = ROOT / "_build" / "student" / "notebooks"


def pin(commit: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise SystemExit(f"not a full commit hash: {commit!r}")
    sync(notebook_paths(), ref=commit)
    config = ROOT / "_config.yml"
    text, count = re.subn(
        r"^(  branch:).*$", rf"\1 {PUBLISHED_BRANCH}", config.read_text(), flags=re.MULTILINE
    )
    if count != 1:
        raise SystemExit("_config.yml: expected one `branch:` line under `repository:`")
    config.write_text(text)


def tree(out: Path) -> None:
    if not any(STUDENT_NOTEBOOKS.glob("*.ipynb")):
        raise SystemExit("no student notebooks: run `make student` first")
    shutil.rmtree(out, ignore_errors=True)
    for folder, paths in (
        (out / "notebooks", notebook_paths()),
        (out / STUDENT_PATH / "notebooks", sorted(STUDENT_NOTEBOOKS.glob("*.ipynb"))),
    ):
        folder.mkdir(parents=True)
        for path in paths:
            shutil.copy(path, folder)
    (out / "README.md").write_text(
        "# The notebooks of the published book\n\n"
        "Written by the publishing workflow from the main branch; do not edit here. "
        "`notebooks/` are the chapters, `student/notebooks/` the student edition (no solutions). "
        "Each notebook's first cell installs qlora_edu at the commit the book was built from.\n"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pin").add_argument("commit")
    commands.add_parser("tree").add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pin":
        pin(args.commit)
    else:
        tree(args.out)


if __name__ == "__main__":
    main()
