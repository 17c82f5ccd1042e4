"""Run a command with PyTorch's CPU kernels limited to AVX2, after showing that the limit bites.

`make notebooks` stores every notebook's outputs with whatever instructions the machine offers
(often AVX-512); `make nbval` re-executes them through this script, limited to AVX2. A stored output
that passes under both depends on no instruction set, as a reader's laptop or Colab needs.

Before the command runs, one small computation is done in two fresh processes, natively and
limited, and the script prints whether the last bits differ: on an AVX-512 machine they do, which
shows the limit takes effect. (On an AVX2-only machine both are the same, and so are the kernels.)

    python scripts/avx2.py python -m pytest --nbval notebooks
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

# ATen's vectorised kernels (softmax, reductions, elementwise math) follow ATEN_CPU_CAPABILITY,
# oneDNN's (convolutions) ONEDNN_MAX_CPU_ISA, and MKL's (matmul) MKL_ENABLE_INSTRUCTIONS.
# torch.compile's Inductor also follows ATEN_CPU_CAPABILITY, but its on-disk cache does not tell
# the two apart (torch 2.13): a limited process that reuses code compiled natively computes wrong
# values. So the limited run gets a cache of its own.
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "TORCHINDUCTOR_CACHE_DIR": os.path.join(tempfile.gettempdir(), "torchinductor-avx2-limited"),
}

PROBE = """
import hashlib, torch
torch.manual_seed(0)
a = torch.randn(257, 513)
conv = torch.nn.functional.conv1d(torch.randn(4, 16, 300), torch.randn(32, 16, 5))
digest = lambda t: hashlib.sha1(t.numpy().tobytes()).hexdigest()[:12]
print(torch.backends.cpu.get_cpu_capability(), digest(torch.softmax(a, -1)), digest(conv))
"""


def environment(limited: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AVX2}
    return {**env, **AVX2} if limited else env


def probe(limited: bool) -> list[str]:
    """``[capability, softmax digest, conv1d digest]``, computed in a fresh process."""
    command = [sys.executable, "-c", PROBE]
    result = subprocess.run(
        command, env=environment(limited), capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def report() -> tuple[list[str], list[str]]:
    native, limited = probe(False), probe(True)
    print(f"torch CPU capability: {native[0]} natively, {limited[0]} limited")
    for i, name in ((1, "softmax (ATen)"), (2, "conv1d (oneDNN)")):
        verdict = "differ" if native[i] != limited[i] else "are identical"
        print(f"  {name}: last bits {verdict} between the two", flush=True)
    return native, limited


if __name__ == "__main__":
    report()
    if len(sys.argv) > 1:
        os.execvpe(sys.argv[1], sys.argv[1:], environment(True))
