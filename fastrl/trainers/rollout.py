"""One GRPO generation round: prompts -> engine -> rewards -> advantages -> rollout tensors (old and
reference log-probs when needed), shuffled and split into the micro-batches of the following
``steps_per_generation * num_iterations`` micro-steps.

Rollout layout: prompts left-padded to P columns, completions right-padded to C columns starting at column
P, so the completion's token t is scored from the hidden state at column ``P - 1 + t``.
"""

from __future__ import annotations

import math

import torch

from fastrl.data import collate_prompt_completion
from fastrl.rewards import combine_rewards, compute_rewards, group_advantages, reward_metrics
from fastrl.trainers.metrics import Metric


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (the EOS is trained on: it is how the policy stops)."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else list(ids)


def completion_logps(
    model, mb: dict, *, temperature: float, chunk_size=None, entropy: bool = False, share_prompt: bool = False
):
    """[B, C] fp32 log-probs of the completion tokens under ``model`` (a ``Policy`` or a bare model; 0
    outside the completion mask); with ``entropy`` also the [B, C] entropy of each position's next-token
    distribution (0 outside the mask). ``share_prompt``: each distinct prompt runs once
    (``fastrl.models.shared_prompt``). Only the masked-in positions are swept over the vocabulary."""
    from fastrl.models.policy import as_policy
    from fastrl.ops.linear_logprobs import linear_logprobs

    keep = mb["completion_mask"] > 0
    B, C = keep.shape

    def head(hidden, weight, bias, mb):
        # [1, K] rows: the right padding and masked-out completions cost no vocabulary sweep
        out = linear_logprobs(
            hidden[keep][None],
            weight,
            mb["completion_ids"][keep][None],
            bias=bias,
            temperature=temperature,
            chunk_size=chunk_size,
            return_entropy=entropy,
        )
        return out if entropy else (out, None)

    logp_k, ent_k = as_policy(model)(head, mb, completion=True, share_prompt=share_prompt)

    def scatter(t):
        return t.new_zeros(B, C).masked_scatter_(keep, t[0])

    logp = scatter(logp_k)
    return (logp, scatter(ent_k)) if entropy else logp


