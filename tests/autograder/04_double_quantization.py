"""Hidden checks of Chapter 4's exercises (scripts/assignments.py puts them in the autograder)."""

import torch

import qlora_edu
from qlora_edu.codebooks import DYNAMIC_CODE
from qlora_edu.double_quant import bits_per_parameter, dequantize_absmax
from qlora_edu.quantize import dequantize_blockwise, quantize_blockwise


def ch4_ex_bits(env):
    """With double quantization: 4 + 8/128 + 32/(128 x 256), against stored bytes."""
    packed, state = qlora_edu.quantize_4bit(env["W"], blocksize=128, compress_statistics=True)
    stored = bits_per_parameter(packed, state)
    assert abs(env["by_formula"][True] - stored) < 1e-3


def ch4_ex_offset(env):
    """The absmax values quantized without the offset, recomputed."""
    absmax, code = env["absmax"], DYNAMIC_CODE
    codes, scales = quantize_blockwise(absmax, code, 256, search="table")
    raw = dequantize_blockwise(codes, scales, code, 256)
    expected = qlora_edu.error_metrics(absmax, raw)["relative_error"]
    assert abs(env["no_offset"] - expected) <= 1e-6 * expected


def ch4_ex_llama3(env):
    """Every entry, recomputed from the architecture."""
    shapes = qlora_edu.count_parameters(qlora_edu.llama_config("Llama-3-8B")).linear_shapes
    for (blocksize, dq), nbytes in env["cost"].items():
        expected = sum(
            qlora_edu.quantized_nbytes(o * i, blocksize=blocksize, compress_statistics=dq)
            for o, i in shapes
        )
        assert nbytes == expected, (blocksize, dq)
    assert len(env["cost"]) == 4


def ch4_ex_build(env):
    """Another tensor: three full groups of 256 blocks and a partial one of 5, another seed."""
    w = torch.randn(64 * (3 * 256 + 5), generator=torch.Generator().manual_seed(7)) * 0.02
    _, state = qlora_edu.quantize_4bit(w, compress_statistics=True)
    expected = dequantize_absmax(state)
    assert torch.equal(env["my_dequantize_absmax"](state), expected)
