# Written in notebooks/06_qlora_linear.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""The 4-bit linear layer, with a LoRA adapter (QLoRA) and without (Chapter 6).

``QLoRALinear`` keeps its base weight only as packed 4-bit codes and quantization constants
(``qlora_edu.quantize_4bit``), frozen, and adds a trainable LoRA adapter. Its matmul is a custom
autograd function that dequantizes the weight in the forward pass, uses it, and lets it go; the
backward pass dequantizes it again to compute the input gradient. The frozen weight gets no
gradient, and no dequantized weight is kept between forward and backward; the bias is frozen too,
unless it is made trainable (``layer.bias.requires_grad_(True)``, peft's ``bias="all"``). As in
bitsandbytes' ``Linear4bit``, the input is cast to ``compute_dtype`` and the output back to the
input's dtype. The layer compiles with ``torch.compile(fullgraph=True)``. ``Linear4bit`` is the
same frozen 4-bit layer without an adapter, as bitsandbytes' class of that name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.lora import LoRAAdapter, check_input_features
from qlora_edu.quantize import QuantState, dequantize_4bit, quantize_4bit

# Buffers holding the quantized weight: moved between devices, never cast to another dtype.
QUANT_BUFFERS = ("weight_packed", "absmax", "offset", "absmax2", "code", "code2")


class Linear4bitFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` stored in 4 bits and dequantized on the fly, both ways."""

    @staticmethod
    def forward(ctx, x, packed, state: QuantState, bias):
        weight = dequantize_4bit(packed, state).to(x.dtype)
        ctx.state = state
        ctx.save_for_backward(packed)  # the packed bytes only, never the dequantized weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_4bit(packed, ctx.state).to(grad_output.dtype)  # recomputed
            grad_x = grad_output @ weight
        if ctx.needs_input_grad[3]:  # a trainable bias (peft's bias="all" or "lora_only")
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias  # the frozen weight never gets a gradient


class Weight4bit:
    """The frozen 4-bit weight of a layer (a mixin for ``nn.Module`` subclasses).

    The packed codes and the quantization constants are buffers: ``model.to(device)`` moves them,
    but a dtype change (``model.half()``) never casts them, as bitsandbytes' ``Params4bit``. The
    matmul casts the input to ``compute_dtype`` (default: the input's dtype) and the output back,
    as bitsandbytes' ``Linear4bit`` does.
    """

    def register_4bit_weight(self, packed: torch.Tensor, state: QuantState) -> None:
        self.out_features, self.in_features = state.shape
        self.blocksize, self.quant_type, self.weight_dtype = (
            state.blocksize,
            state.quant_type,
            state.dtype,
        )
        self.register_buffer("weight_packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        nested = state.state2
        self.register_buffer("offset", state.offset)
        self.register_buffer("absmax2", nested.absmax if nested else None)
        self.register_buffer("code2", nested.code if nested else None)

    @property
    def quant_state(self) -> QuantState:
        state2 = None
        if self.absmax2 is not None:
            state2 = QuantState(self.absmax2, None, self.code2, torch.float32, 256)
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.code,
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            offset=self.offset,
            state2=state2,
        )

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_4bit(self.weight_packed, self.quant_state)

    def linear_4bit(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` in the compute dtype, returned in ``x``'s dtype."""
        check_input_features(x, self.in_features)
        compute_dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        out = Linear4bitFunction.apply(
            x.to(compute_dtype), self.weight_packed, self.quant_state, bias
        )
        return out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # The quantization buffers follow device moves but never dtype casts. (The packed weight
        # may be a parameter instead, for FSDP: qlora_edu.fsdp.) `to_empty` from the meta device
        # gives them new, uninitialised memory, as it does to every other tensor.
        names = [name for name in QUANT_BUFFERS if name in self._buffers]
        quantized = {name: self._buffers.pop(name) for name in names}
        super()._apply(fn, recurse)
        device = fn(torch.zeros(1, device=quantized["code"].device)).device
        for name, tensor in quantized.items():
            if tensor is not None and tensor.is_meta:
                tensor = torch.empty_like(tensor, device=device)
            self._buffers[name] = None if tensor is None else tensor.to(device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
            f"double_quant={self.absmax2 is not None}"
        )


def frozen_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class Linear4bit(Weight4bit, nn.Module):
    """A frozen linear layer stored in 4 bits, with no adapter (bitsandbytes' ``Linear4bit``)."""

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.register_4bit_weight(packed, state)
        self.compute_dtype = compute_dtype
        self.bias = frozen_bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_4bit(x)


class QLoRALinear(Weight4bit, LoRAAdapter):
    """A frozen 4-bit linear layer plus a trainable LoRA adapter."""

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        compute_dtype: torch.dtype | None,
    ):
        out_features, in_features = state.shape
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout)
        self.register_4bit_weight(packed, state)
        self.compute_dtype = compute_dtype
        self.bias = frozen_bias(bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        blocksize: int = 64,
        compute_dtype: torch.dtype | None = None,
    ) -> QLoRALinear:
        """Quantize ``linear``'s weight to 4 bits and wrap it with a fresh LoRA adapter, on the
        weight's device (on ``meta``: a layer of the right shapes, without values)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_4bit(
            linear.weight.detach(),
            blocksize=blocksize,
            quant_type=quant_type,
            compress_statistics=compress_statistics,
        )
        layer = cls(packed, state, linear.bias, r, lora_alpha, lora_dropout, compute_dtype)
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_4bit(x)
        return out + super().forward(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A full-precision ``nn.Linear`` with the dequantized weight plus the adapter's update."""
        weight = self.dequantized_weight().float() + self.delta_weight().float()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
