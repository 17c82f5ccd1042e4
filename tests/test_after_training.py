"""Chapter 11: merging (qlora_edu.merge) against peft's merge_and_unload, LoftQ (qlora_edu.loftq)
against peft's LoftQ, and the committed LoftQ grid against the code that made it."""

import copy
import math
import warnings

import bitsandbytes as bnb
import experiments_ch11
import pytest
import torch
from conftest import small_llama_config
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_lora_layer
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from qlora_edu import QLoRALinear, QuantState, dequantize_4bit, get_qlora_model, save_adapter
from qlora_edu.hardware import keep_float32_on_cpu, qlora_bnb_config
from qlora_edu.loftq import (
    EXPERIMENTS,
    apply_loftq,
    experiment_results,
    linear_weights,
    loftq_init,
    peft_loftq_init_on_cpu,
    relative_error,
)
from qlora_edu.merge import merge_and_unload
from qlora_edu.model import quantize_linear_weights
from qlora_edu.qlora import Linear4bit

# Rows of whole blocks of 64: bitsandbytes 0.50.2's CPU dequantize_4bit (its C++ kernel, seen on an
# AVX-512 CPU) gives wrong values for rows whose length is not a multiple of the blocksize (160,
# 96), and peft's merge dequantizes with it.
CONFIG = small_llama_config(intermediate_size=192)


