# Written in notebooks/12_fast_kernels.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""Dequantization in one pass that writes each output value once (Chapter 12).

Two versions of the same formula, ``code[nibble] * scale`` rounded once to the output dtype: one
that ``torch.compile`` generates from PyTorch code, and one written by hand in C++ with a vector
table lookup (``dequantize_4bit_kernel``), which :func:`qlora_edu.quantize.dequantize_4bit` uses on
CPUs with AVX2 or AVX-512 when a C++ compiler is found. Both give the same bits as the plain path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from qlora_edu.double_quant import dequantize_absmax
from qlora_edu.quantize import QuantState


def dequantize_4bit_formula(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Chapter 3's dequantization written as one expression per output value, for a compiler to
    fuse: output ``j`` of a block reads byte ``j // 2``, shifts it by 4 if ``j`` is even, looks
    the nibble up and multiplies by the block's (doubly dequantized) absmax. Whole blocks only."""
    blocksize = state.blocksize
    data = packed.reshape(-1, blocksize // 2, 1).expand(-1, -1, 2).reshape(-1, blocksize)
    j = torch.arange(blocksize, device=packed.device)
    nibble = (data.int() >> (4 - 4 * (j % 2))) & 15
    scale = (dequantize_absmax(state) if state.nested else state.absmax).view(-1, 1)
    return (state.code[nibble] * scale).to(dtype or state.dtype)


# The same formula by hand, for x86 CPUs: 16 (AVX-512) or 8 (AVX2) values per step, the nibbles
# looked up in the 16-entry code book held in registers, multiplied in float32 and rounded once.
SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

#define NEAREST (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

// float32 to bfloat16, rounded to nearest even as PyTorch's c10::BFloat16 does (a NaN becomes
// 0x7FC0 there and here; PyTorch's vector loops write 0xFFFF; quantize_4bit's states have none)
static inline uint16_t bf16_bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    return x != x ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#ifdef __AVX512F__
#define LANES 16
typedef __m512 vfloat;
typedef __m512 vtable;  // the 16 code book entries fill one register
static inline vtable load_table(const float* code) { return _mm512_loadu_ps(code); }
static inline vfloat broadcast(float x) { return _mm512_set1_ps(x); }
static inline vfloat mul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
// The 16 values of 8 bytes, high nibble first: each byte widened to 64 bits keeps its high nibble
// in the low 32 bits and moves its low nibble to the high 32 bits; then one permute looks all 16
// indices up in the table.
static inline vfloat lookup(const uint8_t* bytes, vtable table) {
    __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i*)bytes));
    __m512i low = _mm512_and_si512(b, _mm512_set1_epi64(15));
    __m512i idx = _mm512_or_si512(_mm512_srli_epi64(b, 4), _mm512_slli_epi64(low, 32));
    return _mm512_permutexvar_ps(idx, table);
}
static inline void store(float* out, vfloat v) { _mm512_storeu_ps(out, v); }
static inline void store(uint16_t* out, vfloat v, int bf16) {
    __m256i half;
    if (bf16) {
        __m512i u = _mm512_castps_si512(v);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        half = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0)));
    } else {
        half = _mm512_cvtps_ph(v, NEAREST);
    }
    _mm256_storeu_si256((__m256i*)out, half);
}
#else
#define LANES 8
typedef __m256 vfloat;
struct vtable { __m256 lo, hi; };  // the 16 code book entries in two registers of 8
static inline vtable load_table(const float* code) {
    return {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)};
}
static inline vfloat broadcast(float x) { return _mm256_set1_ps(x); }
static inline vfloat mul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
// The 8 values of 4 bytes, as above; AVX2 permutes within 8 entries, so both halves of the table
// are permuted and bit 3 of each index (moved to the sign bit) chooses between them.
static inline vfloat lookup(const uint8_t* bytes, vtable t) {
    int32_t four;
    __builtin_memcpy(&four, bytes, 4);
    __m256i b = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
    __m256i low = _mm256_and_si256(b, _mm256_set1_epi64x(15));
    __m256i idx = _mm256_or_si256(_mm256_srli_epi64(b, 4), _mm256_slli_epi64(low, 32));
    __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx), hi = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(lo, hi, upper);
}
static inline void store(float* out, vfloat v) { _mm256_storeu_ps(out, v); }
static inline void store(uint16_t* out, vfloat v, int bf16) {
    __m128i half;
    if (bf16) {
        __m256i u = _mm256_castps_si256(v);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        half = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else {
        half = _mm256_cvtps_ph(v, NEAREST);
    }
    _mm_storeu_si128((__m128i*)out, half);
}
#endif

// out[i] = code[nibble i] * scale of its block, rounded once to the output type (kind: 0 float32,
// 1 float16, 2 bfloat16). With double quantization (codes8 given) the scale of block b is
// code2[codes8[b]] * absmax2[b / blocksize2] + offset in float32, as dequantize_absmax computes
// it (compiled with -ffp-contract=off, so that no multiply and add are fused into one rounding).
extern "C" void dequantize_4bit(const uint8_t* packed, int64_t n, int64_t blocksize,
                                const float* code, const float* absmax, const uint8_t* codes8,
                                const float* code2, const float* absmax2, int64_t blocksize2,
                                float offset, int kind, void* out, int threads) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    vtable table = load_table(code);
    #pragma omp parallel for num_threads(threads) if (n >= 1 << 16)
    for (int64_t b = 0; b < blocks; b++) {
        float scale = codes8 ? code2[codes8[b]] * absmax2[b / blocksize2] + offset : absmax[b];
        vfloat s = broadcast(scale);
        int64_t i = b * blocksize, end = i + blocksize < n ? i + blocksize : n;
        for (; i + LANES <= end; i += LANES) {  // blocks hold a multiple of 16 values
            vfloat v = mul(lookup(packed + i / 2, table), s);
            if (kind == 0) store((float*)out + i, v);
            else store((uint16_t*)out + i, v, kind == 2);
        }
        for (; i < end; i++) {  // the rest of a final partial block, one value at a time
            float v = code[i % 2 ? packed[i / 2] & 15 : packed[i / 2] >> 4] * scale;
            if (kind == 0) ((float*)out)[i] = v;
            else if (kind == 2) ((uint16_t*)out)[i] = bf16_bits(v);
            else ((uint16_t*)out)[i] = _cvtss_sh(v, NEAREST);
        }
    }
}
"""


FLAGS = {"avx512": ["-mavx512f", "-mavx2", "-mf16c"], "avx2": ["-mavx2", "-mf16c"]}
OUTPUT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def build_kernel(isa: str, folder: Path | None = None) -> ctypes.CDLL:
    """Compile :data:`SOURCE` for ``isa`` ("avx512" or "avx2") and load it. The library is named by
    a hash of the source and flags and kept in ``folder`` (default ``~/.cache/qlora_edu``), so a
    machine compiles it once, whatever the shapes it is used for."""
    compiler = os.environ.get("CXX", "g++")
    command = [compiler, "-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", *FLAGS[isa]]
    folder = folder or Path.home() / ".cache" / "qlora_edu"
    name = hashlib.sha256(" ".join([SOURCE, *command]).encode()).hexdigest()[:16]
    library = folder / f"dequantize_4bit_{isa}_{name}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        source, partial = (library.with_suffix(f".{os.getpid()}{x}") for x in (".cpp", ".tmp"))
        source.write_text(SOURCE)
        try:  # each process writes its own files, and renames: processes may race here
            command += [str(source), "-o", str(partial)]
            subprocess.run(command, check=True, capture_output=True)
            os.replace(partial, library)
        finally:
            source.unlink()
    return ctypes.CDLL(str(library))


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel for this CPU, or None (with one warning that says why) where there is
    none: not x86, no AVX2 (ATEN_CPU_CAPABILITY is followed), or no working C++ compiler."""
    isa = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())
    if platform.machine().lower() not in ("x86_64", "amd64") or isa is None:
        reason = f"needs an x86 CPU with AVX2, this is {platform.machine()} with " + (
            torch.backends.cpu.get_cpu_capability()
        )
    elif shutil.which(os.environ.get("CXX", "g++")) is None:
        reason = f"no C++ compiler {os.environ.get('CXX', 'g++')!r} found"
    else:
        try:
            return build_kernel(isa)
        except (OSError, subprocess.CalledProcessError) as error:
            reason = f"it did not compile: {getattr(error, 'stderr', b'').decode()[-300:] or error}"
    warnings.warn(
        f"qlora_edu: no fused 4-bit kernel ({reason}); using the plain PyTorch path",
        stacklevel=3,
    )
    return None


