"""Hidden checks of Chapter 9's exercises (scripts/assignments.py puts them in the autograder)."""

import torch
from transformers import BitsAndBytesConfig

from qlora_edu import estimate_finetune_memory, llama_config


def ch9_ex_defaults(env):
    """The defaults of BitsAndBytesConfig(load_in_4bit=True) itself."""
    config = BitsAndBytesConfig(load_in_4bit=True)
    call = env["default_call"]
    assert call["quant_type"] == config.bnb_4bit_quant_type
    assert call["compress_statistics"] == config.bnb_4bit_use_double_quant
    assert call.get("blocksize", 64) == 64


def _t4_total(batch, checkpointing):
    return estimate_finetune_memory(
        llama_config("Llama-3-8B"),
        "qlora",
        lora_r=16,
        batch_size=batch,
        seq_len=2048,
        dtype=torch.float16,
        gradient_checkpointing=checkpointing,
        adapter_dtype=torch.float32,
        kbit_prepared=True,
    )["total"]


def ch9_ex_t4(env):
    """The largest batches: they fit in 15 GB, one more does not (0 if none fits)."""
    for checkpointing, batch in env["largest"].items():
        assert batch == 0 or _t4_total(batch, checkpointing) <= 15e9
        assert _t4_total(batch + 1, checkpointing) > 15e9


def ch9_ex_paged(env):
    """A difference of rounding, not of arithmetic: AdamW's update after 5 steps is about 5e-3."""
    assert 0 <= float(env["diff"]) < 1e-6
