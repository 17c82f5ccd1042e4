# Written in notebooks/05_lora.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""LoRA: a frozen linear layer plus a trainable low-rank update (Chapter 5).

``y = W x + b + (lora_alpha / r) * B A dropout(x)``, with ``A`` (r x in) initialised
Kaiming-uniform (a = sqrt(5), as ``nn.Linear`` and peft do) and ``B`` (out x r) zeros, so the
adapter starts as no change at all. Only ``A`` and ``B`` train. Names follow peft: ``lora_A``,
``lora_B``, ``r``, ``lora_alpha``, ``scaling``.
"""

import math

import torch
from torch import nn


def check_lora_args(r: int, lora_alpha: float, lora_dropout: float) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


class LoRAAdapter(nn.Module):
    """The trainable part, ``(lora_alpha / r) * B A dropout(x)``, of LoRA and QLoRA layers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_lora_args(r, lora_alpha, lora_dropout)
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the weight: ``scaling * B @ A`` (out x in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def check_input_features(x: torch.Tensor, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(
            f"input's last dimension is {x.shape[-1]}, but the layer expects {in_features} features"
        )


class LoRALinear(LoRAAdapter):
    """An ``nn.Linear`` (frozen) with a LoRA adapter; ``merge()`` folds the adapter into it."""

    def __init__(
        self, base: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0
    ):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        super().__init__(base.in_features, base.out_features, r, lora_alpha, lora_dropout)
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_features(x, self.in_features)
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + super().forward(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter's update to the base weight (for inference: no extra matmuls)."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (up to rounding), so training can continue."""
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False
