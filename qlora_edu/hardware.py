"""The device, the compute dtype and the 4-bit loading config, chosen in one place (Chapters 8-10),
and the GPU measurements shipped with the package (Chapter 9).

bitsandbytes computes a 4-bit layer's matmul in ``bnb_4bit_compute_dtype``. bfloat16 is the right
choice where the GPU supports it (Ampere and newer); Colab's free T4 (Turing) does not, so float16
there; on a CPU float32, the dtype its kernels are fastest and exact in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

# benchmarks/gpu_report.py writes here; the files travel with the package (pyproject.toml's
# package-data), so a reader who only installed qlora_edu (Colab) sees what the book shows.
GPU_RESULTS = Path(__file__).parent / "assets" / "gpu_results"


def default_device() -> torch.device:
    """``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 on a GPU with bfloat16 tensor cores (compute capability 8.0, Ampere, and newer),
    float16 on an older GPU (a T4 is 7.5), float32 on a CPU.

    Decided by the capability, not by ``torch.cuda.is_bf16_supported()``: by default that counts
    emulation and says True on a T4, where bfloat16 matmuls run without tensor cores, many times
    slower than float16 ones.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def qlora_training_arguments(dtype: torch.dtype) -> dict:
    """The QLoRA recipe as keyword arguments of transformers' ``TrainingArguments``, for a compute
    dtype from :func:`compute_dtype`: paged 8-bit AdamW, mixed precision in that dtype (float16 on
    a T4, bfloat16 from Ampere on, none on a CPU, where everything is float32) and non-reentrant
    gradient checkpointing."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"compute dtype must be float32, float16 or bfloat16, got {dtype}")
    return {
        "optim": "paged_adamw_8bit",
        "fp16": dtype == torch.float16,
        "bf16": dtype == torch.bfloat16,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }


def keep_float32_on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Make bitsandbytes' 4-bit layers compute in their compute dtype on every CPU.

    bitsandbytes 0.50, on a CPU with AVX512-BF16 (recent Xeons, AMD Zen 4 and newer), switches a
    ``Linear4bit`` called in evaluation mode without gradients to a bfloat16 inference kernel: it
    repacks the weight into a CPU layout and casts the input and the block scales to bfloat16,
    whatever ``bnb_4bit_compute_dtype`` says. Outputs then differ from float32 compute by about
    3e-3 relative (bfloat16's precision), on some CPUs and not on others, and a repacked layer keeps
    that kernel, in training too. The book compares bitsandbytes with its own code, so it turns
    this off (the layers' own ``support_avx512bf16_for_cpu`` flag): the same path on every CPU.
    Call it before the first forward pass.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def qlora_bnb_config(
    dtype: torch.dtype | None = None, quant_storage: torch.dtype = torch.uint8
) -> BitsAndBytesConfig:
    """transformers' ``BitsAndBytesConfig`` for the QLoRA recipe, said explicitly.

    NF4 with double quantization (bitsandbytes' defaults are FP4 without it), matmuls in ``dtype``
    (default: :func:`compute_dtype` of this machine), packed bytes stored as ``quant_storage``
    (a float dtype only matters for sharding: Chapter 10).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or compute_dtype(),
        bnb_4bit_quant_storage=quant_storage,
    )


def gpu_results() -> dict[str, dict]:
    """The GPU reports shipped with qlora_edu (``benchmarks/gpu_report.py``), file name to report,
    in file name order; empty when none has been measured yet."""
    return {path.name: json.loads(path.read_text()) for path in sorted(GPU_RESULTS.glob("*.json"))}


__all__ = [
    "GPU_RESULTS",
    "compute_dtype",
    "default_device",
    "gpu_results",
    "keep_float32_on_cpu",
    "qlora_bnb_config",
]
