"""`make assignments`: per chapter, the notebook to hand out and the autograder that grades it.

Writes, for each chapter, into _build/assignments/<chapter>/:

- `<chapter>.ipynb`, the student edition's notebook: solutions removed; every exercise keeps its
  stub (`...` or `raise NotImplementedError`) and its public check, the code cell after the
  solution whose first line is `# Check <label>`.
- `autograder.zip`, otter-grader's autograder: one test per exercise, worth one point, earned only
  when the exercise's public check and its hidden check (the function named after the label in
  tests/autograder/<chapter>.py, which tries other inputs or recomputes the answer) both pass.

`scripts/grade.py` grades a folder of submissions with it (otter's containerless `otter run`).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import nbformat
from booktools import ROOT, notebook_paths, strip_solutions

OUT = ROOT / "_build" / "assignments"
HIDDEN = ROOT / "tests" / "autograder"

TEST_FILE = '''"""Exercise {label}: one point, for the public check and the hidden one together."""

from otter.test_files import test_case

OK_FORMAT = False
name = {label!r}
points = 1
all_or_nothing = True
PUBLIC_CHECK = {public!r}

{hidden}


@test_case(hidden=False)
def public_check(env):
    exec(PUBLIC_CHECK, dict(env))


@test_case(hidden=True)
def hidden_check(env):
    {function}(env)
'''


def exercise_labels(nb) -> list[str]:
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return re.findall(r"```\{exercise\}\n:label: (\S+)", markdown)


def public_checks(nb) -> dict[str, str]:
    """Each exercise's public check: the code cell that starts with `# Check <label>`."""
    found = (re.match(r"# Check (\S+?):?(\s|$)", c.source) for c in nb.cells)
    return {m[1]: c.source for c, m in zip(nb.cells, found, strict=True) if m}


def hidden_function(label: str) -> str:
    return label.replace("-", "_")


def autograder(path: Path, nb, zip_path: Path) -> list[str]:
    """Write the chapter's autograder; return its exercises in order. An exercise without both
    checks is left out, and said so (tests/test_assignments.py fails on it)."""
    checks = public_checks(nb)
    hidden_file = HIDDEN / f"{path.stem}.py"
    hidden = hidden_file.read_text() if hidden_file.exists() else ""
    labels, missing = [], []
    for label in exercise_labels(nb):
        ok = label in checks and f"def {hidden_function(label)}(env):" in hidden
        (labels if ok else missing).append(label)
    if missing:
        print(f"{path.name}: not autograded, a check is missing: {', '.join(missing)}")
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("otter_config.json", json.dumps({"lang": "python"}))
        for label in labels:
            source = TEST_FILE.format(
                label=label, public=checks[label], hidden=hidden, function=hidden_function(label)
            )
            z.writestr(f"tests/{label}.py", source)
    return labels


def main(chapters: list[str]) -> None:
    paths = [p for p in notebook_paths() if not chapters or p.stem in chapters]
    for path in paths:
        out = OUT / path.stem
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        nb = nbformat.read(path, as_version=4)
        nbformat.write(strip_solutions(nb), out / path.name)
        labels = autograder(path, nb, out / "autograder.zip")
        print(f"{out.relative_to(ROOT)}: {path.name}, autograder.zip ({len(labels)} exercises)")


if __name__ == "__main__":
    main(sys.argv[1:])
