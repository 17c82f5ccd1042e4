"""Chapter 8's committed experiment results come from the current code (scripts/experiments.py)."""

import experiments

from qlora_edu.finetune import EXPERIMENTS, experiment_results


def test_committed_results_come_from_the_current_code_and_settings():
    results = experiment_results()
    assert results["code_hash"] == experiments.code_hash(), (
        f"{EXPERIMENTS.name} was made by other code or settings: run `make experiments` and "
        "commit the result"
    )
    assert results["config"] == experiments.CONFIG


def test_committed_results_are_complete_and_say_where_they_come_from():
    results = experiment_results()
    for key in ("command", "date", "machine", "versions", "minutes"):
        assert results[key]
    grid = results["config"]["table4"]
    runs = {(r["method"], r["seed"]) for r in results["table4"]}
    assert runs == {(m, s) for m in grid["methods"] for s in grid["seeds"]}
    assert all(len(r["losses"]) == grid["steps"] for r in results["table4"])
    windows = {len(v) for v in results["table2"].values()}
    assert len(windows) == 1 and windows.pop() > 900
    assert list(results["table2"]) == list(results["config"]["table2"]["formats"])


def test_the_hash_changes_when_a_dependency_or_a_setting_changes(monkeypatch):
    before = experiments.code_hash()
    monkeypatch.setitem(experiments.CONFIG["table4"], "steps", 61)
    assert experiments.code_hash() != before
    monkeypatch.undo()
    monkeypatch.setattr(experiments, "DEPENDS", experiments.DEPENDS[1:])
    assert experiments.code_hash() != before
