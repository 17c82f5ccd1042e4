"""Chapters 2-4: code books, blockwise 4-bit quantization and double quantization, against
bitsandbytes' CPU backend (the installed version is the reference)."""

import bitsandbytes.functional as bnb
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_edu import (
    FP4_CODE,
    NF4_CODE,
    QuantState,
    create_normal_map,
    dequantize_4bit,
    quantize_4bit,
)
from qlora_edu.codebooks import DYNAMIC_CODE, create_dynamic_map
from qlora_edu.double_quant import bits_per_parameter, dequantize_absmax
from qlora_edu.quantize import SUPPORTED_BLOCKSIZES, pack_4bit, quantize_blockwise, unpack_4bit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantization, on the original shape (its CPU kernel returns (1, n) for 1-D).

    bitsandbytes 0.50's C++ CPU kernel gets blocks wrong when they straddle rows, i.e. when the last
    dimension is not a multiple of the blocksize (e.g. shape (2, 48), blocksize 32: errors the size
    of the weights). There we compare with bitsandbytes' own reference PyTorch kernel.
    """
    if len(state.shape) > 1 and state.shape[-1] % state.blocksize:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        absmax = state.absmax
        if state.nested:
            absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
        code = bnb.get_4bit_type(state.quant_type, device="cpu")
        out = (
            _dequantize_4bit_compute.__wrapped__
            if hasattr(_dequantize_4bit_compute, "__wrapped__")
            else _dequantize_4bit_compute
        )
        return out(
            packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, state.dtype
        )
    return bnb.dequantize_4bit(packed, state).reshape(state.shape)


def test_code_books_equal_bitsandbytes():
    assert torch.equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, bnb.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(torch.signbit(FP4_CODE), torch.signbit(bnb.get_4bit_type("fp4", "cpu")))
    assert torch.equal(DYNAMIC_CODE, bnb.create_dynamic_map(signed=True))
    assert torch.equal(create_dynamic_map(signed=False), bnb.create_dynamic_map(signed=False))
    for extra in (True, False):
        theirs = bnb.create_normal_map(use_extra_value=extra).unique()
        assert torch.equal(create_normal_map(use_extra_value=extra), theirs)


def test_nf4_has_an_exact_zero_and_ends_at_plus_minus_one():
    assert NF4_CODE.numel() == 16 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert (NF4_CODE == 0).sum() == 1
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])


def test_packing_puts_the_first_value_in_the_high_nibble():
    packed, _ = quantize_4bit(torch.tensor([1.0, -1.0]), compress_statistics=False)
    assert packed.flatten().tolist() == [0xF0]


@given(st.lists(st.integers(0, 15), min_size=0, max_size=300))
def test_unpack_inverts_pack(values):
    q = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(unpack_4bit(pack_4bit(q), len(values)), q)


shapes = st.one_of(
    st.tuples(st.integers(1, 3000)),
    st.tuples(st.integers(1, 40), st.integers(1, 200)),
    # bitsandbytes' dequantize_4bit fails on 3-D tensors of one packed byte (it transposes)
    st.tuples(st.integers(2, 4), st.integers(1, 10), st.integers(2, 70)),
)


def make_tensor(shape, dtype, seed, outlier, zero_block):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(shape, generator=g) * 10 ** (seed % 5 - 2)
    flat = A.view(-1)
    if outlier:
        flat[seed % flat.numel()] *= 50  # stays finite in float16
    if zero_block and flat.numel() > 130:
        flat[64:128] = 0
    return A.to(dtype)


TENSORS = dict(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    blocksize=st.sampled_from(SUPPORTED_BLOCKSIZES),
    seed=st.integers(0, 10_000),
    outlier=st.booleans(),
)


@settings(max_examples=120, deadline=None)
@given(**TENSORS, zero_block=st.booleans())
def test_single_quantization_is_bit_identical(
    shape, dtype, quant_type, blocksize, seed, outlier, zero_block
):
    A = make_tensor(shape, dtype, seed, outlier, zero_block)
    before = A.clone()
    kw = dict(blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    ours, state = quantize_4bit(A, **kw)
    theirs, bnb_state = bnb.quantize_4bit(A, **kw)
    assert torch.equal(A, before)  # nothing modified in place
    assert torch.equal(ours, theirs)
    assert torch.equal(state.absmax, bnb_state.absmax)
    result = dequantize_4bit(ours, state)
    assert result.dtype == dtype and result.shape == A.shape
    assert torch.equal(result, bnb_dequantize(theirs, bnb_state))
    assert torch.equal(dequantize_4bit(theirs, QuantState.from_bnb(bnb_state)), result)
    assert torch.equal(bnb_dequantize(ours, state.to_bnb()), result)


@settings(max_examples=120, deadline=None)
@given(**TENSORS)
def test_double_quantization_against_bitsandbytes(
    shape, dtype, quant_type, blocksize, seed, outlier
):
    A = make_tensor(shape, dtype, seed, outlier, zero_block=False)
    kw = dict(blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    ours, state = quantize_4bit(A, **kw)
    theirs, bnb_state = bnb.quantize_4bit(A, **kw)
    assert torch.equal(ours, theirs)
    assert torch.equal(state.offset, bnb_state.offset)
    assert torch.equal(state.state2.absmax, bnb_state.state2.absmax)
    assert torch.equal(state.state2.code, bnb_state.state2.code)
    assert torch.equal(state.absmax, bnb_state.absmax)  # the 8-bit codes of the absmax
    assert torch.equal(dequantize_absmax(state), dequantize_absmax(QuantState.from_bnb(bnb_state)))
    # Dequantization is exact both ways, whichever side quantized.
    assert torch.equal(
        dequantize_4bit(theirs, QuantState.from_bnb(bnb_state)), bnb_dequantize(theirs, bnb_state)
    )
    assert torch.equal(bnb_dequantize(ours, state.to_bnb()), dequantize_4bit(ours, state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("chunk", [None, 3])
def test_chunks_of_blocks_join_up(dtype, blocksize, chunk, monkeypatch):
    """Both directions work through the tensor a chunk of whole blocks at a time: a tensor of
    several chunks, ending in a partial block, is still bit-identical to bitsandbytes. ``chunk``
    shrinks the chunks to a few blocks, so that a small tensor spans hundreds of them."""
    import qlora_edu.quantize

    n = 1_050_017
    if chunk is not None:
        monkeypatch.setattr(qlora_edu.quantize, "CHUNK", chunk * blocksize)
        n = 100 * blocksize + 17
    A = make_tensor((n,), dtype, seed=3, outlier=True, zero_block=True)
    kw = dict(blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    ours, state = quantize_4bit(A, **kw)
    theirs, bnb_state = bnb.quantize_4bit(A, **kw)
    assert torch.equal(ours, theirs) and torch.equal(state.absmax, bnb_state.absmax)
    assert torch.equal(dequantize_4bit(ours, state), bnb_dequantize(theirs, bnb_state))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    scale=st.sampled_from([1e-4, 1e-2, 1.0, 100.0]),
    zeros=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_8bit_table_search_equals_bitsandbytes_cpu_kernel(n, scale, zeros, seed):
    A = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    if zeros:
        A[: min(n, 300)] = 0
    codes, absmax = quantize_blockwise(A, DYNAMIC_CODE, 256, search="table")
    theirs, state = bnb.quantize_blockwise(A, blocksize=256)
    assert torch.equal(codes, theirs)
    assert torch.equal(absmax, state.absmax)


def test_table_search_differs_from_nearest_only_next_to_midpoints():
    A = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    table, absmax = quantize_blockwise(A, DYNAMIC_CODE, 256, search="table")
    nearest, _ = quantize_blockwise(A, DYNAMIC_CODE, 256, search="nearest")
    differ = table != nearest
    assert 0 < int(differ.sum()) < A.numel() // 500
    assert torch.all((table.long() - nearest.long())[differ].abs() == 1)
    scaled = A / absmax.repeat_interleave(256)[: A.numel()]
    midpoints = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2
    gap = (scaled[differ, None] - midpoints).abs().amin(dim=1)
    assert torch.all(gap <= 1 / 65535)  # within half a table step of a midpoint


def test_double_quantization_stores_4_127_bits_per_parameter():
    A = torch.randn(4096, 4096)
    single = bits_per_parameter(*quantize_4bit(A, compress_statistics=False))
    double = bits_per_parameter(*quantize_4bit(A, compress_statistics=True))
    assert single == 4.5
    assert double == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)  # + the offset
    assert round(double, 3) == 4.127


def test_nf4_error_is_bounded_by_half_the_widest_gap():
    A = torch.randn(1000, 64)
    packed, state = quantize_4bit(A, compress_statistics=False)
    error = (dequantize_4bit(packed, state) - A).abs()
    widest = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    assert torch.all(error <= widest * state.absmax.view(-1, 1) + 1e-6)


@pytest.mark.parametrize("bad,count,first", [((3, 5), 1, (3, 5)), ((0, 1), 2, (0, 1))])
def test_nan_and_inf_are_refused_with_count_and_first_index(bad, count, first):
    A = torch.randn(8, 16)
    A[bad] = float("nan")
    if count == 2:
        A[6, 2] = float("inf")
    with pytest.raises(ValueError, match=rf"{count} NaN.*index \({first[0]}, {first[1]}\)"):
        quantize_4bit(A)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_dtypes_are_refused(dtype):
    with pytest.raises(TypeError, match="supported dtypes"):
        quantize_4bit(torch.zeros(64, dtype=dtype))


def test_unsupported_blocksize_lists_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported blocksize 100; supported: 32, 64"):
        quantize_4bit(torch.randn(256), blocksize=100)


def test_a_packed_tensor_that_does_not_match_its_state_is_refused():
    packed, state = quantize_4bit(torch.randn(256))
    with pytest.raises(ValueError, match="needs 128"):
        dequantize_4bit(packed[:100], state)


@pytest.mark.parametrize("compress", [True, False])
def test_empty_tensor_round_trips(compress):
    A = torch.empty(0, 8)
    packed, state = quantize_4bit(A, compress_statistics=compress)
    assert packed.numel() == 0 and state.absmax.numel() == 0
    out = dequantize_4bit(packed, state)
    assert out.shape == A.shape and out.dtype == A.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_needs_at_most_3x_the_input_in_extra_memory(dtype):
    # Measured in a fresh process: the peak resident size during quantize_4bit, above what the
    # process held just before, must stay within 3x the input's bytes.
    import subprocess
    import sys

    script = f"""
