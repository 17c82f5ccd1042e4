"""Chapter 1: parameter counts and the finetuning memory calculator."""

import pytest
import torch
from conftest import small_llama_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from qlora_edu import (
    count_parameters,
    estimate_finetune_memory,
    get_qlora_model,
    llama_config,
    quant_state_nbytes,
    quantized_nbytes,
)
from qlora_edu.hardware import qlora_bnb_config
from qlora_edu.memory import measure_training_step

GB = 1000**3


@pytest.mark.parametrize(
    "name,expected",
    [
        ("LLaMA-7B", 6_738_415_616),
        ("LLaMA-13B", 13_015_864_320),
        ("LLaMA-33B", 32_528_943_616),
        ("LLaMA-65B", 65_285_660_672),
        ("Llama-2-70B", 68_976_648_192),
        ("Llama-3-8B", 8_030_261_248),
    ],
)
def test_counts_equal_the_released_checkpoints(name, expected):
    assert count_parameters(llama_config(name)).total == expected


def test_counts_equal_a_materialised_model():
    config = small_llama_config()
    model = LlamaForCausalLM(config)
    counts = count_parameters(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert counts.linear == sum(m.weight.numel() for m in linears)
    assert len(counts.linear_shapes) == 7 * config.num_hidden_layers


def test_paper_headline_for_65b():
    config = llama_config("LLaMA-65B")
    assert estimate_finetune_memory(config, "full")["total"] > 780 * GB
    assert estimate_finetune_memory(config, "qlora")["total"] < 48 * GB


def test_full_finetuning_costs_twelve_bytes_per_parameter():
    config = small_llama_config()
    total = count_parameters(config).total
    parts = estimate_finetune_memory(config, "full")
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == 12 * total
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


@pytest.mark.parametrize(
    "kwargs,bytes_per_parameter",
    [
        (dict(master_weights=True), 16),  # mixed precision: ZeRO's 2 + 2 + (4 + 4 + 4)
        (dict(), 12),  # 16-bit weights and gradients, float32 moments
        (dict(moments_dtype=None), 8),  # torch.optim.AdamW on 16-bit parameters
        (dict(moments_dtype=torch.bfloat16, master_weights=True), 12),
    ],
)
def test_the_accountings_of_full_finetuning(kwargs, bytes_per_parameter):
    config = small_llama_config()
    total = count_parameters(config).total
    parts = estimate_finetune_memory(config, "full", dtype=torch.bfloat16, **kwargs)
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == bytes_per_parameter * total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_adamw_keeps_moments_in_the_parameters_dtype(dtype):
    torch.manual_seed(0)
    config = small_llama_config()
    model = LlamaForCausalLM(config).to(dtype)
    measured = measure_training_step(model, torch.randint(0, config.vocab_size, (1, 8)))
    estimated = estimate_finetune_memory(config, "full", dtype=dtype, moments_dtype=None)
    for part in ("weights", "gradients", "optimizer"):
        assert estimated[part] == measured[part], part
    assert measured["optimizer"] == 2 * measured["weights"]


def test_quantized_bytes_per_parameter():
    n = 4096 * 4096
    assert quantized_nbytes(n, compress_statistics=False) * 8 / n == 4.5
    assert quantized_nbytes(n) * 8 / n == pytest.approx(4.127, abs=5e-4)


@pytest.mark.parametrize("double_quant", [True, False])
def test_quant_state_bytes_of_ours_and_of_bitsandbytes(double_quant, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    config = small_llama_config()
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    shapes = count_parameters(config).linear_shapes
    expected = sum(quantized_nbytes(o * i, 64, double_quant) - (o * i + 1) // 2 for o, i in shapes)
    code_books = len(shapes) * 4 * (16 + (256 if double_quant else 0))

    ours = get_qlora_model(
        AutoModelForCausalLM.from_pretrained(tmp_path), compress_statistics=double_quant
    )
    assert quant_state_nbytes(ours) == expected
    assert quant_state_nbytes(ours, code_books=True) == expected + code_books
    bnb_config = qlora_bnb_config(torch.float32)
    if not double_quant:
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=bnb_config, device_map="cpu"
    )
    assert quant_state_nbytes(theirs) == expected
    assert quant_state_nbytes(theirs, code_books=True) == expected + code_books
    assert quant_state_nbytes(LlamaForCausalLM(config)) == 0


@pytest.mark.parametrize(
    "method,lora_r,dtype",
    [
        ("full", None, torch.float32),
        ("lora", 4, torch.float32),
        ("full", None, torch.bfloat16),
        ("full", None, torch.float16),
    ],
)
@pytest.mark.parametrize("batch,seq", [(1, 32), (3, 17)])
def test_estimate_matches_a_measured_training_step(method, lora_r, dtype, batch, seq):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = small_llama_config()
    model = LlamaForCausalLM(config).to(dtype)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=lora_r, target_modules="all-linear"))
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    measured = measure_training_step(model, ids)
    estimated = estimate_finetune_memory(
        config,
        method,
        lora_r=lora_r or 8,
        batch_size=batch,
        seq_len=seq,
        gradient_checkpointing=False,
        dtype=dtype,
        moments_dtype=None,  # torch.optim.AdamW keeps the parameters' dtype
    )
    for part in ("weights", "lora", "gradients", "optimizer"):
        assert estimated[part] == measured[part], part
    # token ids and labels (int64) are the only saved tensors the estimate leaves out
    assert 0 <= measured["activations"] - estimated["activations"] <= 3 * 8 * batch * seq
    assert estimated["total"] == pytest.approx(measured["total"], rel=0.10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_peft_keeps_16_bit_models_adapters_in_float32(dtype):
    """peft's adapters are float32 on a 16-bit model: their bytes, and the float32 copy of its
    input each adapted layer keeps, are what adapter_dtype counts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = small_llama_config()
    model = get_peft_model(
        LlamaForCausalLM(config).to(dtype), LoraConfig(r=4, target_modules="all-linear")
    )
    ids = torch.randint(0, config.vocab_size, (3, 17))
    measured = measure_training_step(model, ids)
    estimated = estimate_finetune_memory(
        config, "lora", lora_r=4, batch_size=3, seq_len=17, gradient_checkpointing=False,
        dtype=dtype, adapter_dtype=torch.float32, moments_dtype=None,
    )  # fmt: skip
    for part in ("weights", "lora", "gradients", "optimizer"):
        assert estimated[part] == measured[part], part
    assert 0 <= measured["activations"] - estimated["activations"] <= 3 * 8 * ids.numel()
    plain = estimate_finetune_memory(
        config, "lora", lora_r=4, batch_size=3, seq_len=17, gradient_checkpointing=False,
        dtype=dtype, moments_dtype=None,
    )  # fmt: skip
    assert plain["activations"] < estimated["activations"]  # the float32 copies are not free


@pytest.mark.parametrize("prepared", [False, True])
def test_bitsandbytes_qlora_in_bfloat16_with_and_without_prepare(prepared, tmp_path):
    """A 4-bit model in bfloat16 with peft, before and after prepare_model_for_kbit_training
    (everything not 4-bit, and so every activation, in float32)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from qlora_edu.hardware import keep_float32_on_cpu, qlora_bnb_config

    torch.manual_seed(0)
    config = small_llama_config()
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=qlora_bnb_config(torch.bfloat16), dtype=torch.bfloat16,
        device_map="cpu",
    )  # fmt: skip
    keep_float32_on_cpu(model)
    if prepared:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, config.vocab_size, (2, 24))
    measured = measure_training_step(model, ids)
    estimated = estimate_finetune_memory(
        config, "qlora", lora_r=4, batch_size=2, seq_len=24, gradient_checkpointing=False,
        dtype=torch.bfloat16, adapter_dtype=torch.float32, moments_dtype=None,
        kbit_prepared=prepared,
    )  # fmt: skip
    for part in ("lora", "gradients", "optimizer"):
        assert estimated[part] == measured[part], part
    assert estimated["weights"] == measured["weights"] + quant_state_nbytes(model)
    assert 0 <= measured["activations"] - estimated["activations"] <= 3 * 8 * ids.numel()


