"""Hidden checks of Chapter 12's exercises (scripts/assignments.py puts them in the autograder)."""

import torch


def ch12_ex_bf16(env):
    """Other values: every float32 bit pattern near powers of two, ties both ways, overflow to
    infinity at the top of the range."""
    top = torch.tensor([3.4e38, -3.4e38])  # beyond bfloat16's largest finite value: infinity
    steps = torch.arange(-70000, 70000, 7, dtype=torch.int32) + (1 << 30)  # around 2.0
    x = torch.cat([steps.view(torch.float32), -steps.view(torch.float32), top])
    assert torch.equal(env["bf16_bits"](x), x.bfloat16().view(torch.int16).int() & 0xFFFF)


def ch12_ex_avx2(env):
    """A random code book and a batch of indices in another shape."""
    code = torch.randn(16, generator=torch.Generator().manual_seed(5))
    index = torch.randint(0, 16, (7, 9), generator=torch.Generator().manual_seed(6))
    assert torch.equal(env["lookup_by_halves"](index, code), code[index])


def ch12_ex_partial(env):
    """Other partial shapes, FP4, blocks of 128, bfloat16, and no double quantization."""
    quantize_4bit, dequantize_4bit = env["quantize_4bit"], env["dequantize_4bit"]
    for shape, blocksize in (((2, 200), 128), ((9, 7), 64)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).bfloat16()
        packed, state = quantize_4bit(x, blocksize, "fp4", compress_statistics=False)
        out = env["formula_any_length"](packed, state)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(out.view(torch.int16), dequantize_4bit(packed, state).view(torch.int16))
