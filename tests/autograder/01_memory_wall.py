"""Hidden checks of Chapter 1's exercises (scripts/assignments.py puts them in the autograder)."""

from qlora_edu import estimate_finetune_memory


def ch1_ex_gpu(env):
    """Exactly the models that fit, none left out."""
    for method in ("lora", "qlora"):
        fit = [n for n in env["models"] if env["estimates"][n][method]["total"] < 24 * env["GB"]]
        assert list(env["fits"][method]) == fit, method


def ch1_ex_seq(env):
    """The first such length: one token fewer, the activations still fit under the weights."""
    before = estimate_finetune_memory(
        env["config_7b"], "qlora", seq_len=env["crossing"] - 1, gradient_checkpointing=False
    )
    assert before["activations"] <= before["weights"]


def ch1_ex_rank(env):
    """The difference of the two totals, and its share of the rank-64 one."""
    r8, r64 = (
        estimate_finetune_memory(env["config_65b"], "qlora", lora_r=r)["total"] for r in (8, 64)
    )
    assert env["rank_cost"] == r64 - r8
    assert abs(env["rank_share"] - (r64 - r8) / r64) < 1e-3
