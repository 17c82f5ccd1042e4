"""Grade a folder of submitted notebooks with a chapter's autograder; write a CSV of the scores.

    python scripts/grade.py _build/assignments/02_quantization_basics/autograder.zip submissions/

Runs otter-grader's `otter run` (no container: it executes each notebook in this environment, on
the CPU, offline) on every .ipynb in the folder, and writes `<folder>/grades.csv`: one row per
submission, one column per exercise (1 point each), and the total.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import zipfile
from pathlib import Path

from otter.run import main as otter_run


def exercises(autograder: Path) -> list[str]:
    """The exercises the autograder tests, in the chapter's order (one test file each)."""
    names = zipfile.ZipFile(autograder).namelist()
    return [Path(n).stem for n in names if n.startswith("tests/") and n.endswith(".py")]


def grade(autograder: Path, submission: Path) -> dict[str, float]:
    """The points of each exercise for one notebook."""
    with contextlib.redirect_stdout(io.StringIO()):  # otter prints a report per submission
        results = otter_run(str(submission), autograder=str(autograder), output_dir=None)
    return {name: results.get_score(name) for name in exercises(autograder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("autograder", type=Path, help="a chapter's autograder.zip")
    parser.add_argument("folder", type=Path, help="the folder of submitted notebooks")
    parser.add_argument("--out", type=Path, help="the CSV to write (default: <folder>/grades.csv)")
    args = parser.parse_args()
    out = args.out or args.folder / "grades.csv"
    rows = []
    for submission in sorted(args.folder.glob("*.ipynb")):
        scores = grade(args.autograder, submission)
        rows.append({"submission": submission.name, **scores, "total": sum(scores.values())})
        print(f"{submission.name}: {rows[-1]['total']:g} of {len(scores)}")
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["submission"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
