"""Chapter 11's experiment grid: does LoftQ initialisation help the Chapter 8 finetune?

Like ``scripts/experiments.py`` (Chapter 8), this runs what a chapter cannot afford in its five
minutes and writes one JSON file that ships with the package, with the machine, the library
versions, the date, the command and a hash of the settings and of every source file the numbers
depend on (``tests/test_after_training.py`` fails when they changed and the results were not made
again). The chapter loads it, analyses the paired differences between initialisations over seeds,
and re-runs one cell live.

- ``runs``: the Chapter 8 finetune (NF4 + DQ, rank 8, 60 steps of 16 examples) from each
  initialisation with each seed: ``"standard"`` (LoRA's: A Kaiming-uniform, B zero, base Q(W)) and
  ``"loftq-T"`` (:func:`qlora_edu.loftq.apply_loftq` with T iterations). A seed sets the
  data order, and for ``"standard"`` the adapter's initial A; a LoftQ adapter is the same for
  every seed. Each run records its training losses, its scores on the held-out dates and the
  perplexity of the held-out corpus (what finetuning costs the model's first skill), before and
  after training.

    python scripts/experiments_ch11.py          # about 5 minutes on 2 quiet CPU cores
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import experiments
import torch
from experiments import machine

from qlora_edu.base_model import (
    corpus_documents,
    load_base_model,
    perplexity,
    token_stream,
    token_windows,
)
from qlora_edu.finetune import FinetuneConfig, date_task, encode, evaluate, finetune, prepare_model
from qlora_edu.loftq import EXPERIMENTS, apply_loftq, linear_weights

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {
    "method": "nf4-dq",
    "inits": {"standard": 0, "loftq-1": 1, "loftq-5": 5},  # name -> LoftQ iterations (0: none)
    "seeds": [0, 1, 2, 3, 4, 5],
    "steps": 60,
    "batch_size": 16,
    "heldout_windows": 200,
}
# Every file whose change could change a number in the results: this script, LoftQ, and what
# Chapter 8's grid depends on (scripts/experiments.py serves here only for its helpers).
DEPENDS = [
    "scripts/experiments_ch11.py",
    "qlora_edu/loftq.py",
    *(name for name in experiments.DEPENDS if name != "scripts/experiments.py"),
]


def code_hash() -> str:
    """SHA-256 of ``CONFIG`` and of every file in ``DEPENDS``: Chapter 8's hash, of this grid."""
    with mock.patch.multiple(experiments, CONFIG=CONFIG, DEPENDS=DEPENDS):
        return experiments.code_hash()


def initialised_model(init: str, seed: int):
    """``(model, tokenizer, config)``: the Chapter 8 QLoRA model with the ``init`` adapters."""
    config = FinetuneConfig(
        method=CONFIG["method"], steps=CONFIG["steps"], batch_size=CONFIG["batch_size"], seed=seed
    )
    model, tokenizer = prepare_model(config)
    iterations = CONFIG["inits"][init]
    if iterations:
        apply_loftq(model, linear_weights(load_base_model()[0]), num_iter=iterations)
    return model, tokenizer, config


def run(init: str, seed: int, test_data: dict, windows: torch.Tensor) -> dict:
    model, tokenizer, config = initialised_model(init, seed)
    before = perplexity(model, windows)
    history = finetune(model, tokenizer, config)
    return {
        "init": init,
        "seed": seed,
        "losses": [h["loss"] for h in history],
        **evaluate(model, test_data),
        "heldout_perplexity_before": before,
        "heldout_perplexity": perplexity(model, windows),
    }


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    _, tokenizer = load_base_model()
    test_data = encode(tokenizer, date_task()[1])
    stream = token_stream(tokenizer, corpus_documents("heldout"))
    windows = token_windows(stream)[: CONFIG["heldout_windows"]]
    runs = []
    for seed in CONFIG["seeds"]:
        for init in CONFIG["inits"]:
            began = time.perf_counter()
            runs.append(run(init, seed, test_data, windows))
            print(f"{init} seed {seed}: {time.perf_counter() - began:.0f} s", flush=True)
    results = {
        "command": "python scripts/experiments_ch11.py",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
        "code_hash": code_hash(),
        "config": CONFIG,
        "runs": runs,
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }
    EXPERIMENTS.parent.mkdir(parents=True, exist_ok=True)
    EXPERIMENTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {EXPERIMENTS.relative_to(ROOT)} in {results['minutes']} minutes")


if __name__ == "__main__":
    sys.exit(main())
