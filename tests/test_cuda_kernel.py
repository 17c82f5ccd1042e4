"""kernel="cuda": bitsandbytes' CUDA quantization rules, against a literal transcription of
csrc/kernels.cu (tests/cuda_reference.py). The GPU itself is checked by benchmarks/gpu_report.py."""

import cuda_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_edu import FP4_CODE, NF4_CODE, quantize_4bit
from qlora_edu.codebooks import DYNAMIC_CODE
from qlora_edu.quantize import (
    FP4_CUDA_THRESHOLDS,
    NF4_CUDA_THRESHOLDS,
    cuda_codes,
    quantize_blockwise,
)


def near(values: list[float], ulps: int = 40) -> torch.Tensor:
    """Every float32 within ``ulps`` steps of each value, both signs."""
    bits = torch.tensor(values, dtype=torch.float32).view(torch.int32)
    around = (bits[:, None] + torch.arange(-ulps, ulps + 1, dtype=torch.int32)).view(torch.float32)
    return torch.cat([around.flatten(), -around.flatten()])


def probes(thresholds: list[float]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tiny = torch.finfo(torch.float32).tiny
    special = torch.tensor([0.0, -0.0, tiny / 2, -tiny / 2, tiny, 1.0, -1.0, float("nan")])
    return torch.cat([torch.rand(500_000, generator=g) * 2 - 1, near(thresholds), special])


def test_thresholds_are_the_source_literals_rounded_by_a_compiler():
    assert torch.equal(NF4_CUDA_THRESHOLDS, torch.stack(ref.NF4_T))
    assert torch.equal(FP4_CUDA_THRESHOLDS, torch.stack(sorted(ref.FP4_T.values())))


def test_nf4_codes_are_the_decision_tree():
    x = probes(NF4_CUDA_THRESHOLDS.tolist())
    assert torch.equal(cuda_codes(x, NF4_CODE), ref.nf4_code(x))


def test_fp4_codes_are_the_decision_tree():
    x = probes(FP4_CUDA_THRESHOLDS.tolist())
    assert torch.equal(cuda_codes(x, FP4_CODE), ref.fp4_code(x))


def test_8bit_codes_are_the_binary_search():
    midpoints = ((DYNAMIC_CODE[1:] + DYNAMIC_CODE[:-1]) * 0.5).tolist()
    x = torch.cat([probes(midpoints[::3])[:200_000], near(midpoints, ulps=3)])
    assert torch.equal(cuda_codes(x, DYNAMIC_CODE), ref.dynamic8_code(x, DYNAMIC_CODE))


def test_where_cuda_differs_from_the_nearest_level():
    """Values the tree sends the other way than the nearest level (read from the source)."""
    nf4 = torch.tensor([-0.6106328964233398, -0.33967941999435425, -0.23460739850997925,
                        0.1202552542090416])  # fmt: skip
    nearest = (nf4[:, None] - NF4_CODE).abs().argmin(1)
    assert torch.equal(cuda_codes(nf4, NF4_CODE), nearest - 1)  # the lower code, 1, 3, 4, 8
    fp4 = torch.tensor([0.5833331, 0.0026041698, -0.001])  # 0.6667 not 0.5; 0 not 0.0052; -0
    assert cuda_codes(fp4, FP4_CODE).tolist() == [0b010, 0b000, 0b1000]
    k = 100  # on a float32 midpoint the 8-bit search keeps the even index
    for low in (k, k + 1):
        midpoint = (DYNAMIC_CODE[low] + DYNAMIC_CODE[low + 1]) * 0.5
        assert int(cuda_codes(midpoint.reshape(1), DYNAMIC_CODE)) == low + (low % 2)


@settings(max_examples=30, deadline=None)
@given(
    numel=st.integers(1, 3000),
    blocksize=st.sampled_from([64, 128, 256]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    zero_block=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_4bit_cuda_equals_the_kernel(numel, blocksize, quant_type, zero_block, seed):
    A = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 0.02
    if zero_block:  # the last block all zeros: 1/0 makes NaN, code 0 (an NF4 byte 0x00, not 0x77)
        A[(numel - 1) // blocksize * blocksize :] = 0.0
    packed, state = quantize_4bit(A, blocksize, quant_type, compress_statistics=True, kernel="cuda")
    expected_packed, expected_absmax = ref.quantize_4bit(A, blocksize, quant_type)
    assert torch.equal(packed, expected_packed)
    offset = expected_absmax.mean()
    codes, absmax2 = ref.quantize_blockwise(expected_absmax - offset, DYNAMIC_CODE, 256)
    assert torch.equal(state.absmax, codes) and torch.equal(state.state2.absmax, absmax2)
    assert torch.equal(state.offset, offset)


def test_the_default_kernel_follows_the_device():
    A = torch.randn(4096) * 0.02
    assert torch.equal(quantize_4bit(A)[0], quantize_4bit(A, kernel="cpu")[0])
    with pytest.raises(ValueError, match="CUDA kernels quantize to NF4, FP4"):
        quantize_blockwise(A, torch.linspace(-1, 1, 15), 64, search="cuda")
