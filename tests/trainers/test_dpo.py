"""DPO end to end on a tiny local model: padding on either side is exact, every loss type runs, LD-DPO
and precomputed reference log-probs, the LoRA reference is the disabled adapter, bad data is named."""

from __future__ import annotations

import pytest
import torch

from fastrl.data import DataConfig, collate_dpo, dpo_example
from fastrl.losses.dpo_losses import DPO_LOSSES
from fastrl.models import LoraConfig, ModelConfig, apply_lora, load_model_and_tokenizer
from fastrl.trainers.common import Reference, as_dataset
from fastrl.trainers.core import OptimConfig, TrainConfig
from fastrl.trainers.dpo import DPOConfig, DPORunConfig, DPOStep, run_dpo, sequence_logps, tokenize_dpo

from .conftest import assert_same_history


def pair_rows(n: int = 40) -> list[dict]:
    """Chosen: the right sum; rejected: a wrong one of another length."""
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 7) + "9" * (i % 3)})
    return rows


def _cfg(tiny_dir, out, *, dpo=None, **train):
    base = dict(
        output_dir=str(out), max_steps=6, per_device_batch_size=8, progress_bar=False, export_final=False
    )
    return DPORunConfig(
        model=ModelConfig(name_or_path=tiny_dir),
        data=DataConfig(max_length=32),
        optim=OptimConfig(lr=3e-3),
        train=TrainConfig(**{**base, **train}),
        dpo=dpo or DPOConfig(),
    )


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_padding_side_does_not_change_logps(tiny_dir, seed, ld_alpha):
    from fastrl.losses.dpo import ld_sequence_logps

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    exs = [dpo_example(tok, r, max_prompt_length=16, max_length=32) for r in pair_rows(5)]
    got = {}
    with torch.no_grad():
        for side in ("left", "right"):
            batch = collate_dpo(exs, tok.pad_token_id, side=side, multiple_of=4)
            got[side] = sequence_logps(model, batch, len(exs), ld_alpha=ld_alpha)
        # truth: each sequence alone, no padding at all
        singles = []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in exs:
                ids = torch.tensor([ex["prompt_ids"] + ex[key]])
                logits = model(ids).logits[0, :-1].double().log_softmax(-1)
                lp = logits.gather(-1, ids[0, 1:, None])[:, 0]
                singles.append(lp[len(ex["prompt_ids"]) - 1 :])
    n = len(exs)
    if ld_alpha is None:
        want = (torch.stack([s.sum() for s in singles[:n]]), torch.stack([s.sum() for s in singles[n:]]))
    else:
        pad = torch.nn.utils.rnn.pad_sequence
        lp_c, lp_r = pad(singles[:n], batch_first=True), pad(singles[n:], batch_first=True)
        m_c = pad([torch.ones(len(s), dtype=torch.bool) for s in singles[:n]], batch_first=True)
        m_r = pad([torch.ones(len(s), dtype=torch.bool) for s in singles[n:]], batch_first=True)
        want = ld_sequence_logps(lp_c, m_c, lp_r, m_r, ld_alpha)
    for side in ("left", "right"):
        for g, w in zip(got[side], want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_dpo_with_ld_alpha_loss_falls(tiny_dir, tmp_path, seed):
    out = run_dpo(
        _cfg(tiny_dir, tmp_path, max_steps=12, seed=seed, dpo=DPOConfig(ld_alpha=0.5)), dataset=pair_rows()
    )
    losses = [r["loss"] for r in out["history"]]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses


def test_precomputed_reference_matches_on_the_fly(tiny_dir, tmp_path, seed):
    a = run_dpo(_cfg(tiny_dir, tmp_path / "a", max_steps=3, seed=seed), dataset=pair_rows())
    pre = DPOConfig(precompute_ref_log_probs=True)
    b = run_dpo(_cfg(tiny_dir, tmp_path / "b", max_steps=3, seed=seed, dpo=pre), dataset=pair_rows())
    assert_same_history(a["history"], b["history"], ("loss", "grad_norm"))


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_every_loss_type_trains(tiny_dir, seed, loss_type):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    cfg = _cfg(tiny_dir, "unused", dpo=DPOConfig(loss_type=loss_type, label_smoothing=smoothing))
    ref = Reference(model, lora=False, needed=True)
    step = DPOStep(
        model, ref, tok, tokenize_dpo(as_dataset(pair_rows(8)), tok, cfg.data), cfg, torch.device("cpu")
    )
    loss, metrics = step.micro_step(0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


def test_lora_reference_is_the_disabled_adapter(tiny_dir, tmp_path, seed):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    base, _ = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    cfg = _cfg(tiny_dir, tmp_path, max_steps=4, seed=seed)
    cfg.lora = LoraConfig(enabled=True, r=4, alpha=8)
    model = apply_lora(model, cfg.lora)
    run_dpo(cfg, model=model, tokenizer=tok, dataset=pair_rows())
    exs = [dpo_example(tok, r, max_prompt_length=16, max_length=32) for r in pair_rows(4)]
    batch = collate_dpo(exs, tok.pad_token_id, side="right", multiple_of=None)
    ref = Reference(model, lora=True, needed=True)
    with torch.no_grad():
        want = sequence_logps(base, batch, 4, ld_alpha=None)
        policy = sequence_logps(model, batch, 4, ld_alpha=None)
    with ref.model() as m:
        got = sequence_logps(m, batch, 4, ld_alpha=None)
    assert ref.frozen is None  # no second copy of the weights under LoRA
    for g, w, p in zip(got, want, policy):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(p, w, atol=1e-3)  # the adapter did learn something


def test_bad_dpo_data(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="'rejected'"):
        run_dpo(_cfg(tiny_dir, tmp_path), dataset=[{"prompt": "1+1=", "chosen": "2"}])
    with pytest.raises(ValueError, match="loss_type"):
        run_dpo(_cfg(tiny_dir, tmp_path, dpo=DPOConfig(loss_type="nope")), dataset=pair_rows())
