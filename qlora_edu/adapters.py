# Written in notebooks/06_qlora_linear.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""Saving and loading LoRA adapters in PEFT's on-disk format (Chapter 6).

A PEFT adapter is a folder with ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors``, whose keys are the model's module names prefixed with
``base_model.model.``: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
``peft.PeftModel.from_pretrained`` loads what :func:`save_adapter` writes, and
:func:`load_adapter` loads what peft saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_edu.lora import LoRAAdapter

PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` under PEFT's key names."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            for part in ("lora_A", "lora_B"):
                weight = getattr(module, part).weight
                state[f"{PREFIX}{name}.{part}.weight"] = weight.detach().contiguous()
    return state


def save_adapter(
    model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None
) -> None:
    """Write ``model``'s LoRA adapters to ``path`` in PEFT's format."""
    config = getattr(model, "qlora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters: call get_qlora_model first")
    write_adapter(
        path,
        lora_state_dict(model),
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        target_modules=config["target_modules"],
        lora_dropout=config["lora_dropout"],
        base_model_name_or_path=base_model_name_or_path,
    )


def write_adapter(
    path: str | Path,
    state: dict[str, torch.Tensor],
    *,
    r: int,
    lora_alpha: float,
    target_modules: str | list[str],
    lora_dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write LoRA weights keyed as :func:`lora_state_dict` keys them, and the ``LoraConfig`` they
    were trained with, as a PEFT adapter folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    save_file(state, str(path / "adapter_model.safetensors"))


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter from ``path`` into ``model``'s LoRA layers.

    Everything is checked before anything is copied: a missing or unexpected key, a rank, alpha or
    shape that does not fit raise ValueError and leave the model untouched.
    """
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} holds a {config.get('peft_type')} adapter, not LoRA")
    saved = {
        k.replace(".default.", "."): v
        for k, v in load_file(path / "adapter_model.safetensors").items()
    }
    _check_fits(model, saved, rank=config.get("r"))
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            if (module.r, module.lora_alpha) != (config["r"], config["lora_alpha"]):
                raise ValueError(
                    f"{name}: adapter has r={config['r']}, lora_alpha={config['lora_alpha']}; "
                    f"the layer r={module.r}, lora_alpha={module.lora_alpha}"
                )
    return load_lora_state_dict(model, saved)


def _check_fits(model: nn.Module, saved: dict[str, torch.Tensor], rank: int | None) -> None:
    ours = lora_state_dict(model)
    missing, unexpected = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
    if missing or unexpected:
        raise ValueError(
            f"adapter does not fit the model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
        )
    for key, tensor in saved.items():
        if tensor.shape != ours[key].shape:
            expected = tuple(ours[key].shape)
            raise ValueError(
                f"{key}: adapter has shape {tuple(tensor.shape)}, the model {expected}"
                f" (adapter rank {rank})"
            )


def load_lora_state_dict(model: nn.Module, saved: dict[str, torch.Tensor]) -> nn.Module:
    """Copy LoRA weights keyed as :func:`lora_state_dict` keys them into ``model``, after checking
    that every key and shape fits (ValueError otherwise, with the model left untouched)."""
    _check_fits(model, saved, rank=None)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRAAdapter):
                for part in ("lora_A", "lora_B"):
                    weight = getattr(module, part).weight
                    weight.copy_(saved[f"{PREFIX}{name}.{part}.weight"].to(weight.dtype))
    return model
