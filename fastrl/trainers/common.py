"""What the three trainers share besides the loop: the policy and its reference, their wrapping for
activation checkpointing and FSDP2 (``parallelize``), per-token log-probs from the backbone's hidden
states (the lm_head is applied only inside the fused log-prob op, never as full logits), and batch
movement.

Every forward goes through a ``fastrl.models.policy.Policy`` (``policy(head_fn, batch)``), the module FSDP
shards as its root; functions here accept a bare model too and wrap it on the fly (no FSDP, same numbers).
"""

from __future__ import annotations

import contextlib
import copy
import random

import torch

from fastrl.models import (
    LoraConfig,
    ModelConfig,
    adapter_disabled,
    apply_lora,
    backbone_hidden,
    lm_head_params,
)
from fastrl.models.modes import eval_mode
from fastrl.models.policy import Policy, as_policy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Reference:
    """The reference policy: the policy with its LoRA adapter disabled, a frozen copy of the initial
    policy otherwise, or nothing. ``with ref.model() as m:`` gives the module to run in eval mode and
    under ``no_grad`` (a ``Policy`` once ``parallelize`` has run)."""

    def __init__(self, policy: torch.nn.Module, *, lora: bool, needed: bool):
        self.policy, self.lora, self.needed = policy, lora, needed
        self.wrapper: Policy | None = None  # the (sharded) policy wrapper, set by ``parallelize``
        self.frozen = None
        if needed and not lora:
            self.frozen = copy.deepcopy(policy).eval().requires_grad_(False)

    @contextlib.contextmanager
    def model(self):
        assert self.needed, "no reference model in this run"
        if self.frozen is not None:
            with torch.no_grad():
                yield self.frozen
            return
        with eval_mode(self.policy), torch.no_grad(), adapter_disabled(self.policy):
            yield self.wrapper if self.wrapper is not None else self.policy


def setup_policy(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    device: torch.device,
    *,
    need_reference: bool,
    model=None,
    tokenizer=None,
):
    """(policy, tokenizer, Reference). ``model``/``tokenizer`` given in memory skip the loading; a model
    given already wrapped with LoRA (``apply_lora``) trains its adapters as they are."""
    if model is None:
        from fastrl.models import load_model_and_tokenizer

        model, loaded_tok = load_model_and_tokenizer(model_cfg, device=device)
        tokenizer = tokenizer or loaded_tok
    elif tokenizer is None:
        raise ValueError("tokenizer must be given together with an in-memory model")
    if not any(p.is_meta for p in model.parameters()):  # meta parameters are materialised after sharding
        model.to(device)
    from fastrl.models.heads import peft_model

    if peft_model(model) is None:
        model = apply_lora(model, lora_cfg)
    elif not lora_cfg.enabled:
        raise ValueError("the model given already has LoRA adapters; set lora.enabled to train them")
    model.train()
    return model, tokenizer, Reference(model, lora=lora_cfg.enabled, needed=need_reference)


def fsdp_options(train_cfg, device: torch.device) -> dict:
    """``apply_fsdp_policy``'s options from the ``train.fsdp_*`` fields."""
    from fastrl.distributed.fsdp import offload_policy

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    param = train_cfg.fsdp_param_dtype
    if param == "auto":
        param = "bfloat16" if device.type == "cuda" and train_cfg.bf16 else None
    return {
        "param_dtype": dtypes[param] if param else None,
        "reduce_dtype": dtypes[train_cfg.fsdp_reduce_dtype],
        "reshard_after_forward": train_cfg.fsdp_reshard_after_forward,
        "offload": offload_policy(train_cfg.fsdp_cpu_offload),
    }


def parallelize(model, ref: Reference, train_cfg, device: torch.device, *, fsdp: bool) -> Policy:
    """The ``Policy`` the trainer runs, built in this order (``fastrl.distributed.parallel.parallelize``):
    ``train.activation_checkpointing`` (and activation offloading) applied to ``model``'s decoder
    layers, then, with ``fsdp``, FSDP2 over the mesh (``train.fsdp_replicate`` > 1: HSDP's 2-D mesh),
    each decoder layer, then the wrapper as the root, with the ``train.fsdp_*`` options. A frozen
    reference is sharded the same way (regathered per forward: it never runs a backward)."""
    from fastrl.distributed.parallel import parallelize_policy

    mesh = None
    if fsdp:
        from fastrl.distributed.env import dist_info
        from fastrl.distributed.fsdp import build_mesh

        mesh = build_mesh(device.type, dist_info().world_size, train_cfg.fsdp_replicate)
    options = fsdp_options(train_cfg, device) if fsdp else {}
    policy = parallelize_policy(
        model,
        mesh=mesh,
        ac=train_cfg.activation_checkpointing,
        offload_activations=train_cfg.activation_offloading,
        compile_layers=train_cfg.compile_layers,
        fsdp=options,
    )
    if fsdp and ref.frozen is not None:
        from fastrl.distributed.fsdp import apply_fsdp_policy

        ref.frozen = apply_fsdp_policy(Policy(ref.frozen), mesh, root_reshard_after_forward=True, **options)
    ref.wrapper = policy
    return policy


