"""The hf engine's own copy of the policy in another dtype (``EngineConfig.dtype``), e.g. bf16 weights for
generation while the trainer keeps fp32 ones.

Why: decoding is memory-bound (each step reads every weight once) and on CPUs with native bf16 matrix
instructions (``avx512_bf16`` / AMX) a bf16 matrix product is 2-2.5x faster than fp32 at decode shapes.

What the copy is: a plain Hugging Face causal LM of the policy's class and config, built once, its
parameters written from ``fastrl.engine.sync.sources.iter_sync_weights`` (PEFT LoRA merged,
``W + B @ A * scaling``, torch.compile / fastrl ``Policy`` wrappers seen through), each cast with
``Tensor.copy_`` (round to nearest even). Buffers (rotary ``inv_freq``) are the copy's own, computed by its
constructor as the model class computes them (fp32). The copy is refreshed before the first ``generate``
after every ``sync_weights`` (the engine contract), never in between: unlike the engine's zero-copy path,
weights changed without a ``sync_weights`` are not seen.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastrl.models.heads import causal_lm


class WeightCopy:
    """A ``dtype`` copy of a policy's causal LM, refreshed on demand (module docstring)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.lm: nn.Module | None = None
        self.stale = True
        self.syncs = 0  # how many times the weights were copied (tests and benchmarks read it)

    def mark_stale(self) -> None:
        self.stale = True

    def drop(self) -> None:
        """Free the copy (``sleep``); the next ``get`` rebuilds it."""
        self.lm, self.stale = None, True

    @torch.no_grad()
    def get(self, model: nn.Module) -> nn.Module:
        """The copy, holding ``model``'s current weights if they were marked changed since the last copy."""
        src = causal_lm(model)
        if self.lm is None or type(self.lm) is not type(src):
            self.lm, self.stale = _build(src, self.dtype), True
        if self.stale:
            _copy_weights(model, self.lm)
            self.stale = False
            self.syncs += 1
        return self.lm


def _build(src: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An eval-mode, grad-free model of ``src``'s class and config in ``dtype``, on ``src``'s device."""
    config = copy.deepcopy(src.config)
    # The constructor's random init is wasted work (every parameter is overwritten next): skip it.
    from transformers import initialization

    with initialization.no_init_weights():
        lm = type(src)._from_config(config, dtype=dtype)
    lm.tie_weights()  # tied embeddings (config.tie_word_embeddings): the stream sends the tensor once
    device = src.get_input_embeddings().weight.device
    lm = lm.to(device=device).eval().requires_grad_(False)
    return lm


def _copy_weights(model: nn.Module, lm: nn.Module) -> None:
    from fastrl.engine.sync.sources import iter_sync_weights

    params = dict(lm.named_parameters())  # tied lm_head / embed_tokens: one entry, as the stream sends it
    for name, tensor in iter_sync_weights(model):
        dst = params.pop(name, None)
        if dst is None:
            raise ValueError(f"engine weight copy: the policy sends {name!r}, which the copy does not have")
        if dst.shape != tensor.shape:
            raise ValueError(
                f"engine weight copy: {name} has shape {tuple(tensor.shape)}, the copy {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
    if params:
        raise ValueError(f"engine weight copy: the policy sent no value for {sorted(params)[:3]}")
