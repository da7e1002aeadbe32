"""Supervised fine-tuning: ``loss = -sum_t log p(y_t | y_<t) / N`` over the loss tokens of the optimizer
step (completion tokens with ``completion_only_loss``, assistant turns with ``assistant_only_loss``, every
token of plain text), computed from hidden states by the fused linear log-prob op. ``N`` is the number of
loss tokens in the whole step: all ``gradient_accumulation_steps`` micro-batches on all ranks (TRL's and
transformers' ``num_items_in_batch``), so the loss, its gradient and the logged loss are those of one
process on the global batch for any world size and accumulation split.

Data parallel: each rank takes a token-balanced share of each global micro-batch; micro-step ``k`` of a
step returns ``-sum(logp_k) * ga * world_size / N`` (the loop divides by ``ga``, FSDP averages over the
ranks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastrl.data import DataConfig, collate_lm, collate_packed, sft_example
from fastrl.data.loading import check_kept
from fastrl.data.sampler import ShardedSampler
from fastrl.distributed.env import dist_info
from fastrl.models.policy import as_policy
from fastrl.trainers.common import setup_run, to_device, token_logps
from fastrl.trainers.core import RunConfig, setup_distributed, train_run
from fastrl.trainers.metrics import global_sum


@dataclass(kw_only=True)
class SFTConfig:
    """What SFT takes its loss on, and packing."""

    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on completion tokens only (None: on for prompt/completion data)."},
    )
    assistant_only_loss: bool = field(
        default=False, metadata={"help": "For messages data: loss on the assistant turns only."}
    )
    packing: bool = field(
        default=False, metadata={"help": "Pack several examples per row up to data.max_length (FFD)."}
    )
    formatting_func: str | None = field(
        default=None,
        metadata={"help": "'module:function' mapping an example to text or to {'prompt', 'completion'}."},
    )
    chunk_size: int | None = field(default=None, metadata={"help": "Tokens per fused log-prob chunk."})


@dataclass(kw_only=True)
class SFTRunConfig(RunConfig):
    """A complete SFT run."""

    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "SFT options."})


def _import(spec: str):
    from fastrl.rewards import resolve_reward  # the same "module:function" resolution

    if ":" not in spec:
        raise ValueError(f"sft.formatting_func must be 'module:function', got {spec!r}")
    return resolve_reward(spec)


def tokenize_sft(dataset, tokenizer, data: DataConfig, sft: SFTConfig) -> list[dict]:
    """Tokenized examples ``{"input_ids", "loss_mask"}``; examples without any loss token are dropped."""
    if sft.formatting_func is None:
        from fastrl.data import require_columns

        cols = set(dataset.column_names)
        if "prompt" in cols or "completion" in cols:
            require_columns(dataset, ["prompt", "completion"], task="SFT")
        else:
            require_columns(dataset, [("messages", "text", "prompt")], task="SFT")
    fmt = _import(sft.formatting_func) if sft.formatting_func else None
    out = []
    for ex in dataset:
        enc = sft_example(
            tokenizer,
            ex,
            max_length=data.max_length,
            completion_only_loss=sft.completion_only_loss,
            assistant_only_loss=sft.assistant_only_loss,
            formatting_func=fmt,
        )
        if any(enc["loss_mask"][1:]):  # the first token is never predicted
            out.append(enc)
    why = f"no loss token left within data.max_length={data.max_length}"
    check_kept(len(out), len(dataset), task="SFT", why=why)
    return out


class SFTStep:
    """Draws micro-batches from the examples (or packs) in a resumable seeded order (this rank's share).
    ``model``: a ``Policy`` (possibly FSDP-sharded) or a bare model."""

    def __init__(self, model, tokenizer, examples: list[dict], cfg: SFTRunConfig, device):
        self.policy, self.device, self.cfg = as_policy(model), device, cfg
        self.pad_id = tokenizer.pad_token_id
        self.examples = examples
        self.packs = None
        if cfg.sft.packing:
            from fastrl.native import pack_sequences

            self.packs = pack_sequences([len(e["input_ids"]) for e in examples], cfg.data.max_length)
        lengths = [len(e["input_ids"]) for e in examples]
        if self.packs is not None:
            lengths = [sum(lengths[j] for j in pack) for pack in self.packs]
        info = dist_info()
        self.pending: list[dict] | None = None  # the micro-batches of the current optimizer step
        self.step_tokens = 0.0
        self.sampler = ShardedSampler(
            len(lengths),
            cfg.train.per_device_batch_size,
            seed=cfg.train.seed,
            rank=info.rank,
            world_size=info.world_size,
            lengths=lengths,
        )

    def batch(self, indices: list[int]) -> dict:
        data = self.cfg.data
        if self.packs is not None:
            packs = [
                [(self.examples[j]["input_ids"], self.examples[j]["loss_mask"]) for j in self.packs[i]]
                for i in indices
            ]
            return collate_packed(packs, self.pad_id, multiple_of=data.pad_to_multiple_of)
        exs = [self.examples[i] for i in indices]
        return collate_lm(
            [e["input_ids"] for e in exs],
            [e["loss_mask"] for e in exs],
            self.pad_id,
            side=data.padding_side,
            multiple_of=data.pad_to_multiple_of,
        )

    def micro_step(self, index: int):
        ga = self.cfg.train.gradient_accumulation_steps
        if index % ga == 0:
            # The whole optimizer step's micro-batches, drawn up front (the sampler ends where ga separate
            # draws would: checkpoints, taken between steps, are unchanged): its global loss-token count
            # is the normaliser of every micro-step.
            self.pending = [self.batch(self.sampler.next_batch()) for _ in range(ga)]
            n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in self.pending)
            self.step_tokens = global_sum(n_local)
        batch = to_device(self.pending[index % ga], self.device)
        if index % ga == ga - 1:
            self.pending = None
        logp, mask = token_logps(self.policy, batch, chunk_size=self.cfg.sft.chunk_size)
        # The loop backpropagates loss / ga and FSDP averages the ranks: the step's gradient is that of
        # -sum(logp) / step_tokens over the global batch.
        world = dist_info().world_size
        loss = -logp.sum() * (ga * world / max(self.step_tokens, 1.0))
        return loss, {"num_loss_tokens": float(mask.sum())}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


def run_sft(cfg: SFTRunConfig, *, model=None, tokenizer=None, dataset=None, eval_dataset=None) -> dict:
    """Train with SFT; returns the final metrics record (plus ``history`` and ``eval_history``).
    ``model``, ``tokenizer``, ``dataset`` and ``eval_dataset`` (a ``datasets.Dataset`` or a list of dicts)
    may be given in memory instead of by name."""
    from fastrl.trainers.common import seed_everything
    from fastrl.trainers.epochs import resolve_max_steps
    from fastrl.trainers.evaluation import SFTEvaluator, check_eval_request, eval_data

    check_eval_request(cfg, eval_dataset)
    seed_everything(cfg.train.seed)
    device, fsdp = setup_distributed(cfg.train)
    model, tokenizer, ref, policy, dataset = setup_run(
        cfg, device, fsdp, need_reference=False, model=model, tokenizer=tokenizer, dataset=dataset
    )
    dataset, held_out = eval_data(cfg, dataset, eval_dataset)
    examples = tokenize_sft(dataset, tokenizer, cfg.data, cfg.sft)
    step = SFTStep(policy, tokenizer, examples, cfg, device)
    cfg = resolve_max_steps(cfg, len(step.packs) if step.packs is not None else len(examples))
    hooks = []
    if held_out is not None:
        held = tokenize_sft(held_out, tokenizer, cfg.data, cfg.sft)
        hooks.append(SFTEvaluator(policy, held, tokenizer.pad_token_id, cfg, device))
    return train_run(step, cfg, model=model, tokenizer=tokenizer, desc="sft", hooks=hooks)