def weight(rows=128, cols=192, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


# LoftQ


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_equals_peft_with_the_same_quantizer(num_iter):
    """peft's loftq_init (NF4, blocks of 64, no double quantization, run on the CPU) and ours with
    that quantizer: the same base and the same adapter. Both make the same calls on the same
    values, so they agree to the bit on the CPUs tested; the test allows float32 rounding of a
    product computed in another order (rtol 1e-5) should a BLAS differ."""
    W = weight()
    peft_base, peft_A, peft_B = peft_loftq_init_on_cpu()(
        W, num_bits=4, reduced_rank=4, num_iter=num_iter
    )
    packed, state, lora_A, lora_B = loftq_init(W, 4, num_iter, compress_statistics=False)
    torch.testing.assert_close(dequantize_4bit(packed, state), peft_base, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lora_A, peft_A, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lora_B, peft_B, rtol=1e-5, atol=1e-7)


def test_loftq_reduces_the_error_and_scales_for_lora_alpha():
    W = weight()
    plain = dequantize_4bit(*loftq_init(W, 8)[:2])  # one iteration: the base is Q(W)
    for scaling in (1.0, 2.0, 0.5):
        packed, state, lora_A, lora_B = loftq_init(W, 8, num_iter=2, scaling=scaling)
        effective = dequantize_4bit(packed, state) + scaling * lora_B @ lora_A
        assert (W - effective).norm() < 0.97 * (W - plain).norm()
    _, _, lora_A, lora_B = loftq_init(W, 8, scaling=2.0)
    _, _, unscaled_A, unscaled_B = loftq_init(W, 8)
    torch.testing.assert_close(2.0 * lora_B @ lora_A, unscaled_B @ unscaled_A)


def test_peft_loftq_ignores_the_scaling():
    """peft issue #1982: with lora_alpha = 2 r, peft's adapter adds twice the SVD of W - Q(W); with
    one iteration the error is then exactly as large as with no adapter at all (the removed and the
    doubled parts are orthogonal)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    W = linear_weights(model)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(peft_lora_layer, "loftq_init", peft_loftq_init_on_cpu())
        peft_model = get_peft_model(copy.deepcopy(model), config)
    name = "model.layers.0.mlp.up_proj"
    layer = peft_model.base_model.model.get_submodule(name)
    Q = layer.base_layer.weight.detach()
    effective = Q + layer.get_delta_weight("default")
    error, plain = (W[name] - effective.detach()).norm(), (W[name] - Q).norm()
    assert math.isclose(error, plain, rel_tol=1e-4)
    ours = get_qlora_model(copy.deepcopy(model), r=8, lora_alpha=16, compress_statistics=False)
    apply_loftq(ours, W)
    assert relative_error(ours.get_submodule(name), W[name]) < 0.97 * plain / W[name].norm()


@pytest.mark.parametrize("compress_statistics", [True, False])
def test_apply_loftq_sets_every_layer_to_loftq_init(compress_statistics):
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    W = linear_weights(model)
    get_qlora_model(model, r=4, lora_alpha=8, compress_statistics=compress_statistics)
    apply_loftq(model, W, num_iter=2)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert layers.keys() == W.keys()
    for name, layer in layers.items():
        packed, state, lora_A, lora_B = loftq_init(
            W[name], 4, 2, scaling=2.0, compress_statistics=compress_statistics
        )
        assert torch.equal(layer.weight_packed, packed)
        assert torch.equal(layer.dequantized_weight(), dequantize_4bit(packed, state))
        assert torch.equal(layer.lora_A.weight, lora_A) and torch.equal(layer.lora_B.weight, lora_B)
        assert relative_error(layer, W[name]) < 0.1
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model(torch.randint(0, CONFIG.vocab_size, (2, 8))).logits.sum().backward()


def test_loftq_rejects_no_iterations():
    with pytest.raises(ValueError, match="num_iter"):
        loftq_init(weight(), 4, num_iter=0)


# Merging


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small Llama saved to disk, and a QLoRA model of it with random ("trained") adapters, saved
    as a PEFT adapter."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    LlamaForCausalLM(CONFIG).save_pretrained(folder)
    model = get_qlora_model(AutoModelForCausalLM.from_pretrained(folder), r=8, lora_alpha=16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, folder / "adapter")
    return folder, model.eval()


def test_requantized_merge_equals_peft_merge_and_unload_on_a_4bit_model(trained):
    folder, model = trained
    base = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=qlora_bnb_config(torch.float32), device_map={"": "cpu"}
    )
    peft_model = PeftModel.from_pretrained(keep_float32_on_cpu(base), folder / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft_model.merge_and_unload()
    assert any("rounding errors" in str(w.message) for w in caught)
    ours = merge_and_unload(copy.deepcopy(model), requantize=True)
    checked = 0
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            layer, state = ours.get_submodule(name), QuantState.from_bnb(module.weight.quant_state)
            assert isinstance(layer, Linear4bit)
            assert torch.equal(layer.weight_packed, module.weight.data)
            assert torch.equal(layer.quant_state.absmax, state.absmax)
            assert torch.equal(layer.quant_state.offset, state.offset)
            assert torch.equal(layer.quant_state.state2.absmax, state.state2.absmax)
            checked += 1
    assert checked == 7 * CONFIG.num_hidden_layers
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("into", ["dequantized", "original"])
def test_float_merge_equals_peft_merge_and_unload(trained, into):
    """Into Q(W) (peft on a float model holding the 4-bit round trip of its weights) and into the
    original W: the same float32 additions, so the same bits."""
    folder, model = trained
    base = AutoModelForCausalLM.from_pretrained(folder)
    W = linear_weights(base)
    if into == "dequantized":
        quantize_linear_weights(base, compress_statistics=True)
    theirs = PeftModel.from_pretrained(base, folder / "adapter").merge_and_unload()
    ours = merge_and_unload(copy.deepcopy(model), base_weights=W if into == "original" else None)
    for name in W:
        assert type(ours.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(ours.get_submodule(name).weight, theirs.get_submodule(name).weight)


def test_merged_models_compute_what_the_trained_one_did(trained):
    _, model = trained
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        merged = merge_and_unload(copy.deepcopy(model))(ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    layer = next(m for m in model.modules() if isinstance(m, QLoRALinear))
    plain = copy.deepcopy(layer)
    torch.nn.init.zeros_(plain.lora_B.weight)
    four_bit = Linear4bit(layer.weight_packed, layer.quant_state, layer.bias)
    x = torch.randn(3, layer.in_features)
    assert torch.equal(four_bit(x), plain(x))  # the 4-bit layer is QLoRALinear without adapter


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_a_requantized_merge_loses_an_update_far_below_the_level_spacing(compress_statistics):
    linear = torch.nn.Linear(192, 128, bias=False)
    layer = QLoRALinear.from_linear(linear, r=4, compress_statistics=compress_statistics)
    merged = merge_and_unload(torch.nn.Sequential(copy.deepcopy(layer)), requantize=True)[0]
    change = merged.dequantized_weight() - layer.dequantized_weight()
    if compress_statistics:  # the absmax values are re-quantized from their own 8-bit round trip
        assert 0 < change.abs().max() < 3e-3 * layer.dequantized_weight().abs().max()
    else:  # without double quantization a re-quantized 4-bit weight is the same weight
        assert not change.any()
    with torch.no_grad():
        layer.lora_B.weight.fill_(1e-6)
    assert layer.delta_weight().abs().max() > 0
    merged = merge_and_unload(torch.nn.Sequential(layer), requantize=True)[0]
    assert torch.equal(merged.weight_packed, layer.weight_packed)  # every code as it was


# The committed grid


def test_committed_loftq_results_come_from_the_current_code_and_settings():
    results = experiment_results()
    assert results["code_hash"] == experiments_ch11.code_hash(), (
        f"{EXPERIMENTS.name} was made by other code or settings: run "
        "`python scripts/experiments_ch11.py` and commit the result"
    )
    assert results["config"] == experiments_ch11.CONFIG
    for key in ("command", "date", "machine", "versions", "minutes"):
        assert results[key]
    grid = results["config"]
    runs = {(r["init"], r["seed"]) for r in results["runs"]}
    assert runs == {(i, s) for i in grid["inits"] for s in grid["seeds"]}
    assert all(len(r["losses"]) == grid["steps"] for r in results["runs"])


def test_the_grid_hash_changes_when_a_dependency_or_a_setting_changes(monkeypatch):
    before = experiments_ch11.code_hash()
    monkeypatch.setitem(experiments_ch11.CONFIG, "steps", 61)
    assert experiments_ch11.code_hash() != before
    monkeypatch.undo()
    monkeypatch.setattr(experiments_ch11, "DEPENDS", experiments_ch11.DEPENDS[1:])
    assert experiments_ch11.code_hash() != before
