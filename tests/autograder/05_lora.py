"""Hidden checks of Chapter 5's exercises (scripts/assignments.py puts them in the autograder)."""

import torch


def ch5_ex_count(env):
    """Each projection's r (in + out) at rank 16; the MLP's are the largest."""
    shapes = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096)}
    shapes |= {"gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
    assert env["per_projection"] == {k: 16 * (o + i) for k, (o, i) in shapes.items()}


def ch5_ex_zero(env):
    """Neither moves: each one's gradient is multiplied by the other, zero."""
    assert env["a_zero"] is True and env["b_zero"] is True


def ch5_ex_rank(env):
    """The target's change has rank 4: ranks 4 and 8 fit it, 1 and 2 cannot."""
    assert sorted(env["fitted"]) == [4, 8]


def ch5_ex_adapter(env):
    """Other inputs: four dimensions, rank 3, another scaling, against B A formed explicitly."""
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(3, 20, generator=g), torch.randn(9, 3, generator=g)
    x = torch.randn(2, 3, 4, 20, generator=g)
    out = env["lora_forward"](x, A, B, 0.25)
    torch.testing.assert_close(out, 0.25 * x @ (B @ A).T)
