"""How much memory finetuning needs: exact parameter counts and a calculator (Chapter 1).

Parameter counts come from instantiating a transformers config on the ``meta`` device: every
tensor gets a shape but no storage, so a 65B model is counted exactly, without weights or downloads.

The calculator adds up, in bytes, what a finetuning step keeps in memory:

- ``weights``: the model's own weights (16-bit, or packed 4-bit plus their quantization constants);
- ``lora``: the LoRA adapter parameters;
- ``gradients``: a gradient for every trainable parameter;
- ``optimizer``: AdamW's two moments (float32 by default: 8 bytes per trainable parameter) and,
  when asked, a float32 master copy of each trainable weight (mixed precision, 4 bytes more);
- ``activations``: what the forward pass saves for backward (see :func:`activation_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import LlamaConfig, PretrainedConfig

METHODS = ("full", "lora", "qlora")
_REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


# Published shapes of real architectures (from their papers and released configs).
ARCHITECTURES: dict[str, dict[str, int]] = {
    "TinyLlama-1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "LLaMA-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, vocab_size=32000),
    "LLaMA-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, vocab_size=32000),
    "LLaMA-33B": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, vocab_size=32000),
    "LLaMA-65B": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, vocab_size=32000),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip


def llama_config(name: str) -> LlamaConfig:
    """A transformers ``LlamaConfig`` for one of :data:`ARCHITECTURES` (no weights, no download)."""
    from transformers import LlamaConfig

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return LlamaConfig(**ARCHITECTURES[name])


@dataclass(frozen=True)
class ParameterCount:
    """Exact parameter counts of a causal LM, split the way QLoRA treats them."""

    total: int  # every parameter (tied embeddings counted once)
    linear: int  # weights of the linear layers inside the transformer blocks (quantized by QLoRA)
    linear_shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) of each such layer
    other: int  # embeddings, norms, output head, biases: kept in 16-bit by QLoRA

    def lora(self, r: int) -> int:
        """LoRA parameters for rank ``r`` on every block linear layer: r * (in + out) each."""
        return sum(r * (out_f + in_f) for out_f, in_f in self.linear_shapes)


def _check_config(config) -> None:
    missing = [f for f in _REQUIRED_FIELDS if getattr(config, f, None) is None]
    if missing:
        raise ValueError(f"config is missing fields needed for the estimate: {', '.join(missing)}")
    for field in _REQUIRED_FIELDS:
        value = getattr(config, field)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.{field} must be a positive integer, got {value!r}")


def count_parameters(config: PretrainedConfig) -> ParameterCount:
    """Count a causal LM's parameters exactly by building it on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    _check_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # transformers 5.0 leaves a meta model's embeddings untied
    head = model.get_output_embeddings()
    shapes = tuple(
        tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    total = sum(p.numel() for p in model.parameters())
    linear = sum(o * i for o, i in shapes)
    return ParameterCount(total=total, linear=linear, linear_shapes=shapes, other=total - linear)


def quantized_nbytes(numel: int, blocksize: int = 64, compress_statistics: bool = True) -> int:
    """Bytes that blockwise 4-bit quantization stores for ``numel`` weights.

    Packed codes (two per byte) plus one absmax per block: float32 without double quantization;
    with it, one uint8 code per block, one float32 absmax per 256 blocks and one float32 offset.
    """
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not compress_statistics:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / 256) + 4


