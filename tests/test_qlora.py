"""Chapters 5-6: LoRA and the QLoRA layer against bitsandbytes + transformers + peft."""

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from conftest import small_llama_config
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from qlora_edu import (
    LoRALinear,
    QLoRALinear,
    dequantize_4bit,
    get_qlora_model,
    load_adapter,
    quantize_4bit,
    save_adapter,
)
from qlora_edu.hardware import keep_float32_on_cpu, qlora_bnb_config

warnings.filterwarnings("ignore", category=UserWarning)


def tiny_llama():
    torch.manual_seed(0)
    config = small_llama_config(hidden_size=128, intermediate_size=320, max_position_embeddings=128)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    return path


def peft_qlora(path, r=8):
    config = qlora_bnb_config(torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    keep_float32_on_cpu(model)  # the float32 path on every CPU (no bfloat16 inference kernel)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear"))


def ours_qlora(path, r=8):
    model = AutoModelForCausalLM.from_pretrained(path)
    return get_qlora_model(model, r=r, lora_alpha=16, compute_dtype=torch.float32)


def peft_name(name):
    return name.removeprefix("base_model.model.").replace(".default", "")


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def copy_lora(source, target):
    ours = dict(target.named_parameters())
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_" in name:
                ours[peft_name(name)].copy_(p)


def test_lora_linear_starts_as_the_base_and_merges():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(copy.deepcopy(base), r=4, lora_alpha=8)
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), base(x))  # B = 0: no change
    nn.init.normal_(layer.lora_B.weight)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=0, atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "lora_A.weight",
        "lora_B.weight",
    ]


def test_lora_initialisation_equals_peft():
    base = nn.Linear(64, 32)
    torch.manual_seed(0)
    ours = LoRALinear(copy.deepcopy(base), r=8)
    torch.manual_seed(0)
    theirs = get_peft_model(
        nn.Sequential(base), LoraConfig(r=8, lora_alpha=16, target_modules=["0"])
    )
    layer = theirs.base_model.model[0]
    assert torch.equal(ours.lora_A.weight, layer.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, layer.lora_B["default"].weight)
    assert torch.all(ours.lora_B.weight == 0)
    assert ours.scaling == layer.scaling["default"] == 16 / 8


def test_trainable_parameters_match_peft(saved_base):
    theirs = peft_qlora(saved_base)
    ours = ours_qlora(saved_base)
    peft_trainable = {
        peft_name(n): p.numel() for n, p in theirs.named_parameters() if p.requires_grad
    }
    our_trainable = {n: p.numel() for n, p in ours.named_parameters() if p.requires_grad}
    assert our_trainable == peft_trainable
    assert (
        sum(our_trainable.values())
        == 2
        * 8
        * sum(m.in_features + m.out_features for m in ours.modules() if isinstance(m, QLoRALinear))
        // 2
    )


def test_weights_logits_and_gradients_equal_bitsandbytes_and_peft(saved_base):
    theirs, ours = peft_qlora(saved_base), ours_qlora(saved_base)
    randomize_lora(theirs)
    copy_lora(theirs, ours)
    # every quantized layer stores the same bytes and dequantizes to the same weight
    their_layers = {
        peft_name(n).removesuffix(".base_layer"): m
        for n, m in theirs.named_modules()
        if type(m).__name__ == "Linear4bit"
        and hasattr(m, "weight")
        and m.weight.dtype == torch.uint8
    }
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, QLoRALinear)}
    assert set(their_layers) == set(our_layers) and len(our_layers) == 14
    import bitsandbytes.functional as bnb

    for name, layer in our_layers.items():
        weight = their_layers[name].weight
        assert torch.equal(layer.weight_packed, weight.data.view(-1, 1))
        assert torch.equal(
            layer.dequantized_weight(), bnb.dequantize_4bit(weight.data, weight.quant_state)
        )
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    logits_theirs = theirs(input_ids=ids).logits
    logits_ours = ours(input_ids=ids).logits
    torch.testing.assert_close(logits_ours, logits_theirs, rtol=1e-5, atol=1e-5)
    theirs(input_ids=ids, labels=ids).loss.backward()
    ours(input_ids=ids, labels=ids).loss.backward()
    grads = {peft_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6)


def test_adapter_round_trips_through_peft(saved_base, tmp_path):
    ours = ours_qlora(saved_base)
    randomize_lora(ours, seed=5)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(
        saved_base,
        quantization_config=qlora_bnb_config(torch.float32),
        device_map="cpu",
    )
    theirs = PeftModel.from_pretrained(keep_float32_on_cpu(base), tmp_path / "ours")
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5
    )
    # and the other way: peft saves, we load
    trained = peft_qlora(saved_base)
    randomize_lora(trained, seed=9)
    trained.save_pretrained(tmp_path / "peft")
    fresh = ours_qlora(saved_base)
    load_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(
        fresh(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5
    )


def test_a_mismatched_adapter_is_refused_and_nothing_is_loaded(saved_base, tmp_path):
    source = ours_qlora(saved_base, r=4)
    randomize_lora(source)
    save_adapter(source, tmp_path / "r4")
    target = ours_qlora(saved_base, r=8)
    before = {n: p.clone() for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match="shape"):
        load_adapter(target, tmp_path / "r4")
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())


def test_qlora_linear_stores_4_127_bits_per_base_parameter():
    layer = QLoRALinear.from_linear(nn.Linear(4096, 4096, bias=False), r=16)
    base = sum(b.numel() * b.element_size() for b in layer.buffers() if b is not None)
    code_books = layer.code.numel() * 4 + layer.code2.numel() * 4  # shared tables, not per weight
    assert round((base - code_books) * 8 / 4096**2, 3) == 4.127
    lora = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert lora == 16 * (4096 + 4096)


