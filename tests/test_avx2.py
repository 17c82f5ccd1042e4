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
