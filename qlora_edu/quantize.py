# Written in notebooks/03_nf4.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""Blockwise absmax quantization against any code book, and 4-bit packing (Chapters 2 and 3).

``quantize_4bit`` and ``dequantize_4bit`` mirror bitsandbytes' functions of the same names and give
the same bytes: the tensor is flattened, cut into blocks of ``blocksize`` values, each block is
divided by its absmax (its largest absolute value) so it lies in [-1, 1], and every value is
replaced by the index of the nearest code book entry. Two 4-bit indices share a byte, the first in
the high nibble. Double quantization of the absmax values lives in :mod:`qlora_edu.double_quant`.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import bitsandbytes.functional

from qlora_edu.codebooks import DYNAMIC_CODE, FP4_CODE, INT4_CODE, NF4_CODE

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# "int4" (symmetric integers, 15 levels) is no bitsandbytes type: the book's baseline (Chapter 8).
QUANT_TYPES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}
CHUNK = 1 << 20  # values quantized at a time: bounds the extra memory to a few MB
TABLE_SIZE = 1 << 16  # points of the lookup table of the "table" search
TINY = 1e-38  # bitsandbytes' 4-bit kernel scales by at most 1 / TINY (see quantize_blockwise)
# How each bitsandbytes CPU kernel finds a code (quantize_blockwise's `search`), for the 4-bit codes
# and for double quantization's 8-bit ones. They agree except for values within float rounding of
# the midpoint between two codes, and for blocks of zeros (Chapters 3 and 4 count the differences).
KERNELS = {
    "cpu": ("nearest", "table"),  # bitsandbytes >= 0.50 on a CPU
    "cpu-0.49": ("argmin", "argmin"),  # bitsandbytes 0.49.x on a CPU
    "cuda": ("cuda", "cuda"),  # bitsandbytes' CUDA kernels (csrc/kernels.cu, 0.50)
}


def _float32_bits(words: list[int]) -> torch.Tensor:
    """float32 values given by their bit patterns."""
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


# bitsandbytes' CUDA kernels pick a 4-bit code by a tree of comparisons `x > T`, with constants
# written in csrc/kernels.cu (dQuantizeNF4, dQuantizeFP4); the tree amounts to counting the
# constants below x. NF4's are the midpoints between its levels, as the compiler rounds their
# decimals to float32 (four are a float32 step from the CPU's midpoint (a + b) / 2). FP4's compare
# |x| with decimals typed to a few digits: 0.00260417f and 0.583333f are 14 and 5.5 float32 steps
# away from the midpoints they stand for. Bit patterns checked against the compiled kernels.
NF4_CUDA_THRESHOLDS = _float32_bits([
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
    0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9,
])  # fmt: skip  # -0.8480964004993439f ... 0.8614784181118011f
# 0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f:
FP4_CUDA_THRESHOLDS = _float32_bits([
    0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555,
])  # fmt: skip
# FP4's code (without its sign bit) for each number of thresholds below |x|: the bit patterns of
# the levels 0, 0.0052, 0.1667, 0.25, 0.3333, 0.5, 0.6667, 1 in FP4_CODE's order.
FP4_CUDA_CODES = torch.tensor([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011])
# bitsandbytes 0.49's CPU kernel searched FP4 against its values typed to four decimals (0.0052 for
# 1/192, 0.6667 for 2/3, ...), though it stores and dequantizes with the exact ones.
FP4_CODE_049 = torch.tensor([round(v, 4) for v in FP4_CODE.tolist()])
# Its 8-bit C++ kernel set the dynamic map's first entry, -0.99297, to -1.0 (in place, before
# searching it), and stored that map with the codes.
DYNAMIC_CODE_049 = torch.cat([torch.tensor([-1.0]), DYNAMIC_CODE[1:]])


