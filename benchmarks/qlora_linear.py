"""Forward + backward of one 4096 x 4096 linear layer on 2048 tokens with a rank-16 adapter,
float32 compute on the CPU, three ways in the same run, interleaved:

(a) LoRA over an unquantized base (qlora_edu.LoRALinear),
(b) qlora_edu.QLoRALinear (NF4, double quantization), dequantizing with Chapter 12's kernel,
(b0) the same layer on the plain PyTorch path (Chapter 3's dequantization),
(c) bitsandbytes' Linear4bit (NF4, double quantization) with peft's LoRA.

Prints medians and ratios. Run with `make bench`; record results with the machine.
"""

from __future__ import annotations

import statistics
import time
import warnings

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from qlora_edu import LoRALinear, QLoRALinear, fused

SIZE, TOKENS, RANK, REPEATS = 4096, 2048, 16, 5


def bitsandbytes_peft(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        SIZE, SIZE, bias=False, compute_dtype=torch.float32, quant_type="nf4",
        compress_statistics=True,
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )._quantize("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(nn.Sequential(layer), LoraConfig(r=RANK, target_modules=["0"]))
    return model


def step(layer: nn.Module, x: torch.Tensor) -> None:
    layer(x).sum().backward()


def plain_step(layer: nn.Module, x: torch.Tensor) -> None:
    with fused.disabled():
        step(layer, x)


def main() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(SIZE, SIZE, bias=False)
    lora, ours, theirs = (
        LoRALinear(linear, r=RANK),
        QLoRALinear.from_linear(linear, r=RANK),
        bitsandbytes_peft(linear),
    )
    x = torch.randn(TOKENS, SIZE, requires_grad=True)
    steps = {
        "(a) LoRA, float32 base": lambda: step(lora, x),
        "(b) qlora_edu QLoRALinear": lambda: step(ours, x),
        "(b0) the same, plain path": lambda: plain_step(ours, x),
        "(c) bitsandbytes + peft": lambda: step(theirs, x),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for f in steps.values():
        f()  # warm up
    for _ in range(REPEATS):
        for name, f in steps.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, "
        f"{torch.get_num_threads()} threads; median of {REPEATS}"
    )
    for name, t in median.items():
        print(f"{name:<28} {t * 1000:8.1f} ms")
    b, c, a = (
        median["(b) qlora_edu QLoRALinear"],
        median["(c) bitsandbytes + peft"],
        median["(a) LoRA, float32 base"],
    )
    print(f"qlora_edu vs bitsandbytes + peft: {c / b:.2f}x the speed")
    print(f"kernel vs plain path: {median['(b0) the same, plain path'] / b:.2f}x the speed")
    print(f"4-bit overhead of qlora_edu over an unquantized base: {b / a - 1:+.0%}")


if __name__ == "__main__":
    main()
