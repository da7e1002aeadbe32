"""The hidden states that score a rollout's completion tokens, with each distinct prompt run once.

Rollout layout (``fastrl.data.collate_prompt_completion``): prompts left-padded to P columns, completions
right-padded to C columns from column P; completion token ``t`` is scored from the final hidden state at
column ``P - 1 + t``. ``completion_hidden(model, batch, share=...)`` returns exactly those states,
``hidden_BCH[:, t] = backbone_hidden(model, input_ids, ...)[:, P - 1 + t]``, in one of two ways:

* padded (``share=False``, and every fallback): the whole [B, P + C] batch through the decoder, sliced.
* shared (``share=True`` where ``shared_prompt_unsupported`` finds nothing against it): in GRPO every
  prompt appears ``num_generations`` times, and under causal attention a prompt's tokens never see the
  completion after it, so their hidden states and keys/values are the same in every row of the group.
  The U distinct prompts of the batch (rows with equal ids and mask over the P prompt columns, found by
  ``torch.unique``; nothing about the layout of groups is assumed) run once, [U, P], with a Hugging Face
  ``DynamicCache`` whose keys/values keep their autograd history; the cache is expanded to the B rows by
  an index (its backward sums each group's gradients) and the completions, [B, C - 1] (the last
  completion column scores nothing), run on top of it with the full [B, P + C - 1] attention mask and
  the batch's own position ids. Then ``hidden_BCH = cat(prompt_hidden[inverse, P - 1], completion_hidden)``.
  Left-padding columns shared by all U prompts are dropped first (masked keys add exactly 0).

Exactness: the shared path computes the same function as the padded one; only floating-point summation
order differs (attention over a [P] cache plus [C - 1] new keys, and the gradient sums over the group),
so fp64 results agree to ~1e-12 (``tests/test_shared_prompt.py``: log-probs and every parameter gradient,
Qwen2 and Llama, LoRA, uneven left-padded prompts, shuffled rows of mixed groups, masks).

Cost: the decoder processes ``U * P + B * (C - 1)`` tokens instead of ``B * (P + C)``; with 8 generations
per prompt and prompts as long as the completions that is about half the FLOPs of the training forward
and backward, and of the old / reference log-prob passes.

Fallbacks (``shared_prompt_unsupported`` returns the reason; the padded path then runs, same numbers):
FSDP (every layer would be gathered and its backward hooks fired twice per step), activation
checkpointing and ``torch.compile``-d layers (the recomputed or traced layer would update the cache a
second time), attention other than ``sdpa`` / ``eager`` (not verified), sliding-window or other non-full
attention layers (the dynamic cache would keep only the window), decoders without ``past_key_values``,
and batches without a completion layout.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fastrl.models.heads import _check_batch, backbone_hidden, causal_lm

_ATTENTION = ("sdpa", "eager")


def shared_prompt_unsupported(model: nn.Module) -> str | None:
    """Why the shared-prompt forward cannot run on ``model`` (module docstring), or None when it can."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    lm = causal_lm(model)
    decoder = lm.get_decoder()
    if _cache_kwarg(decoder) is None:
        return f"{type(decoder).__name__}.forward takes no cache (past_key_values)"
    config = lm.config
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in _ATTENTION:
        return f"attention implementation {attn!r} (supported: {', '.join(_ATTENTION)})"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "the model has non-full-attention layers (sliding window, linear attention)"
    if not layer_types and getattr(config, "sliding_window", None) is not None:
        return "the model has a sliding attention window"  # e.g. Mistral: not verified with a cache
    for m in model.modules():
        if isinstance(m, CheckpointWrapper):
            return "activation checkpointing"
        if type(m).__name__ == "OptimizedModule":
            return "torch.compile-d layers"
        if isinstance(m, FSDPModule):
            return "FSDP"
    return None


def _cache_kwarg(decoder: nn.Module) -> str | None:
    """The decoder's name for its KV-cache argument: ``cache`` (transformers >= 5.2x), or the older
    ``past_key_values``; None when it has neither."""
    params = inspect.signature(decoder.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first_B -> U row indices, inverse_B)``: the rows holding each distinct prompt (ids and mask over
    the prompt columns; padding ids do not matter) and, per row, the index of its prompt among them."""
    key = torch.where(prompt_mask.bool(), prompt_ids, torch.full_like(prompt_ids, -1))
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    U = int(inverse.max()) + 1 if inverse.numel() else 0
    # the first row of each group (scatter_reduce "amin" over row numbers)
    rows = torch.arange(inverse.numel(), device=inverse.device)
    first = torch.full((U,), inverse.numel(), dtype=rows.dtype, device=rows.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def _padded(model, batch, P):
    hidden = backbone_hidden(
        model,
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
    )
    return hidden[:, P - 1 : -1]


def completion_hidden(model: nn.Module, batch: dict, *, share: bool = True) -> torch.Tensor:
    """[B, C, H] final hidden states scoring the C completion columns of ``batch`` (``input_ids``,
    ``attention_mask``, ``position_ids`` [B, P + C], ``completion_ids`` [B, C]); module docstring."""
    ids, mask, pos = batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
    if "completion_ids" not in batch:
        raise ValueError("completion_hidden: batch must hold completion_ids (the rollout layout)")
    C = batch["completion_ids"].shape[1]
    P = ids.shape[1] - C
    if C < 1 or P < 1:
        raise ValueError(f"completion_hidden: need >= 1 prompt and completion column, got P={P}, C={C}")
    if not share or mask is None or pos is None or shared_prompt_unsupported(model) is not None:
        return _padded(model, batch, P)
    _check_batch("attention_mask", mask, ids.shape, integer=False)
    _check_batch("position_ids", pos, ids.shape, integer=True)
    first, inverse = prompt_groups(ids[:, :P], mask[:, :P])
    if first.numel() == ids.shape[0]:  # no prompt repeats: nothing to share
        return _padded(model, batch, P)
    from transformers import DynamicCache

    # drop the left-padding columns that every distinct prompt has (they are masked keys)
    real = mask[first, :P].bool().any(0)
    lead = int(real.long().argmax()) if bool(real.any()) else P - 1
    lead = min(lead, P - 1)
    decoder = causal_lm(model).get_decoder()
    cache = DynamicCache()
    kw = {_cache_kwarg(decoder): cache, "use_cache": True}
    p_out = decoder(
        input_ids=ids[first, lead:P],
        attention_mask=mask[first, lead:P],
        position_ids=pos[first, lead:P],
        **kw,
    )
    last = p_out.last_hidden_state[:, -1:][inverse]  # [B, 1, H]: scores completion token 0
    if C == 1:
        return last
    cache.batch_select_indices(inverse)  # [U] -> [B] rows; autograd sums the group's gradients
    # the mask covers the cached prompt columns and the new ones; the cache gives the query offset
    c_out = decoder(input_ids=ids[:, P:-1], attention_mask=mask[:, lead:-1], position_ids=pos[:, P:-1], **kw)
    return torch.cat([last, c_out.last_hidden_state], 1)
