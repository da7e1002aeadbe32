"""Direct preference optimisation: chosen and rejected sequences in one forward (2B rows, padded to one
length on either side), the policy's hidden states into ``FusedLinearDPOLoss`` (any ``loss_type`` of
``fastrl.losses.dpo``, LD-DPO's ``ld_alpha``), the reference's sequence log-probs computed on the fly under
``no_grad`` or once before training (``precompute_ref_log_probs``).

Data parallel and accumulation: each rank takes a token-balanced share of the global micro-batch of
pairs, every micro-batch holds ``per_device_batch_size`` pairs and the losses and metrics are means over
pairs, so the loop's mean over micro-steps and FSDP's over ranks are the mean over the optimizer step's
pairs: the same loss, gradients and metrics for any world size and split (the ``sft`` loss term alone is
a token mean over each micro-batch's chosen completions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastrl.data import DataConfig, collate_dpo, dpo_example, require_columns
from fastrl.data.sampler import ShardedSampler
from fastrl.distributed.env import dist_info
from fastrl.models.policy import as_policy
from fastrl.trainers.common import (
    seed_everything,
    setup_run,
    to_device,
    token_logps,
)
from fastrl.trainers.core import RunConfig, setup_distributed, train_run


@dataclass(kw_only=True)
class DPOConfig:
    """The DPO loss and its reference."""

    beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the implicit reward."})
    loss_type: list[str] | str = field(
        default="sigmoid",
        metadata={"help": "A loss of fastrl.losses.dpo.DPO_LOSSES, or several summed: [sigmoid, sft]."},
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss_type entry (None: all 1), e.g. [1.0, 0.3]."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Label noise (robust/exo_pair/aot; sigmoid: cDPO, which TRL >= 0.29 ignores)."},
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": "f-DPO regulariser: reverse_kl, forward_kl, js_divergence or alpha_divergence."},
    )
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "The alpha of f_divergence_type alpha_divergence."}
    )
    use_weighting: bool = field(default=False, metadata={"help": "WPO's per-pair weights (2406.11827)."})
    loss_options: dict = field(
        default_factory=dict, metadata={"help": "Extra options of the loss type, e.g. {discopop_tau: 0.05}."}
    )
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO weight of tokens past the shorter completion (None: off)."}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute reference log-probs once before training."}
    )
    chunk_size: int | None = field(default=None, metadata={"help": "Tokens per fused log-prob chunk."})

    def __post_init__(self):
        # A typo'd loss_type or option fails when the config is read, before any model loads.
        from fastrl.losses.dpo import validate_dpo_options

        validate_dpo_options(self.beta, self.loss_type, self.label_smoothing, dict(self.loss_options))


@dataclass(kw_only=True)
class DPORunConfig(RunConfig):
    """A complete DPO run."""

    dpo: DPOConfig = field(default_factory=DPOConfig, metadata={"help": "DPO options."})


def sequence_logps(model, batch: dict, num_pairs: int, *, ld_alpha: float | None, chunk_size=None):
    """(chosen [B], rejected [B]) summed completion log-probs of a ``collate_dpo`` batch (LD-DPO sums when
    ``ld_alpha`` is set)."""
    from fastrl.losses.dpo import ld_sequence_logps

    logp, mask = token_logps(model, batch, chunk_size=chunk_size)
    B = num_pairs
    if ld_alpha is None:
        return logp[:B].sum(1), logp[B:].sum(1)
    return ld_sequence_logps(logp[:B], mask[:B], logp[B:], mask[B:], ld_alpha)


class DPOStep:
    def __init__(self, model, ref, tokenizer, examples: list[dict], cfg: DPORunConfig, device):
        from fastrl.losses.fused_dpo import FusedLinearDPOLoss

        self.policy, self.ref, self.cfg, self.device = as_policy(model), ref, cfg, device
        self.pad_id = tokenizer.pad_token_id
        self.examples = examples
        d = cfg.dpo
        self.loss_fn = FusedLinearDPOLoss(
            beta=d.beta,
            loss_type=d.loss_type,
            label_smoothing=d.label_smoothing,
            loss_weights=d.loss_weights,
            f_divergence_type=d.f_divergence_type,
            f_alpha_divergence_coef=d.f_alpha_divergence_coef,
            use_weighting=d.use_weighting,
            ld_alpha=d.ld_alpha,
            chunk_size=d.chunk_size,
            **d.loss_options,
        )
        info = dist_info()
        self.sampler = ShardedSampler(
            len(examples),
            cfg.train.per_device_batch_size,
            seed=cfg.train.seed,
            rank=info.rank,
            world_size=info.world_size,
            lengths=[
                2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples
            ],
        )
        if d.precompute_ref_log_probs:
            self.precompute()

    def collate(self, exs: list[dict]) -> dict:
        data = self.cfg.data
        batch = collate_dpo(exs, self.pad_id, side=data.padding_side, multiple_of=data.pad_to_multiple_of)
        return to_device(batch, self.device)

    def reference_logps(self, batch: dict, num_pairs: int):
        with self.ref.model() as ref_model:
            return sequence_logps(
                ref_model,
                batch,
                num_pairs,
                ld_alpha=self.cfg.dpo.ld_alpha,
                chunk_size=self.cfg.dpo.chunk_size,
            )

    def precompute(self) -> None:
        # Every rank computes every example: under FSDP each forward is a collective, so all ranks must
        # run the same number of them.
        bs = self.cfg.train.per_device_batch_size
        for start in range(0, len(self.examples), bs):
            exs = self.examples[start : start + bs]
            rc, rr = self.reference_logps(self.collate(exs), len(exs))
            for ex, c, r in zip(exs, rc.tolist(), rr.tolist()):
                ex["ref_chosen"], ex["ref_rejected"] = c, r

    def micro_step(self, index: int):
        exs = [self.examples[i] for i in self.sampler.next_batch()]
        B = len(exs)
        batch = self.collate(exs)
        if self.cfg.dpo.precompute_ref_log_probs:
            rc = torch.tensor([e["ref_chosen"] for e in exs], device=self.device)
            rr = torch.tensor([e["ref_rejected"] for e in exs], device=self.device)
        else:
            rc, rr = self.reference_logps(batch, B)

        def head(hidden, weight, bias, batch):
            hidden, labels = hidden[:, :-1], batch["labels"][:, 1:]
            return self.loss_fn(
                hidden[:B],
                hidden[B:],
                weight,
                labels[:B],
                labels[B:],
                bias=bias,
                ref_chosen_logps=rc,
                ref_rejected_logps=rr,
            )

        return self.policy(head, batch)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


def tokenize_dpo(dataset, tokenizer, data: DataConfig) -> list[dict]:
    cols = set(dataset.column_names)
    # a conversational dataset may carry its prompt inside chosen/rejected (an implicit prompt)
    need = (
        ["chosen", "rejected"]
        if "prompt" not in cols and "chosen" in cols
        else ["prompt", "chosen", "rejected"]
    )
    require_columns(dataset, need, task="DPO")
    return [
        dpo_example(tokenizer, ex, max_prompt_length=data.max_prompt_length, max_length=data.max_length)
        for ex in dataset
    ]


def run_dpo(cfg: DPORunConfig, *, model=None, tokenizer=None, dataset=None, eval_dataset=None) -> dict:
    """Train with DPO; returns the final metrics record (plus ``history`` and ``eval_history``).
    ``model``, ``tokenizer``, ``dataset`` and ``eval_dataset`` may be given in memory instead of by name."""
    from fastrl.trainers.epochs import resolve_max_steps
    from fastrl.trainers.evaluation import DPOEvaluator, check_eval_request, eval_data

    check_eval_request(cfg, eval_dataset)
    seed_everything(cfg.train.seed)
    device, fsdp = setup_distributed(cfg.train)
    model, tokenizer, ref, policy, dataset = setup_run(
        cfg, device, fsdp, need_reference=True, model=model, tokenizer=tokenizer, dataset=dataset
    )
    dataset, held_out = eval_data(cfg, dataset, eval_dataset)
    examples = tokenize_dpo(dataset, tokenizer, cfg.data)
    step = DPOStep(policy, ref, tokenizer, examples, cfg, device)
    cfg = resolve_max_steps(cfg, len(examples))
    hooks = []
    if held_out is not None:  # built before the reference is freed: it precomputes the eval pairs' too
        held = DPOStep(policy, ref, tokenizer, tokenize_dpo(held_out, tokenizer, cfg.data), cfg, device)
        hooks.append(DPOEvaluator(held, cfg, device))
    if cfg.dpo.precompute_ref_log_probs:
        ref.frozen = None  # the frozen copy is no longer needed: free its memory
    return train_run(step, cfg, model=model, tokenizer=tokenizer, desc="dpo", hooks=hooks)