def check_blocksize(blocksize: int) -> int:
    """``blocksize`` as a Python int, or an error that names it. Integer types such as NumPy's
    are accepted; a float (even 64.0), a bool, or a size bitsandbytes does not support are not."""
    try:
        if isinstance(blocksize, bool):
            raise TypeError
        blocksize = operator.index(blocksize)
    except TypeError:
        raise TypeError(
            f"blocksize must be an integer such as 64, got {type(blocksize).__name__} {blocksize!r}"
        ) from None
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"unsupported blocksize {blocksize}; supported: "
            + ", ".join(map(str, SUPPORTED_BLOCKSIZES))
        )
    return blocksize


def check_input(A: torch.Tensor, blocksize: int) -> int:
    """Refuse what cannot be quantized, naming the problem; return ``blocksize`` as a Python int.

    A ``meta`` tensor has a shape and a dtype but no values, so its values are not checked.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"cannot quantize a {A.dtype} tensor; supported dtypes: {names}")
    blocksize = check_blocksize(blocksize)
    if A.is_meta:
        return blocksize
    bad = ~torch.isfinite(A.detach())
    if bad.any():
        count = int(bad.sum())
        first = tuple(int(i) for i in torch.unravel_index(bad.reshape(-1).nonzero()[0, 0], A.shape))
        kinds = "NaN" if A[bad].isnan().all() else "NaN or Inf"
        raise ValueError(
            f"cannot quantize: {count} {kinds} value(s), the first at index {first}; "
            "bitsandbytes would silently turn their whole blocks into NaN"
        )
    return blocksize


def _table(midpoints: torch.Tensor) -> torch.Tensor:
    """For 65,536 evenly spaced points of [-1, 1], the index of the code book entry nearest each."""
    i = torch.arange(TABLE_SIZE, dtype=torch.float32, device=midpoints.device)
    return torch.bucketize((i + i) / (TABLE_SIZE - 1) - 1.0, midpoints)


def flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """float32 values below the smallest normal (1.2e-38) as zero, as a ``--use_fast_math`` kernel
    computes them."""
    return torch.where(x.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(x), x)


def cuda_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The codes bitsandbytes' CUDA kernels give scaled values ``x`` (csrc/kernels.cu).

    NF4: the number of :data:`NF4_CUDA_THRESHOLDS` below ``x`` (the tree of ``x > T``: a value
    equal to a threshold gets the lower code). FP4: the sign bit (8) when ``x < 0``, so that tiny
    negative values get FP4's "negative zero", and the code of ``|x|`` by
    :data:`FP4_CUDA_THRESHOLDS`. The 8-bit dynamic map (256 sorted entries): the nearest entry by
    a binary search, split at the float32 midpoints ``(a + b) * 0.5``; a value exactly on a
    midpoint gets the entry of even index. A NaN (a block of zeros) gets code 0 in every case, and
    a subnormal counts as zero, as the kernels' comparisons do.
    """
    x = flush_subnormals(x)
    if code.numel() == 16 and torch.equal(code.cpu(), NF4_CODE):
        found = torch.bucketize(x, NF4_CUDA_THRESHOLDS.to(x.device))
    elif code.numel() == 16 and torch.equal(code.cpu(), FP4_CODE):
        magnitude = torch.bucketize(x.abs(), FP4_CUDA_THRESHOLDS.to(x.device))
        found = FP4_CUDA_CODES.to(x.device)[magnitude.clamp(max=7)] + 8 * (x < 0)
    elif code.numel() == 256 and bool((code[1:] > code[:-1]).all()):
        midpoints = ((code[1:] + code[:-1]) * 0.5).to(x.device)
        found = torch.bucketize(x, midpoints)  # on a midpoint: the lower entry, k
        on_midpoint = found.lt(255) & (x == midpoints[found.clamp(max=254)])
        found = found + (on_midpoint & (found % 2 == 1))  # ... but the even one of k and k + 1
    else:
        raise ValueError("bitsandbytes' CUDA kernels quantize to NF4, FP4 or the 8-bit dynamic map")
    return torch.where(x.isnan(), 0, found)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, search: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of ``A`` against any code book.

    Returns ``(indices, absmax)``: for every value (flattened) the index of a ``code`` entry after
    scaling its block by 1/absmax, and one float32 absmax per block (a final partial block gets its
    own). How the entry is found, mirroring the two kernels of bitsandbytes:

    - ``"nearest"`` (its 4-bit kernel): ``torch.bucketize`` on the midpoints between neighbouring
      entries of the sorted code book: the nearest entry (a value on a midpoint goes down).
    - ``"table"`` (its 8-bit CPU kernel): a table of the nearest entry for 65,536 evenly spaced
      points of [-1, 1], read at the point nearest the value. Faster, but a value within half a
      table step (1.5e-5) of a midpoint can get the neighbouring entry.
    - ``"argmin"`` (bitsandbytes 0.49's CPU kernels, 4 and 8 bits): the entry at the smallest
      distance ``|value - entry|``, the first in the code book's order on a tie. The plain rule:
      it agrees with ``"nearest"`` except where the float32 distances round differently from the
      comparison with a midpoint, and on zeros of FP4, which has two zero entries.
    - ``"cuda"`` (bitsandbytes' CUDA kernels, for NF4, FP4 and the 256-entry dynamic map): see
      :func:`cuda_codes`. Subnormal values count as zero, as the kernels are compiled with
      ``--use_fast_math``. The GPU's reciprocal of absmax is approximate (within a float32 step);
      ours is exact, so a value within a step of a threshold can get the neighbouring code.

    Tiny blocks, where the kernels differ and we follow each. 1/absmax overflows float32 (to
    inf) when absmax is below 2.9e-39, and an all-zero block would give 0 * inf = NaN.

    - ``"nearest"`` scales by 1/max(absmax, ``TINY`` = 1e-38), which stays finite. It stores the
      true absmax of whole blocks (0 for an all-zero block), but max(absmax, 1e-38) for a final
      partial block, which it divides by instead of multiplying. So a whole block of 5e-39 is
      scaled as if its absmax were 1e-38 and comes back at about half its size; a partial one
      comes back right.
    - ``"table"`` scales by 1/absmax unclamped, and stores it. Below 2.9e-39 every nonzero value
      lands on the first or last entry (+-inf clamped to +-1); a zero becomes NaN, which the kernel
      converts to table point 0 (in C++ an undefined conversion; 0 on the machines we tried), so
      it gets entry 0, as does every value of an all-zero block.
    - ``"argmin"`` scales by 1/absmax unclamped and stores it; a final partial block of a float16
      or bfloat16 tensor is scaled in that dtype (a 0-dim scale does not promote it). A NaN
      (every value of an all-zero block) is at NaN distance from every entry and gets entry 0,
      as ``torch.argmin`` decides.

    The work is done ``CHUNK`` values at a time, so no (values x 16) distance matrix and no
    full-size float32 copy is ever made. ``A`` may require grad (its values are read, no graph is
    built) or be on the ``meta`` device (the results then have shapes but no values).
    """
    code = code.detach().cpu()  # a few values: sorted here, then moved to A's device
    sorted_code, order = torch.sort(code, stable=True)
    is_sorted = torch.equal(order, torch.arange(code.numel()))
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    table = _table(midpoints).to(A.device) if search == "table" else None
    midpoints, order = midpoints.to(A.device), order.to(A.device)
    flat = A.detach().reshape(-1)
    n = flat.numel()
    indices = torch.empty(n, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=A.device)
    if search not in ("nearest", "table", "argmin", "cuda"):
        raise ValueError(
            f"unknown search {search!r}; expected 'nearest', 'table', 'argmin' or 'cuda'"
        )
    # argmin holds a (values x entries) distance matrix: fewer values at a time for more entries
    values = CHUNK if search != "argmin" else CHUNK * 16 // code.numel()
    step = max(values // blocksize, 1) * blocksize
    for start in range(0, n, step):
        chunk = flat[start : start + step].float()
        tail = chunk.numel() % blocksize
        blocks = torch.nn.functional.pad(chunk, (0, (-tail) % blocksize)).view(-1, blocksize)
        if search == "cuda":
            blocks = flush_subnormals(blocks)
        block_max = blocks.abs().amax(dim=1)
        if search == "cuda":  # 1/absmax unguarded: a block of zeros gives NaN, hence code 0
            scaled = flush_subnormals(blocks * flush_subnormals(1.0 / block_max).unsqueeze(1))
        elif search == "nearest":
            scale = block_max.clamp(min=TINY)
            scaled = blocks * (1.0 / scale).unsqueeze(1)
            if tail:  # a final partial block is divided by its clamped absmax, which is stored
                # (dividing and multiplying by the reciprocal can differ in the last bit)
                scaled[-1, :tail] = chunk[-tail:] / scale[-1]
                block_max[-1] = scale[-1]
        else:
            scaled = blocks * (1.0 / block_max).unsqueeze(1)
            if tail and search == "argmin":  # 0.49 scaled a final partial block in A's dtype
                end = start + chunk.numel()
                scaled[-1, :tail] = flat[end - tail : end] * (1.0 / block_max[-1])
        scaled = scaled.clamp_(-1, 1).view(-1)[: chunk.numel()]
        if search == "cuda":
            found = cuda_codes(scaled, code)
        elif search == "argmin":
            found = (scaled.unsqueeze(1) - code.to(A.device)).abs().argmin(dim=1)
        elif table is None:
            found = torch.bucketize(scaled, midpoints, out_int32=True)
        else:
            scaled = scaled.nan_to_num_(nan=-1.0)  # NaN (0 * inf) reads table point 0
            point = ((scaled + 1.0) * 0.5).double() * (TABLE_SIZE - 1) + 0.5  # as the kernel's fma
            found = table[point.float().long()]
        if not is_sorted and search not in ("argmin", "cuda"):  # FP4's order: bit patterns
            found = order[found]
        indices[start : start + chunk.numel()] = found
        absmax[start // blocksize : start // blocksize + block_max.numel()] = block_max
    return indices, absmax


def dequantize_blockwise(
    indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Undo :func:`quantize_blockwise`: ``code[index] * absmax`` of its block, in float32."""
    values = code.to(indices.device)[indices.reshape(-1).long()]
    n = values.numel()
    pad = (-n) % blocksize
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize)
    return (values * absmax.view(-1, 1)).view(-1)[:n]


def pack_4bit(indices: torch.Tensor, pad_value: int = 0) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble; an odd count is padded.

    Returns a ``(bytes, 1)`` uint8 tensor, the layout of bitsandbytes' packed weights.
    """
    q = indices.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_tensor([pad_value])])
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Undo :func:`pack_4bit`: the first ``numel`` 4-bit indices, as uint8."""
    flat = (
        packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    )
    return torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:numel]


