"""Held-out evaluation every ``train.eval_steps`` optimizer steps (and after the last one): a hook of the
training loop (``core.train``), whose record goes to ``metrics.jsonl`` with ``eval_`` keys and, on rank 0,
one line on the console.

- SFT: ``eval_loss = sum_t -log p(y_t | y_<t) / (loss tokens)`` over the whole eval set (token-weighted,
  as one batch holding every eval example would give), plus ``eval_num_loss_tokens``.
- DPO: the training loss and its metrics on each eval batch (the same ``DPOStep`` code), weighted by the
  batch's pairs: ``eval_loss = sum_b P_b loss_b / sum_b P_b`` (every DPO loss is a mean over pairs).
- GRPO: ``num_generations`` completions per eval prompt from the run's engine (with its sampling
  settings, seeded per eval batch so every evaluation sees the same noise), scored by the reward
  functions: ``eval_reward`` (weighted total, mean over completions scored) and ``eval_reward/<name>``.

Every evaluation runs in eval mode under ``no_grad`` (and the training autocast). Under FSDP the forwards
are collectives, so every rank evaluates its share (rows ``rank, rank + W, ...``) in the same number of
batches (a rank whose share ran out runs a copy of row 0 at weight 0), and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from fastrl.distributed.env import all_reduce_dict_mean, dist_info


def eval_data(cfg, dataset, eval_dataset=None):
    """(training dataset, eval dataset or None): ``eval_dataset`` given in memory, else the data section's
    ``eval_dataset`` / ``eval_split`` / ``eval_fraction`` (``fastrl.data.loading.load_eval_data``). Eval
    data with ``train.eval_steps`` 0 is not used (a warning says so)."""
    from fastrl.data.loading import load_eval_data
    from fastrl.trainers.common import as_dataset

    if eval_dataset is not None:
        dataset, held_out = dataset, as_dataset(eval_dataset)
    else:
        dataset, held_out = load_eval_data(cfg.data, dataset, seed=cfg.train.seed)
    if held_out is not None and not cfg.train.eval_steps:
        import warnings

        from fastrl import FastRLWarning

        warnings.warn("eval data is given but train.eval_steps is 0: it is not evaluated", FastRLWarning, 2)
        return dataset, None
    if held_out is not None and len(held_out) == 0:
        raise ValueError("the eval dataset has no rows")
    return dataset, held_out


def check_eval_request(cfg, eval_dataset=None) -> None:
    """Before any model loads: ``train.eval_steps`` needs eval data."""
    from fastrl.data.loading import has_eval_data

    if cfg.train.eval_steps and eval_dataset is None and not has_eval_data(cfg.data):
        raise ValueError(
            f"train.eval_steps {cfg.train.eval_steps} needs eval data: set data.eval_dataset, "
            "data.eval_split or data.eval_fraction (or pass eval_dataset=)"
        )


def due(step: int, max_steps: int, every: int) -> bool:
    """Evaluate after ``step``: every ``every`` steps and after the last (``every`` 0: never)."""
    return every > 0 and (step % every == 0 or step == max_steps)


def shard_batches(n: int, batch_size: int) -> list[tuple[list[int], float]]:
    """This rank's share of ``range(n)`` in batches, as (indices, weight): every rank gets the same number
    of batches; where its share ran out, ``([0], 0.0)`` (to run, and to be ignored)."""
    info = dist_info()
    mine = list(range(info.rank, n, info.world_size))
    count = math.ceil(math.ceil(n / info.world_size) / batch_size)
    out = []
    for b in range(count):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        out.append((idx, 1.0) if idx else ([0], 0.0))
    return out


def global_sums(sums: dict[str, float]) -> dict[str, float]:
    """``sums`` added over ranks (one collective; the keys must match on every rank)."""
    world = dist_info().world_size
    return {k: v * world for k, v in all_reduce_dict_mean(sums).items()}


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    return contextlib.nullcontext()


class _Evaluator:
    """The hook: ``__call__(step, max_steps)`` evaluates when due and returns the record (else None)."""

    autocast = True  # the training forward's bf16 autocast (CUDA); generation runs without, as rollouts do

    def __init__(self, policy, cfg, device):
        self.policy, self.cfg, self.device = policy, cfg, device
        self.batch_size = cfg.train.per_device_eval_batch_size or cfg.train.per_device_batch_size

    def __call__(self, step: int, max_steps: int) -> dict | None:
        if not due(step, max_steps, self.cfg.train.eval_steps):
            return None
        from fastrl.models.modes import eval_mode

        t0 = time.perf_counter()
        bf16 = self.cfg.train.bf16 and self.autocast
        with eval_mode(self.policy), torch.no_grad(), _autocast(self.device, bf16):
            record = self.evaluate()
        record["eval_runtime_s"] = time.perf_counter() - t0
        if dist_info().is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if not k.startswith("eval_num"))
            print(f"step {step}: {shown}", flush=True)
        return record

    def evaluate(self) -> dict:
        raise NotImplementedError


class SFTEvaluator(_Evaluator):
    """``examples``: tokenized ``{"input_ids", "loss_mask"}`` (``sft.tokenize_sft``), never packed."""

    def __init__(self, policy, examples: list[dict], pad_id: int, cfg, device):
        super().__init__(policy, cfg, device)
        self.examples, self.pad_id = examples, pad_id

    def evaluate(self) -> dict:
        from fastrl.data import collate_lm
        from fastrl.trainers.common import to_device, token_logps

        data = self.cfg.data
        nll = tokens = 0.0
        for idx, w in shard_batches(len(self.examples), self.batch_size):
            exs = [self.examples[i] for i in idx]
            batch = collate_lm(
                [e["input_ids"] for e in exs],
                [e["loss_mask"] for e in exs],
                self.pad_id,
                side=data.padding_side,
                multiple_of=data.pad_to_multiple_of,
            )
            logp, mask = token_logps(
                self.policy, to_device(batch, self.device), chunk_size=self.cfg.sft.chunk_size
            )
            nll += w * float(-logp.double().sum())
            tokens += w * float(mask.sum())
        total = global_sums({"nll": nll, "tokens": tokens})
        return {
            "eval_loss": total["nll"] / max(total["tokens"], 1.0),
            "eval_num_loss_tokens": total["tokens"],
        }


class _FixedBatches:
    """Stands in for a ``DPOStep``'s sampler: ``next_batch()`` returns the indices set last."""

    indices: list[int] = []

    def next_batch(self) -> list[int]:
        return self.indices


