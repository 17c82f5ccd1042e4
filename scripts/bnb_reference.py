"""Bytes from another bitsandbytes version's CPU kernels, stored so tests can check its rules.

qlora_edu reproduces each CPU kernel of bitsandbytes a reader can install, chosen by `kernel=`:
"cpu" is bitsandbytes >= 0.50 (installed with the book, tested live), "cpu-0.49" is 0.49.x, which
the book's environment cannot hold beside 0.50. This script runs in an environment that has the
other version and writes what its kernels produce for a fixed list of inputs; the inputs are
regenerated from their seeds in the tests (their SHA-256 is stored to prove they are the same).

    python -m venv venv-0.49
    venv-0.49/bin/pip install torch==<the book's version> bitsandbytes==0.49.2
    PYTHONPATH=. venv-0.49/bin/python scripts/bnb_reference.py

writes tests/data/bnb-<version>-cpu.json: for every case, the SHA-256 of each stored tensor.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

CRAFTED = 99  # the seed of a case built to hit one corner, see case_input
# (seed, shape, dtype, blocksize, quant_type, double quantization); std 0.02 like real weights,
# plus cases with outliers, zero blocks and a final partial block.
CASES = [
    (seed, shape, dtype, blocksize, quant_type, dq)
    for seed, shape in enumerate([(256, 512), (1000, 130), (64, 4096)])
    for dtype in DTYPES
    for blocksize in (64, 128, 256)
    for quant_type in ("nf4", "fp4")
    for dq in (False, True)
] + [
    (10, (1024, 4096), "float32", 64, "nf4", True),  # the size of a real projection
    (11, (1024, 1024), "bfloat16", 64, "nf4", True),
    (12, (500, 67), "float32", 32, "nf4", True),  # a final partial block
    (13, (2048, 777), "float16", 4096, "fp4", True),
    (CRAFTED, (256, 64), "float32", 64, "nf4", True),
]


def case_input(seed: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The input of a case, the same on every machine: a seeded generator, then exact edits.

    The ``CRAFTED`` case has block absmax values whose double quantization puts one value at
    -0.988 of the second-level scale: between the dynamic map's first two entries, where 0.49's
    search (which replaced the first entry, -0.99297, by -1.0) and the exact map disagree."""
    g = torch.Generator().manual_seed(seed)
    if seed == CRAFTED:
        absmax = torch.full((shape[0],), 2.0 - 0.012 / (shape[0] - 2))
        absmax[:2] = torch.tensor([3.0, 2.0 - 0.988])
        blocks = torch.rand(shape, generator=g) * absmax[:, None]
        blocks[:, 0] = absmax
        return blocks.to(DTYPES[dtype])
    x = torch.randn(shape, generator=g) * 0.02
    flat = x.view(-1)
    flat[::997] *= 40  # outliers
    flat[128:192] = 0.0  # a block of zeros (for blocksizes up to 64)
    return x.to(DTYPES[dtype])


def digest(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes."""
    return hashlib.sha256(x.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def stored_digests(packed: torch.Tensor, state) -> dict[str, str]:
    """SHA-256 of every tensor a 4-bit quantization stores (bitsandbytes' QuantState or ours)."""
    stored = {"packed": packed, "absmax": state.absmax}
    if state.state2 is not None:
        stored |= {
            "offset": state.offset,
            "absmax2": state.state2.absmax,
            "code2": state.state2.code,
        }
    return {name: digest(t) for name, t in stored.items()}


def main() -> None:
    import bitsandbytes
    import bitsandbytes.functional as F

    results = []
    for seed, shape, dtype, blocksize, quant_type, dq in CASES:
        x = case_input(seed, shape, dtype)
        packed, state = F.quantize_4bit(
            x, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq
        )
        results.append(
            {
                "case": [seed, list(shape), dtype, blocksize, quant_type, dq],
                "input": digest(x),
                **stored_digests(packed, state),
            }
        )
    version = bitsandbytes.__version__
    out = ROOT / "tests" / "data" / f"bnb-{version}-cpu.json"
    out.parent.mkdir(exist_ok=True)
    provenance = {
        "bitsandbytes": version,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/bnb_reference.py",
    }
    out.write_text(json.dumps({"provenance": provenance, "results": results}, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB): {len(results)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
