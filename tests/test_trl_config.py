"""Starting from a TRL config: configs/trl_grpo_example.yaml is a real TRL 1.16 config (TRL's own parser and
``trl.GRPOConfig`` take it), ``fastrl grpo --trl-config`` runs it on a tiny local model, every field is
mapped to the fastrl key it means, and unsupported fields are refused by name, all in one error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from fastrl.config import load_config
from fastrl.trl_config import convert

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "trl_grpo_example.yaml"

trl = pytest.importorskip("trl")


def _cpu(kwargs: dict) -> dict:
    import torch

    # bf16 on a machine without a GPU: TrainingArguments wants use_cpu (the file is written for a GPU)
    return kwargs if torch.cuda.is_available() else {**kwargs, "use_cpu": True}


def test_example_is_a_real_trl_grpo_config(tmp_path):
    from trl.scripts.grpo import GRPOScriptArguments

    raw = yaml.safe_load(EXAMPLE.read_text())
    # TRL's own CLI parser: every key must be a field of its script, model or GRPO arguments
    parser = trl.TrlParser((GRPOScriptArguments, trl.GRPOConfig, trl.ModelConfig))
    args = ["--config", str(EXAMPLE)] + (["--use_cpu", "true"] if _cpu({}) else [])
    script, grpo, model = parser.parse_args_and_config(args)
    assert script.reward_funcs == ["numeric_match"] and model.model_name_or_path == raw["model_name_or_path"]
    assert grpo.epsilon_high == 0.28 and grpo.num_generations == 8 and grpo.log_completions
    # and trl.GRPOConfig itself, on the GRPOConfig fields of the file
    names = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    own = {k: v for k, v in raw.items() if k in names}
    assert len(own) > 30
    cfg = trl.GRPOConfig(**_cpu(own))
    assert cfg.learning_rate == 1e-6 and cfg.loss_type == "dapo" and cfg.beta == 0.04


def test_example_maps_onto_the_fastrl_keys():
    from fastrl.trainers.grpo import GRPORunConfig

    data, notes = convert(yaml.safe_load(EXAMPLE.read_text()), "grpo")
    cfg = load_config(GRPORunConfig, base=data)
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.torch_dtype == "bfloat16"
    assert cfg.model.gradient_checkpointing and cfg.lora.enabled and (cfg.lora.r, cfg.lora.alpha) == (16, 32)
    assert (cfg.data.dataset, cfg.data.dataset_config, cfg.data.split) == ("openai/gsm8k", "main", "train")
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.adam_beta2) == (
        1e-6,
        "linear",
        10,
        0.99,
    )
    t = cfg.train
    assert (t.per_device_batch_size, t.gradient_accumulation_steps, t.max_steps, t.seed) == (8, 2, 200, 42)
    assert (t.logging_steps, t.save_steps, t.save_total_limit, t.bf16) == (5, 50, 2, True)
    assert (t.log_completions_steps, t.num_completions_to_print) == (5, 4)  # TRL logs them at logging_steps
    g, loss = cfg.grpo, cfg.loss
    assert (g.num_generations, g.max_completion_length, g.reward_funcs) == (8, 256, ["numeric_match"])
    assert g.mask_truncated_completions and g.scale_rewards == "group" and cfg.engine.kind == "hf"
    assert (loss.loss_type, loss.beta, loss.epsilon_low, loss.epsilon_high) == ("dapo", 0.04, 0.2, 0.28)
    assert any("warmup" in n for n in notes)


def test_unsupported_fields_are_refused_by_name_all_at_once():
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.update(
        sync_ref_model=True,  # a TRL feature fastrl lacks
        optim="adafactor",
        eval_strategy="epoch",
        reward_model_name_or_path="some/reward-model",
        learning_rat=1e-5,  # a typo TRL itself would refuse too
        fp16=True,
    )
    with pytest.raises(ValueError) as err:
        convert(raw, "grpo")
    text = str(err.value)
    for name in ("sync_ref_model=True", "optim='adafactor'", "eval_strategy='epoch'",
                 "reward_model_name_or_path", "learning_rat", "fp16=True"):  # fmt: skip
        assert name in text, (name, text)
    assert "learning_rate" not in text and "num_generations" not in text  # the supported ones pass
    # a field of another trainer is refused too
    with pytest.raises(ValueError, match="num_generations"):
        convert({"num_generations": 4, "beta": 0.1}, "dpo")


def test_dpo_and_sft_configs():
    from fastrl.trainers.dpo import DPORunConfig
    from fastrl.trainers.sft import SFTRunConfig

    dpo = dict(
        output_dir="out", learning_rate=5e-7, beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
        max_length=512, precompute_ref_log_probs=True, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.1, max_steps=50, num_train_epochs=2,
        bf16=False, eval_strategy="steps", eval_steps=10, per_device_eval_batch_size=4,
    )  # fmt: skip
    trl.DPOConfig(**dpo)  # a real TRL config
    data, notes = convert(dpo, "dpo")
    cfg = load_config(DPORunConfig, base=data)
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.loss_weights) == (0.2, ["sigmoid", "sft"], [1.0, 0.5])
    assert cfg.dpo.precompute_ref_log_probs and cfg.data.max_length == 512
    assert (cfg.optim.schedule, cfg.optim.min_lr_ratio, cfg.optim.warmup_steps) == ("cosine", 0.1, 5)
    assert (cfg.train.max_steps, cfg.train.num_train_epochs) == (50, None)  # max_steps wins, as in TRL
    assert (cfg.train.eval_steps, cfg.train.per_device_eval_batch_size) == (10, 4)
    assert any("overrides num_train_epochs" in n for n in notes)

    sft = dict(
        output_dir="out", num_train_epochs=2, packing=True, completion_only_loss=True, max_length=256,
        per_device_train_batch_size=4, dataset_text_field="text", report_to="tensorboard", bf16=False,
    )  # fmt: skip
    trl.SFTConfig(**sft)
    cfg = load_config(SFTRunConfig, base=convert(sft, "sft")[0])
    assert (cfg.train.num_train_epochs, cfg.train.max_steps, cfg.train.tensorboard) == (2, None, True)
    assert cfg.sft.packing and cfg.sft.completion_only_loss and cfg.data.max_length == 256
    with pytest.raises(ValueError, match="dataset_text_field='content'"):
        convert({"dataset_text_field": "content"}, "sft")
    with pytest.raises(ValueError, match=r"save_steps=0.1 \(a ratio.*eval_steps=0.05 \(a ratio"):
        convert({"save_steps": 0.1, "eval_strategy": "steps", "eval_steps": 0.05}, "sft")
    assert convert({"max_steps": -1}, "sft")[0] == {"train": {"num_train_epochs": 3.0}}  # TRL's 3 epochs
    notes = convert({}, "sft")[1]
    assert any(n.startswith("learning_rate is not in the file: TRL's default is 2e-5") for n in notes)


def test_grpo_trl_config_runs_from_the_cli(tmp_path, monkeypatch, capsys):
    """``fastrl grpo --trl-config`` on the example file, a tiny local model and a local data file."""
    from fastrl.cli import main
    from fastrl.models.tiny import save_tiny

    model = save_tiny(tmp_path / "model", hidden_size=64, num_layers=1)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(8))
    )
    monkeypatch.chdir(tmp_path)
    argv = ["grpo", "--trl-config", str(EXAMPLE), "--model.name_or_path", str(model), "--model.torch_dtype",
            "float32", "--data.dataset", str(data), "--data.dataset_config", "null", "--train.max_steps", "2",
            "--grpo.max_completion_length", "4", "--train.output_dir", "run", "--train.log_completions_steps",
            "1", "--train.progress_bar", "false"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "fastrl grpo: note: warmup" in out.err and "fastrl grpo: done, 2 steps" in out.out
    metrics = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [2]  # logging_steps 5 from the file; the last step is logged
    assert "reward/numeric_match" in metrics[0]
    samples = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 4  # num_completions_to_print 4 from the file, at steps 1 and 2
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()  # use_peft: LoRA, merged on export


def test_convert_config_command(tmp_path, capsys):
    from fastrl.cli import main
    from fastrl.trainers.grpo import GRPORunConfig

    dest = tmp_path / "fastrl.yaml"
    assert main(["convert-config", str(EXAMPLE), "--trainer", "grpo", "-o", str(dest)]) == 0
    cfg = load_config(GRPORunConfig, dest)  # a plain fastrl config file now
    assert cfg.loss.epsilon_high == 0.28 and cfg.optim.schedule == "linear"
    assert dest.read_text().startswith("# fastrl grpo config converted from the TRL config")
    assert main(["convert-config", str(EXAMPLE), "--trainer", "grpo"]) == 0
    assert "epsilon_high: 0.28" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-5\nuse_vllm: true\nvllm_mode: colocate\nsync_ref_model: true\n")
    assert main(["convert-config", str(bad), "--trainer", "grpo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fastrl convert-config: error: this TRL grpo config has fields fastrl does not support: "
        "sync_ref_model=True (drop them, or set the closest fastrl keys after converting)"
    ]