class DPOEvaluator(_Evaluator):
    """``step``: a ``DPOStep`` over the eval examples (its reference log-probs precomputed when the run
    precomputes them); each batch is its ``micro_step`` on the chosen indices."""

    def __init__(self, step, cfg, device):
        super().__init__(step.policy, cfg, device)
        self.step = step
        self.step.sampler = _FixedBatches()

    def evaluate(self) -> dict:
        sums: dict[str, float] = {"pairs": 0.0, "loss": 0.0}
        for idx, w in shard_batches(len(self.step.examples), self.batch_size):
            self.step.sampler.indices = idx
            loss, metrics = self.step.micro_step(0)
            pairs = w * len(idx)
            sums["pairs"] += pairs
            sums["loss"] += pairs * float(loss)
            for k, v in metrics.items():
                v = float(torch.as_tensor(v).detach().float().mean())
                sums[k] = sums.get(k, 0.0) + (w * v if k.startswith("num_") else pairs * v)
        total = global_sums(sums)
        pairs = max(total.pop("pairs"), 1.0)
        out = {f"eval_{k}": v if k.startswith("num_") else v / pairs for k, v in total.items()}
        return {**out, "eval_num_pairs": pairs}


class GRPOEvaluator(_Evaluator):
    """``step``: the run's ``GRPOStep`` (its engine, reward functions and weights); ``rows``: prepared eval
    prompts (``grpo.prepare_prompts``)."""

    autocast = False

    def __init__(self, step, rows: list[dict], cfg, device):
        from fastrl.rewards import check_reward_signature

        super().__init__(step.policy, cfg, device)
        self.step, self.rows = step, rows
        for fn in step.reward_funcs:  # the eval rows' columns, checked now rather than at the first eval
            check_reward_signature(fn, list(rows[0]["columns"]))

    def evaluate(self) -> dict:
        from fastrl.distributed.fsdp import gathered
        from fastrl.rewards import combine_rewards, compute_rewards, reward_name
        from fastrl.trainers.rollout import cut_at_eos, sampling_params

        st, g = self.step, self.cfg.grpo
        tok, G, rank = st.tokenizer, g.num_generations, dist_info().rank
        names = [reward_name(f) for f in st.reward_funcs]
        sums = {"scored": 0.0, "reward": 0.0, "completions": 0.0, "length": 0.0}
        for name in names:
            sums[f"{name}/sum"] = sums[f"{name}/count"] = 0.0
        with gathered(st.policy):
            st.engine.sync_weights(st.model)  # the weights changed since the last round
            for b, (idx, w) in enumerate(shard_batches(len(self.rows), self.batch_size)):
                rows = [self.rows[i] for i in idx]
                prompt_ids = [r["prompt_ids"] for r in rows for _ in range(G)]
                seed = self.cfg.train.seed * 1_000_003 + 104_729 * (b + 1) + 7919 * rank
                params = sampling_params(g, seed=seed)
                out = st.policy.run(lambda _, p=prompt_ids, s=params: st.engine.generate(p, s))
                completions = [cut_at_eos(c, tok.eos_token_id) for c in out.completion_ids]
                columns = {k: [r["columns"][k] for r in rows for _ in range(G)] for k in rows[0]["columns"]}
                rewards_NF = compute_rewards(
                    st.reward_funcs,
                    prompts=[r["prompt"] for r in rows for _ in range(G)],
                    completions=tok.batch_decode(completions, skip_special_tokens=True),
                    completion_ids=completions,
                    columns=columns,
                )
                total_N = combine_rewards(rewards_NF, st.reward_weights)
                scored = ~total_N.isnan()
                sums["scored"] += w * float(scored.sum())
                sums["reward"] += w * float(total_N[scored].double().sum())
                sums["completions"] += w * len(completions)
                sums["length"] += w * sum(len(c) for c in completions)
                for j, name in enumerate(names):
                    ok = ~rewards_NF[:, j].isnan()
                    sums[f"{name}/sum"] += w * float(rewards_NF[ok, j].double().sum())
                    sums[f"{name}/count"] += w * float(ok.sum())
        t = global_sums(sums)
        nan = float("nan")
        out = {
            "eval_reward": t["reward"] / t["scored"] if t["scored"] else nan,
            "eval_completion_length": t["length"] / max(t["completions"], 1.0),
            "eval_num_completions": t["completions"],
        }
        for name in names:
            c = t[f"{name}/count"]
            out[f"eval_reward/{name}"] = t[f"{name}/sum"] / c if c else nan
        return out
