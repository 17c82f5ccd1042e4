"""nbval: print how long each notebook took, and fail a notebook that overruns its time budget.

Every chapter must execute in at most five minutes on two CPU cores (Colab's free CPU runtime has
two as well). A busy machine runs slower, so the run fails only past half as much again.
"""

from collections import defaultdict

import pytest

BUDGET_S = 300
MARGIN = 1.5  # a shared CI machine can be this much slower than a quiet one

seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if ".ipynb::" in report.nodeid:  # setup (the kernel starting), call and teardown
        seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not seconds:
        return
    terminalreporter.section(f"notebook execution times (budget {BUDGET_S} s)")
    for path, s in seconds.items():
        flag = "  OVER BUDGET" if s > BUDGET_S else ""
        terminalreporter.write_line(f"{s:7.1f} s  {path}{flag}")
    terminalreporter.write_line(f"{sum(seconds.values()):7.1f} s  in all")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    over = {p: s for p, s in seconds.items() if s > MARGIN * BUDGET_S}
    if over and session.exitstatus == 0:
        session.exitstatus = 1
        for path, s in over.items():
            print(f"\n{path} took {s:.0f} s, over {MARGIN} x the budget of {BUDGET_S} s")
