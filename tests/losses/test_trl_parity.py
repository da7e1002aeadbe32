"""Parity with TRL 1.16's OWN loss code: ``GRPOTrainer._compute_loss`` and ``DPOTrainer._compute_loss`` run
on crafted fp64 inputs, against ``fastrl.grpo_loss`` / ``fastrl.losses.dpo.dpo_loss`` on the same inputs;
loss and gradient (to the per-token log-probs, and to the entropies for the entropy options) agree within
1e-6 relative (in practice to ~1e-15).

How TRL is driven, without a model or a full trainer: the trainer object is made with ``object.__new__``
and given only the attributes its loss method reads (``grpo_trainer`` / ``dpo_trainer`` below; a stand-in
accelerator for one process). The model calls are replaced: GRPO's ``_get_per_token_logps_and_entropies``
returns our log-prob and entropy leaves; DPO's ``model(...)`` returns them as its fused-LM-head outputs
(``log_probs``, ``log_sum_sq_probs`` for WPO, ...). The reference log-probs are passed precomputed.

What is not TRL's own code here: TRL computes the vLLM importance-sampling ratio inline in
``_generate_and_score_completions`` (not callable without generating); ``trl_is_ratio`` transcribes those
lines (``nan_to_num`` on the masked log-ratio, clamp or mask), and both sides then see that same engine
correction through their own loss code.

Deliberate differences are named expectations, each checked for exactly the difference it documents:

- ``GSPO_KL_TOKEN_RATIO``: with ``importance_sampling_level="sequence"`` and ``use_bias_correction_kl``, TRL
  weights the per-token KL with the broadcast sequence ratio (its open issue #6586); fastrl with the token
  ratio ``exp(l - o)``, the importance weight of a per-token KL sample. Checked:
  ``fastrl = TRL + beta * sum_bt s_b m_bt (exp(l - o) - r_b) K_bt``, loss and gradient.
- ``CDPO_LABEL_SMOOTHING``: TRL >= 0.29 ignores ``label_smoothing`` for ``sigmoid``; fastrl applies cDPO.
  Checked: TRL(ε) = fastrl(0) and fastrl(ε) = fastrl(0) + ε b mean(d) (as logσ(z) - logσ(-z) = z).
- ``SAPO_TEMPERATURE_FP32``: TRL builds SAPO's temperatures with ``torch.where`` of Python floats, so they
  are fp32 even for fp64 inputs (``sapo_temperature_neg=1.05`` becomes 1.0499999523...); fastrl keeps the
  compute dtype. Checked: fastrl given the fp32-rounded temperatures equals TRL to fp64 rounding.
- ``TRL_HINGE_WPO_BACKWARD``: not a difference but a TRL defect: hinge with ``use_weighting`` multiplies
  ReLU's output in place (``per_sequence_loss *= weights``), so TRL's backward raises. The loss is
  compared, and the raise asserted (when TRL fixes it, this case says so).
- ``TRL_SFT_WPO_EXPAND``: a TRL defect too: sft with ``use_weighting`` multiplies an ``expand``-ed scalar in
  place, which raises in TRL's forward. fastrl gives what the code means, the sft scalar times each pair's
  weight; as the weights are data, that is ``mean(ω) x`` TRL's unweighted sft, loss and gradient: checked.
- ``ALPHA_DIVERGENCE_FP32``: TRL's alpha-divergence has no fp64 branch (its clamp table stops at fp32), so
  that variant is compared with fp32 inputs on both sides, within fp32 rounding (1e-5 relative).

Within the tolerance but not to fp64 rounding: TRL's exo_pair takes ``log(ε)`` and ``log1p(-ε)`` of an fp32
``torch.tensor(label_smoothing)`` (about 1e-8 relative); every other fp64 case agrees to ~1e-14 relative
(measured: at most 8e-15).

Equal by construction of the inputs (so the cases test the loss code, not these conventions): entropies on
a 1/16 grid (TRL takes the quantile threshold in fp32; on the grid that rounding flips no token); masked
positions hold finite values (TRL multiplies by the mask, so a NaN there would reach its loss; fastrl
ignores masked positions whatever they hold); the completion mask's first column is prompt (TRL counts
ipo / sigmoid_norm lengths on the unshifted mask and sft / WPO ones on the shifted one).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="parity with TRL needs trl installed")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="parity with TRL needs trl installed")

from fastrl.losses.dpo import dpo_loss, ld_sequence_logps, wpo_weights  # noqa: E402
from fastrl.losses.grpo import grpo_loss  # noqa: E402

RTOL = 1e-6
B, T = 6, 13


class _OneProcess:
    """The accelerator calls TRL's loss methods make, for a single process."""

    num_processes = 1
    sync_gradients = True
    device = torch.device("cpu")

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t


