# Written in notebooks/11_after_training.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""Merging a trained QLoRA adapter into its base, and the 4-bit layer that serves it (Chapter 11).

:func:`merge_and_unload` folds each ``QLoRALinear``'s update ``scaling * B A`` into a weight and
drops the adapter, as peft's function of that name does. Into which weight is the question:

- the dequantized 4-bit weight ``Q(W)``, the one the adapter was trained with (the default): the
  merged model computes what the trained one did, up to rounding, if it is kept in float32;
- the original weights ``W`` (``base_weights``, from :func:`qlora_edu.loftq.linear_weights`): the
  adapter corrected ``Q(W)``, not ``W``, so this adds ``W - Q(W)`` to what was trained;
- either, quantized to 4 bits again (``requantize=True``, a
  :class:`qlora_edu.qlora.Linear4bit`): what peft's ``merge_and_unload`` does on a bitsandbytes
  model, and what loses the update where it is small next to the spacing of the 4-bit levels.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_edu.qlora import Linear4bit, QLoRALinear
from qlora_edu.quantize import quantize_4bit


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


__all__ = ["merge_and_unload"]
