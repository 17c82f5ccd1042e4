"""The GPU report's code, run small on the CPU, and the hardware helpers (Chapter 9)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from qlora_edu.hardware import (
    compute_dtype,
    default_device,
    qlora_bnb_config,
    qlora_training_arguments,
)


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
    ids=["T4", "A100", "H100"],
)
def test_compute_dtype_follows_the_capability(monkeypatch, capability, expected):
    """A T4 (7.5) gets float16 although is_bf16_supported() says True there (emulation counts)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("cuda") == expected


@pytest.mark.parametrize(
    "capability, fp16, bf16", [((7, 5), True, False), ((8, 0), False, True), (None, False, False)],
    ids=["T4", "A100", "CPU"],
)  # fmt: skip
def test_training_arguments_follow_the_capability(monkeypatch, tmp_path, capability, fp16, bf16):
    """The Trainer recipe of Chapter 9: paged 8-bit AdamW from bitsandbytes, mixed precision in the
    GPU's compute dtype (none on a CPU), non-reentrant gradient checkpointing."""
    import bitsandbytes as bnb
    from transformers import Trainer, TrainingArguments

    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    kwargs = qlora_training_arguments(compute_dtype("cuda" if capability else "cpu"))
    assert (kwargs["fp16"], kwargs["bf16"]) == (fp16, bf16)
    assert kwargs["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    # Only the CPU's arguments can be built here (mixed precision asks for a GPU); the optimizer
    # transformers picks from them is the same on every machine.
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, **{**kwargs, "fp16": False, "bf16": False}
    )
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert optimizer_cls is bnb.optim.AdamW
    assert optimizer_kwargs["optim_bits"] == 8 and optimizer_kwargs["is_paged"] is True
    with pytest.raises(ValueError, match="compute dtype"):
        qlora_training_arguments(torch.float64)


def test_compute_dtype_on_a_cpu(monkeypatch):
    assert compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    assert compute_dtype() == torch.float32


def test_the_bitsandbytes_config_is_the_qlora_recipe():
    config = qlora_bnb_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == compute_dtype()
    assert config.bnb_4bit_quant_storage == torch.uint8
    sharded = qlora_bnb_config(torch.bfloat16, quant_storage=torch.float32)
    assert sharded.bnb_4bit_compute_dtype == torch.bfloat16
    assert sharded.bnb_4bit_quant_storage == torch.float32


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sys.path.insert(0, "benchmarks")
    import gpu_report

    out = tmp_path_factory.mktemp("report") / "report.json"
    gpu_report.main(["--device", "cpu", "--quick", "--out", str(out)])
    return json.loads(out.read_text()), gpu_report


def test_report_checks_equality_with_bitsandbytes(report):
    data, _ = report
    assert data["environment"]["device"] == "cpu"
    assert {"torch", "bitsandbytes", "transformers", "peft", "date"} <= data["environment"].keys()
    for row in data["dequantize"]:
        assert row["quantize_bytes_identical"] and row["dequantized_identical"]
        assert row["compiled_identical"] and row["compiled_ms"] > 0
        assert row["quantize_kernel"] == "cpu" and not any(row["quantize_differing"].values())
        assert row["bitsandbytes_ms"] > 0 and row["qlora_edu_ms"] > 0


def test_report_trains_every_implementation_beside_the_estimate(report):
    from transformers import AutoConfig

    from qlora_edu import count_parameters, estimate_finetune_memory
    from qlora_edu.base_model import MODEL_PATH

    data, gpu_report = report
    rows = data["training_step"]
    assert [r["implementation"] for r in rows] == list(gpu_report.IMPLEMENTATIONS)
    config = AutoConfig.from_pretrained(MODEL_PATH)
    for row in rows:
        method = "lora" if row["implementation"].startswith("16-bit") else "qlora"
        estimate = estimate_finetune_memory(
            config, method, lora_r=row["lora_r"], batch_size=row["batch_size"],
            seq_len=row["seq_len"], dtype=torch.float32, adapter_dtype=torch.float32,
        )  # fmt: skip
        assert row["estimate_MiB"] == round(estimate["total"] / 2**20, 1)
        r = row["lora_r"]
        adapter_numels = [
            n for o, i in count_parameters(config).linear_shapes for n in (r * i, o * r)
        ]
        paged = sum(8 * n for n in adapter_numels if n >= 100_000)
        expected = paged if row["implementation"].endswith("paged AdamW") else 0
        assert row["paged_state_MiB"] == round(expected / 2**20, 1)
        assert row["step_ms"] > 0 and row["peak_MiB"] is None  # no allocator peak on a CPU


ROOT = Path(__file__).parents[1]


def test_by_default_the_report_goes_where_the_package_ships_it_from(report):
    import tomllib

    from qlora_edu.hardware import GPU_RESULTS

    _, gpu_report = report
    env = {"device": "cuda:0", "gpu": "Tesla T4", "date": "2026-11-28"}
    assert gpu_report.default_out(env) == GPU_RESULTS / "gpu_report_tesla-t4_2026-11-28.json"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = package_data["package-data"]["qlora_edu"]
    assert f"{GPU_RESULTS.relative_to(ROOT / 'qlora_edu').as_posix()}/*.json" in shipped


def test_shipped_gpu_results_come_from_a_gpu_and_chapter_9_shows_them():
    from qlora_edu.hardware import gpu_results

    results = gpu_results()
    chapter = (ROOT / "notebooks" / "09_bitsandbytes_peft.ipynb").read_text()
    readme = (ROOT / "README.md").read_text()
    if not results:  # then the book must not pretend otherwise
        assert "No GPU measurement has been committed yet" in chapter
        assert "(none yet)" in readme
    for name, data in results.items():
        assert data["environment"]["device"].startswith("cuda") and data["environment"]["gpu"]
        assert all(r["dequantized_identical"] for r in data["dequantize"])
        assert all(r["peak_MiB"] > 0 for r in data["training_step"])
        assert f"{name}: {data['environment']['gpu']}" in chapter  # in its stored outputs


def test_gpu_results_reads_every_shipped_report(monkeypatch, tmp_path):
    from qlora_edu import hardware

    monkeypatch.setattr(hardware, "GPU_RESULTS", tmp_path / "none")
    assert hardware.gpu_results() == {}
    monkeypatch.setattr(hardware, "GPU_RESULTS", tmp_path)
    for name in ("gpu_report_b.json", "gpu_report_a.json"):
        (tmp_path / name).write_text(json.dumps({"environment": {"gpu": name}}))
    assert list(hardware.gpu_results()) == ["gpu_report_a.json", "gpu_report_b.json"]
    assert hardware.gpu_results()["gpu_report_b.json"]["environment"]["gpu"] == "gpu_report_b.json"
