"""bitsandbytes picks CPU kernels by CPU: the book compares on the same path everywhere."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16

from qlora_edu.hardware import keep_float32_on_cpu


def linear4bit(weights: torch.nn.Linear) -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(256, 128, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(weights.state_dict())
    return layer.to("cpu").eval()  # .to() quantizes


@pytest.mark.parametrize("batch", [1, 8])
def test_keep_float32_on_cpu_computes_in_float32_in_evaluation_mode(batch):
    torch.manual_seed(0)
    weights, x = torch.nn.Linear(256, 128), torch.randn(batch, 256)
    layer = keep_float32_on_cpu(linear4bit(weights))
    with torch.no_grad():
        out = layer(x)
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(out, x @ w.T + layer.bias, rtol=1e-6, atol=1e-6)
    if has_avx512bf16():  # without it, this CPU runs bitsandbytes' bfloat16 inference kernel
        with torch.no_grad():
            plain = linear4bit(weights)(x)
        assert (plain - out).abs().max() > 1e-4
