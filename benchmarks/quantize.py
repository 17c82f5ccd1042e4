"""quantize_4bit / dequantize_4bit (NF4, double quantization): qlora_edu against bitsandbytes' CPU
backend, in the same run, interleaved; median of several repeats; prints throughput and ratios.
Dequantization is timed three ways: our plain PyTorch path (Chapter 3), our default path (Chapter
12's kernel where it can be built) and bitsandbytes, beside the floor of filling a fresh output.

Run with `make bench`. Timings vary between runs and machines: record them with the machine.
"""

from __future__ import annotations

import platform
import statistics
import time

import bitsandbytes
import bitsandbytes.functional as bnb
import torch

from qlora_edu import dequantize_4bit, fused, quantize_4bit

REPEATS = 7
KWARGS = dict(blocksize=64, quant_type="nf4", compress_statistics=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, ours, theirs, numel: int, **others) -> None:
    """Throughputs of `ours`, `theirs` and `others`, interleaved, and ours / theirs."""
    functions = {"ours": ours, "bitsandbytes": theirs, **others}
    for f in functions.values():
        f()  # warm up
    times = {key: [] for key in functions}
    for _ in range(REPEATS):
        for key, f in functions.items():
            times[key].append(timed(f))
    median = {key: statistics.median(t) for key, t in times.items()}
    speeds = "".join(f"{key} {numel / t / 1e6:8.1f} M/s   " for key, t in median.items())
    print(f"{name:<28} {speeds}ours/theirs speed {median['bitsandbytes'] / median['ours']:5.2f}x")


def plain_dequantize(packed, state):
    with fused.disabled():
        return dequantize_4bit(packed, state)


def main() -> None:
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"bitsandbytes {bitsandbytes.__version__}, kernel: {fused.kernel() is not None}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        A = torch.randn(4096, 4096).to(dtype)
        ours_q, ours_state = quantize_4bit(A, **KWARGS)
        bnb_q, bnb_state = bnb.quantize_4bit(A, **KWARGS)
        compare(
            f"quantize   {dtype}",
            lambda A=A: quantize_4bit(A, **KWARGS),
            lambda A=A: bnb.quantize_4bit(A, **KWARGS),
            A.numel(),
        )
        compare(
            f"dequantize {dtype}",
            lambda q=ours_q, s=ours_state: dequantize_4bit(q, s),
            lambda q=bnb_q, s=bnb_state: bnb.dequantize_4bit(q, s),
            A.numel(),
            plain=lambda q=ours_q, s=ours_state: plain_dequantize(q, s),
            floor=lambda dtype=dtype: torch.empty(4096, 4096, dtype=dtype).fill_(1),
        )


if __name__ == "__main__":
    main()
