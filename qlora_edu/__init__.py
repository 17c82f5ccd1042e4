"""qlora_edu: the pieces of QLoRA built from scratch, one module per chapter.

- :mod:`qlora_edu.memory` (Chapter 1): parameter counts and the finetuning memory calculator.
- :mod:`qlora_edu.basics` (Chapter 2): integer absmax and zero-point quantization, blockwise absmax,
  error metrics.
- :mod:`qlora_edu.codebooks` (Chapters 3-4): NF4, FP4, INT4 and the 8-bit dynamic map.
- :mod:`qlora_edu.quantize` (Chapter 3): blockwise quantization against a code book, 4-bit packing.
- :mod:`qlora_edu.double_quant` (Chapter 4): quantizing the absmax constants.
- :mod:`qlora_edu.lora` (Chapter 5): LoRA adapters and ``LoRALinear``.
- :mod:`qlora_edu.qlora`, :mod:`qlora_edu.model`, :mod:`qlora_edu.adapters` (Chapter 6): the QLoRA
  layer, model surgery, adapters in PEFT's format.
- :mod:`qlora_edu.paging` (Chapter 7): a simulated accelerator with paging, and ``PagedAdamW``.
- :mod:`qlora_edu.base_model`, :mod:`qlora_edu.finetune` (Chapter 8): the shipped model, the date
  task, the training loop and its checkpoints.
- :mod:`qlora_edu.hardware` (Chapter 9): the compute dtype by GPU capability, bitsandbytes configs.
- :mod:`qlora_edu.fsdp` (Chapter 10): QLoRA sharded with FSDP2, launched by torchrun.
- :mod:`qlora_edu.merge`, :mod:`qlora_edu.loftq` (Chapter 11): merging adapters, LoftQ.
- :mod:`qlora_edu.fused` (Chapter 12): dequantization in one pass, compiled by ``torch.compile``
  and by hand in C++ (the kernel ``dequantize_4bit`` uses on x86 CPUs).
- :mod:`qlora_edu.diagrams`, :mod:`qlora_edu.plotting`: the diagrams, plot style and ``glue``.

The modules of Chapters 2-7, 11 and 12 are written in their chapters' ``# @save`` cells
(``make save``); the others are plain modules.
"""

import logging

from qlora_edu.adapters import load_adapter, save_adapter
from qlora_edu.basics import error_metrics
from qlora_edu.codebooks import FP4_CODE, INT4_CODE, NF4_CODE, create_dynamic_map, create_normal_map
from qlora_edu.lora import LoRALinear
from qlora_edu.memory import (
    ARCHITECTURES,
    ParameterCount,
    count_parameters,
    estimate_finetune_memory,
    llama_config,
    measure_training_step,
    quant_state_nbytes,
    quantized_nbytes,
)
from qlora_edu.model import get_qlora_model, prepare_model_for_kbit_training
from qlora_edu.paging import PagedAdamW, SimulatedDevice
from qlora_edu.plotting import glue, use_book_style
from qlora_edu.qlora import QLoRALinear
from qlora_edu.quantize import QuantState, dequantize_4bit, quantize_4bit, quantize_roundtrip

# bitsandbytes >= 0.50, on a CPU with AVX512-BF16, tries to load an optional batch-1 bf16 kernel
# from the `kernels` package (fetched from the Hugging Face hub) and logs a warning when it cannot.
# The book never needs that kernel, and what a chapter prints must not depend on the reader's CPU.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = [
    "PagedAdamW",
    "SimulatedDevice",
    "LoRALinear",
    "QLoRALinear",
    "get_qlora_model",
    "load_adapter",
    "prepare_model_for_kbit_training",
    "save_adapter",
    "FP4_CODE",
    "INT4_CODE",
    "NF4_CODE",
    "QuantState",
    "create_dynamic_map",
    "create_normal_map",
    "dequantize_4bit",
    "error_metrics",
    "quantize_4bit",
    "quantize_roundtrip",
    "ARCHITECTURES",
    "ParameterCount",
    "count_parameters",
    "estimate_finetune_memory",
    "llama_config",
    "measure_training_step",
    "quant_state_nbytes",
    "quantized_nbytes",
    "glue",
    "use_book_style",
]
