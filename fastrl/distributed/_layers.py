"""Find the repeated decoder blocks of a Hugging Face causal LM, PEFT-wrapped or not.

FSDP wraps and activation checkpointing both work per decoder layer, so both need the ``nn.ModuleList``
that holds them. Known layouts are tried first (Llama / Qwen2 / Mistral / Gemma: ``model.layers``;
GPT-2 style: ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``; OPT: ``model.decoder.layers``); failing
those, the longest ``nn.ModuleList`` whose children all share one class is taken.
"""

from __future__ import annotations

from torch import nn

_KNOWN_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers")
# Module names that activation checkpointing, torch.compile and FSDP1 insert into parameter names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def hf_name(name: str) -> str:
    """``name`` as the Hugging Face checkpoint spells it: the wrappers' module names removed."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a ``peft.PeftModel`` (``base_model.model``); ``model`` otherwise."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers; ``ValueError`` if the model has none."""
    base = unwrap_peft(model)
    for path in _KNOWN_PATHS:
        found = _get_path(base, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    best: nn.ModuleList | None = None
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(
            f"model must hold its decoder layers in an nn.ModuleList (e.g. model.model.layers); "
            f"found none in {type(model).__name__}"
        )
    return best
