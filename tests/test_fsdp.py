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