def setup_run(
    cfg, device: torch.device, fsdp: bool, *, need_reference: bool, model=None, tokenizer=None, dataset=None
):
    """What every trainer does before its own step: the policy (and reference) set up and parallelised,
    and the dataset (given in memory, or loaded from ``cfg.data``). Returns
    ``(model, tokenizer, ref, policy, dataset)``."""
    from fastrl.data import load_data
    from fastrl.trainers.run_state import preflight

    preflight(cfg.train)  # output folder and resume checks, before anything loads
    from fastrl.models.heads import peft_model

    fresh_lora = cfg.lora.enabled and (model is None or peft_model(model) is None)
    meta = model is None and fsdp and _meta_init_applies(cfg)
    if meta:  # parameters on the meta device; each rank loads its own shards once they are sharded
        from fastrl.distributed.meta_init import build_on_meta
        from fastrl.models.loading import load_tokenizer

        model, tokenizer = build_on_meta(cfg.model), tokenizer or load_tokenizer(cfg.model)
        if model.generation_config is not None and model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    model, tokenizer, ref = setup_policy(
        cfg.model, cfg.lora, device, need_reference=need_reference, model=model, tokenizer=tokenizer
    )
    from fastrl.distributed.meta_init import init_lora_adapters

    if fresh_lora and not meta:  # seeded after load: the same adapters as the meta-device path's
        init_lora_adapters(model, cfg.train.seed)
    policy = parallelize(model, ref, cfg.train, device, fsdp=fsdp)
    if meta:
        _load_shards(model, ref, cfg, device)
        if fresh_lora:
            init_lora_adapters(model, cfg.train.seed)
    dataset = as_dataset(dataset) if dataset is not None else load_data(cfg.data)
    return model, tokenizer, ref, policy, dataset


def _meta_init_applies(cfg) -> bool:
    """``train.fsdp_meta_init`` for a local safetensors model, full fine-tune or LoRA (whose adapters are
    initialised from the seed after the load, as in the unsharded run: ``init_lora_adapters``). Hub names
    load the ordinary way."""
    from pathlib import Path

    from fastrl.distributed.meta_init import weight_files

    if not cfg.train.fsdp_meta_init or cfg.model.gradient_checkpointing:
        return False
    return Path(cfg.model.name_or_path).is_dir() and weight_files(cfg.model.name_or_path) is not None


def _load_shards(model, ref: Reference, cfg, device: torch.device) -> None:
    from fastrl.distributed.env import dist_info
    from fastrl.distributed.meta_init import materialize_and_load

    if cfg.train.fsdp_cpu_offload:  # the offloaded shards live on the CPU; FSDP copies them over per use
        device = torch.device("cpu")
    report = materialize_and_load(model, cfg.model.name_or_path, device)
    if ref.frozen is not None:
        materialize_and_load(ref.frozen.model, cfg.model.name_or_path, device)
    info = dist_info()
    if info.is_main:
        mib = 2**20
        print(
            f"meta-device load: rank 0 holds {report.local_bytes / mib:.1f} MiB of the model's "
            f"{report.model_bytes / mib:.1f} MiB (world size {info.world_size}), peak "
            f"{report.peak_bytes / mib:.1f} MiB with the largest slice in flight"
        )


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def hidden_and_head(model, batch: dict):
    """(hidden_BTH, weight_VH, bias_V or None) of a collated batch. Not for FSDP-sharded models (the
    head would stay sharded): there, compute inside ``Policy.forward``."""
    hidden = backbone_hidden(
        model,
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
    )
    weight, bias = lm_head_params(model)
    return hidden, weight, bias


def token_logps(model, batch: dict, *, temperature: float = 1.0, chunk_size: int | None = None):
    """(logp [B, T-1] fp32, mask [B, T-1] bool): log-prob of each next token ``labels[:, 1:]`` given the
    prefix, 0 where the label is -100 (mask False). ``model``: a ``Policy`` or a bare model."""
    from fastrl.ops.linear_logprobs import linear_logprobs

    def head(hidden, weight, bias, batch):
        labels = batch["labels"][:, 1:]
        logp = linear_logprobs(
            hidden[:, :-1], weight, labels, bias=bias, temperature=temperature, chunk_size=chunk_size
        )
        mask = labels != -100
        return torch.where(mask, logp, torch.zeros_like(logp)), mask

    return as_policy(model)(head, batch)


def as_dataset(dataset):
    """A ``datasets.Dataset`` from a list of dicts; a dataset as is."""
    if isinstance(dataset, list):
        import datasets

        return datasets.Dataset.from_list(dataset)
    return dataset
