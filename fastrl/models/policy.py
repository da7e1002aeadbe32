"""``Policy``: the training model behind one module ``forward``, so FSDP2 can be the root of it.

fastrl never calls ``model(...)`` during training: ``backbone_hidden`` runs the decoder and the fused
losses take the lm_head weight itself (``lm_head_params``). Under FSDP2 the root module's hooks would then
never run, and the parameters the root owns (embeddings, final norm, lm_head) would stay sharded
DTensors. torchtitan's answer, used here: a small wrapper whose ``forward`` does the whole computation,
backbone and head, and that is itself the FSDP root (``fastrl.distributed.fsdp.apply_fsdp_policy``).
Inside ``forward`` every parameter is the unsharded tensor FSDP registered on its module, so the fused
loss's gradient to the lm_head weight reaches FSDP's backward hooks and is reduce-scattered like any other.

``policy(head_fn, batch)``: ``head_fn(hidden_BTH, weight_VH, bias_V | None, batch)`` gets the final hidden
states of ``batch`` (``input_ids``, ``attention_mask``, ``position_ids``) and the head, and its result is
returned. ``policy(head_fn, batch, completion=True, share_prompt=...)``: a rollout batch (prompts left-padded
to P columns, completions right-padded to C), and ``head_fn`` gets the [B, C, H] states that score the
completion tokens, ``hidden_BTH[:, P - 1 : -1]``, from ``fastrl.models.shared_prompt.completion_hidden``
(each distinct prompt run once when ``share_prompt`` and the model allow it; the same numbers either way).
``policy.run(fn, *args)`` runs ``fn(model, *args)`` inside ``forward`` (generation, which calls the Hugging
Face model itself). Without FSDP both are plain function calls: the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fastrl.models.heads import backbone_hidden, lm_head_params
from fastrl.models.shared_prompt import completion_hidden

_RUN = object()  # marks a ``run`` call to ``forward``


class Policy(nn.Module):
    """Holds ``model`` (a Hugging Face causal LM, PEFT-wrapped or not) as ``self.model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, Policy):
            raise ValueError("model is already a Policy")
        self.model = model

    def forward(self, head_fn, *args, completion: bool = False, share_prompt: bool = False, **kwargs):
        if head_fn is _RUN:
            fn, *rest = args
            return fn(self.model, *rest, **kwargs)
        (batch,) = args
        if completion:
            hidden = completion_hidden(self.model, batch, share=share_prompt)
        else:
            hidden = backbone_hidden(
                self.model,
                batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"),
            )
        weight, bias = lm_head_params(self.model)
        return head_fn(hidden, weight, bias, batch, **kwargs)

    def run(self, fn: Callable, *args, **kwargs):
        """``fn(self.model, *args, **kwargs)`` inside this module's forward (FSDP's hooks run around it)."""
        return self(_RUN, fn, *args, **kwargs)


def as_policy(model: nn.Module) -> Policy:
    """``model`` if it is a ``Policy``, else a fresh (unsharded) ``Policy`` around it."""
    return model if isinstance(model, Policy) else Policy(model)
