"""QLoRA sharded with PyTorch's FSDP2 (``fully_shard``) over processes (Chapter 10).

Launch with torchrun; the same command runs as 2 processes on one CPU (gloo), on N GPUs (NCCL), or
over several nodes (add ``--nnodes``, ``--node-rank`` and a ``--rdzv-endpoint``)::

    torchrun --nproc-per-node 2 -m qlora_edu.fsdp --impl qlora_edu --steps 5 --out run/

``--impl qlora_edu`` shards our ``QLoRALinear`` model; ``--impl bitsandbytes`` a transformers model
loaded with bitsandbytes' 4-bit layers plus peft's LoRA. Every decoder layer and then the whole
model is wrapped with ``fully_shard``: each rank keeps 1/N of every parameter (the frozen packed
4-bit weights included) and gathers a layer's full parameters just before it runs. Only the LoRA
parameters train; their gradients are reduce-scattered and AdamW updates each rank's shard.

Each step takes a global batch of the date task (Chapter 8), split evenly across ranks. The loss
is the mean over all answer tokens of the global batch, so the run computes the same thing on any
number of ranks. Rank 0 writes one JSON line per step and, at the end, the adapter in PEFT's format.

What a large model needs on GPUs, as flags:

- ``--mixed-precision bf16`` (or ``fp16``): FSDP2's ``MixedPrecisionPolicy``, parameters gathered
  and computed in that dtype, gradients reduced in float32. FSDP2 casts floating-point parameters
  only: packed 4-bit bytes stored as ``uint8``, or viewed as the same 16-bit dtype, arrive intact,
  but bytes viewed as float32 would be converted to 16 bits, which destroys them; that
  combination is refused.
- ``--activation-checkpointing``: every decoder layer recomputed in backward (non-reentrant).
- ``--cpu-offload``: FSDP2's ``CPUOffloadPolicy``, the shards kept in host memory between uses
  (GPU runs only).
- ``--low-memory-load`` (``--impl qlora_edu``): only rank 0 loads and quantizes the model; the
  other ranks build its structure on the meta device (no memory), one decoder layer at a time,
  shard it, and receive their shards from rank 0 (``set_model_state_dict`` with
  ``broadcast_from_rank0``). Without it every rank loads the whole model before sharding it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from qlora_edu.adapters import PREFIX, write_adapter
from qlora_edu.base_model import load_base_model, model_name_or_path
from qlora_edu.finetune import batch_indices, date_task, encode
from qlora_edu.hardware import qlora_bnb_config
from qlora_edu.model import get_qlora_model
from qlora_edu.qlora import QLoRALinear

STORAGE = {"uint8": torch.uint8, "float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_quant_storage(storage: torch.dtype, param_dtype: torch.dtype | None) -> None:
    """Refuse packed bytes that mixed precision would cast: FSDP2 converts every floating-point
    parameter to ``param_dtype``, and a float view of packed bytes converted is no longer them."""
    if param_dtype is not None and storage.is_floating_point and storage != param_dtype:
        raise ValueError(
            f"quant storage {storage} under mixed precision {param_dtype}: FSDP2 would convert "
            f"the packed 4-bit bytes, viewed as {storage}, to {param_dtype}, which changes the "
            f"bytes; store them as uint8 or as {param_dtype}"
        )


def packed_weights_as_parameters(model: nn.Module, storage: torch.dtype = torch.uint8) -> None:
    """FSDP shards parameters, not buffers: turn each QLoRALinear's packed weight into a frozen
    parameter, its bytes viewed as ``storage`` (what bitsandbytes calls ``quant_storage``). The
    small quantization state (absmax codes, offset, code books) stays in buffers, whole on every
    rank, so the layer can always dequantize its gathered bytes."""
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            packed = module._buffers.pop("weight_packed")
            bytes_as_storage = packed.reshape(-1).view(storage).reshape(-1, 1)  # as bitsandbytes
            module.weight_packed = nn.Parameter(bytes_as_storage, requires_grad=False)


def build(impl: str, r: int, storage: torch.dtype, model_name: str | None = None) -> nn.Module:
    """The QLoRA model, identical on every rank (same weights, same adapter initialisation)."""
    torch.manual_seed(0)
    if impl == "qlora_edu":
        model, _ = load_base_model(model_name)
        get_qlora_model(model, r=r, lora_alpha=2 * r)
        packed_weights_as_parameters(model, storage)
        return model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = qlora_bnb_config(torch.float32, quant_storage=storage)
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path(model_name), quantization_config=config, device_map={"": "cpu"}
    )
    model.requires_grad_(False)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def build_on_meta(r: int, storage: torch.dtype, model_name: str | None = None) -> nn.Module:
    """The structure of :func:`build`'s model with every tensor on the meta device, holding no
    values: for ranks that receive their shards from rank 0. The 4-bit layers' quantization state
    has shapes that depend on the weight's, so each decoder layer in turn is made real (zeros),
    converted, and sent back to meta: at most one layer is ever in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name_or_path(model_name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    for layer in decoder_layers(model):
        layer.to_empty(device="cpu")
        for tensor in [*layer.parameters(), *layer.buffers()]:
            tensor.detach().zero_()
        get_qlora_model(layer, r=r, lora_alpha=2 * r)
        layer.to("meta")
    packed_weights_as_parameters(model, storage)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds of the given (possibly sharded) tensors."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def full_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under peft's key names, gathered from every rank (a collective: every rank
    must call it). Works for qlora_edu's layers and for peft's (which add ``.default``)."""
    state = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            key = key if key.startswith(PREFIX) else PREFIX + key
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[key] = full.detach().cpu().contiguous()
    return state


@record  # a failing rank's error is reported by torchrun's summary too
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="torchrun ... -m qlora_edu.fsdp", description=__doc__)
    parser.add_argument("--impl", choices=["qlora_edu", "bitsandbytes"], default="qlora_edu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, all ranks")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--quant-storage", choices=list(STORAGE), default="uint8")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fail-at-step", type=int, default=None, help="rank 1 raises (a test)")
    parser.add_argument("--mixed-precision", choices=list(PRECISION), default=None)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--cpu-offload", action="store_true", help="shards in host memory (GPU)")
    parser.add_argument("--low-memory-load", action="store_true", help="only rank 0 loads")
    args = parser.parse_args(argv)
    if args.low_memory_load and args.impl != "qlora_edu":
        raise ValueError("--low-memory-load builds qlora_edu's model on meta: use --impl qlora_edu")
    param_dtype = PRECISION.get(args.mixed_precision)
    check_quant_storage(STORAGE[args.quant_storage], param_dtype)

    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} ranks")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    policies = {}
    if param_dtype is not None:
        policies["mp_policy"] = MixedPrecisionPolicy(param_dtype, reduce_dtype=torch.float32)
    if args.cpu_offload:
        if not cuda:
            raise ValueError("--cpu-offload keeps GPU shards in host memory: it needs CUDA")
        policies["offload_policy"] = CPUOffloadPolicy()

    # Training mode, which from_pretrained does not set: in evaluation mode bitsandbytes 0.50, on a
    # CPU with AVX512-BF16, repacks 4-bit weights for a bfloat16 inference kernel, and training
    # through it goes wrong (the loss rose from 5.7 to 9.5 in one step).
    storage = STORAGE[args.quant_storage]
    if args.low_memory_load and rank != 0:
        model = build_on_meta(args.r, storage, args.model).train()
    else:
        model = build(args.impl, args.r, storage, args.model).train()
    full_state = model.state_dict() if args.low_memory_load and rank == 0 else {}
    frozen_before = local_bytes(p for p in model.parameters() if not p.requires_grad)
    loaded = local_bytes(t for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model):
        fully_shard(layer, **policies)
    fully_shard(model, **policies)
    if args.low_memory_load:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if rank != 0:
            model.to_empty(device=device or "cpu")  # memory for this rank's shards only
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state, options=options)
        for buffer in model.buffers():  # whole on every rank, non-persistent ones included
            dist.broadcast(buffer, src=0)
        del full_state
    frozen_after = local_bytes(p for p in model.parameters() if not p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    _, tokenizer = load_base_model(args.model)
    data = encode(tokenizer, date_task()[0])
    local = args.batch_size // world
    log = []
    for step in range(args.steps):
        if step == args.fail_at_step and rank == 1:
            raise RuntimeError(f"rank {rank} fails at step {step} (--fail-at-step)")
        idx = batch_indices(step, len(data["input_ids"]), args.batch_size, seed=0)
        ids, labels = data["input_ids"][idx], data["labels"][idx]
        n_tokens = (labels[:, 1:] != -100).sum()  # answer tokens in the global batch
        ids, labels = (
            ids[rank * local : (rank + 1) * local],
            labels[rank * local : (rank + 1) * local],
        )
        if device is not None:
            ids, labels = ids.to(device), labels.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss_sum = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
        )
        # FSDP averages gradients over ranks; scaling by world makes that the global mean.
        (loss_sum * world / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        log.append({"step": step, "loss": (total / n_tokens).item()})

    memory = torch.tensor([frozen_before, frozen_after, loaded], dtype=torch.float64)
    gathered = [torch.zeros_like(memory) for _ in range(world)]
    dist.all_gather(gathered, memory)
    state = full_lora_state_dict(model)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        modules = {k.removeprefix(PREFIX).split(".")[-3] for k in state}
        write_adapter(
            args.out / "adapter",
            state,
            r=args.r,
            lora_alpha=2 * args.r,
            target_modules=sorted(modules),
        )
        result = {
            "impl": args.impl,
            "world_size": world,
            "quant_storage": args.quant_storage,
            "mixed_precision": args.mixed_precision,
            "activation_checkpointing": args.activation_checkpointing,
            "low_memory_load": args.low_memory_load,
            "losses": [entry["loss"] for entry in log],
            "frozen_bytes_unsharded": int(gathered[0][0]),
            "frozen_bytes_per_rank": [int(g[1]) for g in gathered],
            "loaded_bytes_per_rank": [int(g[2]) for g in gathered],  # before sharding
        }
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
