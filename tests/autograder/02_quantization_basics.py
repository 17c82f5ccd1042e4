"""Hidden checks of Chapter 2's exercises (scripts/assignments.py puts them in the autograder)."""

import math

import torch


def ch2_ex_byhand(env):
    """The codes worked out by hand: round(7 w / 0.9), half to even."""
    assert [int(c) for c in env["codes_ex"]] == [7, -2, 0, 4]


def ch2_ex_sqnr(env):
    """Each gain is 20 log10 of q_max's ratio, measured on other uniform values."""
    q_max = [2 ** (b - 1) - 1 for b in range(2, 9)]
    predicted = [20 * math.log10(q_max[i + 1] / q_max[i]) for i in range(6)]
    assert all(abs(g - p) < 0.2 for g, p in zip(env["gains"], predicted, strict=True))


def ch2_ex_outlier(env):
    """The smallest such outlier: 1% below it, at most half of the others round to zero."""
    t = env["W"].clone()
    t[0, 0] = 0.99 * env["threshold"]
    codes, _ = env["absmax_quantize"](t, bits=4)
    assert (codes.flatten()[1:] == 0).float().mean() <= 0.5


def ch2_ex_blockwise(env):
    """Other inputs: 2, 5 and 4 bits, blocks of 32, 128 and 1024, a constant block."""
    quantize, dequantize = env["zeropoint_quantize"], env["zeropoint_dequantize"]
    x = torch.randn(2048, generator=torch.Generator().manual_seed(11)) * 3
    x[32:64] = 0.25  # a constant block
    for bits, blocksize in ((2, 32), (5, 128), (4, 1024)):
        expected = torch.cat([dequantize(*quantize(b, bits)) for b in x.split(blocksize)])
        result = env["blockwise_zeropoint"](x, bits, blocksize)
        torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
