"""An independent reference for ``kernel="cuda"``: bitsandbytes' CUDA quantization transcribed
literally from its source, csrc/kernels.cu at tag 0.50.1 (identical in 0.50.2): the decision trees
of dQuantizeNF4 (lines 110-153) and dQuantizeFP4 (64-106), the 8-bit binary search dQuantize<0>
(160-219), and kQuantizeBlockwise's scaling (269-375: absmax, one reciprocal per block, a multiply,
the first value in the high nibble). The wheel is compiled with --use_fast_math, so subnormals are
flushed to zero. The thresholds are the source's decimal literals, rounded to float32 here as a C
compiler rounds them (directly, not through a double), independently of qlora_edu's bit patterns.
"""

from fractions import Fraction

import torch

NF4_LITERALS = [
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
]  # fmt: skip
FP4_LITERALS = {
    "root": "0.29166667", "hi": "0.583333", "top": "0.8333333", "mid": "0.4166667",
    "lo": "0.0859375", "lohi": "0.20833333", "sub": "0.00260417",
}  # fmt: skip


def decimal_to_float32(literal: str) -> float:
    """The float32 nearest the decimal (ties to even), as a C compiler rounds ``<literal>f``."""
    exact = Fraction(literal)
    guess = torch.tensor(float(literal), dtype=torch.float32).view(torch.int32).item()
    candidates = [
        torch.tensor(guess + d, dtype=torch.int32).view(torch.float32).item() for d in (-1, 0, 1)
    ]
    return min(
        candidates,
        key=lambda v: (abs(Fraction(v) - exact), torch.tensor(v).view(torch.int32).item() & 1),
    )


NF4_T = [torch.tensor(decimal_to_float32(s)) for s in NF4_LITERALS]
FP4_T = {k: torch.tensor(decimal_to_float32(s)) for k, s in FP4_LITERALS.items()}


def ftz(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < torch.finfo(torch.float32).tiny, x * 0.0, x)


def _c(v: int) -> torch.Tensor:
    return torch.tensor(v)


def nf4_code(x: torch.Tensor) -> torch.Tensor:
    """dQuantizeNF4, branch by branch."""
    x, w = ftz(x.float()), torch.where

    def gt(k):
        return x > NF4_T[k]

    positive = w(gt(11),
                 w(gt(13), w(gt(14), _c(15), _c(14)), w(gt(12), _c(13), _c(12))),
                 w(gt(9), w(gt(10), _c(11), _c(10)), w(gt(8), _c(9), _c(8))))  # fmt: skip
    negative = w(gt(3),
                 w(gt(5), w(gt(6), _c(7), _c(6)), w(gt(4), _c(5), _c(4))),
                 w(gt(1), w(gt(2), _c(3), _c(2)), w(gt(0), _c(1), _c(0))))  # fmt: skip
    return w(gt(7), positive, negative)


def fp4_code(x: torch.Tensor) -> torch.Tensor:
    """dQuantizeFP4: ``sign = x < 0 ? 0b1000 : 0``, then a tree on ``fabsf(x)``."""
    x, w, t = ftz(x.float()), torch.where, FP4_T
    sign = (x < 0).long() * 8
    a = x.abs()
    high = w(
        a > t["hi"], w(a > t["top"], _c(0b011), _c(0b010)), w(a > t["mid"], _c(0b101), _c(0b100))
    )
    low = w(
        a > t["lo"], w(a > t["lohi"], _c(0b111), _c(0b110)), w(a > t["sub"], _c(0b001), _c(0b000))
    )
    return w(a > t["root"], high, low) + sign


def dynamic8_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """dQuantize<0>: seven halving steps from pivot 127, then the float32 midpoint of the last."""
    x, w = ftz(x.float().reshape(-1)), torch.where
    n = x.numel()
    pivot, upper_pivot, lower_pivot = (torch.full((n,), v) for v in (127, 255, 0))
    lower, upper = torch.full((n,), -1.0), torch.full((n,), 1.0)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = x > value
        lower_pivot, lower = w(above, pivot, lower_pivot), w(above, value, lower)
        upper_pivot, upper = w(above, upper_pivot, pivot), w(above, upper, value)
        pivot = w(above, pivot + step, pivot - step)
        value = code[pivot]
    upper = w(upper_pivot == 255, code[255], upper)
    lower = w(lower_pivot == 0, code[0], lower)
    return w(
        x > value,
        w(x > (upper + value) * 0.5, upper_pivot, pivot),
        w(x < (lower + value) * 0.5, lower_pivot, pivot),
    )


def scale_blocks(A: torch.Tensor, blocksize: int):
    """kQuantizeBlockwise's absmax (NaN ignored, padding zeros) and ``x * (1.0f / absmax)``."""
    v = ftz(A.reshape(-1).float())
    n = v.numel()
    padded = torch.nn.functional.pad(v, (0, (-n) % blocksize)).view(-1, blocksize)
    absmax = padded.abs().nan_to_num(nan=0.0).amax(dim=1)
    scaled = ftz(padded * ftz(1.0 / absmax)[:, None]).reshape(-1)
    return scaled, absmax, n


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    """packed bytes (an odd count's missing value loaded as 0.0) and absmax, as the kernel."""
    scaled, absmax, n = scale_blocks(A, blocksize)
    if n % 2:
        scaled = scaled[: n + 1]  # the padding zero scaled by its block's reciprocal
    else:
        scaled = scaled[:n]
    codes = (nf4_code if quant_type == "nf4" else fp4_code)(scaled).to(torch.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1), absmax


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    scaled, absmax, n = scale_blocks(A, blocksize)
    return dynamic8_code(scaled[:n], code).to(torch.uint8), absmax