import resource, torch
from qlora_edu import quantize_4bit
quantize_4bit(torch.randn(4096), compress_statistics=True)  # load everything once
A = torch.randn(4096, 4096).to({dtype})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
packed, state = quantize_4bit(A)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (A.numel() * A.element_size()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) <= 3.0


def test_int4_is_a_quant_type_of_ours_but_not_of_bitsandbytes():
    from qlora_edu import quantize_roundtrip

    A = torch.randn(64, 192)
    packed, state = quantize_4bit(A, quant_type="int4", compress_statistics=False)
    assert torch.equal(dequantize_4bit(packed, state), quantize_roundtrip(A, "int4"))
    with pytest.raises(ValueError, match="bitsandbytes has no quant_type 'int4'"):
        state.to_bnb()


# Edge cases from bitsandbytes' own test suite: tiny and huge values, zeros, meta tensors,
# tensors that require grad, and arguments of the wrong type.

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_same_bits(ours, theirs):
    """Bit for bit (so -0.0 differs from 0.0). One exception, a property of the CPU: bitsandbytes'
    AVX-512 loop on a CPU with AVX512-BF16 flushes subnormal bfloat16 results to zero."""
    ours, theirs = ours.reshape(-1), theirs.reshape(-1)
    flushed = torch.where(ours.float().abs() < torch.finfo(torch.float32).tiny, ours * 0, ours)
    same = [torch.equal(o.view(BITS[o.dtype]), theirs.view(BITS[o.dtype])) for o in (ours, flushed)]
    assert same[0] or (ours.dtype == torch.bfloat16 and same[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.0, 1e-40, 5e-39, 2e-38])
