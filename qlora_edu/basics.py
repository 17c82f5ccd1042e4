# Written in notebooks/02_quantization_basics.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""Quantization basics: integer absmax and zero-point quantization, and error metrics (Chapter 2).

These are the textbook schemes that NF4 improves on. A ``b``-bit absmax (symmetric) quantizer maps
``x`` to ``round(x * q_max / absmax)`` with ``q_max = 2^(b-1) - 1``; a zero-point (asymmetric)
quantizer maps the range [min, max] onto [0, 2^b - 1] with a scale and an integer zero point.
"""

import torch


def _check_bits(bits: int) -> None:
    if bits not in range(2, 17):
        raise ValueError(f"bits must be between 2 and 16, got {bits}")


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: ``(codes, scale)`` with ``x ~ codes * scale``, codes in
    [-(2^(b-1) - 1), 2^(b-1) - 1]. ``scale = absmax / q_max``; an all-zero ``x`` gets scale 1."""
    _check_bits(bits)
    q_max = 2 ** (bits - 1) - 1
    absmax = x.abs().max().float()
    scale = absmax / q_max if absmax > 0 else torch.tensor(1.0)
    return torch.round(x.float() / scale).to(torch.int32), scale


def error_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """How far ``x_hat`` is from ``x``: mean squared error, mean absolute error, relative error
    ``||x - x_hat|| / ||x||`` and the signal-to-quantization-noise ratio in dB,
    ``10 log10(sum x^2 / sum (x - x_hat)^2)``."""
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(x_hat.shape)}")
    x, x_hat = x.detach().double(), x_hat.detach().double()
    noise = (x - x_hat).pow(2).sum()
    return {
        "mse": float((x - x_hat).pow(2).mean()),
        "mae": float((x - x_hat).abs().mean()),
        "relative_error": float(noise.sqrt() / x.pow(2).sum().sqrt()),
        "sqnr_db": float(10 * torch.log10(x.pow(2).sum() / noise)),
    }


def zeropoint_quantize(
    x: torch.Tensor, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization: ``(codes, scale, zero_point)`` with
    ``x ~ (codes - zero_point) * scale`` and codes in [0, 2^b - 1]."""
    _check_bits(bits)
    q_max = 2**bits - 1
    low, high = x.min().float(), x.max().float()
    scale = (high - low) / q_max if high > low else torch.tensor(1.0)
    zero_point = torch.round(-low / scale)
    codes = torch.clamp(torch.round(x.float() / scale) + zero_point, 0, q_max)
    return codes.to(torch.int32), scale, zero_point.to(torch.int32)


def zeropoint_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """The values that zero-point ``codes`` stand for: ``(codes - zero_point) * scale``."""
    return (codes - zero_point).float() * scale


def blockwise_absmax_roundtrip(x: torch.Tensor, bits: int = 4, blocksize: int = 64) -> torch.Tensor:
    """``x`` quantized with absmax and back, every ``blocksize`` consecutive values (in row-major
    order) with their own scale; a block of zeros stays zero. Chapter 3 generalises it to any code
    book (``qlora_edu.quantize.quantize_roundtrip``)."""
    _check_bits(bits)
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    q_max = 2 ** (bits - 1) - 1
    flat = x.detach().flatten().float()
    blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / q_max, torch.ones_like(absmax))
    return (torch.round(blocks / scale) * scale).flatten()[: flat.numel()].view(x.shape)
