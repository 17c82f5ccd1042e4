"""Hidden checks of Chapter 11's exercises (scripts/assignments.py puts them in the autograder)."""

import math

import torch

import qlora_edu
from qlora_edu import NF4_CODE, dequantize_4bit, quantize_4bit


def ch11_ex_threshold(env):
    """The median distance to a decision boundary over the RMS of the update, recomputed."""
    layer = env["layers"][env["probe"]]
    Q, delta = layer.dequantized_weight(), layer.delta_weight().detach()
    index = env["codes"](layer.weight_packed, Q.numel()).long()
    scale = Q.abs().view(-1, 64).amax(1, keepdim=True).expand(-1, 64).reshape(-1)
    midpoints = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    upper = torch.cat([midpoints, torch.tensor([math.inf])])[index] - NF4_CODE[index]
    lower = NF4_CODE[index] - torch.cat([torch.tensor([-math.inf]), midpoints])[index]
    expected = torch.minimum(upper, lower).mul(scale).median() / delta.pow(2).mean().sqrt()
    assert abs(float(env["threshold"]) - expected.item()) < 0.01 * expected.item()


def ch11_ex_loftq_rank(env):
    """The smallest rank whose truncated SVD of the NF4 + DQ error beats blocks of 32."""
    w = env["W"][env["probe"]]
    fine = dequantize_4bit(*quantize_4bit(w, blocksize=32, compress_statistics=True))
    fine_error = ((w - fine).norm() / w.norm()).item()
    s2 = torch.linalg.svdvals(w - dequantize_4bit(*quantize_4bit(w))) ** 2
    error = (s2.sum() - s2.cumsum(0)).clamp(min=0).sqrt() / w.norm()  # entry r - 1: rank r
    needed = env["needed"]
    assert error[needed - 1] <= fine_error and (needed == 1 or error[needed - 2] > fine_error)


def ch11_ex_serving(env):
    """Each count, recomputed from Chapter 1's calculator."""
    config = qlora_edu.llama_config("LLaMA-13B")
    q13 = qlora_edu.estimate_finetune_memory(config, "qlora", lora_r=64)
    f13 = qlora_edu.estimate_finetune_memory(config, "full")
    room = 70e9
    expected = {
        "merged, 16 bits": math.ceil(20 / (room // f13["weights"])),
        "merged, 4 bits": math.ceil(20 / (room // q13["weights"])),
        "4-bit base + 20 adapters": math.ceil((q13["weights"] + 20 * q13["lora"]) / room),
    }
    assert env["gpus"] == expected


def ch11_ex_requantize(env):
    """Without double quantization nothing moves; with it, some weights do."""
    assert env["moved"][False] == 0 and env["moved"][True] > 0