def quant_state_nbytes(model: nn.Module, code_books: bool = False) -> int:
    """Bytes of the quantization constants of every 4-bit linear layer in ``model``.

    Counts ``qlora_edu.QLoRALinear`` (its state is in buffers) and bitsandbytes' ``Linear4bit``,
    whose state is an attribute of its weight, outside parameters and buffers, so that parameter
    counts and ``model.get_memory_footprint()`` miss it. By default the constants
    :func:`quantized_nbytes` counts: the absmax values (or their 8-bit codes) and, with double
    quantization, the second-level absmax values and the offset. ``code_books=True`` adds the code
    books each layer keeps a copy of (16 values, and 256 for the nested state).
    """
    import bitsandbytes as bnb

    from qlora_edu.qlora import QLoRALinear
    from qlora_edu.quantize import QuantState

    total = 0
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            state = module.quant_state
        elif isinstance(module, bnb.nn.Linear4bit):
            state = QuantState.from_bnb(module.weight.quant_state)
        else:
            continue
        tensors = [state.absmax]
        if state.nested:
            tensors += [state.state2.absmax, state.offset]
        if code_books:
            tensors += [state.code] + ([state.state2.code] if state.nested else [])
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def activation_bytes(
    config: PretrainedConfig,
    *,
    batch_size: int,
    seq_len: int,
    bytes_per_element: int,
    gradient_checkpointing: bool,
    lora_r: int | None = None,
    adapter_bytes: int | None = None,
) -> int:
    """Bytes of the tensors a Llama-style forward pass saves for the backward pass.

    Counted tensor by tensor from what transformers' Llama decoder layer, with PyTorch's
    ``scaled_dot_product_attention`` (which keeps no seq x seq attention matrix), hands to
    autograd. ``lora_r=None`` means full finetuning; a rank means a frozen base with LoRA on every
    block linear layer. Per token and layer, in elements:

    - the layer input and the residual sum after attention: ``2 h``;
    - two RMSNorms, each keeping one ``1/rms`` and its output (the input of the next linear
      layers), plus its normalised input only when the norm's weight trains: ``2 h + 2 (+ 2 h)``;
    - attention: queries and attention output ``2 q``, keys and values ``2 kv``, and one
      log-sum-exp per head ``heads`` (``q`` = heads x head_dim, ``kv`` = kv_heads x head_dim);
    - the MLP: gate and up projections, SiLU of the gate, and their product: ``4 intermediate``;
    - with LoRA, each adapter's ``r`` intermediate values ``A x`` (the input of ``B``).

    Once per step: the log-softmax of the logits for the loss (``vocab`` per token), the rotary
    cos/sin tables (``2 seq head_dim``) and, when everything trains, the final norm (``3 h + 1``
    per token). A frozen base needs no gradient for its embedding output, which saves the first
    layer's input and ``1/rms`` (``h + 1``); the final norm's input and ``1/rms`` cost the same.

    In 16 bits (``bytes_per_element`` 2), transformers' Llama computes two things in float32: each
    RMSNorm casts its input to float32 and keeps that copy and its ``1/rms`` (``4 (h + 1)`` bytes
    per norm, where float32 counts them once as elements), attention keeps its log-sum-exp in
    float32 (``4 heads`` bytes per layer), and the loss casts the logits to float32 before its
    log-softmax (``4 vocab`` bytes per token). A frozen base's first norm keeps nothing,
    which its final norm makes up.

    Adapters in another dtype than the model (``adapter_bytes`` per element: peft keeps them in
    float32 on a 16-bit model) change what an adapted layer keeps: peft casts the layer's input to
    the adapters' dtype and the adapter saves that copy, in every adapted layer, and its ``A x``
    in that dtype too; the frozen base layers then keep no input of their own, so the norms'
    outputs (``2 h``) and the MLP's product (``intermediate``) are no longer kept in the model's
    dtype.

    With gradient checkpointing only each layer's input is kept, and one layer's activations live
    again while it is recomputed during backward.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    tokens = batch_size * seq_len
    per_layer = 4 * h + 2 + 2 * q + 2 * kv + heads + 4 * inter
    if lora_r is None:
        per_layer += 2 * h
        once = 3 * h + 1 + config.vocab_size
    else:
        adapters_per_layer = len(count_parameters(config).linear_shapes) // layers
        per_layer += adapters_per_layer * lora_r
        once = config.vocab_size
    kept = layers * (h if gradient_checkpointing else per_layer)
    recomputed = per_layer if gradient_checkpointing else 0
    elements = (kept + recomputed + once) * tokens + 2 * seq_len * head_dim
    upcast = max(4 - bytes_per_element, 0)  # bytes more per value kept in float32
    live_layers = 1 if gradient_checkpointing else layers
    norms = 2 * live_layers + (1 if lora_r is None else 0)
    float32_values = norms * (h + 1) + live_layers * heads + config.vocab_size
    total = elements * bytes_per_element + float32_values * upcast * tokens
    if lora_r is not None and adapter_bytes not in (None, bytes_per_element):
        shapes = count_parameters(config).linear_shapes
        adapter_inputs = sum(in_f for _, in_f in shapes) // layers  # per layer, one copy each
        adapters = len(shapes) // layers
        cast = adapter_bytes * (adapter_inputs + adapters * lora_r)
        shared = bytes_per_element * (2 * h + inter + adapters * lora_r)
        total += live_layers * (cast - shared) * tokens
    return total


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def estimate_finetune_memory(
    config: PretrainedConfig,
    method: str,
    *,
    lora_r: int = 64,
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    moments_dtype: torch.dtype | None = torch.float32,
    master_weights: bool = False,
    adapter_dtype: torch.dtype | None = None,
    kbit_prepared: bool = False,
    blocksize: int = 64,
    compress_statistics: bool = True,
    world_size: int = 1,
) -> dict[str, int]:
    """Bytes needed to finetune ``config``'s model, per component and in ``total``.

    ``method``: ``"full"`` (every parameter trained in ``dtype``), ``"lora"`` (frozen ``dtype`` base
    plus LoRA of rank ``lora_r`` on every block linear layer) or ``"qlora"`` (the same, with the
    block linear layers stored in 4 bits, double-quantized when ``compress_statistics``).
    ``dtype`` is the precision of unquantized weights, adapters, gradients and activations.

    The optimizer state is an assumption to choose, because setups differ. AdamW keeps two moments
    per trainable parameter, in ``moments_dtype``: float32 by default, as mixed-precision training
    and bitsandbytes' 32-bit optimizers keep them; ``None`` means the parameters' own ``dtype``, as
    ``torch.optim.AdamW`` does (its state is ``zeros_like(param)``). ``master_weights=True`` adds a
    float32 copy of every trainable weight, as mixed-precision training with 16-bit weights keeps
    (the 16 bytes per parameter of ZeRO's accounting with the defaults).

    Two settings of the libraries change the bytes of a 16-bit run. ``adapter_dtype``: the
    adapters' dtype when it is not ``dtype``; peft keeps them in float32 on a 16-bit model unless
    told otherwise (``autocast_adapter_dtype``), and their gradients and moments follow (see
    :func:`activation_bytes` for what it changes in the activations). ``kbit_prepared``: peft's
    ``prepare_model_for_kbit_training`` was applied to a 4-bit model, which casts every parameter
    that is not 4-bit (embeddings, norms, head) to float32; the residual stream, the norms and,
    through the 4-bit layers, which return their input's dtype, every activation are then
    float32, and so are the adapters unless ``adapter_dtype`` says otherwise.

    ``world_size`` > 1: the bytes on each of that many ranks under FSDP (Chapter 10), with
    ``batch_size`` sequences per rank. Weights, adapters, gradients and optimizer state are
    sharded (divided by ``world_size``); activations are each rank's own; and a part ``gathered``
    is added: the full weights of two decoder layers, the one running and the next, prefetched.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    for name, value in (
        ("lora_r", lora_r),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("world_size", world_size),
    ):
        _positive_int(name, value)
    for name, value in (("dtype", dtype), ("moments_dtype", moments_dtype or dtype)):
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise ValueError(f"{name} must be a floating point torch.dtype, got {value!r}")
    if adapter_dtype is not None and not adapter_dtype.is_floating_point:
        raise ValueError(f"adapter_dtype must be a floating point dtype, got {adapter_dtype}")
    if kbit_prepared and method != "qlora":
        raise ValueError("kbit_prepared describes a 4-bit model: it needs method='qlora'")
    width = torch.finfo(dtype).bits // 8
    kept = 4 if kbit_prepared else width  # bytes of unquantized parameters and of activations
    trained = torch.finfo(adapter_dtype).bits // 8 if adapter_dtype else kept  # of the adapters
    moment_bytes = (torch.finfo(moments_dtype).bits // 8) if moments_dtype else None
    counts = count_parameters(config)

    if method == "full":
        weights, lora, trainable, trained = width * counts.total, 0, counts.total, width
    else:
        n_lora = counts.lora(lora_r)
        lora, trainable = trained * n_lora, n_lora
        if method == "lora":
            weights = width * counts.total
        else:
            packed = sum(
                quantized_nbytes(o * i, blocksize, compress_statistics)
                for o, i in counts.linear_shapes
            )
            weights = packed + kept * counts.other
    optimizer_bytes = 2 * (moment_bytes or trained) + (4 if master_weights else 0)
    parts = {
        "weights": weights,
        "lora": lora,
        "gradients": trained * trainable,
        "optimizer": optimizer_bytes * trainable,
        "activations": activation_bytes(
            config,
            batch_size=batch_size,
            seq_len=seq_len,
            bytes_per_element=kept,
            gradient_checkpointing=gradient_checkpointing,
            lora_r=None if method == "full" else lora_r,
            adapter_bytes=None if method == "full" else trained,
        ),
    }
    if world_size > 1:
        for part in ("weights", "lora", "gradients", "optimizer"):
            parts[part] = math.ceil(parts[part] / world_size)
        layer = (weights - _outside_layers(config, kept)) / config.num_hidden_layers
        parts["gathered"] = math.ceil(2 * (layer + lora / config.num_hidden_layers))
    parts["total"] = sum(parts.values())
    return parts


def _outside_layers(config, width: int) -> int:
    """Bytes of the parameters outside the decoder layers: embeddings, final norm, output head."""
    embed = config.vocab_size * config.hidden_size
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    return width * (embed + head + config.hidden_size)


def _storages(tensors) -> dict[int, int]:
    """Distinct storages behind ``tensors`` (views of one storage count once): address -> bytes."""
    return {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors
        if t is not None and t.device.type != "meta"
    }


def _storage_bytes(tensors, exclude: dict[int, int] | None = None) -> int:
    return sum(n for ptr, n in _storages(tensors).items() if ptr not in (exclude or {}))


def measure_training_step(model: nn.Module, input_ids: torch.Tensor) -> dict[str, int]:
    """Run one AdamW step of a causal LM and count, in bytes, the tensors it keeps in memory.

    ``activations`` are the distinct storages autograd saved for backward during the forward pass
    (collected with ``torch.autograd.graph.saved_tensors_hooks``), less the parameters themselves,
    which autograd also saves; ``weights``, ``gradients`` and
    ``optimizer`` are the storages of the parameters (``lora`` those with ``lora_`` in their name,
    as peft and qlora_edu name them), their ``.grad`` and AdamW's state after the step. Frozen
    parameters get no gradient and no optimizer state.
    """
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    activations = _storage_bytes(saved, exclude=_storages(model.parameters()))
    saved.clear()
    loss.backward()
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    named = list(model.named_parameters())
    parts = {
        "weights": _storage_bytes(p for n, p in named if "lora_" not in n),
        "lora": _storage_bytes(p for n, p in named if "lora_" in n),
        "gradients": _storage_bytes(p.grad for p in trainable),
        "optimizer": _storage_bytes(state),
        "activations": activations,
    }
    parts["total"] = sum(parts.values())
    return parts
