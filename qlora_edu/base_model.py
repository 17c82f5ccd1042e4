"""The small pretrained model the book ships, and its held-out text (Chapters 8-10).

``pydoc-llama`` is a 4M-parameter ``LlamaForCausalLM`` trained from scratch on the docstrings
of Python, NumPy and SciPy by ``scripts/train_base_model.py``; its weights, tokenizer and model
card are in ``qlora_edu/assets/pydoc-llama``, so the finetuning chapters run offline. Set the
environment variable ``QLORA_EDU_MODEL`` (or pass ``name``) to use a hub model instead.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_PATH = ASSETS / "pydoc-llama"
CORPUS_PATH = ASSETS / "pydoc_corpus.txt.gz"
SEPARATOR = "\n\x1e\n"  # between the corpus's documents (ASCII record separator)
HELDOUT_EVERY = 20  # every 20th document is held out from training


def model_name_or_path(name: str | None = None) -> str:
    """``name``, else ``$QLORA_EDU_MODEL``, else the path of the shipped model."""
    return name or os.environ.get("QLORA_EDU_MODEL") or str(MODEL_PATH)


def load_base_model(
    name: str | None = None, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: the shipped model by default, or a hub id / path (see module doc).

    Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (for example
    ``quantization_config``). The model is returned in evaluation mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_name_or_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval(), tokenizer


def corpus_documents(split: str = "heldout") -> list[str]:
    """The documents of the training corpus: ``"train"`` or ``"heldout"`` (every 20th)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    docs = gzip.decompress(CORPUS_PATH.read_bytes()).decode("utf-8").split(SEPARATOR)
    if split == "heldout":
        return docs[::HELDOUT_EVERY]
    return [d for i, d in enumerate(docs) if i % HELDOUT_EVERY]


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """The texts' token ids in one 1-D tensor, an end-of-text token after each text."""
    ids = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(stream: torch.Tensor, seq_len: int = 128) -> torch.Tensor:
    """A token stream cut into windows of ``seq_len + 1`` tokens, each starting where the last one's
    inputs end: inputs ``[:, :-1]``, next-token targets ``[:, 1:]``."""
    n = (len(stream) - 1) // seq_len
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Held-out perplexity of the unigram model (add-one smoothed token frequencies) of ``train``:
    the baseline a language model must beat."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    return math.exp(-(counts / counts.sum()).log()[heldout].mean().item())


def next_token_loss(
    model: nn.Module, windows: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross entropy of predicting ``windows[:, 1:]`` from ``windows[:, :-1]``."""
    logits = model(windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        windows[:, 1:].reshape(-1),
        reduction=reduction,
    )


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 64) -> float:
    """exp(mean next-token cross entropy) of ``model`` over ``windows``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch_size):
        total += next_token_loss(model, windows[i : i + batch_size], reduction="sum").item()
    model.train(was_training)
    return math.exp(total / windows[:, 1:].numel())


__all__ = [
    "MODEL_PATH",
    "corpus_documents",
    "load_base_model",
    "model_name_or_path",
    "next_token_loss",
    "perplexity",
    "token_stream",
    "token_windows",
    "unigram_perplexity",
]
