"""Make the small pretrained model the book ships: `pydoc-llama`, a Llama trained on Python's docs.

Nothing can be downloaded from a model hub where the book is built and tested, so the repository
makes its own pretrained model. This script is the whole recipe, deterministic on CPU:

1. ``corpus``: collect English technical text available on any machine with Python: the
   docstrings of CPython's standard library and the reference topics of ``pydoc_data`` (PSF
   License), and the docstrings of NumPy and SciPy (BSD-3-Clause), into
   ``qlora_edu/assets/pydoc_corpus.txt.gz``. That file is committed, so later steps do not depend on
   the Python version that runs them.
2. ``train``: train a byte-level BPE tokenizer with ``tokenizers`` and a ``LlamaForCausalLM`` from
   scratch, then write config, safetensors weights, tokenizer, training curve and model card to
   ``qlora_edu/assets/pydoc-llama/``.

    python scripts/train_base_model.py corpus
    python scripts/train_base_model.py train          # about an hour on 2 CPU cores

Same torch version and thread count -> the same weights, bit for bit.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import math
import pathlib
import platform
import sys
import sysconfig
import time

from qlora_edu.base_model import (
    CORPUS_PATH,
    MODEL_PATH,
    SEPARATOR,
    corpus_documents,
    next_token_loss,
    perplexity,
    token_stream,
    token_windows,
    unigram_perplexity,
)

OUT = MODEL_PATH

SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages"}

CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,  # a multiple of 64: every linear layer splits into whole 4-bit blocks
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
TRAIN = dict(seq_len=128, batch_size=32, steps=1500, lr=3e-3, warmup=100, weight_decay=0.1, seed=0)


def docstrings(root: pathlib.Path) -> set[str]:
    """Every module, class and function docstring of at least 80 ASCII characters under root."""
    docs = set()
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80 and doc.isascii():
                    docs.add(doc.strip())
    return docs


def collect_corpus() -> list[str]:
    """Docstrings of CPython's standard library, NumPy and SciPy, and the pydoc reference topics."""
    from pydoc_data.topics import topics

    import numpy
    import scipy

    docs = docstrings(pathlib.Path(sysconfig.get_paths()["stdlib"]))
    for package in (numpy, scipy):
        docs |= docstrings(pathlib.Path(package.__file__).parent)
    docs.update(text.strip() for text in topics.values() if text.isascii())
    return sorted(docs)


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=CONFIG["max_position_embeddings"],
    )


