"""``grpo.share_prompt_forward``: a GRPO run with each distinct prompt run once equals the padded run."""

from __future__ import annotations

import pytest

import fastrl.models.shared_prompt as shared_prompt
from fastrl.losses.grpo_config import GRPOLossConfig
from fastrl.trainers.grpo import GRPOConfig, run_grpo
from tests.models.test_shared_prompt import true_fp64  # noqa: F401 (a fixture)

from .conftest import assert_same_history
from .test_grpo import FIX, _cfg, prompt_rows


@pytest.mark.usefixtures("true_fp64")
def test_shared_prompt_run_equals_padded_run(tiny_dir, tmp_path, monkeypatch, seed):
    """Old log-probs (one micro-step per optimizer step, rounds of 2) and a KL reference: the training,
    old and reference passes all take the shared path, and the run's history is the padded run's.

    In float64 (the model given in memory, ``true_fp64`` keeping transformers' norms and softmax in it): in
    fp32 the two summation orders differ by ~1e-7, which AdamW at lr 1e-2 grows to 3e-5 relative in
    step 3's grad_norm (seed 509056500), a bound with no principled fp32 value; in fp64 the same
    growth stays below 1e-12."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastrl.models import ModelConfig
    from fastrl.models.loading import load_tokenizer

    shared_calls = []
    groups = shared_prompt.prompt_groups

    def counting_groups(ids, mask):
        out = groups(ids, mask)
        shared_calls.append((ids.shape[0], out[0].numel()))
        return out

    monkeypatch.setattr(shared_prompt, "prompt_groups", counting_groups)
    keys = ("loss", "grad_norm", "kl", "reward", "ratio/mean", "entropy")
    history = {}
    for share in (False, True):
        g = GRPOConfig(
            num_generations=4,
            max_completion_length=4,
            steps_per_generation=2,
            reward_funcs=[f"{FIX}:length_reward"],
            share_prompt_forward=share,
        )
        cfg = _cfg(
            tiny_dir, tmp_path / str(share), grpo=g, max_steps=3, seed=seed, loss=GRPOLossConfig(beta=0.1)
        )
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
        tokenizer = load_tokenizer(ModelConfig(name_or_path=tiny_dir))
        history[share] = run_grpo(cfg, model=model, tokenizer=tokenizer, dataset=prompt_rows())["history"]
        if not share:
            assert shared_calls == []  # the padded run never groups prompts
    # 2 rounds x 2 micro-batches x (old, ref, train) passes, each of 8 rows holding 2 distinct prompts
    assert len(shared_calls) >= 8 and all(u < b for b, u in shared_calls), shared_calls
    assert_same_history(history[True], history[False], keys, rel=1e-9, abs=1e-12)


def test_config_help():
    field = GRPOConfig.__dataclass_fields__["share_prompt_forward"]
    assert field.default is True and "exact" in field.metadata["help"]
    with pytest.raises(TypeError):
        GRPOConfig(True)  # keyword-only


def test_completion_logps_match_the_model_logits(tiny_dir):
    """Old/reference pass: log-probs (and entropies) at the masked-in completion tokens, from the model's
    own logits; 0 elsewhere (masked-out row 1, padding); an all-masked micro-batch is all zeros."""
    import torch

    from fastrl.data import collate_prompt_completion
    from fastrl.models import ModelConfig, load_model_and_tokenizer
    from fastrl.trainers.rollout import completion_logps

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    prompts = [[5, 6, 7]] * 2 + [[8, 9]] * 2
    mb = collate_prompt_completion(prompts, [[10, 11, 12], [13], [14, 15], [16, 17, 18]], tok.pad_token_id)
    mask = mb["completion_mask"].float()
    mask[1] = 0.0
    mb["completion_mask"] = mask
    with torch.no_grad():
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.float()
    C = mb["completion_ids"].shape[1]
    logp_all = torch.log_softmax(logits[:, -C - 1 : -1] / 0.7, -1)
    want = logp_all.gather(-1, mb["completion_ids"][..., None])[..., 0] * mask
    want_ent = -(logp_all.exp() * logp_all).sum(-1) * mask
    for share in (False, True):
        with torch.no_grad():
            logp, ent = completion_logps(model, mb, temperature=0.7, entropy=True, share_prompt=share)
        torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
        assert torch.equal(logp[mask == 0], torch.zeros_like(logp[mask == 0]))
    mb["completion_mask"] = torch.zeros_like(mask)
    with torch.no_grad():
        assert torch.equal(
            completion_logps(model, mb, temperature=1.0, share_prompt=True), torch.zeros_like(mask)
        )
