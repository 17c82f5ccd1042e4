"""Chapter 8's experiment grids, run once by `make experiments` and committed as data.

A chapter must execute in five minutes; these grids take longer, and their numbers vary in the last
bits between CPUs. So this script runs them and writes one JSON file that ships with the package,
with the machine, the library versions, the date, the command, and a hash of the settings and of
every source file the numbers depend on (a test fails when the code changed and the results were
not made again). The chapter loads the file, analyses it, re-runs one cell of each grid live and
asserts that it agrees with the committed row.

- ``table2``: the held-out loss of every window of the held-out corpus, for the float32 model and
  each 4-bit format (Table 2 of the paper in miniature; the chapter bootstraps over windows).
- ``table4``: finetuning runs, every method with every seed (Table 4 in miniature).

    python scripts/experiments.py            # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from qlora_edu.base_model import (
    corpus_documents,
    load_base_model,
    next_token_loss,
    token_stream,
    token_windows,
)
from qlora_edu.finetune import FinetuneConfig, date_task, encode, evaluate, finetune, prepare_model
from qlora_edu.model import quantize_linear_weights

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "qlora_edu" / "assets" / "experiments" / "finetune.json"
CONFIG = {
    "table2": {
        "formats": {
            "float32": None,
            "INT4": ["int4", False],
            "FP4": ["fp4", False],
            "NF4": ["nf4", False],
            "NF4 + DQ": ["nf4", True],
        },
        "blocksize": 64,
        "seq_len": 128,
    },
    "table4": {
        "methods": ["lora", "nf4-dq", "fp4", "int4"],
        "seeds": [0, 1, 2, 3, 4],
        "steps": 60,
        "batch_size": 16,
    },
}
# Every file whose change could change a number in the results.
DEPENDS = [
    "scripts/experiments.py",
    "qlora_edu/adapters.py",
    "qlora_edu/base_model.py",
    "qlora_edu/codebooks.py",
    "qlora_edu/double_quant.py",
    "qlora_edu/finetune.py",
    "qlora_edu/lora.py",
    "qlora_edu/model.py",
    "qlora_edu/qlora.py",
    "qlora_edu/quantize.py",
    "qlora_edu/assets/pydoc_corpus.txt.gz",
    "qlora_edu/assets/pydoc-llama/model.safetensors",
    "qlora_edu/assets/pydoc-llama/tokenizer.json",
]


def code_hash() -> str:
    """SHA-256 of the settings and of every file in ``DEPENDS``."""
    digest = hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode())
    for name in DEPENDS:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()


def heldout_windows(tokenizer) -> torch.Tensor:
    stream = token_stream(tokenizer, corpus_documents("heldout"))
    return token_windows(stream, CONFIG["table2"]["seq_len"])


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 64) -> list[float]:
    """The mean next-token cross entropy of each window."""
    model.eval()
    losses = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        loss = next_token_loss(model, batch, reduction="none").view(len(batch), -1).mean(1)
        losses += loss.tolist()
    return losses


def format_model(fmt: list | None):
    """The shipped model with every linear layer but the head replaced by its 4-bit round trip."""
    model, _ = load_base_model()
    if fmt is not None:
        quant_type, compress = fmt
        quantize_linear_weights(
            model,
            quant_type=quant_type,
            compress_statistics=compress,
            blocksize=CONFIG["table2"]["blocksize"],
        )
    return model


def table2() -> dict[str, list[float]]:
    _, tokenizer = load_base_model()
    windows = heldout_windows(tokenizer)
    return {
        name: window_losses(format_model(fmt), windows)
        for name, fmt in CONFIG["table2"]["formats"].items()
    }


def run_config(method: str, seed: int) -> FinetuneConfig:
    grid = CONFIG["table4"]
    return FinetuneConfig(
        method=method, steps=grid["steps"], batch_size=grid["batch_size"], seed=seed
    )


def finetune_run(method: str, seed: int, test_data: dict) -> dict:
    config = run_config(method, seed)
    model, tokenizer = prepare_model(config)
    history = finetune(model, tokenizer, config)
    return {
        "method": method,
        "seed": seed,
        "losses": [h["loss"] for h in history],
        **evaluate(model, test_data),
    }


def table4() -> list[dict]:
    _, tokenizer = load_base_model()
    test_data = encode(tokenizer, date_task()[1])
    runs = []
    for method in CONFIG["table4"]["methods"]:
        for seed in CONFIG["table4"]["seeds"]:
            start = time.perf_counter()
            runs.append(finetune_run(method, seed, test_data))
            print(f"{method} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return runs


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "cpu": cpu,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "system": platform.system(),
    }


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    results = {
        "command": "python scripts/experiments.py",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
        "code_hash": code_hash(),
        "config": CONFIG,
        "table2": table2(),
        "table4": table4(),
    }
    results["minutes"] = round((time.perf_counter() - start) / 60, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} in {results['minutes']} minutes")


if __name__ == "__main__":
    sys.exit(main())
