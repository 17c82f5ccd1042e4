"""qlora_edu: the pieces of QLoRA built from scratch, one module per chapter.

- :mod:`qlora_edu.memory` (Chapter 1): parameter counts and the finetuning memory calculator.
"""

from qlora_edu.memory import (
    ARCHITECTURES,
    ParameterCount,
    count_parameters,
    estimate_finetune_memory,
    llama_config,
    measure_training_step,
    quantized_nbytes,
)
from qlora_edu.plotting import use_book_style

__all__ = [
    "ARCHITECTURES",
    "ParameterCount",
    "count_parameters",
    "estimate_finetune_memory",
    "llama_config",
    "measure_training_step",
    "quantized_nbytes",
    "use_book_style",
]
