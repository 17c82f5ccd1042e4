# Written in notebooks/06_qlora_linear.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""Model surgery: turn a transformers model into a QLoRA model (Chapter 6).

``get_qlora_model`` stores every linear layer inside the model but the output head in 4 bits, gives
the target layers (all of them, as peft's ``target_modules="all-linear"``, or those named) a LoRA
adapter, and freezes everything else. ``prepare_model_for_kbit_training`` does what peft's
function of the same name does before training a 4-bit model.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_edu.lora import LoRALinear, check_lora_args
from qlora_edu.qlora import Linear4bit, QLoRALinear
from qlora_edu.quantize import dequantize_4bit, quantize_4bit


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` layers, except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def get_qlora_model(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    quant_type: str | None = "nf4",
    compress_statistics: bool = True,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
) -> nn.Module:
    """Store every linear layer of ``model`` but the output head in 4 bits, and give the target
    layers a LoRA adapter (in place), as ``BitsAndBytesConfig`` + peft do.

    What is quantized does not depend on what is adapted: the target layers become
    :class:`QLoRALinear`, the others :class:`Linear4bit` (4 bits, no adapter). ``target_modules``:
    ``"all-linear"`` (every linear layer but the output head) or a list of names, matched like
    peft does: a layer is taken if its name equals an entry or ends with ``"." + entry``
    (``["q_proj", "v_proj"]``). Every parameter but the LoRA adapters is frozen.
    ``quant_type=None`` keeps the base weights in full precision: plain LoRA (:class:`LoRALinear`
    on the targets), the baseline QLoRA is compared with.
    """
    check_lora_args(r, lora_alpha, lora_dropout)
    candidates = linear_layer_names(model)
    if target_modules == "all-linear":
        chosen = candidates
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        chosen = [n for n in candidates if _matches(n, targets)]
        if not chosen:
            raise ValueError(
                f"target_modules {targets} match none of the model's linear layers: "
                + ", ".join(candidates)
            )
    model.requires_grad_(False)
    for name in candidates:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if quant_type is None:
            if name not in chosen:
                continue
            layer = LoRALinear(linear, r, lora_alpha, lora_dropout)
        elif name in chosen:
            layer = QLoRALinear.from_linear(
                linear,
                r=r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                quant_type=quant_type,
                compress_statistics=compress_statistics,
                blocksize=blocksize,
                compute_dtype=compute_dtype,
            )
        else:
            packed, state = quantize_4bit(
                linear.weight.detach(), blocksize, quant_type, compress_statistics
            )
            layer = Linear4bit(packed, state, linear.bias, compute_dtype)
            layer = layer.to(linear.weight.device)
        setattr(parent, child, layer)
    model.qlora_config = {
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": sorted({n.rpartition(".")[2] for n in chosen}),
    }
    return model


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True
) -> nn.Module:
    """What peft's function of this name does (peft 0.13 to 0.21), for a 4-bit model:

    1. freeze every parameter;
    2. cast every float16 / bfloat16 parameter that is not 4-bit (norms, embeddings, the output
       head, biases) to float32, for stable training; this costs memory: 2 more bytes each;
    3. with gradient checkpointing: make the embedding output require grad (so that checkpointed
       layers, whose inputs would otherwise need no gradient, still backpropagate into the LoRA
       adapters) and turn gradient checkpointing on.

    Call it before :func:`get_qlora_model`, whose adapters are then the only trainable parameters.
    """
    model.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if use_gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()
    return model


@torch.no_grad()
def quantize_linear_weights(
    model: nn.Module,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    blocksize: int = 64,
) -> nn.Module:
    """Replace (in place) the weight of every linear layer but the output head by its 4-bit round
    trip, kept in the weight's dtype: the model computes what its 4-bit version would, so its
    perplexity measures what the quantization costs (the paper's Table 2)."""
    for name in linear_layer_names(model):
        weight = model.get_submodule(name).weight
        packed, state = quantize_4bit(weight, blocksize, quant_type, compress_statistics)
        weight.copy_(dequantize_4bit(packed, state))
    return model
