"""SFT end to end on a tiny local model: loss falls, packing is exact, resume is exact, LoRA trains only
the adapter, bad data is named."""

from __future__ import annotations

import json

import pytest
import torch

from fastrl.data import DataConfig, collate_lm, collate_packed, sft_example
from fastrl.models import LoraConfig, ModelConfig, apply_lora, load_model_and_tokenizer
from fastrl.trainers.common import token_logps
from fastrl.trainers.core import OptimConfig, TrainConfig, lr_factor
from fastrl.trainers.sft import SFTConfig, SFTRunConfig, SFTStep, run_sft

from .conftest import InterruptedRunError, addition_rows, assert_same_history, interrupt_after


def _cfg(tiny_dir, out, **train):
    base = dict(
        output_dir=str(out), max_steps=8, per_device_batch_size=8, progress_bar=False, export_final=False
    )
    return SFTRunConfig(
        model=ModelConfig(name_or_path=tiny_dir),
        data=DataConfig(max_length=32),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        train=TrainConfig(**{**base, **train}),
    )


def test_sft_loss_falls_and_exports(tiny_dir, tmp_path, seed):
    from transformers import AutoModelForCausalLM

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    cfg = _cfg(tiny_dir, tmp_path, max_steps=12, seed=seed, export_final=True)
    out = run_sft(cfg, model=model, tokenizer=tok, dataset=addition_rows())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    ids = torch.tensor([tok("3+4=7", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits)
    losses = [r["loss"] for r in out["history"]]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))


def test_schedule():
    opt = OptimConfig(warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_factor(s, opt, 10) for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert lr_factor(2, opt, 10) == pytest.approx(1.0)
    assert lr_factor(10, opt, 10) == pytest.approx(0.1)
    assert lr_factor(5, OptimConfig(schedule="constant"), 10) == 1.0
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="polynomial")  # (linear is one since issue 10)
    with pytest.raises(ValueError, match="train.max_steps"):
        TrainConfig(max_steps=0)


def test_packing_is_exact(tiny_dir, seed):
    """Packed rows give every token the log-prob it has in its own padded row."""
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    rows = addition_rows(100)
    exs = [
        sft_example(tok, rows[i], max_length=32, completion_only_loss=None, assistant_only_loss=False)
        for i in torch.randperm(100)[:5].tolist()
    ]
    ids, masks = [e["input_ids"] for e in exs], [e["loss_mask"] for e in exs]
    with torch.no_grad():
        lp_pad, m_pad = token_logps(
            model, collate_lm(ids, masks, tok.pad_token_id, side="right", multiple_of=None)
        )
        packs = [list(zip(ids[:3], masks[:3])), list(zip(ids[3:], masks[3:]))]
        packed = collate_packed(packs, tok.pad_token_id, multiple_of=8)
        lp_pack, m_pack = token_logps(model, packed)
    torch.testing.assert_close(lp_pack[m_pack], lp_pad[m_pad], rtol=1e-5, atol=1e-5)


def test_packing_run(tiny_dir, tmp_path, seed):
    cfg = _cfg(tiny_dir, tmp_path, max_steps=3, seed=seed)
    cfg.sft = SFTConfig(packing=True)
    out = run_sft(cfg, dataset=addition_rows())
    assert out["num_loss_tokens"] > 8 * 2  # several examples per packed row


def test_resume_continues_exactly(tiny_dir, tmp_path, monkeypatch, seed):
    full = run_sft(_cfg(tiny_dir, tmp_path / "a", max_steps=6, seed=seed), dataset=addition_rows())
    cfg = _cfg(tiny_dir, tmp_path / "b", max_steps=6, seed=seed, save_steps=3)
    with monkeypatch.context() as m:
        interrupt_after(m, SFTStep, 4)  # dies during step 5, after checkpoint-3
        with pytest.raises(InterruptedRunError):
            run_sft(cfg, dataset=addition_rows())
    cfg.train.resume_from_checkpoint = "auto"
    resumed = run_sft(cfg, dataset=addition_rows())
    assert_same_history(
        resumed["history"], full["history"][3:], ("loss", "grad_norm", "lr", "num_loss_tokens")
    )
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_lora_trains_only_the_adapter(tiny_dir, tmp_path, seed):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tiny_dir, tmp_path, max_steps=3, seed=seed, save_steps=2)
    cfg.lora = LoraConfig(enabled=True, r=4, alpha=8)
    model = apply_lora(model, cfg.lora)
    run_sft(cfg, model=model, tokenizer=tok, dataset=addition_rows())
    after = model.state_dict()
    changed = {k for k in after if "lora_" in k and not torch.equal(after[k], torch.zeros_like(after[k]))}
    assert any("lora_B" in k for k in changed)
    for k, v in after.items():
        if "lora_" not in k:
            base_key = k.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(v, before[base_key]), k
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()


def test_bad_sft_data(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="'completion'"):
        run_sft(_cfg(tiny_dir, tmp_path), dataset=[{"prompt": "1+1="}])
    with pytest.raises(ValueError, match="'messages' or 'text' or 'prompt'"):
        run_sft(_cfg(tiny_dir, tmp_path), dataset=[{"question": "1+1="}])
    cfg = _cfg(tiny_dir, tmp_path)
    cfg.sft = SFTConfig(formatting_func="not_a_spec")
    with pytest.raises(ValueError, match="formatting_func"):
        run_sft(cfg, dataset=addition_rows())


@pytest.mark.gpu
def test_sft_bf16_autocast_on_cuda(tiny_dir, tmp_path, seed):
    cfg = _cfg(tiny_dir, tmp_path, max_steps=12, seed=seed, device="cuda", bf16=True)
    losses = [r["loss"] for r in run_sft(cfg, dataset=addition_rows())["history"]]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