ENABLED = True  # dequantize_4bit uses the kernel where there is one; `disabled()` turns it off


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block, :func:`qlora_edu.quantize.dequantize_4bit` takes the plain PyTorch path
    (Chapter 3's): to compare the two, or to time them."""
    global ENABLED
    ENABLED, before = False, ENABLED
    try:
        yield
    finally:
        ENABLED = before


def _pointer(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def dequantize_4bit_kernel(
    packed: torch.Tensor, state: QuantState, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """:func:`qlora_edu.quantize.dequantize_4bit` in one pass of the compiled kernel, for CPU
    tensors, into ``out`` if given (contiguous, of the state's shape and dtype); None where there
    is no kernel. The caller has checked the sizes."""
    lib = kernel() if ENABLED else None
    if lib is None:
        return None
    if out is None:
        out = torch.empty(state.shape, dtype=state.dtype)
    elif not (out.is_contiguous() and out.shape == state.shape and out.dtype == state.dtype):
        raise ValueError(
            f"out must be a contiguous {state.dtype} tensor of shape {tuple(state.shape)}, got "
            f"{out.dtype} {tuple(out.shape)}" + ("" if out.is_contiguous() else " (not contiguous)")
        )
    code = torch.zeros(16)  # INT4's code book has 15 entries
    code[: state.code.numel()] = state.code
    data = packed.contiguous().view(-1).view(torch.uint8)
    absmax = state.absmax.contiguous()
    if state.nested:
        nested = state.state2
        scales = (None, absmax, nested.code.float(), nested.absmax.float().contiguous())
        nested_blocksize, offset = nested.blocksize, float(state.offset)
    else:
        scales, nested_blocksize, offset = (absmax.float(), None, None, None), 1, 0.0
    lib.dequantize_4bit(
        _pointer(data), ctypes.c_int64(out.numel()), ctypes.c_int64(state.blocksize),
        _pointer(code), *map(_pointer, scales), ctypes.c_int64(nested_blocksize),
        ctypes.c_float(offset), ctypes.c_int(OUTPUT_KINDS[state.dtype]), _pointer(out),
        ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    return out