@pytest.mark.parametrize("n", [64, 32, 96])  # a whole block, a partial one, both
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tiny_blocks_are_stored_as_bitsandbytes_stores_them(dtype, value, n, quant_type):
    A = torch.full((n,), value).to(dtype)
    A[::3] *= -1
    if n == 96:
        A[:64] = torch.linspace(-1, 1, 64)
    kw = dict(blocksize=64, quant_type=quant_type, compress_statistics=False)
    ours, state = quantize_4bit(A, **kw)
    theirs, bnb_state = bnb.quantize_4bit(A, **kw)
    assert torch.equal(ours, theirs)
    assert torch.equal(state.absmax.view(torch.int32), bnb_state.absmax.view(torch.int32))
    # The rule: a final partial block stores max(absmax, 1e-38); a whole block its true absmax.
    true_absmax = A[-(n % 64 or 64) :].float().abs().max()
    expected = true_absmax.clamp(min=1e-38) if n % 64 else true_absmax
    assert torch.equal(state.absmax[-1], expected)
    assert_same_bits(dequantize_4bit(ours, state), bnb_dequantize(theirs, bnb_state))


@pytest.mark.parametrize(
    "dtype,scale", [(torch.float32, 1e-40), (torch.bfloat16, 1e-39), (torch.float32, 3e-39)]
)
def test_subnormal_blocks_double_quantize_as_bitsandbytes(dtype, scale):
    A = (torch.randn(64 * 300, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)
    A[:64] = 0  # one block equal to... nothing: its absmax is 0
    kw = dict(blocksize=64, quant_type="nf4", compress_statistics=True)
    ours, state = quantize_4bit(A, **kw)
    theirs, bnb_state = bnb.quantize_4bit(A, **kw)
    assert torch.equal(ours, theirs)
    assert torch.equal(state.offset, bnb_state.offset)
    assert torch.equal(state.state2.absmax, bnb_state.state2.absmax)
    assert torch.equal(state.absmax, bnb_state.absmax)
    theirs_absmax = bnb.dequantize_blockwise(bnb_state.absmax, bnb_state.state2) + bnb_state.offset
    assert torch.equal(dequantize_absmax(state), theirs_absmax)
    assert_same_bits(dequantize_4bit(ours, state), bnb_dequantize(theirs, bnb_state))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 1000),
    scale=st.sampled_from([1e-45, 1e-41, 1e-40, 2.9e-39, 3e-39, 1e-38, 1e-37]),
    zeros=st.integers(0, 300),
    seed=st.integers(0, 10_000),
)
def test_8bit_table_search_on_subnormal_blocks_equals_bitsandbytes(n, scale, zeros, seed):
    A = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    A[seed % n : seed % n + zeros] = 0
    codes, absmax = quantize_blockwise(A, DYNAMIC_CODE, 256, search="table")
    theirs, state = bnb.quantize_blockwise(A, blocksize=256)
    assert torch.equal(codes, theirs)
    assert torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("dtype,value", [(torch.float32, 3e38), (torch.bfloat16, 1e38)])
