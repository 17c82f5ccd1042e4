"""What Chapter 9 reports from a real GPU, measured in one run and written as JSON.

1. Dequantization: bitsandbytes' CUDA kernel against qlora_edu's PyTorch ``dequantize_4bit`` on the
   same packed weights (NF4, double quantization), and against Chapter 12's formula compiled by
   ``torch.compile`` (Triton on a GPU), with a check that all give identical values and
   that qlora_edu's ``quantize_4bit`` on the GPU (``kernel="cuda"``, the rules of csrc/kernels.cu)
   gives bitsandbytes' bytes: NF4 and FP4 codes, 8-bit absmax codes, second-level absmax, offset,
   each counted where they differ (the GPU's approximate reciprocal can move a value within a
   float32 step of a threshold).
2. One training step (gradient checkpointing on), median time and peak memory
   (``torch.cuda.max_memory_allocated``), for the shipped model and a TinyLlama-1.1B-shaped model
   (random weights): a 16-bit base with peft LoRA; bitsandbytes 4-bit with peft LoRA and AdamW; the
   same with bitsandbytes' paged AdamW; qlora_edu's QLoRA model; each beside the Chapter 1
   calculator's estimate.

    python benchmarks/gpu_report.py

writes qlora_edu/assets/gpu_results/gpu_report_<gpu>_<date>.json: committed there, it ships with the
package and Chapter 9 shows it (``qlora_edu.hardware.gpu_results()``), on Colab too. On a CPU
(``--device cpu --quick --out FILE``) it runs a small version of the same code: that is what the
tests check. Only numbers from a GPU go into the book.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import platform
import re
import statistics
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

from qlora_edu import estimate_finetune_memory, get_qlora_model, llama_config
from qlora_edu.base_model import MODEL_PATH
from qlora_edu.fused import dequantize_4bit_formula
from qlora_edu.hardware import GPU_RESULTS, compute_dtype, qlora_bnb_config
from qlora_edu.quantize import QuantState, dequantize_4bit, quantize_4bit

MiB = 2**20
PAGE_MIN_NUMEL = 100_000  # bitsandbytes' optimizers page only the state of tensors this large


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` (the GPU synchronised after each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dequantize_rows(device: torch.device, shapes, dtypes, repeats: int) -> list[dict]:
    import bitsandbytes.functional as F

    rows = []
    for shape in shapes:
        for dtype in dtypes:
            W = torch.randn(shape, dtype=dtype, device=device)
            packed, state = F.quantize_4bit(
                W, blocksize=64, quant_type="nf4", compress_statistics=True
            )
            ours = QuantState.from_bnb(state)
            # the kernel follows the device: "cuda" (csrc/kernels.cu's rules) on a GPU
            our_packed, our_state = quantize_4bit(W, blocksize=64, quant_type="nf4")
            differing = {
                "packed_bytes": int((our_packed != packed).sum()),
                "absmax_codes": int((our_state.absmax != state.absmax).sum()),
                "absmax2": int((our_state.state2.absmax != state.state2.absmax).sum()),
                "offset": int(our_state.offset != state.offset),
            }
            fp4_packed, _ = F.quantize_4bit(W, blocksize=64, quant_type="fp4")
            our_fp4, _ = quantize_4bit(W, blocksize=64, quant_type="fp4", compress_statistics=False)
            differing["fp4_packed_bytes"] = int((our_fp4 != fp4_packed).sum())
            same_bytes = not any(differing.values())
            same_values = torch.equal(
                dequantize_4bit(packed, ours), F.dequantize_4bit(packed, state)
            )
            t_bnb = timed(lambda: F.dequantize_4bit(packed, state), device, repeats)  # noqa: B023
            t_ours = timed(lambda: dequantize_4bit(packed, ours), device, repeats)  # noqa: B023
            compiled = torch.compile(dequantize_4bit_formula, dynamic=False)
            same_compiled = torch.equal(
                compiled(packed, ours).view(shape), F.dequantize_4bit(packed, state)
            )
            t_compiled = timed(lambda: compiled(packed, ours), device, repeats)  # noqa: B023
            out_bytes = W.numel() * W.element_size()
            rows.append(
                {
                    "shape": list(shape),
                    "dtype": str(dtype).removeprefix("torch."),
                    "bitsandbytes_ms": round(t_bnb * 1e3, 4),
                    "qlora_edu_ms": round(t_ours * 1e3, 4),
                    "bitsandbytes_GBps": round(out_bytes / t_bnb / 1e9, 1),
                    "qlora_edu_GBps": round(out_bytes / t_ours / 1e9, 1),
                    "qlora_edu_time_over_bitsandbytes": round(t_ours / t_bnb, 2),
                    "compiled_ms": round(t_compiled * 1e3, 4),
                    "compiled_time_over_bitsandbytes": round(t_compiled / t_bnb, 2),
                    "compiled_identical": same_compiled,
                    "quantize_kernel": "cuda" if W.is_cuda else "cpu",
                    "quantize_bytes_identical": same_bytes,
                    "quantize_differing": differing,
                    "dequantized_identical": same_values,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _load(path: str, dtype: torch.dtype, device: torch.device, four_bit: bool):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "device_map": {"": str(device)}}
    if four_bit:
        kwargs["quantization_config"] = qlora_bnb_config(dtype)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def build(impl: str, path: str, r: int, dtype: torch.dtype, device: torch.device):
    """The model to train and its optimizer, for one implementation."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    if impl == "qlora_edu":
        model = _load(path, dtype, torch.device("cpu"), four_bit=False)
        model = get_qlora_model(model.to(device), r=r, lora_alpha=2 * r, compute_dtype=dtype)
        model.to(device)  # the new adapters; the 4-bit buffers only move, never cast
    else:
        model = _load(path, dtype, device, four_bit=impl != "16-bit base + peft")
        config = LoraConfig(
            r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if impl.endswith("paged AdamW"):
        optimizer = bnb.optim.PagedAdamW(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    return model, optimizer


def train_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


IMPLEMENTATIONS = (
    "16-bit base + peft",
    "bitsandbytes 4-bit + peft",
    "bitsandbytes 4-bit + peft, paged AdamW",
    "qlora_edu",
)


def step_rows(name, path, config, device, batch, seq_len, r, repeats) -> list[dict]:
    dtype = compute_dtype(device)
    rows = []
    for impl in IMPLEMENTATIONS:
        model, optimizer = build(impl, path, r, dtype, device)
        params = [p for p in model.parameters() if p.requires_grad]
        ids = torch.randint(config.vocab_size, (batch, seq_len), generator=torch.Generator())
        ids = ids.to(device)

        step = functools.partial(train_step, model, optimizer, ids)
        step()  # the optimizer's state exists from here on
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, device, repeats, warmup=1)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        # Paged state lives in CUDA unified memory, which max_memory_allocated does not count.
        paged = impl.endswith("paged AdamW")
        paged_state = sum(8 * p.numel() for p in params if paged and p.numel() >= PAGE_MIN_NUMEL)
        method = "lora" if impl.startswith("16-bit") else "qlora"
        estimate = estimate_finetune_memory(
            config, method, lora_r=r, batch_size=batch, seq_len=seq_len, dtype=dtype,
            adapter_dtype=torch.float32,  # peft's and qlora_edu's adapters, on any model
        )  # fmt: skip
        rows.append(
            {
                "model": name,
                "implementation": impl,
                "batch_size": batch,
                "seq_len": seq_len,
                "lora_r": r,
                "compute_dtype": str(dtype).removeprefix("torch."),
                "step_ms": round(seconds * 1e3, 1),
                "peak_MiB": None if peak is None else round(peak / MiB, 1),
                "estimate_MiB": round(estimate["total"] / MiB, 1),
                "estimate_parts_MiB": {k: round(v / MiB, 1) for k, v in estimate.items()},
                "peak_over_estimate": None if peak is None else round(peak / estimate["total"], 3),
                "paged_state_MiB": round(paged_state / MiB, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model, optimizer, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def random_llama(name: str, folder: Path, device: torch.device) -> str:
    """Save a randomly initialised model of the published shape ``name`` (16-bit) to ``folder``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(name)).to(compute_dtype(device))
    model.save_pretrained(folder)
    del model
    return str(folder)


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "python": platform.python_version(),
    }
    for package in ("torch", "bitsandbytes", "transformers", "peft"):
        info[package] = version(package)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_GiB"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30
        )
    return info


def default_out(env: dict) -> Path:
    """gpu_report_<gpu>_<date>.json in the package's GPU results (one file per GPU and day)."""
    gpu = re.sub(r"[^a-z0-9]+", "-", env.get("gpu", env["device"]).lower()).strip("-")
    return GPU_RESULTS / f"gpu_report_{gpu}_{env['date']}.json"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        help="default: qlora_edu/assets/gpu_results/gpu_report_<gpu>_<date>.json",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke run)")
    parser.add_argument("--model", default=str(MODEL_PATH), help="the small model (a path)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: this report is measured on a GPU (or pass --device cpu)")
    from transformers import AutoConfig

    report = {"environment": environment(device)}
    if args.quick:
        shapes, dtypes, repeats = [(256, 256)], [torch.float32], 2
    else:
        shapes, repeats = [(4096, 4096), (8192, 8192)], 20
        dtypes = [torch.float16, torch.bfloat16]
    report["dequantize"] = dequantize_rows(device, shapes, dtypes, repeats)
    shipped = AutoConfig.from_pretrained(args.model)
    batch, seq_len = (2, 32) if args.quick else (16, 256)
    report["training_step"] = step_rows(
        "pydoc-llama (shipped)",
        args.model,
        shipped,
        device,
        batch,
        seq_len,
        8,
        repeats=2 if args.quick else 10,
    )
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            path = random_llama("TinyLlama-1.1B", Path(tmp), device)
            report["training_step"] += step_rows(
                "TinyLlama-1.1B shape, random weights",
                path,
                llama_config("TinyLlama-1.1B"),
                device,
                batch=4,
                seq_len=1024,
                r=64,  # the paper's rank: most adapter tensors reach the page threshold
                repeats=5,
            )
    out = args.out or default_out(report["environment"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