def assert_rel(name, got, want, rtol=RTOL):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * scale + 1e-300, f"{name}: max |fastrl - TRL| = {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------------ GRPO

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
MAX_LEN = T + 4  # dr_grpo's constant


def grpo_inputs(dtype=torch.float64):
    logp = -2.5 * torch.rand(B, T, dtype=dtype)
    adv = torch.randn(B, dtype=dtype)
    adv[:3] = adv[:3].abs() + 0.05
    adv[3:] = -adv[3:].abs() - 0.05
    # whole sequences off the clip range, and (engine KL ~ shift) on both sides of the off-policy threshold
    shift = torch.tensor([0.0, 0.4, -0.4, 0.5, 0.0, -0.5], dtype=dtype)[:, None]
    old = logp + 0.4 * torch.randn(B, T, dtype=dtype) + shift
    ref = logp + 0.3 * torch.randn(B, T, dtype=dtype)
    engine = old + 0.25 * torch.randn(B, T, dtype=dtype) + 0.1 * torch.randn(B, 1, dtype=dtype)
    lengths = torch.tensor([T, 1, T - 3, T, 5, T - 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]) & (torch.rand(B, T) > 0.1)
    mask[:, 0] = True
    entropy = torch.randint(0, 48, (B, T)).to(dtype) / 16  # the 1/16 grid (module docstring)
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, engine=engine, entropy=entropy)


