"""The backbone / lm_head split of a Hugging Face causal LM.

fastrl never lets the model apply its lm_head during training: ``backbone_hidden`` returns the final
(post-norm) hidden states and ``lm_head_params`` the head's weight and bias, and the fused log-prob and
loss kernels compute ``hidden @ weight.T + bias`` chunk by chunk, never holding [tokens, vocab] logits.
So ``model(input_ids).logits == backbone_hidden(model, input_ids) @ weight.T (+ bias)``.

Both accept the bare model, a PEFT wrapper, a ``torch.compile``-d module, a DDP-style ``.module``
wrapper and a ``fastrl.models.Policy``. ``backbone_hidden`` calls the decoder module (``get_decoder()``)
directly, so under FSDP2 the decoder must be its own ``fully_shard`` unit for its parameters to be
gathered (the root's hooks do not run).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``), DDP-style (``.module``) and fastrl ``Policy`` (``.model``)
    wrappers; PEFT stays."""
    from fastrl.models.policy import Policy  # policy.py imports this module

    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, Policy):
            model = model.model
        else:
            return model


def peft_model(model: nn.Module):
    """The ``peft.PeftModel`` inside ``model``, or None when it has no PEFT wrapper."""
    model = unwrap_model(model)
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for models without adapters
        return None
    return model if isinstance(model, PeftModel) else None


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM itself (for a PEFT model: the base model, adapter layers injected)."""
    model = unwrap_model(model)
    peft = peft_model(model)
    if peft is not None:
        model = peft.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a Hugging Face PreTrainedModel (or a wrapper), got {type(model)}")
    return model


def _check_batch(name: str, t: torch.Tensor | None, shape: torch.Size | None, *, integer: bool) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, seq], got {tuple(t.shape)}")
    if integer and (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(t.shape)}")


def backbone_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final post-norm hidden states ``hidden_BTH`` of the decoder; the lm_head is never applied.

    Padded batches: pass ``attention_mask`` ([B, T], 1 = token, 0 = padding). Padding-free packed
    batches: several sequences concatenated along T, ``attention_mask=None`` and ``position_ids`` that
    restart at 0 at each sequence start; every sequence then attends only to itself. transformers builds
    that block-diagonal mask from the position ids for ``sdpa`` and ``eager`` attention, and
    ``flash_attention_2`` takes the variable-length path, so all three are exact (sdpa/eager materialise
    a [B, 1, T, T] mask, flash attention does not). The LoRA adapter, if any, is applied (or not, inside
    ``adapter_disabled``).
    """
    _check_batch("input_ids", input_ids, None, integer=True)
    _check_batch("attention_mask", attention_mask, input_ids.shape, integer=False)
    _check_batch("position_ids", position_ids, input_ids.shape, integer=True)
    decoder = causal_lm(model).get_decoder()
    out = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state


def _head_module(model: nn.Module) -> nn.Module:
    """The module that computes the logits, seen through PEFT's wrappers."""
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(causal_lm(model)).__name__} has no output embeddings (lm_head)")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return head
    if isinstance(head, ModulesToSaveWrapper):
        # A fully trained copy of the lm_head (modules_to_save): the active copy, or the original when
        # adapters are disabled, exactly as the wrapper's forward chooses.
        active = head.active_adapters
        if head.disable_adapters or not active or any(a not in head.modules_to_save for a in active):
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    if isinstance(head, BaseTunerLayer):
        if not head.disable_adapters and not head.merged and head.active_adapters:
            raise ValueError(
                "the lm_head carries an active LoRA adapter, so its logits are not hidden @ weight.T; "
                "exclude lm_head from LoRA target_modules (fastrl.models.apply_lora does) or merge the "
                "adapter first (merge_and_unload)"
            )
        head = head.get_base_layer()  # merged or disabled: the base layer alone computes the logits
    return head


def lm_head_params(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight_VH, bias_V or None)`` of the output projection: logits = hidden @ weight_VH.T + bias_V.

    The returned tensors are the model's own parameters (no copy), tied to the input embedding when the
    model ties them. A LoRA-adapted lm_head raises ``ValueError`` unless the adapter is merged or
    disabled; a ``modules_to_save`` copy of the lm_head is followed to the active copy.
    """
    head = _head_module(model)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the lm_head ({type(head).__name__}) has no 2-D weight")
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None