@dataclass
class QuantState:
    """Everything needed to undo a quantization, with bitsandbytes' field names.

    ``absmax`` holds one float32 scale per block, or, when ``state2`` is set (double quantization),
    one uint8 code per block that ``state2`` and ``offset`` turn back into the scale.
    """

    absmax: torch.Tensor
    shape: torch.Size | None
    code: torch.Tensor
    dtype: torch.dtype
    blocksize: int
    quant_type: str | None = None
    offset: torch.Tensor | None = None
    state2: QuantState | None = field(default=None, repr=False)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @classmethod
    def from_bnb(cls, state: bitsandbytes.functional.QuantState) -> QuantState:
        """Convert a ``bitsandbytes.functional.QuantState`` (lossless)."""
        state2 = cls.from_bnb(state.state2) if state.state2 is not None else None
        shape = torch.Size(state.shape) if state.shape is not None else None
        return cls(
            absmax=state.absmax,
            shape=shape,
            code=state.code,
            dtype=state.dtype,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            offset=state.offset,
            state2=state2,
        )

    def to_bnb(self) -> bitsandbytes.functional.QuantState:
        """Convert to a ``bitsandbytes.functional.QuantState`` (lossless)."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        if self.quant_type not in (None, "nf4", "fp4"):
            raise ValueError(f"bitsandbytes has no quant_type {self.quant_type!r}")
        return BnbQuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=self.offset,
            state2=self.state2.to_bnb() if self.state2 is not None else None,
        )


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    kernel: str | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 4 bits in blocks: ``(packed, state)``, byte for byte as bitsandbytes.

    ``kernel`` names the bitsandbytes kernel whose bytes to reproduce (:data:`KERNELS`): "cpu"
    for bitsandbytes >= 0.50 on a CPU, "cpu-0.49" for 0.49.x on a CPU, "cuda" for its CUDA
    kernels. By default it follows ``A``'s device: "cuda" for a CUDA tensor, "cpu" otherwise.

    ``packed`` is a ``(ceil(numel / 2), 1)`` uint8 tensor; ``state`` a :class:`QuantState`.
    With ``compress_statistics`` the absmax values are double-quantized to 8 bits
    (:func:`qlora_edu.double_quant.quantize_absmax`). NaN or Inf raise ValueError, other dtypes
    TypeError. An empty tensor gives an empty ``packed`` and no blocks. ``A`` is not modified; it
    may require grad (the results do not). A ``meta`` tensor gives ``packed`` and a state of the
    right shapes and dtypes, on ``meta``, as bitsandbytes does: how large models are set up
    before their weights are loaded. Unlike bitsandbytes, whose default is FP4, the default here
    is NF4.
    """
    from qlora_edu.double_quant import quantize_absmax

    blocksize = check_input(A, blocksize)
    kernel = kernel or ("cuda" if A.device.type == "cuda" else "cpu")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {list(KERNELS)}")
    search4, search8 = KERNELS[kernel]
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {list(QUANT_TYPES)}")
    code = QUANT_TYPES[quant_type]
    search_code = FP4_CODE_049 if (kernel, quant_type) == ("cpu-0.49", "fp4") else code
    indices, absmax = quantize_blockwise(A, search_code, blocksize, search=search4)
    zero = int(torch.nonzero(code == 0)[0, 0])  # bitsandbytes pads an odd count with a zero value
    if kernel == "cuda" and absmax.numel() and not absmax.is_meta and absmax[-1] == 0:
        zero = 0  # ... which CUDA scales by 1/0 like the rest of an all-zero block: NaN, code 0
    packed = pack_4bit(indices, pad_value=zero)
    state = QuantState(
        absmax=absmax,
        shape=A.shape,
        code=code.to(A.device, copy=True),
        dtype=A.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
    )
    if compress_statistics:
        code8 = DYNAMIC_CODE_049 if kernel == "cpu-0.49" else DYNAMIC_CODE
        state.absmax, state.offset, state.state2 = quantize_absmax(absmax, search8, code8)
    return packed, state


