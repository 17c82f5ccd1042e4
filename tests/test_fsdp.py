"""FSDP2 over two CPU processes (gloo), launched by torchrun: the same losses and adapter as one
process, half the frozen bytes per rank, and a failing rank that ends the job (Chapter 10)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

STEPS = 3


def torchrun(tmp_path, n_procs, name, *args, timeout=240):
    out = tmp_path / name
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n_procs),
               "-m", "qlora_edu.fsdp", "--steps", str(STEPS), "--out", str(out), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    return run, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    results = {}
    for name, n_procs, args in [
        ("single", 1, ()),
        ("sharded", 2, ("--quant-storage", "float32")),
        ("bitsandbytes", 2, ("--impl", "bitsandbytes", "--quant-storage", "bfloat16")),
        ("bf16", 1, ("--mixed-precision", "bf16", "--activation-checkpointing")),
        (
            "bf16_sharded",
            2,
            (
                "--mixed-precision",
                "bf16",
                "--activation-checkpointing",
                "--quant-storage",
                "bfloat16",
            ),
        ),  # fmt: skip
        ("low_memory", 2, ("--low-memory-load",)),
    ]:
        run, out = torchrun(tmp, n_procs, name, *args)
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = (json.loads((out / "result.json").read_text()), out)
    return results


def test_two_processes_compute_the_losses_of_one(runs):
    single, sharded = runs["single"][0], runs["sharded"][0]
    assert single["world_size"] == 1 and sharded["world_size"] == 2
    assert len(sharded["losses"]) == STEPS
    torch.testing.assert_close(
        torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-6, atol=0
    )
    assert sharded["losses"][-1] < sharded["losses"][0]  # it trains


def test_the_sharded_run_saves_the_same_adapter_once_in_peft_format(runs):
    from peft import PeftModel

    from qlora_edu.base_model import load_base_model

    a = load_file(runs["single"][1] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["sharded"][1] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 4
    scale = max(t.abs().max().item() for t in a.values())
    for key in a:  # AdamW amplifies last-bit gradient differences where gradients are near zero
        assert (a[key] - b[key]).abs().max().item() < 1e-3 * scale
    model = PeftModel.from_pretrained(load_base_model()[0], runs["sharded"][1] / "adapter")
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == b.keys() and all(torch.equal(loaded[k], b[k]) for k in b)


def test_each_rank_holds_half_of_the_frozen_weights(runs):
    result = runs["sharded"][0]
    for nbytes in result["frozen_bytes_per_rank"]:
        assert nbytes == pytest.approx(result["frozen_bytes_unsharded"] / 2, rel=0.01)


def test_bitsandbytes_with_float_quant_storage_computes_the_same(runs):
    theirs, ours = runs["bitsandbytes"][0], runs["single"][0]
    torch.testing.assert_close(
        torch.tensor(theirs["losses"]), torch.tensor(ours["losses"]), rtol=1e-6, atol=0
    )


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    run, out = torchrun(tmp_path, 2, "failing", "--fail-at-step", "1")
    assert run.returncode != 0
    assert "rank 1 fails at step 1" in run.stderr
    assert not (out / "result.json").exists()


def test_mixed_precision_and_checkpointing_shard_like_one_process(runs):
    """bf16 compute with float32 gradient reduction and recomputed layers: two processes follow
    one (to bf16 rounding), and both follow the float32 run closely."""
    one, two, fp32 = runs["bf16"][0], runs["bf16_sharded"][0], runs["single"][0]
    assert one["mixed_precision"] == "bf16" and one["activation_checkpointing"]
    torch.testing.assert_close(
        torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-2, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(one["losses"]), torch.tensor(fp32["losses"]), rtol=3e-2, atol=0
    )
    assert two["losses"][-1] < two["losses"][0]


def test_low_memory_load_gives_the_same_run_with_one_full_copy(runs):
    """Rank 1 builds the model on meta (it holds no weights before sharding) and receives its
    shards from rank 0: the losses and the adapter are those of the run where both ranks load."""
    low, both = runs["low_memory"], runs["sharded"]
    assert low[0]["losses"] == both[0]["losses"]
    adapter = "adapter/adapter_model.safetensors"
    assert (low[1] / adapter).read_bytes() == (both[1] / adapter).read_bytes()
    full = low[0]["frozen_bytes_unsharded"]
    assert low[0]["loaded_bytes_per_rank"][0] >= full and low[0]["loaded_bytes_per_rank"][1] == 0
    assert all(loaded >= full for loaded in both[0]["loaded_bytes_per_rank"])
    assert low[0]["frozen_bytes_per_rank"] == both[0]["frozen_bytes_per_rank"]


def test_low_memory_load_is_refused_for_bitsandbytes():
    from qlora_edu.fsdp import main

    with pytest.raises(ValueError, match="use --impl qlora_edu"):
        main(["--out", "unused", "--impl", "bitsandbytes", "--low-memory-load"])


def test_a_prepared_model_moves_and_is_materialised_from_meta():
    """With packed weights as parameters (FSDP's layout), `.to()` and `to_empty` still work; the
    quantization buffers follow the device, never a dtype cast."""
    from qlora_edu import QLoRALinear
    from qlora_edu.fsdp import build_on_meta, packed_weights_as_parameters

    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=4)
    packed_weights_as_parameters(layer)
    assert layer.to("cpu").half().code.dtype == torch.float32
    model = build_on_meta(4, torch.uint8)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.to_empty(device="cpu")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_float_quant_storage_under_mixed_precision_is_refused():
    from qlora_edu.fsdp import check_quant_storage, main

    check_quant_storage(torch.uint8, torch.bfloat16)
    check_quant_storage(torch.bfloat16, torch.bfloat16)
    check_quant_storage(torch.float32, None)
    with pytest.raises(ValueError, match="store them as uint8 or as torch.bfloat16"):
        main(["--out", "unused", "--quant-storage", "float32", "--mixed-precision", "bf16"])


def test_fsdp2_casts_float_views_of_packed_bytes_and_leaves_uint8_alone():
    """The failure the refusal prevents, in one process: FSDP2's mixed precision converts packed
    bytes viewed as float32 to bfloat16, and the layer can no longer dequantize them."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qlora_edu import QLoRALinear
    from qlora_edu.fsdp import packed_weights_as_parameters

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 64)
        outputs = {}
        for storage in (torch.float32, torch.uint8):
            layer = torch.nn.Sequential(QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=4))
            packed_weights_as_parameters(layer, storage)
            fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
            try:
                outputs[storage] = layer(x)
            except ValueError as error:
                outputs[storage] = error
        assert isinstance(outputs[torch.float32], ValueError)
        assert "bytes" in str(outputs[torch.float32])
        assert outputs[torch.uint8].dtype == torch.bfloat16
    finally:
        dist.destroy_process_group()
