"""The student edition: the notebooks without their solution cells, and the book built from them.

Writes _build/student/notebooks (hand these to students) and _build/student/_build/html, built
from a copy of the book's sources in which every notebook has had its solutions removed. Its launch
buttons open the student notebooks where the publishing workflow puts them: `student/notebooks/`
on the published branch (booktools.PUBLISHED_BRANCH), never the full notebooks on main.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml
from booktools import (
    PUBLISHED_BRANCH,
    ROOT,
    STUDENT_PATH,
    book_config,
    notebook_paths,
    strip_solutions,
)

OUT = ROOT / "_build" / "student"


def main() -> None:
    source = OUT / "src"
    shutil.rmtree(OUT, ignore_errors=True)
    (source / "notebooks").mkdir(parents=True)
    shutil.copytree(ROOT / "book", source / "book")
    shutil.copy(ROOT / "_toc.yml", source)
    for path in notebook_paths():
        nbformat.write(
            strip_solutions(nbformat.read(path, as_version=4)), source / path.relative_to(ROOT)
        )
    shutil.copytree(source / "notebooks", OUT / "notebooks")
    config = book_config()
    config["title"] += " (student edition)"
    config["sphinx"]["config"]["hide_solutions"] = True
    # launch buttons open PUBLISHED_BRANCH/STUDENT_PATH/notebooks/: booktools.student_colab_url
    config["repository"] |= {"branch": PUBLISHED_BRANCH, "path_to_book": STUDENT_PATH}
    (source / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    jb = Path(sys.executable).with_name("jupyter-book")
    command = [str(jb), "build", str(source), "--path-output", str(OUT), "-W", "-n", "--keep-going"]
    subprocess.run(command, check=True)
    print(f"student edition: {OUT / 'notebooks'} and {OUT / '_build' / 'html'}")


if __name__ == "__main__":
    main()