def test_no_dequantized_weight_is_kept_for_backward():
    layer = QLoRALinear.from_linear(nn.Linear(512, 256), r=8)
    x = torch.randn(4, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not [t for t in saved if t.shape == (256, 512)]  # no dense weight saved
    out.sum().backward()
    assert x.grad is not None and layer.lora_A.weight.grad is not None
    assert layer.bias.grad is None


def test_gradient_of_the_input_is_exact():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = QLoRALinear.from_linear(linear, r=4)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    layer64 = layer.to(torch.float64)
    assert layer64.weight_packed.dtype == torch.uint8 and layer64.absmax.dtype == torch.uint8
    torch.autograd.gradcheck(lambda t: layer64(t), (x,))


def test_merge_gives_a_plain_linear_with_the_same_output():
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(64, 48), r=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(7, 64)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_compute_dtype_casts_input_and_output_back():
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), r=4, compute_dtype=torch.bfloat16)
    out = layer(torch.randn(2, 64))
    assert out.dtype == torch.float32
    packed, state = quantize_4bit(nn.Linear(64, 32).weight.detach())
    assert dequantize_4bit(packed, state).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(r=0), ValueError, "r must be"),
        (dict(lora_alpha=0), ValueError, "lora_alpha"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    ],
)
def test_bad_lora_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        QLoRALinear.from_linear(nn.Linear(64, 64), **kwargs)


def test_bad_layers_and_inputs_are_named():
    with pytest.raises(TypeError, match="nn.Linear"):
        QLoRALinear.from_linear(nn.Conv1d(4, 4, 1))
    layer = QLoRALinear.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="last dimension is 63.*expects 64"):
        layer(torch.randn(2, 63))
    with pytest.raises(ValueError, match="match none.*q_proj"):
        get_qlora_model(tiny_llama(), target_modules=["attention.query"])


def test_explicit_target_modules():
    model = get_qlora_model(tiny_llama(), target_modules=["q_proj", "v_proj"])
    names = [n for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert model.get_output_embeddings().__class__ is nn.Linear
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A",
        "lora_B",
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [(3,), (2, 5), (0,)])
def test_a_trainable_bias_gets_the_gradient_of_a_plain_linear(dtype, batch):
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), r=4)
    layer.bias.requires_grad_(True)  # peft's bias="all" or "lora_only"
    x = torch.randn(*batch, 64).to(dtype).requires_grad_(True)
    g = torch.randn(*batch, 32).to(dtype)
    (layer(x) * g).sum().backward()
    bias = layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    weight = layer.dequantized_weight().to(dtype)
    (torch.nn.functional.linear(x_ref, weight, bias.to(dtype)) * g).sum().backward()
    assert layer.bias.grad.dtype == layer.bias.dtype == torch.float32
    assert torch.equal(layer.bias.grad, bias.grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert layer.weight_packed.grad is None


def test_the_layer_compiles_as_one_graph_forward_and_backward():
    """fullgraph=True: any graph break is an error. Inductor compiles the layer (a C++ compiler
    is needed on the CPU); checkpointing is traced with the faster aot_eager backend."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(128, 64), r=4)
    nn.init.normal_(layer.lora_B.weight)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 128)
    state = dataclasses.replace(layer.quant_state, dtype=torch.bfloat16)

    def forward(t, checkpointed=False):
        out = checkpoint(layer, t, use_reentrant=False) if checkpointed else layer(t)
        return out, dequantize_4bit(layer.weight_packed, state)

    def run(function):
        layer.zero_grad()
        x_ = x.clone().requires_grad_(True)
        out, weight = function(x_)
        out.square().sum().backward()
        return weight, [out, x_.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    weight, eager = run(forward)
    torch._dynamo.reset()
    compiled_weight, compiled = run(torch.compile(forward, fullgraph=True))
    _, checkpointed = run(
        torch.compile(lambda t: forward(t, checkpointed=True), fullgraph=True, backend="aot_eager")
    )
    for ours in (compiled, checkpointed):
        for a, b in zip(ours, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled_weight, weight)  # dequantized bit for bit (bfloat16 here)


def test_from_linear_on_meta_gives_the_shapes_of_a_real_layer():
    real = QLoRALinear.from_linear(nn.Linear(128, 96), r=4)
    meta = QLoRALinear.from_linear(nn.Linear(128, 96, device="meta"), r=4)
    tensors = dict(meta.named_buffers()) | dict(meta.named_parameters())
    assert all(t.device.type == "meta" for t in tensors.values())
    for name, t in (dict(real.named_buffers()) | dict(real.named_parameters())).items():
        assert (t.shape, t.dtype) == (tensors[name].shape, tensors[name].dtype), name
    out = meta(torch.empty(5, 128, device="meta"))
    assert out.shape == (5, 96) and out.device.type == "meta"


def test_a_dtype_change_leaves_the_4bit_buffers_where_they_are():
    """model.half() casts the adapter, not the 4-bit weight, and must not move it either (on a
    GPU it once moved every 4-bit buffer to the CPU): checked on the meta device, which no probe
    tensor on the CPU can stand for."""
    layer = QLoRALinear.from_linear(nn.Linear(64, 32, device="meta"), r=4)
    layer.half()
    assert layer.weight_packed.is_meta and layer.weight_packed.dtype == torch.uint8
    assert layer.absmax.is_meta and layer.lora_A.weight.dtype == torch.float16
