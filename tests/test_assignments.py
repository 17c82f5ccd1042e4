"""Every exercise is checked, and the autograder grades them (`make assignments`, scripts/grade.py).

The structure test covers every chapter. The grading proof runs otter-grader on Chapters 2 and 7,
the two cheapest chapters (about 15 s a run on two cores), with exercises of both kinds (a value
worked out, a function written): the chapter with its solutions scores full marks, the untouched
student notebook scores zero on every exercise, and the chapter with one answer made wrong loses
that exercise's point and no other, whether the public check catches it (Chapter 7) or only the
hidden one (Chapter 2).
"""

import csv
import re
import subprocess
import sys

import assignments
import nbformat
import pytest
from booktools import ROOT, notebook_paths, solution_parts

NOTEBOOKS = notebook_paths()


def _exercises(nb):
    """Each exercise's label with the code cells before its solution (after its statement) and the
    code cells after it (up to the next exercise), all outside every solution."""
    parts = solution_parts(nb)
    outside = [not any(inside for _, inside in p) for p in parts]
    found, current = {}, None
    for cell, out in zip(nb.cells, outside, strict=True):
        if m := re.search(r"```\{exercise\}\n:label: (\S+)", cell.source):
            current = found.setdefault(m[1], {"before": [], "after": [], "solved": False})
        elif current is not None and cell.cell_type == "code" and out:
            current["after" if current["solved"] else "before"].append(cell.source)
        if current is not None and "```{solution-end}" in cell.source:
            current["solved"] = True
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_a_stub_a_public_check_and_a_hidden_check(path):
    nb = nbformat.read(path, as_version=4)
    exercises = _exercises(nb)
    assert list(exercises) == assignments.exercise_labels(nb)
    checks = assignments.public_checks(nb)
    hidden = (ROOT / "tests" / "autograder" / f"{path.stem}.py").read_text()
    for label, cells in exercises.items():
        stubs = [s for s in cells["before"] if "..." in s or "raise NotImplementedError" in s]
        assert stubs, f"{label}: no stub for the student's answer before the solution"
        assert cells["after"] and cells["after"][0] == checks.get(label), (
            f"{label}: the cell after the solution must be its `# Check {label}` cell"
        )
        assert "assert" in checks[label] or "check_" in checks[label], label
        assert f"def {assignments.hidden_function(label)}(env):" in hidden, label


def _grade(tmp_path, chapter, submissions):
    folder = tmp_path / chapter
    folder.mkdir()
    for name, nb in submissions.items():
        nbformat.write(nb, folder / f"{name}.ipynb")
    autograder = ROOT / "_build" / "assignments" / chapter / "autograder.zip"
    command = [sys.executable, ROOT / "scripts" / "grade.py", autograder, folder]
    subprocess.run(command, check=True, cwd=ROOT)
    with open(folder / "grades.csv") as f:
        return {row.pop("submission"): row for row in csv.DictReader(f)}


# One wrong answer per chapter: a cell put just before the exercise's check, replacing the answer.
WRONG = {
    "02_quantization_basics": (
        "ch2-ex-outlier",
        "threshold = 20.0  # large enough, but not the smallest: only the hidden check sees it",
    ),
    "07_paged_optimizers": (
        "ch7-ex-evict",
        "def evict_for(resident, used, capacity, nbytes):  # evicts every page\n"
        "    return list(resident)",
    ),
}


@pytest.mark.parametrize("chapter", sorted(WRONG))
def test_autograder_gives_full_zero_and_exactly_one_point_less(tmp_path, chapter):
    subprocess.run([sys.executable, ROOT / "scripts" / "assignments.py", chapter], check=True)
    full = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    student = nbformat.read(ROOT / "_build" / "assignments" / chapter / f"{chapter}.ipynb", 4)
    label, wrong_answer = WRONG[chapter]
    wrong = nbformat.from_dict(full)
    check = next(i for i, c in enumerate(wrong.cells) if c.source.startswith(f"# Check {label}"))
    wrong.cells.insert(check, nbformat.v4.new_code_cell(wrong_answer))

    grades = _grade(tmp_path, chapter, {"full": full, "blank": student, "wrong": wrong})
    labels = assignments.exercise_labels(full)
    for name, expected in [
        ("full", {x: 1 for x in labels}),
        ("blank", {x: 0 for x in labels}),
        ("wrong", {x: int(x != label) for x in labels}),
    ]:
        row = grades[f"{name}.ipynb"]
        assert {x: float(row[x]) for x in labels} == expected, name
        assert float(row["total"]) == sum(expected.values())
