"""SmolLM2-135M-Instruct end to end: the GGUF loads as an ordinary trainable model and exports as
safetensors; the hf engine's greedy decoding and fastrl's per-token log-probs agree with transformers';
the SFT, DPO and LoRA GRPO paths take a few steps on it."""

from __future__ import annotations

import pytest
import torch

from .conftest import CHATS, chat_ids


def test_gguf_loads_as_an_ordinary_model_and_exports_safetensors(smol, smol_cfg, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from fastrl.distributed.export import export_hf
    from fastrl.models import gguf

    model, tok = smol
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert model.dtype == torch.float32 and tok.chat_template
    # the cache is used: no second dequantisation
    monkeypatch.setattr(gguf, "dequantise_to_folder", lambda *a, **k: pytest.fail("dequantised twice"))
    assert gguf.gguf_source(smol_cfg).name_or_path == gguf.gguf_source(smol_cfg).name_or_path
    path = export_hf(model, tok, tmp_path / "export")
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    again = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert not hasattr(again.config, "quantization_config")
    ids = torch.tensor([chat_ids(tok, CHATS[0])])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_hf_engine_greedy_equals_transformers_generate(smol):
    from fastrl.engine import EngineConfig, SamplingParams, build_engine

    model, tok = smol
    prompts = [chat_ids(tok, q) for q in CHATS]
    n = 24
    got = build_engine(EngineConfig(dtype="float32"), model, tok).generate(
        prompts, SamplingParams(max_new_tokens=n, temperature=0)
    )
    _assert_equals_generate(model, tok, prompts, got, n)


def _assert_equals_generate(model, tok, prompts, got, n):
    eos = tok.eos_token_id
    for i, p in enumerate(prompts):  # one prompt at a time: no padding on the reference side
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )[0, len(p) :].tolist()
        assert got.completion_ids[i] == ref, (i, tok.decode(got.completion_ids[i]), tok.decode(ref))


def test_hf_engine_bf16_greedy_equals_generate_in_bf16(smol):
    """The bf16 weight copy (engine dtype='bfloat16') against transformers generate on the model with its
    parameters cast to bf16 (buffers fp32, as a bf16-built model has them); the fp32 model is untouched.

    One prompt at a time (batch 1 on both sides) the tokens are equal. Batched, a bf16 matrix product's
    rounding depends on the batch it runs in, so a row may take the other token of a near-tie: each
    batched row equals the reference up to a step where the reference's top-2 logits are within 4 bf16
    ulps, and most rows all the way (measured: 7 of 8; the 8th split at 12.6875 vs 12.5625, 2 ulps)."""
    import copy

    from fastrl.engine import EngineConfig, SamplingParams, build_engine

    model, tok = smol
    prompts = [chat_ids(tok, q) for q in CHATS]
    n, eos = 24, tok.eos_token_id
    engine = build_engine(EngineConfig(dtype="bfloat16"), model, tok)
    params = SamplingParams(max_new_tokens=n, temperature=0)
    batched = engine.generate(prompts, params).completion_ids
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.to(torch.bfloat16)
    same = 0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        want = out.sequences[0, len(p) :].tolist()
        assert engine.generate([p], params).completion_ids[0] == want, (i, tok.decode(want))
        if batched[i] == want:
            same += 1
            continue
        j = next(k for k, (a, b) in enumerate(zip(batched[i], want)) if a != b)
        top2 = out.scores[j][0].float().topk(2).values
        ulp = torch.finfo(torch.bfloat16).eps * 2 ** torch.floor(torch.log2(top2[0].abs()))
        assert top2[0] - top2[1] <= 4 * ulp, (i, j, top2.tolist(), tok.decode(batched[i]), tok.decode(want))
    assert same >= len(prompts) - 2
    assert model.dtype == torch.float32


