"""FusedLinearGRPOLoss with the TRL-1.16 options (luspo, vespo, KL bias correction, off-policy mask, entropy
quantile mask, entropy bonus, NaN engine log-probs) against a float64 closed form written here: logits
materialised, log-softmax and entropy by hand, the loss from ``test_grpo.truth_loss`` (TRL's formulas),
gradients to hidden / weight / bias by autograd through both the log-probs and the entropy."""

from __future__ import annotations

import pytest
import torch

from fastrl.losses.fused_grpo import FusedLinearGRPOLoss
from tests.helpers import assert_close_to_truth
from tests.losses.test_fused_grpo import make_case
from tests.losses.test_grpo import truth_loss

TEMPERATURE = 0.9


def truth(case, opts, *, engine, dtype=torch.float64):
    """(loss, grads) computed in ``dtype`` (float64: the truth; float32: PyTorch's own error there):
    ``z = (h W^T + b) / temperature``, ``logp = log_softmax(z)[label]``, ``H = -sum p log p``, then TRL's
    loss on (logp, H)."""
    leaf = {k: case[k].detach().to(dtype).requires_grad_(True) for k in ("hidden", "weight", "bias")}
    z = (leaf["hidden"] @ leaf["weight"].T + leaf["bias"]) / TEMPERATURE
    log_p = torch.log_softmax(z, dim=-1)
    labels = case["labels"].clamp(min=0)
    logp = torch.where(case["mask"], log_p.gather(-1, labels[..., None])[..., 0], 0.0)
    entropy = -(log_p.exp() * log_p).sum(-1)
    out = truth_loss(
        logp, case["old"], case["adv"], case["mask"], case["ref"], engine, opts, dtype=dtype, entropy=entropy
    )
    loss, g_logp, g_entropy = out
    torch.autograd.backward([logp, entropy], [g_logp, g_entropy])
    return loss, {k: v.grad for k, v in leaf.items()}


def fused(case, opts, *, engine, impl, dtype=torch.float64):
    leaf = {k: case[k].detach().to(dtype).requires_grad_(True) for k in ("hidden", "weight", "bias")}
    module = FusedLinearGRPOLoss(temperature=TEMPERATURE, chunk_size=5, impl=impl, **opts)
    loss, metrics = module(
        leaf["hidden"], leaf["weight"], case["labels"], case["old"], case["adv"], case["mask"],
        bias=leaf["bias"], ref_logp=case["ref"], engine_logp=engine,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaf.items()}, metrics


CASES = {
    "luspo_sequence": {"loss_type": "luspo", "importance_sampling_level": "sequence", "beta": 0.05},
    "vespo_token_is": {"loss_type": "vespo", "is_mode": "token_truncate", "beta": 0.05},
    "kl_bias_correction_sequence": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "beta": 0.3,
    },
    "kl_no_bias_correction": {"loss_type": "dapo", "beta": 0.3, "use_bias_correction_kl": False},
    "off_policy_mask": {"loss_type": "dapo", "off_policy_mask_threshold": 0.05, "is_mode": "token_truncate"},
    "entropy_quantile": {"loss_type": "grpo", "top_entropy_quantile": 0.3, "beta": 0.05},
    "entropy_quantile_zero": {"loss_type": "bnpo", "top_entropy_quantile": 0.0},
    "entropy_bonus": {"loss_type": "dapo", "entropy_coef": 0.2, "beta": 0.05},
    "entropy_bonus_and_quantile": {"loss_type": "cispo", "entropy_coef": 0.2, "top_entropy_quantile": 0.5},
    "entropy_bonus_sequence": {
        "loss_type": "grpo",
        "entropy_coef": 0.2,
        "importance_sampling_level": "sequence",
    },
}


def make(seed_nan: bool = False):
    case = make_case(3, 9, 16, 29, dtype=torch.float64)
    case = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.items()}
    engine = case["engine"]
    if seed_nan:
        nan = case["mask"] & (torch.rand(engine.shape) < 0.3)
        # the mask can hold as few as 5 tokens, so a 0.3 draw alone misses them all about 1 run in 6
        nan.view(-1)[case["mask"].view(-1).nonzero()[0]] = True
        engine = engine.masked_fill(nan, float("nan"))
    return case, engine


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_options_match_closed_form(seed, name, impl):
    """torch: float64 inputs, to float64 rounding; triton (interpreted, fp32 only): within PyTorch's own
    fp32 error of the float64 truth."""
    case, engine = make(seed_nan=name == "off_policy_mask")
    opts = CASES[name]
    dtype = torch.float64 if impl == "torch" else torch.float32
    if dtype == torch.float32:
        case = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.items()}
    t_loss, t_grads = truth(case, opts, engine=engine)
    r_loss, r_grads = truth(case, opts, engine=engine, dtype=dtype)
    loss, grads, metrics = fused(case, opts, engine=engine, impl=impl, dtype=dtype)
    for key, g in grads.items():
        assert g.dtype == dtype
        assert_close_to_truth(f"grad_{key}", g, r_grads[key], t_grads[key], dtype=dtype)
    assert_close_to_truth("loss", loss, r_loss, t_loss, dtype=dtype)
    if "top_entropy_quantile" in opts:
        assert 0.0 < metrics["entropy_mask/kept_frac"] < 1.0
    if name == "off_policy_mask":
        assert metrics["is_weight/nan_engine_logp"] > 0


@pytest.mark.parametrize(
    "opts, sweeps",
    [
        ({"loss_type": "dapo"}, [("fused", False)]),
        ({"loss_type": "dapo", "entropy_coef": 0.1}, [("fused", True)]),
        ({"loss_type": "dapo", "top_entropy_quantile": 0.5}, [("first", True), ("fused", False)]),
        (
            {"loss_type": "dapo", "entropy_coef": 0.1, "top_entropy_quantile": 0.5},
            [("first", True), ("fused", True)],
        ),
        ({"loss_type": "vespo", "is_mode": "token_mask"}, [("first", False), ("fused", False)]),
        ({"loss_type": "dapo", "off_policy_mask_threshold": 0.1}, [("first", False), ("fused", False)]),
    ],
)
def test_sweeps_run(seed, monkeypatch, opts, sweeps):
    """The entropy bonus rides on the one-pass sweep; the quantile mask adds the first no-grad sweep (with
    the entropy on), as do vespo and the off-policy mask (module docstring)."""
    import fastrl.losses.fused_grpo as fused_grpo

    calls = []

    def spy(attr, name, flag):
        real = getattr(fused_grpo, attr)

        def wrapped(*args, **kwargs):
            calls.append((name, bool(kwargs.get(flag, False))))
            return real(*args, **kwargs)

        monkeypatch.setattr(fused_grpo, attr, wrapped)

    spy("linear_logprobs", "first", "return_entropy")
    spy("fused_linear_logprobs_with_grad", "fused", "with_entropy")
    case, engine = make()
    fused(case, opts, engine=engine, impl="torch")
    assert calls == sweeps
