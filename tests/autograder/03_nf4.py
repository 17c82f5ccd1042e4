"""Hidden checks of Chapter 3's exercises (scripts/assignments.py puts them in the autograder)."""

import torch
from scipy.stats import norm

import qlora_edu
from qlora_edu.quantize import unpack_4bit


def _mse(env, code):
    W = env["W"]
    return qlora_edu.error_metrics(W, qlora_edu.quantize_roundtrip(W, code))["mse"]


def ch3_ex_symmetric(env):
    """The symmetric book's MSE, recomputed: higher than NF4's."""
    mse = _mse(env, qlora_edu.create_normal_map(use_extra_value=False))
    assert abs(env["symmetric_mse"] - mse) <= 1e-6 * mse
    assert env["symmetric_mse"] > _mse(env, qlora_edu.create_normal_map())


def ch3_ex_offset(env):
    """Within 2% of the best offset of a finer sweep than the exercise's."""
    finer = [0.90 + 0.005 * i for i in range(20)]
    assert _mse(env, qlora_edu.create_normal_map(env["best_offset"])) < 1.02 * min(
        _mse(env, qlora_edu.create_normal_map(o)) for o in finer
    )


def ch3_ex_pack(env):
    """Other bytes: every byte value, and an odd number of codes."""
    packed = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    for n in (512, 301):
        assert torch.equal(env["unpack"](packed, n), unpack_4bit(packed, n))


def ch3_ex_eq4(env):
    """Other k: the normal quantiles at (i + 1/2) / 2^k, scaled to [-1, 1]."""
    for k in (2, 3, 5):
        p = (torch.arange(2**k, dtype=torch.float64) + 0.5) / 2**k
        q = torch.from_numpy(norm.ppf(p.numpy()))
        expected = (q / q.abs().max()).float()
        torch.testing.assert_close(env["equal_mass_levels"](k).float(), expected)