def trl_is_ratio(old, sampling, mask, mode, lo, hi):
    """TRL's vLLM IS ratio, transcribed from ``GRPOTrainer._generate_and_score_completions`` (inline)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=lo, max=hi)
    low = lo if lo is not None else -math.inf
    high = hi if hi is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


def grpo_trainer(opts: dict, *, use_vllm: bool):
    o = {**GRPO_DEFAULTS, **opts}
    trainer = object.__new__(trl_grpo.GRPOTrainer)
    trainer.args = SimpleNamespace(
        use_bias_correction_kl=o["use_bias_correction_kl"], delta=o["delta"], steps_per_generation=1,
        sapo_temperature_pos=o["sapo_temperature_pos"], sapo_temperature_neg=o["sapo_temperature_neg"],
        vespo_k_pos=o["vespo_k_pos"], vespo_lambda_pos=o["vespo_lambda_pos"], vespo_k_neg=o["vespo_k_neg"],
        vespo_lambda_neg=o["vespo_lambda_neg"], entropy_target=0.2,
    )  # fmt: skip
    trainer.__dict__.update(
        loss_type=o["loss_type"], beta=o["beta"], epsilon_low=o["epsilon_low"],
        epsilon_high=o["epsilon_low"] if o["epsilon_high"] is None else o["epsilon_high"],
        importance_sampling_level=o["importance_sampling_level"],
        top_entropy_quantile=o["top_entropy_quantile"],
        off_policy_mask_threshold=o["off_policy_mask_threshold"], entropy_coef=o["entropy_coef"],
        use_adaptive_entropy=False, _entropy_bonus_enabled=o["entropy_coef"] != 0,
        use_vllm=use_vllm, vllm_importance_sampling_correction=use_vllm, aux_loss_enabled=False,
        max_completion_length=MAX_LEN, current_gradient_accumulation_steps=1, accelerator=_OneProcess(),
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    return trainer


GRPO_DEFAULTS = dict(
    loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=None, delta=None, use_bias_correction_kl=True,
    importance_sampling_level="token", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
    vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, top_entropy_quantile=1.0,
    off_policy_mask_threshold=None, entropy_coef=0.0, is_mode="sequence_mask", is_clip_min=None,
    is_clip_max=3.0,
)  # fmt: skip


def run_trl_grpo(x, opts, *, old_given, engine_given):
    o = {**GRPO_DEFAULTS, **opts}
    logp = x["logp"].clone().requires_grad_(True)
    entropy = x["entropy"].clone().requires_grad_(True)
    trainer = grpo_trainer(opts, use_vllm=engine_given)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    m = x["mask"].to(x["logp"].dtype)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m,
        "advantages": x["adv"], "num_items_in_batch": m.sum(), "ref_per_token_logps": x["ref"],
    }  # fmt: skip
    if old_given:
        inputs["old_per_token_logps"] = x["old"]
    if engine_given:
        old = x["old"] if old_given else x["logp"]
        lo, hi = o["is_clip_min"], o["is_clip_max"]
        inputs["importance_sampling_ratio"] = trl_is_ratio(old, x["engine"], m, o["is_mode"], lo, hi)
        inputs["sampling_per_token_logps"] = x["engine"]
    loss = trainer._compute_loss(None, inputs)
    g_logp, g_ent = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss.detach(), g_logp, torch.zeros_like(entropy) if g_ent is None else g_ent


def run_fastrl_grpo(x, opts, *, old_given, engine_given):
    logp = x["logp"].clone().requires_grad_(True)
    entropy = x["entropy"].clone().requires_grad_(True)
    o = {**opts}
    if o.get("loss_type") == "dr_grpo":
        o["max_completion_length"] = MAX_LEN
    if o.get("loss_type") == "sapo":  # SAPO_TEMPERATURE_FP32: what TRL's torch.where makes of them
        for k in ("sapo_temperature_pos", "sapo_temperature_neg"):
            o[k] = torch.tensor(o.get(k, GRPO_DEFAULTS[k]), dtype=torch.float32).item()
    loss, _ = grpo_loss(
        logp, x["old"] if old_given else None, x["adv"], x["mask"], ref_logp=x["ref"],
        engine_logp=x["engine"] if engine_given else None, entropy=entropy, impl="torch", **o,
    )  # fmt: skip
    g_logp, g_ent = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss.detach(), g_logp, torch.zeros_like(entropy) if g_ent is None else g_ent


def gspo_kl_token_ratio_shift(x, opts, *, old_given):
    """GSPO_KL_TOKEN_RATIO: ``beta * sum_bt s_b m_bt (q_bt - r_b) K_bt`` and its gradient to logp."""
    o = {**GRPO_DEFAULTS, **opts}
    lp = x["logp"].clone().requires_grad_(True)
    old = x["old"] if old_given else lp.detach()
    m = x["mask"].double()
    n = m.sum(-1)
    q = torch.exp(lp - old)
    r = torch.exp(((lp - old) * m).sum(-1, keepdim=True) / n.clamp(min=1)[:, None])
    d = x["ref"] - lp
    kl = torch.exp(d) - d - 1
    s = {
        "grpo": 1 / (B * n.clamp(min=1)), "sapo": 1 / (B * n.clamp(min=1)), "bnpo": 1 / m.sum().expand(B),
        "dr_grpo": torch.full((B,), 1 / (B * MAX_LEN), dtype=m.dtype),
        "luspo": torch.full((B,), 1 / B, dtype=m.dtype),
    }.get(o["loss_type"], 1 / m.sum().expand(B))  # fmt: skip
    shift = o["beta"] * (s[:, None] * m * (q - r) * kl).sum()
    return shift.detach(), torch.autograd.grad(shift, lp)[0]


def grpo_cases():
    cases = []
    for lt in LOSS_TYPES:
        base = {"loss_type": lt}
        if lt == "cispo":
            base["epsilon_high"] = 1.3
        if lt in ("grpo", "dapo"):
            base.update(epsilon_high=0.28)
        if lt == "vespo":
            base["is_mode"] = "token_truncate"
        for level in ("token", "sequence") if lt != "vespo" else ("token",):
            b = {**base, "importance_sampling_level": level}
            variants = {
                "plain": ({}, True, False),
                "kl_bias_corrected": ({"beta": 0.1}, True, False),
                "kl_plain": ({"beta": 0.1, "use_bias_correction_kl": False}, True, False),
                "kl_on_policy": ({"beta": 0.1}, False, False),
                "engine_is": ({"is_clip_min": 0.6, "is_clip_max": 1.5}, True, True),
                "off_policy_mask": ({"off_policy_mask_threshold": 0.05}, True, True),
                "entropy_quantile": ({"top_entropy_quantile": 0.3}, True, False),
                "entropy_bonus": ({"entropy_coef": 0.05, "top_entropy_quantile": 0.5}, True, False),
            }
            if lt != "vespo":
                variants["engine_is_token_mask"] = ({"is_mode": "token_mask", "is_clip_min": 0.7}, True, True)
            if lt in ("grpo", "dapo", "bnpo", "luspo"):
                variants["delta"] = ({"delta": 1.35, "beta": 0.05}, True, False)
            for name, (extra, old_given, engine_given) in variants.items():
                cases.append(pytest.param({**b, **extra}, old_given, engine_given, id=f"{lt}-{level}-{name}"))
    return cases


@pytest.mark.parametrize("opts, old_given, engine_given", grpo_cases())
def test_grpo_matches_trl(seed, opts, old_given, engine_given):
    x = grpo_inputs()
    if opts.get("off_policy_mask_threshold") is not None:  # an unscorable engine token (vLLM's None)
        x["engine"][0, 2] = float("nan")
    kw = dict(old_given=old_given, engine_given=engine_given)
    t_loss, t_grad, t_hgrad = run_trl_grpo(x, opts, **kw)
    f_loss, f_grad, f_hgrad = run_fastrl_grpo(x, opts, **kw)
    o = {**GRPO_DEFAULTS, **opts}
    if o["importance_sampling_level"] == "sequence" and o["beta"] and o["use_bias_correction_kl"]:
        shift, shift_grad = gspo_kl_token_ratio_shift(x, opts, old_given=old_given)  # GSPO_KL_TOKEN_RATIO
        # the difference is real (on-policy its value is 0, its gradient is not), and exactly this
        assert shift.abs() > 1e-6 * t_loss.abs() or shift_grad.abs().max() > 1e-6 * t_grad.abs().max()
        t_loss, t_grad = t_loss + shift, t_grad + shift_grad
    assert torch.isfinite(t_loss)
    assert_rel("loss", f_loss, t_loss)
    assert_rel("dloss/dlogp", f_grad, t_grad)
    assert_rel("dloss/dentropy", f_hgrad, t_hgrad) if t_hgrad.abs().max() > 0 else None
    assert bool((f_hgrad == 0).all()) == bool((t_hgrad == 0).all())


def test_grpo_cases_exercise_the_branches(seed):
    """The inputs put tokens and sequences on both clip sides, drop some sequences by the off-policy mask
    and keep others, and the quantile threshold cuts the tokens."""
    x = grpo_inputs()
    m = x["mask"]
    r = torch.exp(x["logp"] - x["old"])[m]
    a = x["adv"][:, None].expand(B, T)[m]
    assert bool(((r > 1.28) & (a > 0)).any()) and bool(((r < 0.8) & (a < 0)).any())
    md = m.double()
    r_seq = torch.exp(((x["logp"] - x["old"]) * md).sum(-1) / md.sum(-1))
    assert bool((r_seq > 1.2).any()) and bool((r_seq < 0.8).any())
    kl = ((x["engine"] - x["logp"]) * md).sum(-1) / md.sum(-1)
    neg = x["adv"] < 0
    assert bool((neg & (kl > 0.05)).any()) and bool((neg & (kl <= 0.05)).any())


# ------------------------------------------------------------------------------------------------- DPO

P, L, V = 4, 11, 7


def dpo_inputs(dtype=torch.float64):
    """[2P, L] batch (chosen rows, then rejected), the completion after a prompt of >= 1 token."""
    prompt = torch.randint(1, 4, (2 * P,))
    length = torch.randint(2, L - 3, (2 * P,))
    pos = torch.arange(L)[None, :]
    completion_mask = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).long()
    logits = torch.randn(2 * P, L - 1, V, dtype=dtype)
    labels = torch.randint(0, V, (2 * P, L - 1))
    log_p = torch.log_softmax(logits, -1)
    shift_mask = completion_mask[:, 1:].bool()
    token_logp = torch.where(shift_mask, log_p.gather(-1, labels[..., None])[..., 0], 0.0)
    log_sum_sq = torch.logsumexp(2 * log_p, -1)
    ref_token = torch.where(shift_mask, token_logp + 0.4 * torch.randn(2 * P, L - 1, dtype=dtype), 0.0)
    return dict(cm=completion_mask, token_logp=token_logp, log_sum_sq=log_sum_sq, ref_token=ref_token)


def ld_sums(token, shift_mask, ld_alpha):
    c, r = ld_sequence_logps(
        token[:P], shift_mask[:P], token[P:], shift_mask[P:], 1.0 if ld_alpha is None else ld_alpha
    )
    return c, r


def run_trl_dpo(
    x, *, types, weights=None, ls=0.0, ld_alpha=None, kind="reverse_kl", use_weighting=False, backward=True
):
    token = x["token_logp"].clone().requires_grad_(True)
    shift_mask = x["cm"][:, 1:].bool()
    ref_c, ref_r = ld_sums(x["ref_token"], shift_mask, ld_alpha)
    trainer = object.__new__(trl_dpo.DPOTrainer)
    trainer.args = SimpleNamespace(discopop_tau=0.3)
    trainer.__dict__.update(
        beta=0.2, loss_types=list(types), loss_weights=weights or [1.0] * len(types), ld_alpha=ld_alpha,
        f_divergence_type=kind, f_alpha_divergence_coef=0.6, label_smoothing=ls, use_weighting=use_weighting,
        precompute_ref_logps=True, aux_loss_enabled=False, accelerator=_OneProcess(), _tp_size=1,
        _total_train_tokens=0, model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    zeros = torch.zeros_like(x["token_logp"])
    # TRL's fused head gives 0, with no gradient, at ignored labels (TRL then sums over every position)
    outputs = SimpleNamespace(
        log_probs=token * shift_mask, log_sum_sq_probs=x["log_sum_sq"], entropy=zeros, mean_logits=zeros,
        is_top1=torch.zeros_like(shift_mask),
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(2 * P, L, dtype=torch.long),
        "attention_mask": torch.ones(2 * P, L, dtype=torch.long),
        "completion_mask": x["cm"], "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r,
    }  # fmt: skip
    loss = trainer._compute_loss(lambda **kw: outputs, inputs, False)
    if not backward:
        return loss.detach()
    return loss.detach(), torch.autograd.grad(loss, token)[0]


def run_fastrl_dpo(x, *, types, weights=None, ls=0.0, ld_alpha=None, kind="reverse_kl", use_weighting=False):
    token = x["token_logp"].clone().requires_grad_(True)
    shift_mask = x["cm"][:, 1:].bool()
    ref_c, ref_r = ld_sums(x["ref_token"], shift_mask, ld_alpha)
    c, r = ld_sums(token, shift_mask, ld_alpha)
    opts = {}
    if set(types) & {"ipo", "sigmoid_norm", "sft"}:
        opts.update(chosen_lengths=shift_mask[:P].sum(1), rejected_lengths=shift_mask[P:].sum(1))
    if "sft" in types:
        opts["sft_chosen_logps"] = (token[:P] * shift_mask[:P]).sum(1)
    if "discopop" in types:
        opts["discopop_tau"] = 0.3
    if use_weighting:
        lss = x["log_sum_sq"]
        opts["pair_weights"] = wpo_weights(
            token[:P], lss[:P], shift_mask[:P], token[P:], lss[P:], shift_mask[P:]
        )
    loss, _ = dpo_loss(
        c, r, ref_c, ref_r, beta=0.2, loss_type=list(types), loss_weights=weights, label_smoothing=ls,
        f_divergence_type=kind, f_alpha_divergence_coef=0.6, **opts,
    )  # fmt: skip
    return loss.detach(), torch.autograd.grad(loss, token)[0]


DPO_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
F_DIV_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.2}


def dpo_cases():
    cases = []
    for t in DPO_TYPES:
        for ld in (None, 0.5):
            for wpo in (False, True) if t not in ("aot", "aot_unpaired") else (False,):
                kw = dict(types=[t], ls=SMOOTHING.get(t, 0.0), ld_alpha=ld, use_weighting=wpo)
                cases.append(pytest.param(kw, id=f"{t}-ld{ld}-{'wpo' if wpo else 'plain'}"))
    for t in F_DIV_TYPES:
        for kind in ("forward_kl", "js_divergence"):
            kw = dict(types=[t], ls=SMOOTHING.get(t, 0.0), kind=kind, use_weighting=t == "sigmoid")
            cases.append(pytest.param(kw, id=f"{t}-{kind}"))
    mixes = (
        (["sigmoid", "sft"], [1.0, 0.3], False),
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], False),  # MPO's mix
        (["sigmoid", "ipo"], [0.7, 0.3], True),
    )
    for types, weights, wpo in mixes:
        for ld in (None, 0.5):
            kw = dict(types=types, weights=weights, ld_alpha=ld, use_weighting=wpo)
            cases.append(pytest.param(kw, id=f"{'+'.join(types)}-ld{ld}{'-wpo' if wpo else ''}"))
    return cases


@pytest.mark.parametrize("kw", dpo_cases())
def test_dpo_matches_trl(seed, kw):
    x = dpo_inputs()
    if kw["types"] == ["hinge"] and kw["use_weighting"]:  # TRL_HINGE_WPO_BACKWARD (module docstring)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            run_trl_dpo(x, **kw)
        t_loss = run_trl_dpo(x, **kw, backward=False)
        f_loss, _ = run_fastrl_dpo(x, **kw)
        assert_rel("loss", f_loss, t_loss)
        return
    if kw["types"] == ["sft"] and kw["use_weighting"]:  # TRL_SFT_WPO_EXPAND (module docstring)
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            run_trl_dpo(x, **kw)
        t_loss, t_grad = run_trl_dpo(x, **{**kw, "use_weighting": False})
        shift_mask = x["cm"][:, 1:].bool()
        lss, tok = x["log_sum_sq"], x["token_logp"]
        omega = wpo_weights(tok[:P], lss[:P], shift_mask[:P], tok[P:], lss[P:], shift_mask[P:]).mean()
        f_loss, f_grad = run_fastrl_dpo(x, **kw)
        assert_rel("loss", f_loss, omega * t_loss)
        assert_rel("dloss/dlogp", f_grad, omega * t_grad)
        return
    t_loss, t_grad = run_trl_dpo(x, **kw)
    f_loss, f_grad = run_fastrl_dpo(x, **kw)
    assert torch.isfinite(t_loss)
    assert_rel("loss", f_loss, t_loss)
    assert_rel("dloss/dlogp", f_grad, t_grad)


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_dpo_alpha_divergence_fp32(seed, ld_alpha):
    """ALPHA_DIVERGENCE_FP32 (module docstring): TRL's alpha-divergence takes fp32 only."""
    x = {k: v.float() if v.is_floating_point() else v for k, v in dpo_inputs().items()}
    with pytest.raises(KeyError):  # the documented reason: no fp64 entry in TRL's clamp table
        run_trl_dpo(dpo_inputs(), types=["sigmoid"], kind="alpha_divergence")
    for types in (["sigmoid"], ["ipo", "sft"], ["sigmoid_norm"]):
        kw = dict(types=types, kind="alpha_divergence", ld_alpha=ld_alpha)
        t_loss, t_grad = run_trl_dpo(x, **kw)
        f_loss, f_grad = run_fastrl_dpo(x, **kw)
        assert_rel("loss", f_loss, t_loss, rtol=1e-5)
        assert_rel("dloss/dlogp", f_grad, t_grad, rtol=1e-5)


