"""The shipped model, the date task, and finetuning that survives being killed (Chapter 8)."""

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_edu import get_qlora_model
from qlora_edu.base_model import (
    MODEL_PATH,
    corpus_documents,
    load_base_model,
    perplexity,
    token_stream,
    token_windows,
    unigram_perplexity,
)
from qlora_edu.finetune import (
    CHECKPOINT,
    FinetuneConfig,
    date_task,
    encode,
    exact_matches,
    finetune,
    pad_examples,
    prepare_model,
    save_checkpoint,
)
from qlora_edu.lora import LoRALinear
from qlora_edu.qlora import QLoRALinear


@pytest.fixture(scope="module")
def shipped():
    return load_base_model()


def test_shipped_model_loads_offline_with_the_auto_classes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(MODEL_PATH)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
    card = json.loads((MODEL_PATH / "training.json").read_text())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert 3e6 <= card["parameters"] <= 10e6
    text = "Return the sum of the elements of the array."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # a tokenizer class name that transformers 4 knows too, not only transformers 5's own
    tokenizer_config = json.loads((MODEL_PATH / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    size = sum(f.stat().st_size for f in MODEL_PATH.iterdir())
    assert size < 50e6


def test_shipped_model_writes_text_far_better_than_a_unigram_model(shipped):
    model, tokenizer = shipped
    heldout = token_stream(tokenizer, corpus_documents("heldout"))
    ppl = perplexity(model, token_windows(heldout))
    card = json.loads((MODEL_PATH / "training.json").read_text())
    assert ppl == pytest.approx(card["heldout_perplexity"], abs=0.006)  # the card tells the truth
    train = token_stream(tokenizer, corpus_documents("train"))
    unigram = unigram_perplexity(train, heldout, len(tokenizer))
    assert unigram == pytest.approx(card["unigram_perplexity"], abs=0.006)
    assert ppl < unigram / 4


def test_model_name_comes_from_the_argument_or_the_environment(monkeypatch):
    from qlora_edu.base_model import model_name_or_path

    assert model_name_or_path() == str(MODEL_PATH)
    monkeypatch.setenv("QLORA_EDU_MODEL", "someone/some-model")
    assert model_name_or_path() == "someone/some-model"
    assert model_name_or_path("other/model") == "other/model"


def test_date_task_is_fixed_and_its_test_dates_are_unseen():
    train, test = date_task()
    assert date_task() == (train, test)
    assert len(train) == 2000 and len(test) == 200
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert ("Date 1948-03-21 is", " March 21, 1948") in train


def test_encode_scores_only_the_answer_and_its_end_token(shipped):
    _, tokenizer = shipped
    data = encode(tokenizer, [("Date 2024-03-15 is", " March 15, 2024")])
    ids, labels = data["input_ids"][0], data["labels"][0]
    scored = ids[labels != -100]
    assert tokenizer.decode(scored[:-1]) == " March 15, 2024"
    assert scored[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[labels == -100]) == "Date 2024-03-15 is"


def test_lora_without_quantization_wraps_the_same_layers(shipped):
    lora = get_qlora_model(load_base_model()[0], quant_type=None)
    qlora = get_qlora_model(load_base_model()[0])
    names = {n for n, m in lora.named_modules() if isinstance(m, LoRALinear)}
    assert names == {n for n, m in qlora.named_modules() if isinstance(m, QLoRALinear)}
    assert len(names) == 7 * 4

    def trainable(m):
        return sorted((n, p.numel()) for n, p in m.named_parameters() if p.requires_grad)

    assert trainable(lora) == trainable(qlora)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="int8"), "unknown method"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(steps=0), "steps must be positive"),
    ],
)
def test_bad_finetune_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**kwargs)


CONFIG = FinetuneConfig(method="nf4-dq", steps=40, checkpoint_every=5)


def _cli(out, config=CONFIG):
    args = [sys.executable, "-m", "qlora_edu.finetune", "--out", str(out), "--no-progress"]
    for key in ("method", "steps", "checkpoint_every", "lr"):
        args += ["--" + key.replace("_", "-"), str(getattr(config, key))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return args, env


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    args, env = _cli(out)
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    return out


def test_a_killed_run_resumes_to_the_same_bits(tmp_path, uninterrupted):
    args, env = _cli(tmp_path)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint = tmp_path / CHECKPOINT
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < step < CONFIG.steps
    assert not (tmp_path / "adapter").exists()

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint}" in resumed.stdout
    ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reference = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    history = torch.load(checkpoint, weights_only=False)["history"]
    assert history == torch.load(uninterrupted / CHECKPOINT, weights_only=False)["history"]
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(
        (uninterrupted / "result.json").read_text()
    )


def test_a_checkpoint_from_other_settings_is_refused(uninterrupted):
    config = FinetuneConfig(method="fp4", steps=40, checkpoint_every=5)
    model, tokenizer = prepare_model(config)
    with pytest.raises(ValueError, match="different config"):
        finetune(model, tokenizer, config, out_dir=uninterrupted)


def test_exact_match_is_greedy_decoding(uninterrupted):
    """Answers built from the model's own greedy continuations must count as exact matches, and
    the same answers with one token changed must not; and on the real task, the verdicts must
    agree with model.generate."""
    from qlora_edu import load_adapter

    # the trained adapter on the float32 base: the equivalence does not depend on quantization,
    # and generating is faster without dequantizing every weight for every token
    model, tokenizer = prepare_model(dataclasses.replace(CONFIG, method="lora"))
    load_adapter(model, uninterrupted / "adapter")
    model.eval()
    eos = tokenizer.eos_token_id
    pairs, expected = [], []
    _, test = date_task()
    for prompt, _ in test[:10]:
        ids = tokenizer(prompt)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=eos)[0, len(ids):].tolist()  # fmt: skip
        if eos not in out:
            continue
        answer = out[: out.index(eos) + 1]
        wrong = [answer[0] + 1] + answer[1:]  # a different first token: greedy would not say it
        pairs += [(ids, answer), (ids, wrong)]
        expected += [True, False]
    assert len(expected) >= 10, "too few greedy continuations ended the text"
    data = pad_examples(pairs, tokenizer.pad_token_id)
    assert exact_matches(model, data).tolist() == expected

    real = test[:8]
    flags = exact_matches(model, encode(tokenizer, real))
    greedy = []
    for prompt, answer in real:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        target = tokenizer(answer)["input_ids"] + [eos]
        out = model.generate(ids, max_new_tokens=len(target), do_sample=False, pad_token_id=eos)
        greedy.append(out[0, ids.shape[1] :].tolist() == target)
    assert flags.tolist() == greedy


def test_a_checkpoint_is_flushed_to_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """fsync of the file before the rename and of its folder after it: otherwise a power loss can
    leave a renamed but empty checkpoint on a local disk."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    layer = LoRALinear(torch.nn.Linear(8, 8), r=2)
    model = torch.nn.Sequential(layer)
    optimizer = torch.optim.AdamW(layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, 3, [], FinetuneConfig())
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (
        torch.load(path, weights_only=False)["step"] == 3 and not path.with_suffix(".tmp").exists()
    )
