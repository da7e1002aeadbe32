"""Checks every vLLM engine kind runs (tests/engine/vllm/test_*.py each call them with their engine).

The reference is computed from the trainer's own weights: for each sampled token, the log-probability
under the distribution it was drawn from, ``log_softmax(filter_logits(logits / T, top_k, top_p))``
(``fastrl.engine.sampling.filter_logits``: top-k, then top-p, renormalised), in fp32; greedy decoding
reports ``log_softmax(logits)``. This is the contract in ``GenerationOutput``'s docstring.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from fastrl.engine import SamplingParams
from fastrl.engine.sampling import filter_logits
from fastrl.models import LoraConfig, ModelConfig, apply_lora, load_model_and_tokenizer

TOL = 1e-4  # fp32 engine vs fp32 trainer (measured: a few 1e-6)
PARAMS = {
    "t1": dict(temperature=1.0),
    "t07_topk_topp": dict(temperature=0.7, top_k=12, top_p=0.8),
    "greedy": dict(temperature=0.0),
}


def load(model_dir: str):
    return load_model_and_tokenizer(ModelConfig(name_or_path=model_dir), device="cpu")


# Longer than two KV blocks (32 tokens on the CPU): vLLM caches full blocks of this shared prefix, so a
# sync that kept the prefix cache would serve KV computed with the old weights (and fail the checks).
PREFIX = "Add the two numbers below and answer with the digits of the sum only, nothing else. "


def prompts(tok, n: int = 6) -> list[list[int]]:
    texts = [f"{PREFIX}{i}+{(3 * i) % 10}=" for i in range(n // 2)]
    return [tok.encode(t) for t in texts for _ in range(2)]  # repeated prompts: a GRPO group


def training_step(model, tok, *, lr: float = 0.5) -> None:
    """One optimizer step that moves every weight noticeably (so a missed sync cannot pass)."""
    ids = torch.tensor([tok.encode("the quick brown fox 12+30=42")])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def reference_logprobs(model, prompt_ids, completions, params: SamplingParams) -> list[list[float]]:
    model.eval()
    ref = []
    for prompt, comp in zip(prompt_ids, completions):
        if not comp:
            ref.append([])
            continue
        ids = torch.tensor([list(prompt) + list(comp)])
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        if params.greedy:
            logp = torch.log_softmax(logits, -1)
        else:
            scaled = logits / params.temperature
            logp = torch.log_softmax(filter_logits(scaled, top_k=params.top_k, top_p=params.top_p), -1)
        ref.append(logp.gather(-1, torch.tensor(comp)[:, None]).squeeze(-1).tolist())
    return ref


def max_error(a: list[list[float]], b: list[list[float]]) -> float:
    errs = [abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return max(errs) if errs else 0.0


def check_logprobs_after_step(engine, model_dir: str, case: str) -> float:
    """Sample with the old weights (filling the prefix cache), train one step, sync, sample again: the
    engine's log-probs equal the trainer's within TOL; the weights before the step would not (a missed
    sync fails, and so does a sync that keeps the stale prefix cache). Returns the error."""
    model, tok = load(model_dir)
    before = copy.deepcopy(model)
    params = SamplingParams(max_new_tokens=8, seed=11, **PARAMS[case])
    p = prompts(tok)
    engine.sync_weights(before)
    engine.generate(p, params)  # the prompts' KV blocks, under the old weights, are now in the prefix cache
    training_step(model, tok)
    engine.sync_weights(model)
    out = engine.generate(p, params)
    assert len(out.completion_ids) == len(p) and all(len(c) > 0 for c in out.completion_ids)
    for ids, lps in zip(out.completion_ids, out.logprobs):
        assert len(ids) == len(lps)
    ref = reference_logprobs(model, p, out.completion_ids, params)
    err = max_error(out.logprobs, ref)
    stale = max_error(out.logprobs, reference_logprobs(before, p, out.completion_ids, params))
    print(f"{case}: max |engine - trainer| log-prob = {err:.3g} (stale weights: {stale:.3g})")
    assert err < TOL, (case, err)
    assert stale > 100 * TOL, stale  # the step moved the distribution: this check can see a missed sync
    if not params.greedy:
        assert all(x <= 1e-6 for lp in out.logprobs for x in lp)
    return err


def check_verified_sync_covers_every_tensor(engine, model_dir: str) -> None:
    """verify_sync: the engine checksums every tensor as it arrived and the trainer compares (a mismatch
    raises ChecksumMismatchError); every name the engine knows was sent."""
    model, tok = load(model_dir)
    training_step(model, tok)
    engine.cfg.verify_sync = True
    engine.sync_weights(model)
    assert engine.last_sync.n_tensors == len(engine.known)


def check_small_buckets(engine, model_dir: str) -> None:
    """Buckets smaller than the largest tensors: many buckets, big tensors alone; still exact."""
    bucket = engine.syncer.bucket_bytes
    engine.syncer.bucket_bytes = 8192  # embeddings (102 x 64 fp32 = 26 KiB) exceed it
    try:
        engine.cfg.verify_sync = True
        check_logprobs_after_step(engine, model_dir, "t1")
        assert engine.last_sync.n_buckets > 5, engine.last_sync
    finally:
        engine.syncer.bucket_bytes = bucket
    # (sync_weights plans with cfg.sync_bucket_mb for the name check only; the syncer's size decides)


def check_lora_sync(engine, model_dir: str) -> None:
    """PEFT LoRA: merged weights reach the engine (log-probs match the adapted model) and the trainer's
    weights, adapter included, are bit-identical afterwards."""
    model, tok = load(model_dir)
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # B = 0 at init would make the merge a no-op
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.cfg.verify_sync = True
    engine.sync_weights(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    params = SamplingParams(max_new_tokens=6, seed=5, temperature=1.0)
    p = prompts(tok, 4)
    out = engine.generate(p, params)
    err = max_error(out.logprobs, reference_logprobs(model, p, out.completion_ids, params))
    print(f"lora: max |engine - trainer| log-prob = {err:.3g}")
    assert err < TOL, err


def check_unknown_names_refused(engine, model_dir: str) -> None:
    """A model with weights the engine does not have is refused, names listed, before anything moves;
    the engine still serves the previous weights."""
    from fastrl.models.tiny import build_char_tokenizer, build_tiny_model

    model, tok = load(model_dir)
    engine.sync_weights(model)
    other = build_tiny_model(build_char_tokenizer(), hidden_size=64, num_layers=3, init_std=0.2)
    try:
        engine.sync_weights(other)
    except ValueError as e:
        assert "model.layers.2.self_attn.q_proj.weight" in str(e), e
    else:
        raise AssertionError("a model with unknown weights was accepted")
    params = SamplingParams(max_new_tokens=4, seed=2, temperature=1.0)
    p = prompts(tok, 2)
    out = engine.generate(p, params)
    assert max_error(out.logprobs, reference_logprobs(model, p, out.completion_ids, params)) < TOL


def check_fails_within(fn, exc, seconds: float, match: str):
    t0 = time.monotonic()
    try:
        fn()
    except exc as e:
        elapsed = time.monotonic() - t0
        assert match in str(e), e
        assert elapsed < seconds, elapsed
        print(f"failed as expected in {elapsed:.1f} s: {e}")
        return e
    raise AssertionError(f"expected {exc.__name__}")


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