def train(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(TRAIN["seed"])
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train_docs, heldout_docs = corpus_documents("train"), corpus_documents("heldout")
    tokenizer = train_tokenizer(train_docs)
    train_stream = token_stream(tokenizer, train_docs)
    heldout_stream = token_stream(tokenizer, heldout_docs)
    seq_len, batch_size, steps = TRAIN["seq_len"], TRAIN["batch_size"], args.steps
    windows = token_windows(train_stream, seq_len)
    heldout = token_windows(heldout_stream, seq_len)
    print(f"train {len(train_stream):,} tokens, held out {len(heldout_stream):,} tokens")

    config = LlamaConfig(
        **CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAIN["weight_decay"]}, {"params": no_decay}],
        lr=TRAIN["lr"],
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )

    def lr_factor(step: int) -> float:
        if step < TRAIN["warmup"]:
            return (step + 1) / TRAIN["warmup"]
        progress = (step - TRAIN["warmup"]) / max(1, steps - TRAIN["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(TRAIN["seed"])
    order = torch.randperm(len(windows), generator=generator)
    curve, position, start = [], 0, time.time()
    for step in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(windows), generator=generator), 0
        batch = windows[order[position : position + batch_size]]
        position += batch_size
        loss = next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            entry = {"step": step, "train_loss": round(loss.item(), 4)}
            if step % 400 == 0 or step == steps - 1:
                entry["heldout_loss"] = round(math.log(perplexity(model, heldout)), 4)
            curve.append(entry)
            rate = (step + 1) * batch_size * seq_len / (time.time() - start)
            print(json.dumps(entry), f"{rate:,.0f} tokens/s", flush=True)

    heldout_ppl = perplexity(model, heldout)
    unigram = unigram_perplexity(train_stream, heldout_stream, config.vocab_size)
    minutes = (time.time() - start) / 60
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    # transformers 5 records its own new class name, which transformers 4 cannot load; the class
    # name both know reads the same tokenizer.json.
    tokenizer_config = json.loads((OUT / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (OUT / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    stats = {
        "parameters": n_params,
        "train_tokens": len(train_stream),
        "heldout_tokens": len(heldout_stream),
        "tokens_seen": steps * batch_size * seq_len,
        "heldout_perplexity": round(heldout_ppl, 2),
        "unigram_perplexity": round(unigram, 2),
        "minutes": round(minutes, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": CONFIG,
        "train": {**TRAIN, "steps": steps},
        "curve": curve,
    }
    (OUT / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    (OUT / "README.md").write_text(model_card(stats))
    print(json.dumps({k: v for k, v in stats.items() if k != "curve"}, indent=1))


def model_card(s: dict) -> str:
    c, t = s["config"], s["train"]
    return f"""---
license: mit
language: en
library_name: transformers
pipeline_tag: text-generation
---
# pydoc-llama

A small `LlamaForCausalLM` trained from scratch on the docstrings of Python, NumPy and SciPy,
made by `scripts/train_base_model.py` so that *QLoRA from Scratch* can finetune a real pretrained
model offline. It writes Python-documentation-flavoured English; it knows little else.

| | |
|---|---|
| parameters | {s["parameters"]:,} ({c["num_hidden_layers"]} layers, hidden {c["hidden_size"]}, \
MLP {c["intermediate_size"]}, {c["num_attention_heads"]} heads, tied embeddings) |
| tokenizer | byte-level BPE, {c["vocab_size"]:,} tokens, trained with `tokenizers` on the \
same corpus |
| data | docstrings of CPython's standard library, NumPy and SciPy, and the `pydoc_data` reference \
topics (`qlora_edu/assets/pydoc_corpus.txt.gz`; every 20th document held out) |
| training tokens | {s["train_tokens"]:,} in the corpus, {s["tokens_seen"]:,} seen \
({t["steps"]} steps x {t["batch_size"]} x {t["seq_len"]} tokens) |
| optimizer | AdamW, lr {t["lr"]}, {t["warmup"]} warm-up steps then cosine to 10%, \
weight decay {t["weight_decay"]}, gradient clipping 1.0, seed {t["seed"]} |
| held-out perplexity | **{s["heldout_perplexity"]}** (unigram baseline {s["unigram_perplexity"]}) |
| training time | {s["minutes"]} minutes on {s["threads"]} CPU threads (torch {s["torch"]}, \
Python {s["python"]}) |

The training curve is in `training.json`.

## Licence
The weights and tokenizer: MIT, like the rest of the repository. The training text is taken from
CPython (Python Software Foundation License, PSF-2.0; Copyright (c) 2001 Python Software
Foundation), NumPy (BSD-3-Clause; Copyright (c) 2005 NumPy Developers) and SciPy (BSD-3-Clause;
Copyright (c) 2001 SciPy Developers); these licences permit redistribution with their notices.

## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
```
or `qlora_edu.load_base_model()`.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["corpus", "train"])
    parser.add_argument("--steps", type=int, default=TRAIN["steps"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.what == "corpus":
        docs = collect_corpus()
        data = SEPARATOR.join(docs).encode("utf-8")
        CORPUS_PATH.write_bytes(gzip.compress(data, mtime=0))
        version = sys.version.split()[0]
        print(f"{len(docs):,} documents, {len(data) / 1e6:.1f} MB from Python {version}")
    else:
        train(args)


if __name__ == "__main__":
    main()