@settings(max_examples=25, deadline=None)
@given(seq=st.integers(1, 4096), batch=st.integers(1, 8))
def test_checkpointing_never_costs_more_and_memory_grows_with_tokens(seq, batch):
    config = llama_config("LLaMA-7B")
    on = estimate_finetune_memory(config, "qlora", seq_len=seq, batch_size=batch)
    off = estimate_finetune_memory(
        config, "qlora", seq_len=seq, batch_size=batch, gradient_checkpointing=False
    )
    more = estimate_finetune_memory(config, "qlora", seq_len=seq + 1, batch_size=batch)
    assert on["activations"] <= off["activations"]
    assert more["activations"] > on["activations"]
    assert on["weights"] == off["weights"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="adam"), "unknown method"),
        (dict(method="qlora", lora_r=0), "lora_r"),
        (dict(method="qlora", batch_size=-1), "batch_size"),
        (dict(method="qlora", seq_len=0), "seq_len"),
        (dict(method="full", dtype=torch.int8), "floating point"),
        (dict(method="full", moments_dtype=torch.int8), "moments_dtype"),
        (dict(method="lora", adapter_dtype=torch.int8), "adapter_dtype"),
        (dict(method="lora", kbit_prepared=True), "kbit_prepared"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_finetune_memory(small_llama_config(), **kwargs)


def test_config_missing_fields_is_named():
    class Partial:
        hidden_size = 64

    with pytest.raises(ValueError, match="intermediate_size"):
        estimate_finetune_memory(Partial(), "full")
    with pytest.raises(ValueError, match="unknown architecture"):
        llama_config("LLaMA-1T")


def test_world_size_shards_all_but_the_activations():
    config = llama_config("LLaMA-7B")
    one = estimate_finetune_memory(config, "qlora", lora_r=16, seq_len=1024)
    four = estimate_finetune_memory(config, "qlora", lora_r=16, seq_len=1024, world_size=4)
    for part in ("weights", "lora", "gradients", "optimizer"):
        assert four[part] == -(-one[part] // 4)
    assert four["activations"] == one["activations"]
    assert "gathered" not in one
    # two decoder layers' packed weights (+ adapters): 1/16 of the layers' share
    layers = one["weights"] - 2 * 32000 * 4096 * 2 - 2 * 4096
    assert four["gathered"] == pytest.approx(2 * (layers + one["lora"]) / 32, rel=1e-6)
    assert four["total"] == sum(v for k, v in four.items() if k != "total")
    with pytest.raises(ValueError, match="world_size"):
        estimate_finetune_memory(config, "qlora", world_size=0)