def sampling_params(g, *, seed: int):
    """The engine's ``SamplingParams`` for ``grpo`` config ``g`` (training rounds and evaluation alike)."""
    from fastrl.engine import SamplingParams

    return SamplingParams(
        max_new_tokens=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        seed=seed,
    )


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of a CPU tensor of the same shape on every rank."""
    import torch.distributed as dist

    from fastrl.distributed.env import dist_info

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    parts = [torch.empty_like(t, device=device) for _ in range(dist_info().world_size)]
    dist.all_gather(parts, t.to(device).contiguous())
    return torch.cat(parts).to(t.device)


def _split(t: torch.Tensor, perm: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(t[perm].chunk(parts))


def make_rollout(trainer, rows: list[dict], generation: int) -> tuple[list[dict], dict[str, float]]:
    """Generate ``num_generations`` completions per row of ``rows`` and turn them into
    ``steps_per_generation`` micro-batches (dicts of CPU tensors) plus this round's metrics.
    ``trainer`` is the ``GRPOStep``. Under a process group each rank generates for its own ``rows``;
    rewards are gathered so that the advantages, and the reward metrics, are the global batch's; this
    rank's token means (``entropy``, ``completion_length``) and extremes are ``Metric``s the loop
    reduces over the ranks (every rank holds as many completions, so its ``advantage_abs_mean`` and
    ``truncated_frac`` average to the global ones)."""
    from fastrl.distributed.env import all_reduce_mean, dist_info, is_distributed
    from fastrl.distributed.fsdp import gathered
    from fastrl.models.modes import eval_mode

    info = dist_info()

    cfg, g = trainer.cfg, trainer.cfg.grpo
    tok, G = trainer.tokenizer, g.num_generations
    prompt_ids = [r["prompt_ids"] for r in rows for _ in range(G)]
    params = sampling_params(g, seed=cfg.train.seed * 1_000_003 + generation + 7919 * info.rank)
    # Generation runs inside the policy's forward (FSDP's root gathers the embeddings and lm_head), with
    # every layer kept gathered for the round: one all-gather per layer, however many decode steps each
    # rank takes, so ranks that stop early cannot desynchronise the collectives.
    with eval_mode(trainer.model), torch.no_grad(), gathered(trainer.policy):
        trainer.engine.sync_weights(trainer.model)  # the weights changed since the last round
        out = trainer.policy.run(lambda _: trainer.engine.generate(prompt_ids, params))
    trainer.generate_calls += 1

    completions = [cut_at_eos(c, tok.eos_token_id) for c in out.completion_ids]
    texts = tok.batch_decode(completions, skip_special_tokens=True)
    columns = {k: [r["columns"][k] for r in rows for _ in range(G)] for k in rows[0]["columns"]}
    rewards_NF = compute_rewards(
        trainer.reward_funcs,
        prompts=[r["prompt"] for r in rows for _ in range(G)],
        completions=texts,
        completion_ids=completions,
        columns=columns,
    )
    rewards_N = combine_rewards(rewards_NF, trainer.reward_weights)
    if is_distributed():  # every rank holds the same number of whole groups
        rewards_NF, rewards_N = _all_gather(rewards_NF), _all_gather(rewards_N)
    adv_N, metrics = group_advantages(rewards_N, G, scale_rewards=g.scale_rewards)
    if is_distributed():
        n = len(prompt_ids)
        adv_N = adv_N[info.rank * n : (info.rank + 1) * n]

    batch = collate_prompt_completion(prompt_ids, completions, tok.pad_token_id)
    mask = batch["completion_mask"].float()
    truncated = torch.tensor([bool(t) for t in out.truncated])
    if g.mask_truncated_completions:
        mask[truncated] = 0.0
    batch["completion_mask"] = mask
    batch["advantages"] = adv_N
    if g.use_engine_logprobs:
        eng = torch.zeros_like(mask)
        for i, lp in enumerate(out.logprobs):
            n = min(len(lp), len(completions[i]))
            eng[i, :n] = torch.tensor(lp[:n], dtype=torch.float32)
        batch["engine_logp"] = eng

    N = len(prompt_ids)
    spg, bs = trainer.steps_per_generation, cfg.train.per_device_batch_size
    device = trainer.device
    # Policy pass (old log-probs, and the entropy metric for free) only when needed; reference pass with beta.
    # Without it the loss's own pass reports the entropy (GRPOStep.loss_entropy).
    policy_pass = trainer.need_old
    entropy_sum = 0.0
    share = g.share_prompt_forward
    with torch.no_grad():
        for key, needed in (("old_logp", policy_pass), ("ref_logp", trainer.ref.needed)):
            if not needed:
                continue
            parts = []
            for start in range(0, N, bs):
                mb = {k: v[start : start + bs].to(device) for k, v in batch.items()}
                if key == "old_logp":
                    out = completion_logps(
                        trainer.policy, mb, temperature=g.temperature, entropy=g.log_entropy,
                        share_prompt=share,
                    )  # fmt: skip
                    lp, ent = out if g.log_entropy else (out, None)
                    if ent is not None:
                        entropy_sum += float((ent * mb["completion_mask"]).sum())
                    parts.append(lp.cpu())
                else:
                    with trainer.ref.model() as ref_model:
                        lp = completion_logps(ref_model, mb, temperature=g.temperature, share_prompt=share)
                        parts.append(lp.cpu())
            if key == "old_logp" and g.log_entropy:  # a token mean: its sum and count add over ranks
                metrics["entropy"] = Metric.mean(entropy_sum, float(mask.sum()))
            batch[key] = torch.cat(parts)

    if g.shuffle_rollouts:
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.train.seed + 7919 * generation))
    else:
        perm = torch.arange(N)
    # dapo/cispo normalise by the completion tokens of the whole generation batch; the loop divides each
    # micro-step by gradient_accumulation_steps, so each micro-step is normalised by tokens / spg.
    # Under a process group: the global count divided by the world size (FSDP averages the ranks' gradients).
    total = float(mask.sum())
    items = max(all_reduce_mean(total) if is_distributed() else total, 1.0) / spg
    micro = [dict(zip(batch, vals)) for vals in zip(*(_split(v, perm, spg) for v in batch.values()))]
    for mb in micro:
        mb["num_items"] = torch.tensor(items)
        keep = int(mb["completion_mask"].sum(0).nonzero().max()) + 1 if mb["completion_mask"].any() else 1
        C = mb["completion_ids"].shape[1]
        # trim completion columns that are padding in every row of this micro-batch
        for k in ("completion_ids", "completion_mask", "old_logp", "ref_logp", "engine_logp"):
            if k in mb:
                mb[k] = mb[k][:, :keep]
        for k in ("input_ids", "attention_mask", "position_ids"):
            mb[k] = mb[k][:, : mb[k].shape[1] - (C - keep)]

    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    metrics.update(
        {
            "reward": float(torch.nanmean(rewards_N)) if (~rewards_N.isnan()).any() else math.nan,
            "advantage_abs_mean": float(adv_N.abs().mean()),
            "completion_length": Metric.mean(lengths.sum(), lengths.numel()),
            "completion_length_min": Metric.min(lengths.min()),
            "completion_length_max": Metric.max(lengths.max()),
            "truncated_frac": float(truncated.float().mean()),
        }
    )
    metrics.update(reward_metrics(rewards_NF, trainer.reward_funcs))  # per function, None/NaN counted
    # This rank's round as text, for samples.SampleLog (train.log_completions_steps).
    lo = info.rank * len(prompt_ids) if is_distributed() else 0
    own = slice(lo, lo + len(prompt_ids))
    trainer.last_samples = {
        "prompt_ids": prompt_ids,
        "completions": texts,
        "rewards": rewards_NF[own],
        "reward": rewards_N[own],
        "advantages": adv_N,
    }
    return micro, metrics
