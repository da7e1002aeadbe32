"""The one place a trainer's model is prepared for training at scale, in a fixed order.

:func:`parallelize_policy` applies, to the decoder layers of a Hugging Face causal LM:

1. activation checkpointing (``none | full | selective:<k> | op``) and, optionally, activation
   offloading;
2. optionally ``torch.compile`` per decoder layer;
3. FSDP2 (each decoder layer, then the ``Policy`` wrapper as the root), when a mesh is given.

Why this order (torchtitan's): checkpointing wraps the plain layer, so each compiled region contains its
layer's checkpoint and the compiler traces the recompute with it; compiling per layer (not the whole
model) keeps the graphs small, identical from layer to layer (one compilation reused), and puts FSDP's
hooks, which run around each layer to all-gather its parameters before and reduce-scatter its gradients
after, at the boundaries between compiled regions instead of inside them. Sharding last means
``fully_shard`` sees the final module tree, so its units are exactly the (wrapped, compiled) layers.
"""

from __future__ import annotations

from torch import nn

from fastrl.distributed._layers import decoder_layers
from fastrl.distributed.activation_checkpoint import apply_ac


def parallelize_policy(
    model: nn.Module,
    *,
    mesh=None,
    ac: str = "none",
    offload_activations: bool = False,
    compile_layers: bool = False,
    fsdp: dict | None = None,
):
    """A ``fastrl.models.policy.Policy`` around ``model``, prepared in the order of the module docstring.
    ``fsdp``: keyword options of ``apply_fsdp_policy`` (used when ``mesh`` is given)."""
    from fastrl.models.policy import Policy

    apply_ac(model, ac)
    if offload_activations:
        from fastrl.distributed.offload import apply_activation_offloading

        apply_activation_offloading(model)
    if compile_layers:
        for layer in decoder_layers(model):
            layer.compile()  # in place: parameter names (and checkpoints) do not change
    policy = Policy(model)
    if mesh is not None:
        from fastrl.distributed.fsdp import apply_fsdp_policy

        apply_fsdp_policy(policy, mesh, **(fsdp or {}))
    return policy
