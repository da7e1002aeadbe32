"""``FusedLinearGRPOLoss(skip_ignored=True)``: rows with label -100 and mask 0 are left out of the sweeps;
loss, log-probs and every gradient equal the full sweep's (float64), the entropy is 0 at those rows."""

from __future__ import annotations

import pytest
import torch

import fastrl.losses.fused_grpo as fused_grpo
from fastrl.losses.fused_grpo import FusedLinearGRPOLoss

from .test_fused_grpo import leaves, make_case

OPTIONS = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", importance_sampling_level="sequence"),  # GSPO: a first no-grad sweep
    dict(loss_type="dapo", entropy_coef=0.1),  # the entropy gradient in the one-pass sweep
    dict(loss_type="bnpo", top_entropy_quantile=0.5),  # entropies of the whole batch first
]


def _run(case, opts, *, skip, grad=True):
    p = leaves(case, torch.float64)
    module = FusedLinearGRPOLoss(
        temperature=0.7, chunk_size=5, return_entropy=True, skip_ignored=skip, **opts
    )
    with torch.set_grad_enabled(grad):
        loss, metrics = module(
            p["hidden"], p["weight"], case["labels"], case["old"], case["adv"], case["mask"],
            bias=p.get("bias"), ref_logp=case["ref"],
        )  # fmt: skip
    if grad:
        loss.backward()
    return loss.detach(), metrics, {k: v.grad for k, v in p.items()}


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "loss_only"])
def test_skip_ignored_is_exact(seed, monkeypatch, opts, grad):
    case = make_case(4, 9, 16, 37, dtype=torch.float64)
    swept = []
    real = fused_grpo.fused_linear_logprobs_with_grad

    def counting(hidden_NH, *args, **kwargs):
        swept.append(hidden_NH.shape[0])
        return real(hidden_NH, *args, **kwargs)

    monkeypatch.setattr(fused_grpo, "fused_linear_logprobs_with_grad", counting)
    loss0, m0, g0 = _run(case, opts, skip=False, grad=grad)
    loss1, m1, g1 = _run(case, opts, skip=True, grad=grad)
    kept = int(case["mask"].sum())
    if grad:
        assert swept == [4 * 9, kept] and kept < 4 * 9
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m1["logp"], m0["logp"], rtol=1e-12, atol=1e-14)
    mask = case["mask"]
    assert torch.equal(m1["entropy"][~mask], torch.zeros_like(m1["entropy"][~mask]))
    torch.testing.assert_close(m1["entropy"][mask], m0["entropy"][mask], rtol=1e-12, atol=1e-14)
    for k in ("clip_ratio/region", "kl"):
        if k in m0:
            torch.testing.assert_close(torch.as_tensor(m1[k]), torch.as_tensor(m0[k]), rtol=1e-12, atol=1e-14)
    for k, g in g0.items():
        if grad:
            torch.testing.assert_close(g1[k], g, rtol=1e-12, atol=1e-14, msg=k)


def test_skip_ignored_must_be_bool():
    with pytest.raises(ValueError, match="skip_ignored"):
        FusedLinearGRPOLoss(skip_ignored=1)
