# Written in notebooks/11_after_training.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""LoftQ: initialising a QLoRA adapter to absorb the quantization error (Chapter 11).

QLoRA starts from ``Q(W)`` plus an adapter that adds nothing (``B = 0``): the model starts with
the whole quantization error ``W - Q(W)``. LoftQ (Li et al., 2023) starts the adapter at a rank-r
approximation of that error instead, and alternates ``T`` times: quantize ``W - B A``, then set
``B A`` to the truncated SVD of ``W - Q``. peft does this with ``LoraConfig(init_lora_weights=
"loftq")`` (``T`` = ``LoftQConfig.loftq_iter``) and, with ``T = 1`` on a model already loaded in 4
bits, ``replace_lora_weights_loftq``; neither scales for ``lora_alpha / r`` (peft issue #1982), so
they are right only when ``lora_alpha == r``. :func:`loftq_init` is right for any scaling.
"""

from __future__ import annotations

import inspect
import json
import math
import types
from collections.abc import Callable

import torch
from torch import nn

from qlora_edu.base_model import ASSETS
from qlora_edu.model import linear_layer_names
from qlora_edu.qlora import QLoRALinear
from qlora_edu.quantize import QuantState, dequantize_4bit, quantize_4bit

EXPERIMENTS = ASSETS / "experiments" / "loftq.json"


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor,
    r: int,
    num_iter: int = 1,
    scaling: float = 1.0,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
) -> tuple[torch.Tensor, QuantState, torch.Tensor, torch.Tensor]:
    """LoftQ: a 4-bit base and a rank-``r`` adapter that together start close to ``weight``.

    ``num_iter`` times: quantize ``W - B A`` (``B A = 0`` the first time), then set ``B A`` to the
    truncated SVD of what that quantization missed, ``W - Q``, split evenly (``B = U sqrt(S)``,
    ``A = sqrt(S) V^T``). Returns ``(packed, state, lora_A, lora_B)``: the 4-bit base, and the
    adapter divided by ``sqrt(scaling)``, so that a layer adding ``scaling * B A``
    (``lora_alpha / r``) adds exactly the approximation. Computed in float32; the state
    dequantizes to ``weight``'s dtype. With ``num_iter=1`` the base is ``Q(W)``.
    """
    if num_iter < 1:
        raise ValueError(f"num_iter must be at least 1, got {num_iter}")
    target = weight.detach().float()
    low_rank = torch.zeros_like(target)
    for _ in range(num_iter):
        packed, state = quantize_4bit(target - low_rank, blocksize, quant_type, compress_statistics)
        U, S, Vh = torch.linalg.svd(target - dequantize_4bit(packed, state), full_matrices=False)
        root = S[:r].sqrt()
        lora_B, lora_A = U[:, :r] * root, root[:, None] * Vh[:r]
        low_rank = lora_B @ lora_A
    state.dtype = weight.dtype
    split = math.sqrt(scaling)
    return packed, state, lora_A / split, lora_B / split


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weight of every linear layer but the output head, by module name: the
    original weights ``W``, to keep before :func:`qlora_edu.get_qlora_model` quantizes them."""
    return {n: model.get_submodule(n).weight.detach().clone() for n in linear_layer_names(model)}


@torch.no_grad()
def apply_loftq(
    model: nn.Module, base_weights: dict[str, torch.Tensor], num_iter: int = 1
) -> nn.Module:
    """Re-initialise (in place) every :class:`qlora_edu.QLoRALinear` of ``model`` with
    :func:`loftq_init` from its original weight ``base_weights[name]``: a new 4-bit base and
    adapter, with the layer's rank, scaling, code book, blocksize and double quantization."""
    for name, layer in model.named_modules():
        if not isinstance(layer, QLoRALinear):
            continue
        packed, state, lora_A, lora_B = loftq_init(
            base_weights[name].to(layer.weight_packed.device),
            layer.r,
            num_iter,
            scaling=layer.scaling,
            quant_type=layer.quant_type,
            blocksize=layer.blocksize,
            compress_statistics=layer.absmax2 is not None,
        )
        layer.weight_packed, layer.absmax, layer.offset = packed, state.absmax, state.offset
        if state.state2 is not None:
            layer.absmax2 = state.state2.absmax
        layer.lora_A.weight.copy_(lora_A)
        layer.lora_B.weight.copy_(lora_B)
    return model


def peft_loftq_init_on_cpu() -> Callable:
    """peft's own ``loftq_init`` (``peft.utils.loftq_utils``), made to run on a CPU.

    peft computes LoftQ on ``"cuda"`` (or ``"xpu"``) whatever the weight's device, so on a machine
    without a GPU it fails at ``weight.to("cuda")``. This returns the same function with that one
    device name replaced by ``"cpu"`` in its code; every other line is peft's.
    """
    from peft.utils import loftq_utils

    function = inspect.unwrap(loftq_utils.loftq_init)
    code = function.__code__
    if "cuda" not in code.co_consts:
        raise RuntimeError("this peft's loftq_init does not name its device 'cuda': look again")
    constants = tuple("cpu" if c in ("cuda", "xpu") else c for c in code.co_consts)
    patched = types.FunctionType(
        code.replace(co_consts=constants), function.__globals__, function.__name__
    )
    patched.__defaults__ = function.__defaults__
    return torch.no_grad()(patched)


def relative_error(layer: QLoRALinear, weight: torch.Tensor) -> float:
    """``||W - (Q + scaling * B A)|| / ||W||`` (Frobenius): how far a QLoRA layer's effective
    weight is from the original ``W``."""
    effective = layer.dequantized_weight().float() + layer.delta_weight().float()
    return ((weight.float() - effective).norm() / weight.float().norm()).item()


def experiment_results() -> dict:
    """Chapter 11's LoftQ grid as committed: made by ``scripts/experiments_ch11.py``, which says
    what each field holds."""
    return json.loads(EXPERIMENTS.read_text())


__all__ = [
    "EXPERIMENTS",
    "apply_loftq",
    "experiment_results",
    "linear_weights",
    "loftq_init",
    "peft_loftq_init_on_cpu",
    "relative_error",
]
