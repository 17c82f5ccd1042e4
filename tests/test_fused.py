"""Chapter 12: the fused dequantization kernel (and the compiled formula) against the plain path,
bit for bit; its AVX2 build as well as the native one; its fallback when it cannot be built."""

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_edu import dequantize_4bit, fused, quantize_4bit
from qlora_edu.quantize import SUPPORTED_BLOCKSIZES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_kernel = pytest.mark.skipif(fused.kernel() is None, reason="no kernel on this machine")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def plain(packed, state):
    with fused.disabled():
        return dequantize_4bit(packed, state)


CASES = dict(
    shape=st.sampled_from([(1,), (7,), (64,), (3, 65), (2, 48), (33, 17), (128, 96), (5, 1024)]),
    blocksize=st.sampled_from(SUPPORTED_BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    nested=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1.0, 1e-38, 1e3]),  # 1e-38: subnormal products; 1e3: float16 overflow
    seed=st.integers(0, 2**16),
)


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(**CASES)
def test_kernel_gives_the_plain_paths_bits(
    shape, blocksize, quant_type, nested, dtype, scale, seed
):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    packed, state = quantize_4bit(x.to(dtype), blocksize, quant_type, compress_statistics=nested)
    expected = plain(packed, state)
    out = fused.dequantize_4bit_kernel(packed, state)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(bits(out), bits(expected))
    assert torch.equal(bits(dequantize_4bit(packed, state)), bits(expected))  # the default path


@needs_kernel
def test_the_avx2_build_gives_the_same_bits(tmp_path, monkeypatch):
    """The AVX2 loop (two permutes and a blend), whatever the machine's own width."""
    avx2 = fused.build_kernel("avx2", tmp_path)
    monkeypatch.setattr(fused, "kernel", lambda: avx2)
    x = torch.randn(37, 200) * torch.logspace(-38, 2, 200)
    for quant_type in ("nf4", "fp4", "int4"):
        for dtype in DTYPES:
            for nested in (False, True):
                packed, state = quantize_4bit(x.to(dtype), 64, quant_type, nested)
                out = fused.dequantize_4bit_kernel(packed, state)
                assert torch.equal(bits(out), bits(plain(packed, state)))


@needs_kernel
def test_kernel_reads_any_storage_and_a_state_moved_to_another_dtype():
    """Packed bytes viewed as another dtype (FSDP's quant_storage), and states of any dtype."""
    packed, state = quantize_4bit(torch.randn(64, 64), compress_statistics=True)
    as_float = packed.view(-1).view(torch.float32)
    for dtype in DTYPES:
        s = dataclasses.replace(state, dtype=dtype)
        assert torch.equal(bits(dequantize_4bit(as_float, s)), bits(plain(packed, s)))


def test_compiled_formula_gives_the_plain_paths_bits():
    compiled = torch.compile(fused.dequantize_4bit_formula, dynamic=False)
    packed, state = quantize_4bit(torch.randn(96, 128), 64, "fp4", compress_statistics=True)
    for dtype in DTYPES:
        s = dataclasses.replace(state, dtype=dtype)
        assert torch.equal(bits(compiled(packed, s).view(s.shape)), bits(plain(packed, s)))


def test_without_a_compiler_the_plain_path_is_used_with_one_warning(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    fused.kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler 'no-such-compiler' found"):
            assert fused.kernel() is None
        packed, state = quantize_4bit(torch.randn(8, 64))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # decided once: no second warning
            assert fused.dequantize_4bit_kernel(packed, state) is None
            assert torch.equal(dequantize_4bit(packed, state), plain(packed, state))
    finally:
        fused.kernel.cache_clear()


def test_disabled_restores_the_setting_after_an_error():
    with pytest.raises(RuntimeError), fused.disabled():
        assert not fused.ENABLED
        raise RuntimeError
    assert fused.ENABLED


def test_bad_input_is_refused_before_the_kernel_runs():
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match="packed tensor has 255 bytes"):
        dequantize_4bit(packed[:-1], state)


@needs_kernel
def test_kernel_writes_into_a_given_output_or_says_what_is_wrong_with_it():
    packed, state = quantize_4bit(torch.randn(16, 64), compress_statistics=True)
    out = torch.full((16, 64), float("nan"))
    assert fused.dequantize_4bit_kernel(packed, state, out) is out
    assert torch.equal(bits(out), bits(plain(packed, state)))
    with pytest.raises(ValueError, match=r"contiguous torch.float32 tensor of shape \(16, 64\)"):
        fused.dequantize_4bit_kernel(packed, state, torch.empty(64, 16))
    with pytest.raises(ValueError, match="not contiguous"):
        fused.dequantize_4bit_kernel(packed, state, torch.empty(64, 16).t())
