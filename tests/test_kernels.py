"""kernel= reproduces each bitsandbytes CPU kernel a reader can install, bit for bit.

"cpu" (bitsandbytes >= 0.50) is compared live in tests/test_quantize.py. bitsandbytes 0.49.x cannot
be installed beside it, so its bytes are stored: scripts/bnb_reference.py ran it on inputs that are
regenerated here from their seeds (the stored SHA-256 of each input proves they are the same), and
wrote the SHA-256 of every tensor it stored.
"""

import json
from pathlib import Path

import pytest
import torch
from bnb_reference import CASES, case_input, digest, stored_digests

from qlora_edu.quantize import KERNELS, quantize_4bit

REFERENCE = json.loads((Path(__file__).parent / "data" / "bnb-0.49.2-cpu.json").read_text())
RESULTS = REFERENCE["results"]


def test_the_reference_holds_every_case_from_bitsandbytes_049():
    assert REFERENCE["provenance"]["bitsandbytes"] == "0.49.2"
    stored = [tuple(r["case"][:1]) + (tuple(r["case"][1]),) + tuple(r["case"][2:]) for r in RESULTS]
    assert stored == CASES


def quantize(result, kernel):
    seed, shape, dtype, blocksize, quant_type, dq = result["case"]
    x = case_input(seed, tuple(shape), dtype)
    assert digest(x) == result["input"], "the regenerated input differs from the one stored"
    packed, state = quantize_4bit(
        x, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq, kernel=kernel
    )
    return stored_digests(packed, state)


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: "-".join(map(str, r["case"])))
def test_cpu_049_gives_bitsandbytes_049s_bytes(result):
    ours = quantize(result, "cpu-0.49")
    assert ours == {name: result[name] for name in ours}


def test_the_kernels_really_differ():
    """Not a test that cannot fail: on the same inputs "cpu" differs from 0.49's bytes often."""
    differ = sum(quantize(r, "cpu") != quantize(r, "cpu-0.49") for r in RESULTS[::4])
    assert differ >= 5


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel 'cuda-0.40'"):
        quantize_4bit(torch.randn(64), kernel="cuda-0.40")
    assert set(KERNELS) == {"cpu", "cpu-0.49", "cuda"}
