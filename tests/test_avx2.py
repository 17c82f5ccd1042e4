"""`make nbval` re-executes the notebooks limited to AVX2 (scripts/avx2.py): the limit must bite."""

import subprocess
import sys

import avx2
import pytest
import torch


def test_the_limit_selects_avx2_kernels_and_changes_last_bits_on_avx512():
    native, limited = avx2.probe(False), avx2.probe(True)
    if native[0] not in ("AVX2", "AVX512"):
        pytest.skip(f"an x86 CPU with AVX2 is needed, this one offers {native[0]}")
    assert limited[0] == "AVX2"
    if native[0] == "AVX512":  # the same computation with other kernels: other last bits
        assert native[1:] != limited[1:]
    else:
        assert native == limited


def test_the_wrapper_runs_the_command_limited():
    command = [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]
    out = subprocess.run(
        [sys.executable, avx2.__file__, *command], capture_output=True, text=True, check=True
    ).stdout
    assert "torch CPU capability:" in out
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert out.splitlines()[-1] == "AVX2"


COMPILED_BITS = """
import dataclasses, torch
from qlora_edu import dequantize_4bit, fused, quantize_4bit
compiled = torch.compile(fused.dequantize_4bit_formula, dynamic=False)
differing = 0
for rows, quant_type in ((16, "nf4"), (4096, "fp4")):
    packed, state = quantize_4bit(torch.randn(rows, 4096), quant_type=quant_type)
    for dtype in (torch.float32, torch.bfloat16):
        s = dataclasses.replace(state, dtype=dtype)
        with fused.disabled():
            expected = dequantize_4bit(packed, s)
        differing += int((compiled(packed, s).view(expected.shape) != expected).sum())
print(differing)
"""


def test_the_limited_run_does_not_reuse_natively_compiled_code():
    """Inductor's on-disk cache does not key on ATEN_CPU_CAPABILITY: a limited run that reused
    code compiled natively gave millions of wrong values (Chapter 12's compiled formula). The
    wrapper gives the limited run a cache of its own; both runs must compute the plain path's."""
    native = subprocess.run(
        [sys.executable, "-c", COMPILED_BITS], capture_output=True, text=True, check=True
    )
    limited = subprocess.run(
        [sys.executable, avx2.__file__, sys.executable, "-c", COMPILED_BITS],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert native.stdout.split()[-1] == "0"
    assert limited.stdout.split()[-1] == "0"
