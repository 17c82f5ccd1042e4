"""Run notebooks top to bottom and fail only on errors: do their asserts hold with these libraries?

`make test-floors` runs it in `.venv-floors`, where the libraries are at the lowest versions that
pyproject.toml allows (constraints-floors.txt). Stored outputs are not compared (at other versions
a warning or a last digit may differ) and nothing is written back: a chapter passes when every cell
runs without an exception, so every assert in it holds.

    python scripts/check_floors.py                      # every notebook
    python scripts/check_floors.py notebooks/03_nf4.ipynb --timeout 600
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "numpy", "scipy")


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def check(path: Path, timeout: int) -> str | None:
    """None when every cell of the notebook ran; else what went wrong (a line, then details)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellTimeoutError:
        return f"a cell ran longer than {timeout} s"
    except CellExecutionError as error:
        # the error, then the end of the failing cell's source and traceback, to act on
        detail = "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()[-25:])
        return f"{error.ename}: {error.evalue}".splitlines()[0][:300] + "\n" + detail
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    print(", ".join(f"{name} {v}" for name, v in versions().items()), flush=True)
    failed = []
    for path in paths:
        start = time.perf_counter()
        problem = check(path, args.timeout)
        took = f"{path.name} ({time.perf_counter() - start:.0f} s)"
        print(f"FAIL {took}: {problem}" if problem else f"pass {took}")
        sys.stdout.flush()
        if problem:
            failed.append(path.name)
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