@functools.lru_cache(maxsize=8)
def _byte_table(code_bits: tuple[int, ...]) -> torch.Tensor:
    """The two code values each packed byte stands for, high nibble first, one 8-byte entry per
    byte: the entry is a float64 only as a container of two float32s, so one gather copies both.
    The cache is keyed by the code book's bit patterns, which tell -0.0 from 0.0."""
    bits = torch.tensor(code_bits + (0,) * (16 - len(code_bits)), dtype=torch.int32)  # INT4: 15
    c = bits.view(torch.float32)
    byte = torch.arange(256)
    return torch.stack([c[byte >> 4], c[byte & 0xF]], dim=1).view(torch.float64).view(-1)


@torch.no_grad()
def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Undo :func:`quantize_4bit`: a tensor of the original shape and dtype.

    Each value is ``code[index] * absmax`` of its block, multiplied in float32 and rounded once to
    the dtype, as bitsandbytes does, with the state's code book (so FP4's code 8 is +0.0, see
    :func:`qlora_edu.codebooks.create_fp4_map`). The result never requires grad, whatever the
    state's tensors do. On a CPU, eager mode runs Chapter 12's one-pass kernel
    (:mod:`qlora_edu.fused`) where it can be built, which gives the same bits; the plain path below
    looks up two values per byte in a table. Under ``torch.compile`` (and on ``meta``, where there
    are no values) the same formula is written out plainly, for the compiler to fuse. On a CPU
    with AVX512-BF16, bitsandbytes' AVX-512 loop (rows whose length is a multiple of 16) flushes
    subnormal bfloat16 results (below 1.2e-38) to zero; we keep them, so that the result does not
    depend on the CPU.
    """
    from qlora_edu.double_quant import dequantize_absmax

    numel = math.prod(state.shape)
    if packed.numel() * packed.element_size() != math.ceil(numel / 2):
        raise ValueError(
            f"packed tensor has {packed.numel() * packed.element_size()} bytes, but a state of "
            f"shape {tuple(state.shape)} needs {math.ceil(numel / 2)}"
        )
    blocks = math.ceil(numel / state.blocksize)
    if state.absmax.numel() != blocks:
        raise ValueError(f"state has {state.absmax.numel()} absmax values for {blocks} blocks")
    if torch.compiler.is_compiling() or packed.is_meta:
        absmax = dequantize_absmax(state) if state.nested else state.absmax
        indices = unpack_4bit(packed, numel)
        values = dequantize_blockwise(indices, absmax, state.code, state.blocksize)
        return values.to(state.dtype).view(state.shape)
    if packed.device.type == "cpu":
        from qlora_edu.fused import dequantize_4bit_kernel  # Chapter 12: one pass, the same bits

        out = dequantize_4bit_kernel(packed, state)  # None where there is no kernel
        if out is not None:
            return out
    absmax = dequantize_absmax(state) if state.nested else state.absmax
    table = _byte_table(tuple(state.code.float().view(torch.int32).tolist())).to(packed.device)
    size = state.blocksize * blocks  # a final partial block is filled up, then cut off
    data = packed.reshape(-1).view(torch.uint8)
    if data.numel() < size // 2:
        data = torch.nn.functional.pad(data, (0, size // 2 - data.numel()))
    out = torch.empty(size, dtype=state.dtype, device=packed.device)
    # Whole blocks at a time, so the index and float32 buffers stay small and every output value
    # is written once: look up two codes per byte, then scale by the block's absmax.
    step = max(CHUNK // 2 // state.blocksize, 1) * state.blocksize  # values per chunk
    index = torch.empty(min(step, size) // 2, dtype=torch.int32, device=packed.device)
    buffer = torch.empty(min(step, size), device=packed.device)
    for start in range(0, size, step):
        count = min(step, size - start)
        codes = index[: count // 2].copy_(data[start // 2 : (start + count) // 2])
        values = buffer[:count]
        torch.index_select(table, 0, codes, out=values.view(torch.float64))
        values = values.view(-1, state.blocksize)
        scale = absmax[start // state.blocksize : (start + count) // state.blocksize].view(-1, 1)
        # multiply in float32 and round once to the output dtype, as bitsandbytes does
        torch.mul(values, scale, out=out[start : start + count].view(-1, state.blocksize))
    out = out[:numel].view(state.shape)
    return out if size == numel else out.clone()


def quantize_roundtrip(
    A: torch.Tensor, code: torch.Tensor | str = "nf4", blocksize: int = 64
) -> torch.Tensor:
    """``A`` quantized blockwise against ``code`` (a code book or "nf4", "fp4", "int4") and back:
    what a layer computes with after quantization, to measure the error of a code book."""
    from qlora_edu.codebooks import CODE_BOOKS

    blocksize = check_input(A, blocksize)
    code = CODE_BOOKS[code] if isinstance(code, str) else code
    indices, absmax = quantize_blockwise(A, code, blocksize)
    return dequantize_blockwise(indices, absmax, code, blocksize).view(A.shape).to(A.dtype)


__all__ = [
    "DYNAMIC_CODE",
    "KERNELS",
    "QuantState",
    "SUPPORTED_BLOCKSIZES",
    "dequantize_4bit",
    "dequantize_blockwise",
    "pack_4bit",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_roundtrip",
    "unpack_4bit",
]
