"""quantize_4bit / dequantize_4bit (NF4, double quantization): qlora_edu against bitsandbytes' CPU
backend, in the same run, interleaved; median of several repeats; prints throughput and ratios.

Run with `make bench`. Timings vary between runs and machines: record them with the machine.
"""

from __future__ import annotations

import platform
import statistics
import time

import bitsandbytes
import bitsandbytes.functional as bnb
import torch

from qlora_edu import dequantize_4bit, quantize_4bit

REPEATS = 7
KWARGS = dict(blocksize=64, quant_type="nf4", compress_statistics=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, ours, theirs, numel: int) -> None:
    ours(), theirs()  # warm up (bitsandbytes compiles its dequantization on first use)
    t_ours, t_theirs = [], []
    for _ in range(REPEATS):
        t_ours.append(timed(ours))
        t_theirs.append(timed(theirs))
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    print(
        f"{name:<28} ours {numel / a / 1e6:8.1f} M/s   bitsandbytes {numel / b / 1e6:8.1f} M/s"
        f"   ours/theirs speed {b / a:5.2f}x"
    )


def main() -> None:
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}"
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
        )


if __name__ == "__main__":
    main()
