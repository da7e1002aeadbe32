"""What a sync sends: the policy's weights under the names of a Hugging Face checkpoint.

Names are those of the causal LM itself (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``),
which is what vLLM's ``load_weights`` / ``reload_weights`` take. The model may be wrapped: a fastrl
``Policy`` (``policy.model``), ``torch.compile`` (``_orig_mod``), PEFT and FSDP2 are seen through.

- PEFT LoRA: each adapted linear layer is sent merged, ``W + sum_a delta_a`` over its active adapters with
  ``delta_a = (B_a @ A_a) * scaling_a`` (transposed for ``fan_in_fan_out``), computed exactly as peft's
  ``merge`` computes it (fp32 on the CPU for fp16/bf16 adapters, then cast back; added into a copy of
  ``W`` in ``W``'s dtype), so the bytes equal ``merge_and_unload``'s. The merge is out of place: the
  trainer's weights are never written, so they are bit-identical afterwards by construction, and no
  unmerge (which in floating point is not an exact inverse of the merge) is needed. ``lora_bias`` adapters
  add ``B.bias * scaling`` to the bias the same way. Adapter weights (``lora_A`` / ``lora_B``) are not
  sent; ``modules_to_save`` copies are sent under the original module's name (the active copy). Merged or
  disabled adapters send the base layer as it is. DoRA and other LoRA variants, and LoRA on anything but
  a linear layer, are refused (their merge differs).
- FSDP2 (``fully_shard``): parameters are sharded ``DTensor``\\ s; each is gathered with ``full_tensor()``
  only when the stream reaches it and dropped once the consumer has copied it, so at most one full
  parameter (plus, under LoRA, its two adapters) exists at a time, never the whole model. ``full_tensor``
  is a collective: every rank must iterate the stream, in the same order (it is deterministic).
- Tied embeddings (``tie_word_embeddings``: ``lm_head.weight`` is ``model.embed_tokens.weight``): the
  tensor is sent once, as ``model.embed_tokens.weight`` (the first name in module order). vLLM (0.32)
  ties its ``lm_head`` to ``embed_tokens`` for such models (``ParallelLMHead.tie_weights``), and its
  ``AutoWeightsLoader`` loads only the first name module traversal reaches for a tied parameter
  (``model.embed_tokens.weight``), skipping the alias: that is the name it needs. An untied model sends
  both.
- Only parameters are sent: buffers (rotary ``inv_freq``) are computed by the engine itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class _Entry:
    name: str
    param: torch.Tensor  # the (possibly sharded) tensor whose value is sent, or the base weight
    deltas: list = dataclasses.field(default_factory=list)  # [(A, B, scaling, fan_in_fan_out)]
    bias_deltas: list = dataclasses.field(default_factory=list)  # [(B.bias, scaling)]


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    full = getattr(t, "full_tensor", None)  # DTensor (FSDP2): gather the whole tensor
    return full() if callable(full) else t


def _peft_types():
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    return BaseTunerLayer, LoraLinear, ModulesToSaveWrapper


def _active_copy(wrapper: nn.Module) -> nn.Module:
    """The module a ``ModulesToSaveWrapper`` runs (the rule of ``fastrl.models.heads._head_module``)."""
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or any(a not in wrapper.modules_to_save for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _lora_entries(prefix: str, layer: nn.Module, lora_linear: type) -> list[_Entry]:
    name = prefix.rstrip(".")
    if not isinstance(layer, lora_linear):
        raise ValueError(f"{name}: weight sync merges LoRA on linear layers only, got {type(layer).__name__}")
    base = layer.get_base_layer()
    adapters = (
        []
        if layer.merged or layer.disable_adapters
        else [a for a in layer.active_adapters if a in layer.lora_A]
    )
    variants = [a for a in adapters if a in getattr(layer, "lora_variant", {})]
    if variants:
        raise ValueError(
            f"{name}: adapters {variants} are a LoRA variant (DoRA, ...); weight sync merges plain LoRA only"
        )
    weight = _Entry(prefix + "weight", base.weight)
    for a in adapters:
        weight.deltas.append(
            (layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a], layer.fan_in_fan_out)
        )
    entries = [weight]
    biased = [a for a in adapters if layer.lora_bias.get(a, False)]
    if biased and getattr(base, "bias", None) is None:
        raise ValueError(
            f"{name}: adapters {biased} train a LoRA bias but the layer has none to merge it into"
        )
    if getattr(base, "bias", None) is not None:
        bias = _Entry(prefix + "bias", base.bias)
        for a in adapters:
            if layer.lora_bias.get(a, False):
                bias.bias_deltas.append((layer.lora_B[a].bias, layer.scaling[a]))
        entries.append(bias)
    return entries


def _entries(model: nn.Module) -> list[_Entry]:
    from fastrl.models.heads import causal_lm  # imports transformers: keep receivers' start-up light

    lm = causal_lm(model)
    types = _peft_types()
    seen: set[int] = set()
    out: list[_Entry] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if types is not None:
            tuner, lora_linear, to_save = types
            if isinstance(module, to_save):
                return visit(prefix, _active_copy(module))
            if isinstance(module, tuner):
                for e in _lora_entries(prefix, module, lora_linear):
                    if id(e.param) not in seen:
                        seen.add(id(e.param))
                        out.append(e)
                return None
        for pname, p in module._parameters.items():
            if p is not None and id(p) not in seen:  # a tied parameter keeps its first name
                seen.add(id(p))
                out.append(_Entry(prefix + pname, p))
        for cname, child in module._modules.items():
            if child is not None:
                visit(f"{prefix}{cname}.", child)
        return None

    visit("", lm)
    return out


def _check_dtype(dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def sync_specs(
    model: nn.Module, *, dtype: torch.dtype | None = None
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of what :func:`iter_sync_weights` yields, in the same order, with no
    gather and no copy (a DTensor's ``shape`` is the global one)."""
    _check_dtype(dtype)
    return [(e.name, _out_dtype(e.param, dtype), tuple(e.param.shape)) for e in _entries(model)]


def _merged(e: _Entry) -> torch.Tensor:
    value = _full(e.param)
    if not e.deltas and not e.bias_deltas:
        return value
    value = value.clone()  # never write the trainer's weight
    for a, b, scaling, fan_in_fan_out in e.deltas:
        a, b = _full(a), _full(b)
        dtype = b.dtype
        upcast = b.device.type == "cpu" and dtype in _HALF  # peft's rule (slow half matmuls on CPUs)
        if upcast:
            a, b = a.float(), b.float()
        delta = b @ a
        if fan_in_fan_out:
            delta = delta.T
        delta = delta * scaling
        if upcast:
            delta = delta.to(dtype)
        value += delta
    for b_bias, scaling in e.bias_deltas:
        value += _full(b_bias) * scaling
    return value


@torch.no_grad()
def iter_sync_weights(
    model: nn.Module, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for every weight the engine needs (module docstring), one at a time.

    Each tensor is full (gathered under FSDP), detached and, with ``dtype``, floating ones cast to it
    (integer and bool tensors keep theirs). A yielded tensor may alias the trainer's parameter: copy it,
    never write to it. Under FSDP2 this is collective: run it to the end on every rank.
    """
    _check_dtype(dtype)
    for e in _entries(model):
        t = _merged(e)
        yield e.name, t.to(_out_dtype(t, dtype))