def test_token_logps_of_a_chat_equal_log_softmax(smol):
    from fastrl.data import collate_lm
    from fastrl.data.tokenize import encode_messages
    from fastrl.trainers.common import token_logps

    model, tok = smol
    chat = [{"role": "user", "content": CHATS[2]}, {"role": "assistant", "content": "12 - 5 = 7. Answer: 7"}]
    ids, mask = encode_messages(tok, chat, assistant_only=False)
    batch = collate_lm([ids], [[1] * len(ids)], tok.pad_token_id, side="right", multiple_of=None)
    with torch.no_grad():
        got, m = token_logps(model, batch)
        out = model(torch.tensor([ids]), output_hidden_states=True)
        torch_lp = out.logits[0, :-1].float().log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        # float64 truth from the same final hidden states and lm_head
        h = out.hidden_states[-1][0, :-1].double()
        truth = (
            (h @ model.lm_head.weight.double().T)
            .log_softmax(-1)
            .gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        )
    assert m.all() and got.shape == (1, len(ids) - 1)
    torch_err = (torch_lp.double() - truth).abs().max().item()
    err = (got[0].double() - truth).abs()
    assert err.max().item() <= 2 * torch_err + 1e-5, (err.argmax().item(), err.max().item(), torch_err)
    torch.testing.assert_close(got[0], torch_lp, rtol=1e-4, atol=1e-4)


def _train(tmp_path, steps: int, batch: int):
    from fastrl.trainers.core import OptimConfig, TrainConfig

    train = TrainConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_batch_size=batch, device="cpu",
        progress_bar=False, export_final=False, seed=0,
    )  # fmt: skip
    return OptimConfig(lr=1e-4, schedule="constant"), train


def _finite_history(out, steps: int, key: str = "loss"):
    values = [h[key] for h in out["history"]]
    assert len(values) == steps and all(map(torch.isfinite, torch.tensor(values, dtype=torch.float64))), (
        values
    )
    return values


def test_sft_steps(smol_cfg, smol_dir, tmp_path):
    from fastrl.data import DataConfig
    from fastrl.models import LoraConfig
    from fastrl.trainers.sft import SFTRunConfig, run_sft

    answer = [{"role": "assistant", "content": "OK."}]
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": answer} for q in CHATS[:4]]
    optim, train = _train(tmp_path, 3, 2)
    cfg = SFTRunConfig(
        model=smol_cfg,
        lora=LoraConfig(enabled=False),
        data=DataConfig(max_length=64),
        optim=optim,
        train=train,
    )
    losses = _finite_history(run_sft(cfg, dataset=rows), 3)
    assert losses[-1] < losses[0], losses  # the same four short answers: the loss must fall


def test_dpo_steps(smol_cfg, smol_dir, tmp_path):
    from fastrl.data import DataConfig
    from fastrl.models import LoraConfig
    from fastrl.trainers.dpo import DPOConfig, DPORunConfig, run_dpo

    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
             "chosen": [{"role": "assistant", "content": "5"}],
             "rejected": [{"role": "assistant", "content": "6"}]}] * 4  # fmt: skip
    optim, train = _train(tmp_path, 2, 2)
    cfg = DPORunConfig(
        model=smol_cfg, lora=LoraConfig(enabled=True, r=4, alpha=8), data=DataConfig(max_length=64),
        optim=optim, train=train, dpo=DPOConfig(beta=0.1),
    )  # fmt: skip
    _finite_history(run_dpo(cfg, dataset=rows), 2)


def test_lora_grpo_steps(smol_cfg, smol_dir, tmp_path):
    from fastrl.data import DataConfig
    from fastrl.demo_smollm2 import chat, correct_reward
    from fastrl.losses.grpo_config import GRPOLossConfig
    from fastrl.models import LoraConfig
    from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig, run_grpo

    rows = [{"prompt": chat(f"What is {a} + {b}?"), "answer": a + b} for a, b in ((3, 4), (10, 7))]
    optim, train = _train(tmp_path, 2, 8)
    cfg = GRPORunConfig(
        model=smol_cfg, lora=LoraConfig(enabled=True, r=4, alpha=8), data=DataConfig(max_prompt_length=128),
        optim=optim, train=train, grpo=GRPOConfig(num_generations=4, max_completion_length=12),
        loss=GRPOLossConfig(loss_type="dapo", beta=0.04),
    )  # fmt: skip
    out = run_grpo(cfg, dataset=rows, reward_funcs=[correct_reward])
    _finite_history(out, 2)
    assert out["generate_calls"] == 2 and out["history"][-1]["completion_length"] > 0
