"""Merging a trained QLoRA adapter into its base, and the 4-bit layer that serves it (Chapter 11).

:func:`merge_and_unload` folds each ``QLoRALinear``'s update ``scaling * B A`` into a weight and
drops the adapter, as peft's function of that name does. Into which weight is the question:

- the dequantized 4-bit weight ``Q(W)``, the one the adapter was trained with (the default): the
  merged model computes what the trained one did, up to rounding, if it is kept in float32;
- the original weights ``W`` (``base_weights``, from :func:`qlora_edu.loftq.linear_weights`): the
  adapter corrected ``Q(W)``, not ``W``, so this adds ``W - Q(W)`` to what was trained;
- either, quantized to 4 bits again (``requantize=True``, a :class:`Linear4bit`): what peft's
  ``merge_and_unload`` does on a bitsandbytes model, and what loses the update where it is small
  next to the spacing of the 4-bit levels.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_edu.qlora import Linear4bitFunction, QLoRALinear
from qlora_edu.quantize import QuantState, dequantize_4bit, quantize_4bit


class Linear4bit(nn.Module):
    """A frozen linear layer stored in 4 bits, with no adapter (bitsandbytes' ``Linear4bit``).

    The input is cast to ``compute_dtype`` (default: the input's dtype) and the output back, as in
    :class:`qlora_edu.QLoRALinear`, whose matmul it shares.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.register_buffer("weight_packed", packed)
        self.quant_state = state
        self.compute_dtype = compute_dtype
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_4bit(self.weight_packed, self.quant_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        out = Linear4bitFunction.apply(
            x.to(compute_dtype), self.weight_packed, self.quant_state, bias
        )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        state = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant_type={state.quant_type}, blocksize={state.blocksize}"
        )


@torch.no_grad()
def merge_and_unload(
    model: nn.Module,
    base_weights: dict[str, torch.Tensor] | None = None,
    requantize: bool = False,
) -> nn.Module:
    """Replace (in place) every :class:`qlora_edu.QLoRALinear` by a layer without adapter whose
    weight is ``base + scaling * B A``.

    ``base`` is the layer's dequantized 4-bit weight ``Q(W)``, or ``base_weights[name]`` (the
    original ``W``). ``requantize=False``: an ``nn.Linear`` holding the merged weight in float32.
    ``requantize=True``: a :class:`Linear4bit` holding it quantized again with the layer's own
    code book, blocksize and double quantization.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    for name, layer in layers:
        base = layer.dequantized_weight() if base_weights is None else base_weights[name]
        weight = base.float() + layer.delta_weight().float()
        if requantize:
            packed, state = quantize_4bit(
                weight.to(layer.weight_dtype),
                blocksize=layer.blocksize,
                quant_type=layer.quant_type,
                compress_statistics=layer.absmax2 is not None,
            )
            merged = Linear4bit(packed, state, layer.bias, layer.compute_dtype)
        else:
            merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            merged.weight.copy_(weight)
            if layer.bias is not None:
                merged.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, merged.requires_grad_(False))
    return model


__all__ = ["Linear4bit", "merge_and_unload"]