def test_dpo_sigmoid_label_smoothing(seed):
    """CDPO_LABEL_SMOOTHING (module docstring): TRL ignores ε for sigmoid, fastrl applies cDPO."""
    x = dpo_inputs()
    eps = 0.2
    trl_eps, trl_eps_grad = run_trl_dpo(x, types=["sigmoid"], ls=eps)
    ours_0, ours_0_grad = run_fastrl_dpo(x, types=["sigmoid"])
    assert_rel("TRL(eps) = fastrl(0)", trl_eps, ours_0)
    assert_rel("TRL(eps) = fastrl(0) grad", trl_eps_grad, ours_0_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cDPO warning (tested in test_dpo_options)
        ours_eps, ours_eps_grad = run_fastrl_dpo(x, types=["sigmoid"], ls=eps)
    token = x["token_logp"].clone().requires_grad_(True)
    shift_mask = x["cm"][:, 1:].bool()
    c, r = ld_sums(token, shift_mask, None)
    rc, rr = ld_sums(x["ref_token"], shift_mask, None)
    shift = eps * 0.2 * ((c - rc) - (r - rr)).mean()  # eps * b * mean(d)
    assert_rel("fastrl(eps) = fastrl(0) + eps b mean(d)", ours_eps, ours_0 + shift.detach())
    assert_rel("... gradient", ours_eps_grad, ours_0_grad + torch.autograd.grad(shift, token)[0])
