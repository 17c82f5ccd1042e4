"""Hidden checks of Chapter 10's exercises (scripts/assignments.py puts them in the autograder)."""

from qlora_edu import estimate_finetune_memory


def ch10_ex_gpus(env):
    """The fewest GPUs: one fewer does not fit."""
    for gpu_bytes, world in env["needed"].items():
        if world > 1:
            fewer = estimate_finetune_memory(
                env["llama2_70b"], "qlora", lora_r=64, batch_size=1, seq_len=4096,
                world_size=world - 1,
            )  # fmt: skip
            assert fewer["total"] > gpu_bytes
    assert set(env["needed"]) == {24e9, 80e9}


def ch10_ex_four(env):
    """The losses match, and each rank holds a quarter."""
    assert env["match"] is True
    assert all(abs(s - 0.25) < 0.001 for s in env["shares"])


def ch10_ex_state(env):
    """A buffer stays a whole tensor; a parameter becomes a sharded DTensor."""
    assert (env["packed_type"], env["lora_type"]) == ("Tensor", "DTensor")
