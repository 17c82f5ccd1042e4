"""Finetuning the shipped model with (Q)LoRA, resumable bit for bit (Chapter 8).

The task: write an ISO date in words, ``"Date 2024-03-15 is"`` -> ``" March 15, 2024"``. The base
model, trained on documentation, cannot; a few hundred LoRA steps teach it. The outcome is measured
by exact match on held-out dates (every answer token, and the end-of-text token after it, is the
model's greedy choice) and by the perplexity of the answer tokens.

A run checkpoints its adapter, optimizer, scheduler and random state every ``checkpoint_every``
steps into one file, written beside the old one, flushed to disk and then renamed over it, so an
interruption at any moment (a power loss included, on a local disk) leaves a valid checkpoint; a
run started again on the same folder resumes, and ends with the same bits as a run never
interrupted. From the command line::

    python -m qlora_edu.finetune --method nf4-dq --steps 100 --out runs/nf4-dq
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from qlora_edu.adapters import load_lora_state_dict, lora_state_dict, save_adapter
from qlora_edu.base_model import load_base_model
from qlora_edu.model import get_qlora_model
from qlora_edu.paging import PagedAdamW, SimulatedDevice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# method -> (quant_type, compress_statistics); "lora" keeps the base weights in full precision
METHODS = {
    "lora": (None, False),
    "nf4-dq": ("nf4", True),
    "nf4": ("nf4", False),
    "fp4": ("fp4", False),
    "int4": ("int4", False),
}
MONTHS = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
CHECKPOINT = "checkpoint.pt"
EXPERIMENTS = Path(__file__).resolve().parent / "assets" / "experiments" / "finetune.json"


def date_examples(n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) pairs, dates from 1900 to 2099, none of them in exclude."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(73_049))
        iso = day.isoformat()
        if iso not in seen:
            seen.add(iso)
            out.append((f"Date {iso} is", f" {MONTHS[day.month - 1]} {day.day}, {day.year}"))
    return out


def date_task(n_train: int = 2000, n_test: int = 200) -> tuple[list, list]:
    """The task's training and held-out examples (disjoint dates, fixed seeds)."""
    train = date_examples(n_train, seed=1)
    test = date_examples(n_test, seed=2, exclude={p.split()[1] for p, _ in train})
    return train, test


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: list[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Token ids padded on the right, and labels that score only the answer and its end token."""
    pairs = [
        (
            tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        )
        for prompt, answer in examples
    ]
    return pad_examples(pairs, tokenizer.pad_token_id)


def pad_examples(
    pairs: list[tuple[list[int], list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """``(prompt ids, answer ids)`` pairs as one batch: ``input_ids`` padded on the right, and
    ``labels`` that are -100 (not scored) everywhere but on the answer."""
    rows = [prompt + answer for prompt, answer in pairs]
    labels = [[-100] * len(prompt) + answer for prompt, answer in pairs]
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
    }


@torch.no_grad()
def _score(model, data: dict[str, torch.Tensor], batch_size: int = 256):
    """Per example: greedy exact match; and the summed cross entropy and count of answer tokens."""
    was_training, matches, loss_sum, tokens = model.training, [], 0.0, 0
    model.eval()
    for i in range(0, len(data["input_ids"]), batch_size):
        ids, labels = data["input_ids"][i : i + batch_size], data["labels"][i : i + batch_size]
        logits = model(ids).logits[:, :-1].float()  # position t predicts token t + 1
        target = labels[:, 1:]
        scored = target != -100
        matches.append(((logits.argmax(-1) == target) | ~scored).all(dim=1))
        loss_sum += torch.nn.functional.cross_entropy(
            logits[scored], target[scored], reduction="sum"
        ).item()
        tokens += scored.sum().item()
    model.train(was_training)
    return torch.cat(matches), loss_sum, tokens


def exact_matches(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """For each example: does greedy decoding reproduce the answer and then end the text?

    It does if and only if, fed the right answer so far, the model's top token is right at every
    answer position (greedy decoding then takes exactly those tokens): one forward pass decides it.
    """
    return _score(model, data)[0]


def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Exact match (see :func:`exact_matches`) and the perplexity of the answer tokens."""
    matches, loss_sum, tokens = _score(model, data)
    loss = loss_sum / tokens
    return {
        "exact_match": matches.float().mean().item(),
        "answer_loss": loss,
        "answer_perplexity": math.exp(loss),
    }


@dataclasses.dataclass
class FinetuneConfig:
    method: str = "nf4-dq"
    r: int = 8
    lora_alpha: float = 16
    lr: float = 1e-2
    steps: int = 100
    batch_size: int = 16
    warmup: int = 10
    seed: int = 0
    n_train: int = 2000
    optimizer: str = "adamw"  # or "paged": qlora_edu.PagedAdamW on a simulated device
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {list(METHODS)}")
        if self.optimizer not in ("adamw", "paged"):
            raise ValueError(f"optimizer must be 'adamw' or 'paged', got {self.optimizer!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "n_train"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def prepare_model(
    config: FinetuneConfig, model_name: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: the base model with (Q)LoRA adapters seeded by ``config.seed``."""
    model, tokenizer = load_base_model(model_name)
    quant_type, compress = METHODS[config.method]
    torch.manual_seed(config.seed)
    get_qlora_model(
        model,
        r=config.r,
        lora_alpha=config.lora_alpha,
        quant_type=quant_type,
        compress_statistics=compress,
    )
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()
    return model.train(), tokenizer


def _make_optimizer(model, config: FinetuneConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "paged":
        device = SimulatedDevice(capacity=1 << 40)
        return PagedAdamW(params, device=device, lr=config.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The examples of a step: a fixed function of the step (each epoch a fresh permutation of the
    n examples, seeded by the epoch), so a resumed run sees exactly the data it would have seen."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // n, positions % n
    orders = {
        e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
        for e in epochs.unique().tolist()
    }
    pairs = zip(epochs.tolist(), offsets.tolist(), strict=True)
    return torch.stack([orders[e][o] for e, o in pairs])


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    history: list,
    config: FinetuneConfig,
) -> None:
    """Everything a resumed run needs, written to a temporary file and renamed into place."""
    state = {
        "config": dataclasses.asdict(config),
        "step": step,
        "history": history,
        "adapter": lora_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    os.replace(tmp, path)  # atomic: a reader sees the old checkpoint or the new one, never half
    fsync_directory(path.parent)  # and the rename itself survives a power loss


def fsync_directory(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the system allows it (POSIX)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: a directory cannot be opened to flush it
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finetune(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> list[dict]:
    """Train ``model``'s adapters on the date task; returns the loss history.

    With ``out_dir``: checkpoint there every ``config.checkpoint_every`` steps, resume from a
    checkpoint found there (after checking it was made with the same config), and save the final
    adapter to ``out_dir/adapter`` in PEFT's format.
    """
    train, _ = date_task(config.n_train)
    data = encode(tokenizer, train)
    optimizer = _make_optimizer(model, config)

    scheduler = linear_schedule(optimizer, config.warmup, config.steps)
    history, start = [], 0
    checkpoint = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        checkpoint = Path(out_dir) / CHECKPOINT
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != dataclasses.asdict(config):
            raise ValueError(
                f"{checkpoint} was made with a different config: {state['config']}; "
                "use another folder or the same settings"
            )
        load_lora_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, history = state["step"], state["history"]
    steps = range(start, config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, initial=start, total=config.steps, desc=config.method)
    for step in steps:
        idx = batch_indices(step, len(data["input_ids"]), config.batch_size, config.seed)
        loss = model(data["input_ids"][idx], labels=data["labels"][idx]).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": loss.item()})
        done = step + 1
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(checkpoint, model, optimizer, scheduler, done, history, config)
    if out_dir is not None:
        save_adapter(model, Path(out_dir) / "adapter")
    return history


def experiment_results() -> dict:
    """Chapter 8's experiment grids as committed: made by ``scripts/experiments.py``, which says
    what each field holds."""
    return json.loads(EXPERIMENTS.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m qlora_edu.finetune",
        description="Finetune the shipped model (or --model) on the date task with (Q)LoRA.",
    )
    defaults = FinetuneConfig()
    for field in dataclasses.fields(FinetuneConfig):
        value = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--out", required=True, help="folder for checkpoints and the adapter")
    parser.add_argument("--model", default=None, help="hub id or path (default: shipped model)")
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    out, model_name, quiet = args.pop("out"), args.pop("model"), args.pop("no_progress")
    config = FinetuneConfig(**args)
    model, tokenizer = prepare_model(config, model_name)
    if (Path(out) / CHECKPOINT).exists():
        print(f"resuming from {Path(out) / CHECKPOINT}")
    history = finetune(model, tokenizer, config, out_dir=out, progress=not quiet)
    _, test = date_task(config.n_train)
    result = {"method": config.method, "seed": config.seed, "final_loss": history[-1]["loss"]}
    result.update(evaluate(model, encode(tokenizer, test)))
    (Path(out) / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