def test_absmax_near_the_float32_maximum(dtype, value):
    A = torch.randn(64 * 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    A[::64] = value
    # Root cause: the offset, the float32 mean of the absmax values, overflows; bitsandbytes
    # returns NaN. We refuse, naming the value and the limit.
    assert bnb.quantize_4bit(A, quant_type="nf4", compress_statistics=True)[1].offset.isinf()
    message = r"as large as [0-9.]+e\+3[78]: .*largest value, 3\.4e\+38"
    with pytest.raises(ValueError, match=message):
        quantize_4bit(A, compress_statistics=True)
    # Without double quantization, or while the sum stays finite, it is exact.
    one_huge_block = A[:128].clone()
    one_huge_block[64] = 1.0
    for B, compress in ((A, False), (one_huge_block, True)):
        kw = dict(blocksize=64, quant_type="nf4", compress_statistics=compress)
        ours, state = quantize_4bit(B, **kw)
        theirs, bnb_state = bnb.quantize_4bit(B, **kw)
        assert torch.equal(ours, theirs) and torch.equal(state.absmax, bnb_state.absmax)
        assert torch.equal(dequantize_4bit(ours, state), bnb_dequantize(theirs, bnb_state))
        assert torch.isfinite(dequantize_4bit(ours, state)).all()


def test_fp4_zeros_get_bitsandbytes_codes_and_a_plus_zero():
    """bitsandbytes' kernels disagree on the sign of FP4 code 8, which its CPU quantizer gives tiny
    positive values: -0.0 from its scalar C++ loop (14 values), +0.0 from its Python fallback (13
    values, an odd row). We keep its code book's +0.0 (see ``create_fp4_map``)."""
    values = [1.0, 0.0, -0.0, 1e-4, -1e-4, 0.0026, -0.0026, 0.5, 0.0, -0.0, 1e-6, -1e-6, 0.0, 0.0]
    for n, bnb_sign in ((14, True), (13, False)):
        for dtype in DTYPES:
            A = torch.tensor(values[:n]).to(dtype)
            kw = dict(blocksize=64, quant_type="fp4", compress_statistics=False)
            ours, state = quantize_4bit(A, **kw)
            theirs, bnb_state = bnb.quantize_4bit(A, **kw)
            assert torch.equal(ours, theirs)
            assert unpack_4bit(ours, n)[3].item() == 8  # a tiny positive value: code 8
            result, reference = dequantize_4bit(ours, state), bnb_dequantize(theirs, bnb_state)
            assert torch.equal(result, reference)  # equal values
            assert not torch.signbit(result[result == 0]).any()  # all +0.0
            assert torch.signbit(reference[3]).item() == bnb_sign
    assert torch.signbit(FP4_CODE).tolist() == [False] * 9 + [True] * 7


@pytest.mark.parametrize("compress", [False, True])
def test_a_tensor_that_requires_grad_quantizes_and_dequantizes_without_a_graph(compress):
    weight = torch.nn.Parameter(torch.randn(32, 64))
    packed, state = quantize_4bit(weight, compress_statistics=compress)
    assert not any(t.requires_grad for t in (packed, state.absmax, state.code))
    result = dequantize_4bit(packed, state)
    plain = dequantize_4bit(*quantize_4bit(weight.detach(), compress_statistics=compress))
    assert not result.requires_grad and torch.equal(result, plain)
    # A state whose float tensors require grad (made elsewhere) dequantizes too, without a graph.
    if compress:
        state.offset = state.offset.clone().requires_grad_(True)
    else:
        state.absmax = state.absmax.clone().requires_grad_(True)
    assert not dequantize_4bit(packed, state).requires_grad
    # (bitsandbytes' result would require grad, through a function without a derivative.)


@pytest.mark.parametrize(
    "blocksize,error,message",
    [
        (64.0, TypeError, "blocksize must be an integer such as 64, got float 64.0"),
        (True, TypeError, "blocksize must be an integer such as 64, got bool True"),
        ("64", TypeError, "blocksize must be an integer such as 64, got str '64'"),
        (65, ValueError, "unsupported blocksize 65"),
    ],
)
def test_a_blocksize_of_the_wrong_type_is_named(blocksize, error, message):
    from qlora_edu import quantize_roundtrip

    with pytest.raises(error, match=message):
        quantize_4bit(torch.randn(256), blocksize=blocksize)
    with pytest.raises(error, match=message):
        quantize_roundtrip(torch.randn(256), blocksize=blocksize)


def test_a_numpy_integer_blocksize_is_accepted():
    import numpy as np

    A = torch.randn(300)
    packed, state = quantize_4bit(A, blocksize=np.int64(128))
    assert type(state.blocksize) is int and state.blocksize == 128
    assert torch.equal(packed, quantize_4bit(A, blocksize=128)[0])


@pytest.mark.parametrize("shape", [(128, 64), (3, 5), (7,), (0, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", [False, True])
def test_meta_tensors_give_bitsandbytes_shapes_and_dtypes(shape, dtype, compress):
    A = torch.empty(shape, dtype=dtype, device="meta")
    ours, state = quantize_4bit(A, compress_statistics=compress)
    theirs, bnb_state = bnb.quantize_4bit(A, quant_type="nf4", compress_statistics=compress)

    def described(*tensors):
        return [None if t is None else (t.shape, t.dtype, t.device.type) for t in tensors]

    def state_tensors(s):
        nested = (s.state2.absmax, s.state2.code) if s.state2 is not None else (None, None)
        return (s.absmax, s.code, s.offset, *nested)

    assert described(ours, *state_tensors(state)) == described(theirs, *state_tensors(bnb_state))
    assert (state.shape, state.dtype, state.blocksize) == (
        bnb_state.shape,
        bnb_state.dtype,
        bnb_state.blocksize,
    )
    if A.numel():  # bitsandbytes cannot dequantize an empty tensor
        assert described(dequantize_4bit(ours, state)) == described(
            bnb.dequantize_4bit(theirs, bnb_state)
        )
    assert described(dequantize_4bit(ours, state)) == described(torch.empty_like(A))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 300),
    blocksize=st.sampled_from([32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_chapter_2_blockwise_int4_is_the_int4_code_book(rows, cols, blocksize, seed):
    """Chapter 2's plain blockwise absmax round trip and Chapter 3's code-book one agree."""
    from qlora_edu.basics import blockwise_absmax_roundtrip
    from qlora_edu.quantize import quantize_roundtrip

    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    ours = blockwise_absmax_roundtrip(x, bits=4, blocksize=blocksize)
    theirs = quantize_roundtrip(x, "int4", blocksize)
    # the two may round a value within float rounding of a midpoint between levels differently
    flat = torch.nn.functional.pad(x.flatten(), (0, (-x.numel()) % blocksize)).view(-1, blocksize)
    scaled = 7 * flat / flat.abs().amax(1, keepdim=True)
    tie = ((scaled - scaled.floor() - 0.5).abs() < 1e-4).flatten()[: x.numel()].view(x.shape)
    torch.testing.assert_close(ours[~tie], theirs[~tie])
    zeros = torch.zeros(2, blocksize)
    assert torch.equal(blockwise_absmax_roundtrip(zeros, 4, blocksize), zeros)


def test_chapter_2_blockwise_round_trip_names_bad_input():
    from qlora_edu.basics import blockwise_absmax_roundtrip

    with pytest.raises(ValueError, match="blocksize"):
        blockwise_absmax_roundtrip(torch.ones(8), 4, 0)
    with pytest.raises(ValueError, match="bits"):
        blockwise_absmax_roundtrip(torch.ones(8), 1, 8)
