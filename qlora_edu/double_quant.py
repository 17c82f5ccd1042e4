# Written in notebooks/04_double_quantization.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""Double quantization: storing the absmax constants themselves in 8 bits (Chapter 4).

With blocksize 64, one float32 absmax per block costs 32 / 64 = 0.5 bits per parameter. QLoRA
quantizes those constants a second time, as bitsandbytes does:

1. subtract their mean (``offset``), so the values are centred on zero and use both signs;
2. quantize them blockwise, 256 at a time, to 8 bits against the signed dynamic map
   (the paper calls these "8-bit floats"; the code uses ``create_dynamic_map(signed=True)``),
   finding codes with a lookup table as bitsandbytes 0.50's CPU kernel does (0.49 searched for
   the nearest code: ``search="argmin"``);
3. keep one float32 absmax per 256 blocks (``state2``) and the float32 offset.

Cost: 8 / 64 + 32 / (64 * 256) = 0.127 bits per parameter instead of 0.5, so 4.127 in all.
"""

from __future__ import annotations

import torch

from qlora_edu.codebooks import DYNAMIC_CODE
from qlora_edu.quantize import QuantState, dequantize_blockwise, quantize_blockwise

NESTED_BLOCKSIZE = 256


def bits_per_parameter(packed: torch.Tensor, state: QuantState) -> float:
    """Bits stored per quantized parameter: packed codes plus every quantization constant."""
    numel = 1
    for size in state.shape:
        numel *= size
    tensors = [packed, state.absmax]
    if state.nested:
        tensors += [state.offset, state.state2.absmax]
    return 8 * sum(t.numel() * t.element_size() for t in tensors) / numel


def quantize_absmax(
    absmax: torch.Tensor, search: str = "table", code: torch.Tensor = DYNAMIC_CODE
) -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """Double-quantize first-level absmax values: ``(codes uint8, offset, state2)``.

    ``search`` finds the 8-bit codes in ``code`` (the signed dynamic map) as a bitsandbytes kernel
    does (:func:`qlora_edu.quantize.quantize_blockwise`): "table" for >= 0.50 on a CPU, "argmin"
    for 0.49.x, "cuda" for its CUDA kernel.

    Two limits, at the ends of float32's range:

    - The offset is their float32 mean, computed as bitsandbytes computes it. If the absmax values
      sum to more than float32's largest value (3.4e38), the mean overflows to inf and bitsandbytes
      silently returns NaN; we raise ValueError instead.
    - A group of 256 whose second-level absmax is below 2.9e-39 (absmax values all within 3e-39
      of the offset: weights of about 1e-38 and less) is quantized as bitsandbytes' 8-bit CPU
      kernel does it, byte for byte: 1/absmax overflows to inf, so each code is the first or the
      last of the map, and a value exactly equal to the offset gets code 0
      (:func:`qlora_edu.quantize.quantize_blockwise`). Such absmax values come back off by up to
      twice their size, even negative; their blocks' weights, all below about 1e-38, are no less
      zero for it.
    """
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())  # no blocks: offset 0
    if not absmax.is_meta and not torch.isfinite(offset):
        raise ValueError(
            f"cannot double-quantize absmax values as large as {float(absmax.max()):.3g}: their "
            f"sum exceeds float32's largest value, {torch.finfo(torch.float32).max:.3g}, so their "
            "mean (the offset) overflows to inf, and bitsandbytes would return NaN; "
            "use compress_statistics=False"
        )
    codes, absmax2 = quantize_blockwise(absmax - offset, code, NESTED_BLOCKSIZE, search=search)
    state2 = QuantState(
        absmax=absmax2,
        shape=None,
        code=code.to(absmax.device, copy=True),
        dtype=torch.float32,
        blocksize=NESTED_BLOCKSIZE,
    )
    return codes, offset, state2


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax values back from their 8-bit codes: dequantize, then add the offset."""
    nested = state.state2
    values = dequantize_blockwise(state.absmax, nested.absmax, nested.code, nested.blocksize)
    return (values + state.offset).float()
