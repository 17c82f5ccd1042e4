# Written in notebooks/03_nf4.ipynb and notebooks/04_double_quantization.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""The code books of 4-bit and 8-bit quantization, derived rather than typed in (Chapters 3 and 4).

A code book is a sorted list of values in [-1, 1]; a quantized number is the index of one entry.

- ``NF4_CODE``: 4-bit NormalFloat, from quantiles of the standard normal distribution
  (``create_normal_map``), as bitsandbytes builds it.
- ``FP4_CODE``: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit), indexed by its bit
  pattern, so it is *not* sorted. Not the OCP E2M1 set.
- ``INT4_CODE``: symmetric integers -7..7 divided by 7, the plain baseline.
- ``create_dynamic_map``: the signed 8-bit dynamic map double quantization uses for the absmax.
"""

from __future__ import annotations

import torch
from scipy.stats import norm


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The 16 NF4 values: normal quantiles at evenly spaced probabilities, scaled to [-1, 1].

    8 positive values come from ``norm.ppf`` at 9 probabilities from ``offset`` down to 0.5 (the
    last, ppf(0.5) = 0, dropped), 7 negative values the same way from 8 probabilities, and one exact
    zero: 16 values in all. ``offset`` = 0.9677083 puts the largest at ppf(offset), about 1.848
    standard deviations, before everything is divided by it. With ``use_extra_value=False`` both
    sides get 7 values (15 in all, symmetric).
    """
    positives = 9 if use_extra_value else 8
    high = norm.ppf(torch.linspace(offset, 0.5, positives)[:-1]).tolist()
    low = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1])).tolist()
    values = torch.tensor(high + [0.0] + low, dtype=torch.float32).sort().values
    return values / values.max()


NF4_CODE = create_normal_map()
INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7  # Chapter 2's integers


def create_fp4_map() -> torch.Tensor:
    """bitsandbytes' FP4: code ``s e1 e0 m`` -> (-1)^s * 2^(4 - e) * (1 + m/2), or m/16 when e = 0.

    Divided by the largest value (12) so that the range is [-1, 1]. Index 8 would be a negative
    zero; bitsandbytes' code book (``get_4bit_type("fp4")``) writes it as the integer ``-0``,
    which is plain 0, and so do we. Its kernels do not agree on that zero's sign bit: on the CPU
    the scalar C++ loop (rows whose length is not a multiple of 16, or no AVX-512) and the CUDA
    kernel write -0.0, the AVX-512 loop and the Python fallback (odd rows) +0.0. Its CPU
    quantizer puts tiny *positive* values in code 8, so -0.0 would also flip their sign. There
    is no one behaviour to match, and we keep the code book's +0.0 (equal in value everywhere).
    """
    codes = torch.arange(16)
    sign = 1.0 - 2.0 * (codes >> 3).float()
    exponent, mantissa = (codes >> 1) & 3, (codes & 1).float()
    magnitude = torch.where(
        exponent > 0, 2.0 ** (4 - exponent).float() * (1 + mantissa / 2), mantissa / 16
    )
    values = sign * magnitude + 0.0  # adding 0.0 turns -0.0 into 0.0
    return values / values.abs().max()


FP4_CODE = create_fp4_map()
CODE_BOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> torch.Tensor:
    """The dynamic 8-bit map of Dettmers et al. (2021): a decimal exponent and a shrinking fraction.

    For each exponent ``i`` the values are the midpoints of ``2^(i + free bits) + 1`` evenly spaced
    points in [0.1, 1], times 10^(i - max_exponent_bits + 1): fine steps near zero, coarse ones near
    one. Then 0 and 1 are added, and the map is sorted. The arithmetic is float32 throughout, as in
    bitsandbytes, so the map is bit-identical to theirs.
    """
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    values: list[float] = []

    def add(points: int, exponent: int) -> None:
        grid = torch.linspace(0.1, 1, points, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + exponent)
        values.extend((scale * means).tolist())
        if signed:
            values.extend((-scale * means).tolist())

    for i in range(max_exponent_bits):
        extra_bit = 0 if signed else 1
        add(2 ** (i + non_sign_bits - max_exponent_bits + extra_bit) + 1, i)
    if additional > 0:
        add(additional + 1, max_exponent_bits - 1)
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = create_dynamic_map(signed=True)
