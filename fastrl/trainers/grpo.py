"""GRPO (Shao et al. 2024, DeepSeekMath) with the loss family of ``fastrl.losses`` (DAPO, Dr. GRPO, GSPO,
CISPO, SAPO...), generation decoupled from gradient accumulation.

Schedule: one generation round every ``steps_per_generation * num_iterations`` micro-steps produces
``generation_batch_size`` completions over all ranks (``generation_batch_size / num_generations`` prompts;
each rank generates its ``1 / WORLD_SIZE`` share, ``per_device_batch_size * steps_per_generation``
completions, whole groups); each rank shuffles its share and splits it into ``steps_per_generation``
micro-batches of ``per_device_batch_size``, which the next micro-steps consume in order, ``num_iterations``
times over. Old log-probs are computed at generation only when some of those micro-steps run after an
optimizer step (``gradient_accumulation_steps`` is not a multiple of the round length); otherwise the
policy is unchanged and the ratio is exactly 1 at ``old_logp = logp.detach()``.

Semantic change (issue 8) for users of ``grpo.generation_batch_size`` under torchrun: it now counts the
completions of all ranks, as TRL's does; it used to count one rank's (the same number now gives each of N
ranks 1/N of the rollouts). The default (``None``: ``per_device_batch_size x steps_per_generation x
WORLD_SIZE``) keeps each rank's share as it was. A value that does not split into whole micro-batches and
whole groups per rank is refused with the numbers.

Normalisers, at any world size and accumulation split the global batch's (rewards are gathered, so the
advantages are those one process would compute): ``grpo``/``sapo``/``dr_grpo``/``luspo`` weigh each
sequence by a factor of its own and of the per-rank micro-batch size (equal on every rank and micro-step),
so the mean over ranks and micro-steps is the global one; ``dapo``/``cispo``/``vespo`` divide by the
generation batch's completion tokens over all ranks (per micro-step: that / (world size x
steps_per_generation)); ``bnpo`` is the token mean over the optimizer step's global batch (its completion
tokens over all micro-steps and ranks; TRL's bnpo takes the local micro-batch's, the same at world size 1
with one micro-step per step). Not global: the ``entropy_coef`` bonus and the ``top_entropy_quantile``
mask act on each micro-batch's tokens (as TRL's). A bnpo step that spans several rounds makes them all at
its first micro-step (the policy is the same until the step ends, so they are the same rounds). Where a
round feeds several optimizer steps, each rank shuffles its own share, so a step at world size N trains
on another subset of the round than one process's step (the round, and each step's size, are the same).
Logged metrics: see ``fastrl.trainers.core``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from fastrl.data import DataConfig, encode_prompt, require_columns
from fastrl.data.sampler import ShardedSampler
from fastrl.distributed.env import dist_info
from fastrl.engine import EngineConfig, build_engine
from fastrl.losses.grpo_config import GRPOLossConfig
from fastrl.models.policy import as_policy
from fastrl.rewards import SCALE_REWARDS, resolve_reward
from fastrl.trainers.common import seed_everything, setup_run, to_device
from fastrl.trainers.core import RunConfig, setup_distributed, train_run
from fastrl.trainers.metrics import Metric, global_sum
from fastrl.trainers.rollout import make_rollout


@dataclass(kw_only=True)
class GRPOConfig:
    """Generation, rewards and the rollout schedule."""

    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (the group size)."})
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Completions per generation round over all ranks, as TRL's (None: per_device_batch_size "
            "x steps_per_generation x WORLD_SIZE); each rank generates its 1/WORLD_SIZE share."
        },
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches per generation round (None: gradient accumulation)."}
    )
    num_iterations: int = field(default=1, metadata={"help": "Passes over each generation round (mu)."})
    max_completion_length: int = field(default=256, metadata={"help": "Most new tokens per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also the loss's)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens (0: off)."})
    reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "Built-in reward names or 'module:function' specs."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (None: all 1)."}
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "Divide centred rewards by the 'group' or 'batch' std, or 'none'."}
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Exclude completions without EOS from the loss."}
    )
    use_engine_logprobs: bool = field(
        default=False, metadata={"help": "Correct for engine/trainer mismatch with engine log-probs (IS)."}
    )
    log_entropy: bool = field(
        default=True,
        metadata={
            "help": "Log the policy's mean completion-token entropy (from a pass the step makes anyway)."
        },
    )
    shuffle_rollouts: bool = field(default=True, metadata={"help": "Shuffle a round before splitting it."})
    chunk_size: int | None = field(default=None, metadata={"help": "Tokens per fused log-prob chunk."})
    share_prompt_forward: bool = field(
        default=True,
        metadata={
            "help": "Run each distinct prompt of a micro-batch once in the training and log-prob forwards "
            "(exact; falls back to the padded forward under FSDP, activation checkpointing, compiled "
            "layers, non-sdpa/eager attention)."
        },
    )

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations must be >= 2 (a group), got {self.num_generations}")
        if self.num_iterations < 1 or self.max_completion_length < 1:
            raise ValueError("grpo.num_iterations and grpo.max_completion_length must be >= 1")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"grpo.scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("grpo.temperature must be > 0, grpo.top_p in (0, 1] and grpo.top_k >= 0")


@dataclass(kw_only=True)
class GRPORunConfig(RunConfig):
    """A complete GRPO run."""

    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prompts (plus reward columns)."})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"help": "Generation and rewards."})
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig, metadata={"help": "The GRPO loss."})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "The generation engine."})


def schedule(cfg: GRPORunConfig, world_size: int | None = None) -> tuple[int, int]:
    """(generation_batch_size, steps_per_generation) resolved and checked: the global generation batch
    (completions of one round over all ``world_size`` ranks, default the process group's) and the
    micro-batches per round. One rank's share is ``generation_batch_size / world_size``
    ``= per_device_batch_size * steps_per_generation`` completions, whole groups of ``num_generations``."""
    g, bs, ga = cfg.grpo, cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps
    world = dist_info().world_size if world_size is None else world_size
    gbs, spg = g.generation_batch_size, g.steps_per_generation
    if gbs is None and spg is None:
        spg = ga
    if gbs is None:
        gbs = bs * spg * world
    elif spg is None:
        if gbs % (bs * world):
            raise ValueError(
                f"grpo.generation_batch_size ({gbs}, global) must be a multiple of per_device_batch_size x "
                f"WORLD_SIZE ({bs} x {world} = {bs * world})"
            )
        spg = gbs // (bs * world)
    if gbs != bs * spg * world:
        raise ValueError(
            f"grpo.generation_batch_size ({gbs}, global) must equal per_device_batch_size x "
            f"steps_per_generation x WORLD_SIZE ({bs} x {spg} x {world} = {bs * spg * world})"
        )
    if (gbs // world) % g.num_generations:
        raise ValueError(
            f"each rank's share of grpo.generation_batch_size ({gbs} / WORLD_SIZE {world} = {gbs // world}) "
            f"must be a multiple of grpo.num_generations ({g.num_generations}): ranks generate whole groups"
        )
    return gbs, spg


class GRPOStep:
    def __init__(self, model, ref, tokenizer, rows, reward_funcs, engine, cfg: GRPORunConfig, device):
        from fastrl.losses.fused_grpo import FusedLinearGRPOLoss

        self.policy = as_policy(model)  # every forward goes through it (the FSDP root when sharded)
        self.model, self.ref, self.tokenizer, self.rows = self.policy.model, ref, tokenizer, rows
        self.engine, self.cfg, self.device = engine, cfg, device
        self.reward_funcs = reward_funcs
        weights = cfg.grpo.reward_weights
        if weights is not None and len(weights) != len(reward_funcs):
            raise ValueError(
                f"grpo.reward_weights has {len(weights)} entries for {len(reward_funcs)} reward functions"
            )
        self.reward_weights = list(weights) if weights is not None else [1.0] * len(reward_funcs)
        gbs, self.steps_per_generation = schedule(cfg)
        gbs //= dist_info().world_size  # this rank's share
        self.cycle = self.steps_per_generation * cfg.grpo.num_iterations
        self.need_old = cfg.train.gradient_accumulation_steps % self.cycle != 0
        loss_cfg = cfg.loss
        if loss_cfg.loss_type == "dr_grpo" and loss_cfg.max_completion_length is None:
            loss_cfg = dataclasses.replace(loss_cfg, max_completion_length=cfg.grpo.max_completion_length)
        self.loss_cfg = loss_cfg
        # The entropy metric comes for free from the rollout's old-log-prob pass when there is one, else
        # from the loss's own pass over the vocabulary (return_entropy): never from an extra sweep.
        self.loss_entropy = cfg.grpo.log_entropy and not self.need_old
        self.loss_fn = FusedLinearGRPOLoss(
            loss_cfg,
            temperature=cfg.grpo.temperature,
            chunk_size=cfg.grpo.chunk_size,
            return_entropy=self.loss_entropy,
            skip_ignored=True,  # right padding and masked completions: no vocabulary sweep for them
        )
        info = dist_info()
        self.sampler = ShardedSampler(
            len(rows),
            gbs // cfg.grpo.num_generations,
            seed=cfg.train.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        self.rounds: dict[int, tuple[list[dict], dict]] = {}  # generation -> (micro-batches, metrics)
        self.resumed: tuple[list[dict], dict] | None = None  # a round loaded from a checkpoint
        self.buffer: list[dict] = []  # the round in use, and its metrics
        self.round_metrics: dict = {}
        self.generate_calls = 0

    def _round(self, generation: int) -> tuple[list[dict], dict]:
        """Generation round ``generation`` (its micro-batches and metrics), made on first use; rounds are
        made in order, so the sampler's stream and the rollouts do not depend on when."""
        if generation not in self.rounds:
            rows = [self.rows[i] for i in self.sampler.next_batch()]
            self.rounds[generation] = make_rollout(self, rows, generation)
        return self.rounds[generation]

    def _step_tokens(self, index: int) -> float:
        """Completion tokens of the optimizer step starting at micro-step ``index``, over all ranks. Rounds
        the step needs beyond the current one are made now: the policy cannot change before the step ends,
        so they are the rounds the micro-steps would have made (and computed old log-probs for) later."""
        ga, spg = self.cfg.train.gradient_accumulation_steps, self.steps_per_generation
        n = sum(
            float(self._round(i // self.cycle)[0][i % spg]["completion_mask"].sum())
            for i in range(index, index + ga)
        )
        return global_sum(n)

    def micro_step(self, index: int):
        if self.resumed is not None:  # the round a checkpoint saved mid-round (a new one starts otherwise)
            if index % self.cycle:
                self.rounds[index // self.cycle] = self.resumed
            self.resumed = None
        ga, world = self.cfg.train.gradient_accumulation_steps, dist_info().world_size
        loss_fn = self.loss_fn
        if self.loss_cfg.loss_type == "bnpo" and index % ga == 0:
            # bnpo: the token mean over the optimizer step's global batch, whatever its split into ranks
            # and micro-steps: dapo's sum / num_items with the step's global token count spread over the
            # ga micro-steps (the loop divides each by ga) and the ranks (FSDP averages them).
            n = max(self._step_tokens(index), 1.0) / (world * ga)
            loss_fn.config = dataclasses.replace(self.loss_cfg, loss_type="dapo", num_items_in_batch=n)
        generation = index // self.cycle
        for old in [k for k in self.rounds if k < generation]:
            del self.rounds[old]
        self.buffer, self.round_metrics = self._round(generation)
        mb = to_device(self.buffer[index % self.steps_per_generation], self.device)
        if self.loss_cfg.uses_num_items and self.loss_cfg.num_items_in_batch is None:
            loss_fn.config = dataclasses.replace(self.loss_cfg, num_items_in_batch=float(mb["num_items"]))

        def head(hidden, weight, bias, mb):  # hidden: [B, C, H], the states scoring the completion tokens
            mask = mb["completion_mask"]
            labels = torch.where(mask > 0, mb["completion_ids"], -100)
            return loss_fn(
                hidden,
                weight,
                labels,
                mb.get("old_logp"),
                mb["advantages"],
                mask,
                bias=bias,
                ref_logp=mb.get("ref_logp"),
                engine_logp=mb.get("engine_logp"),
            )

        share = self.cfg.grpo.share_prompt_forward
        loss, metrics = self.policy(head, mb, completion=True, share_prompt=share)
        return loss, {**self.round_metrics, **_global_metrics(metrics, mb["completion_mask"])}

    def state_dict(self) -> dict:
        """The sampler, and the round in use; collective under a process group (each rank has its own
        round: rank 0 writes them all, under ``ranks``)."""
        own = {
            "buffer": [{k: _encode(v) for k, v in mb.items()} for mb in self.buffer],
            "round_metrics": {k: _encode_metric(v) for k, v in self.round_metrics.items()},
        }
        state = {"sampler": self.sampler.state_dict()}
        info = dist_info()
        if info.world_size == 1:
            return {**state, **own}
        import torch.distributed as dist

        ranks: list = [None] * info.world_size
        dist.all_gather_object(ranks, own)
        return {**state, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if "ranks" in state:
            ranks = state["ranks"]
            if len(ranks) != dist_info().world_size:
                raise ValueError(
                    f"the checkpoint holds the rollouts of {len(ranks)} ranks; resume on as many "
                    f"(WORLD_SIZE is {dist_info().world_size})"
                )
            state = ranks[dist_info().rank]
        self.buffer = [{k: _decode(v) for k, v in mb.items()} for mb in state["buffer"]]
        self.round_metrics = {k: Metric.from_json(v) for k, v in state["round_metrics"].items()}
        self.resumed, self.rounds = (self.buffer, self.round_metrics), {}


# How the loss's metrics (detached token means over the micro-batch's completion mask, grpo_metrics) add
# up over micro-steps and ranks into the global batch's value (fastrl.trainers.metrics).
_EXTREMES = {"ratio/min": Metric.min, "ratio/max": Metric.max}
_COUNTS = ("is_weight/nan_engine_logp",)


def _global_metrics(metrics: dict, mask: torch.Tensor) -> dict:
    n = float(mask.sum())
    out = {}
    for key, v in metrics.items():
        if key == "entropy":  # [B, T] per-token entropy from the loss's own pass
            out[key] = Metric.mean((v * mask).sum(), n)
        elif key == "logp" or torch.as_tensor(v).numel() != 1:  # per-token tensors, not metrics
            continue
        elif key in _EXTREMES:
            out[key] = _EXTREMES[key](v)
        elif key in _COUNTS:
            out[key] = Metric.sum(v)
        else:  # mean = sum / max(n, 1): its sum is mean * max(n, 1), over n tokens
            out[key] = Metric.mean(float(v) * max(n, 1.0), n)
    return out


def _encode_metric(v):
    return v.to_json() if isinstance(v, Metric) else v


# The checkpoint's trainer state is JSON: a rollout round still in use is stored as nested lists (exact for
# float32 and int64), so a run resumed mid-round trains on the very same rollouts.
def _encode(t: torch.Tensor) -> dict:
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "data": t.flatten().tolist(),
    }


def _decode(d: dict) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).view(d["shape"])


def prepare_prompts(dataset, tokenizer, data: DataConfig) -> list[dict]:
    """Rows ``{"prompt", "prompt_ids", "columns"}``: the prompt from ``data.prompt_column`` (wrapped in a
    [system, user] chat when ``data.system_prompt`` is set); every other column goes to the rewards."""
    col = data.prompt_column
    require_columns(dataset, [col], task="GRPO")
    rows = []
    for ex in dataset:
        prompt = ex[col]
        if data.system_prompt is not None and isinstance(prompt, str):
            prompt = [{"role": "system", "content": data.system_prompt}, {"role": "user", "content": prompt}]
        rows.append(
            {
                "prompt": prompt,
                "prompt_ids": encode_prompt(tokenizer, prompt, data.max_prompt_length),
                "columns": {k: v for k, v in ex.items() if k != col},
            }
        )
    return rows


def run_grpo(
    cfg: GRPORunConfig,
    *,
    model=None,
    tokenizer=None,
    dataset=None,
    reward_funcs=None,
    engine=None,
    eval_dataset=None,
) -> dict:
    """Train with GRPO; returns the final metrics record (plus ``history`` and ``eval_history``).
    ``model``, ``tokenizer``, ``dataset``, ``eval_dataset`` (prompts), ``reward_funcs`` (callables,
    replacing ``grpo.reward_funcs``) and ``engine`` may be given in memory."""
    from fastrl.trainers.epochs import resolve_max_steps
    from fastrl.trainers.evaluation import GRPOEvaluator, check_eval_request, eval_data
    from fastrl.trainers.samples import SampleLog

    check_eval_request(cfg, eval_dataset)
    seed_everything(cfg.train.seed)
    device, fsdp = setup_distributed(cfg.train)
    funcs = (
        list(reward_funcs) if reward_funcs is not None else [resolve_reward(r) for r in cfg.grpo.reward_funcs]
    )
    if not funcs:
        raise ValueError("grpo.reward_funcs must name at least one reward function")
    if fsdp and engine is None and cfg.engine.kind == "hf" and cfg.engine.compile:
        # A compiled decode step captures parameter addresses, which FSDP's gathered buffers do not keep
        # from one round to the next. (vLLM engines get full tensors streamed by the weight sync.)
        raise ValueError("under train.fsdp the hf engine cannot use engine.compile")
    model, tokenizer, ref, policy, dataset = setup_run(
        cfg,
        device,
        fsdp,
        need_reference=cfg.loss.beta != 0,
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
    )
    dataset, held_out = eval_data(cfg, dataset, eval_dataset)
    rows = prepare_prompts(dataset, tokenizer, cfg.data)
    cfg = resolve_max_steps(cfg, len(rows) * cfg.grpo.num_generations * cfg.grpo.num_iterations)
    built = engine is None
    if built:
        engine = build_engine(cfg.engine, model, tokenizer)
    try:
        step = GRPOStep(policy, ref, tokenizer, rows, funcs, engine, cfg, device)
        hooks = [SampleLog(step, cfg)]
        if held_out is not None:
            hooks.append(GRPOEvaluator(step, prepare_prompts(held_out, tokenizer, cfg.data), cfg, device))
        out = train_run(step, cfg, model=model, tokenizer=tokenizer, desc="grpo", hooks=hooks)
    finally:
        if built:
            engine.close()  # a vLLM engine holds a process, a KV cache and a checkpoint folder
    out["generate_calls"] = step.generate_calls
    return out
