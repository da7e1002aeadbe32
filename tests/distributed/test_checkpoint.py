"""Checkpoints: exact resume, atomicity under a crash, adapter-only saves, rotation, HF export."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fastrl.distributed import checkpoint as ckpt
from fastrl.distributed.checkpoint import (
    checkpoint_path,
    export_hf,
    latest_checkpoint,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from tests.distributed._models import batch, lm_loss, tiny_lora, tiny_model


def make_run(seed: int, *, tie: bool = False, lora: bool = False):
    model = tiny_model(seed=seed, tie=tie)
    if lora:
        model = tiny_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def train_step(model, opt, sched, ids) -> float:
    loss = lm_loss(model, ids)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def draws() -> tuple:
    """One draw from every generator a checkpoint must restore."""
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][k][name])), (k, name)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_resumes_exactly(tmp_path, seed, tie):
    model, opt, sched = make_run(seed, tie=tie)
    for s in range(2):
        train_step(model, opt, sched, batch(seed + s))
    path = save_checkpoint(
        checkpoint_path(tmp_path, 2), model=model, optimizer=opt, scheduler=sched, state={"step": 2, "pos": 8}
    )
    assert latest_checkpoint(tmp_path) == path
    after_save = draws()
    next_loss = train_step(model, opt, sched, batch(seed + 2))

    model2, opt2, sched2 = make_run(seed + 1, tie=tie)  # different init: everything must come from disk
    state = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 2, "pos": 8}
    assert draws() == after_save, "RNG states restored"
    # Continue the restored run one step: it must retrace the original exactly.
    assert train_step(model2, opt2, sched2, batch(seed + 2)) == next_loss
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert_same_optimizer(opt, opt2)
    assert sched2.state_dict() == sched.state_dict()
    if tie:
        assert model2.lm_head.weight is model2.model.embed_tokens.weight


def test_load_restores_weights_optimizer_scheduler(tmp_path, seed):
    model, opt, sched = make_run(seed)
    train_step(model, opt, sched, batch(seed))
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, state={"step": 1})
    model2, opt2, sched2 = make_run(seed + 7)
    train_step(model2, opt2, sched2, batch(seed + 3))
    train_step(model2, opt2, sched2, batch(seed + 4))
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert_same_optimizer(opt, opt2)
    assert sched2.state_dict() == sched.state_dict()
    meta = json.loads((path / ckpt.COMPLETE).read_text())
    assert meta["has_optimizer"] and meta["has_scheduler"] and not meta["adapter_only"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, seed, monkeypatch):
    model, opt, sched = make_run(seed)
    train_step(model, opt, sched, batch(seed))
    good = save_checkpoint(checkpoint_path(tmp_path, 1), model=model, optimizer=opt, state={"step": 1})
    weights_at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, sched, batch(seed + 1))

    def exploding_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", exploding_save)  # dies after the weights were written
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(checkpoint_path(tmp_path, 2), model=model, optimizer=opt, state={"step": 2})
    # Overwriting the good checkpoint in place and crashing must not damage it either.
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(good, model=model, optimizer=opt, state={"step": 99})
    monkeypatch.undo()

    # A hard kill (no cleanup) leaves an unmarked directory behind: it must be ignored.
    (checkpoint_path(tmp_path, 3)).mkdir()
    (checkpoint_path(tmp_path, 3) / ckpt.MODEL_FILE).write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) == good
    assert not checkpoint_path(tmp_path, 2).exists()
    model2, opt2, _ = make_run(seed + 1)
    assert load_checkpoint(good, model=model2, optimizer=opt2) == {"step": 1}
    for k, v in weights_at_1.items():
        assert torch.equal(model2.state_dict()[k], v), k
    with pytest.raises(ValueError, match="complete checkpoint"):
        load_checkpoint(checkpoint_path(tmp_path, 3), model=model2)


@pytest.mark.parametrize("ac", [False, True])
def test_adapter_only_holds_only_adapter_keys(tmp_path, seed, ac):
    from peft import PeftModel
    from safetensors.torch import load_file

    from fastrl.distributed.activation_checkpoint import apply_ac

    model, opt, sched = make_run(seed, lora=True)
    if ac:  # wrapped layers must not lose their adapters (peft's own selection does)
        apply_ac(model, "selective", every=2)
    train_step(model, opt, sched, batch(seed))  # lora_B starts at zero: make it non-trivial
    path = save_checkpoint(tmp_path / "a", model=model, optimizer=opt, state={"step": 1}, adapter_only=True)
    assert not (path / ckpt.MODEL_FILE).exists()
    saved = load_file(path / ckpt.ADAPTER_FILE)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(saved) == len(trainable) == 8  # q_proj, v_proj x lora_A, lora_B x 2 layers
    assert all("lora_" in k for k in saved)

    # Same base weights, fresh adapter: loading restores the adapter and the optimizer exactly.
    model2, opt2, _ = make_run(seed, lora=True)
    torch.nn.init.normal_(model2.base_model.model.model.layers[1].self_attn.q_proj.lora_B.default.weight)
    if ac:
        apply_ac(model2, "selective", every=2)
    load_checkpoint(path, model=model2, optimizer=opt2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert_same_optimizer(opt, opt2)
    # The directory is also a valid PEFT adapter.
    peft_model = PeftModel.from_pretrained(tiny_model(seed=seed), str(path))
    ids = batch(seed + 5)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=0, atol=0)


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("<>abcdefghijklmnopqrstuvwxyz ")}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<", pad_token=">", eos_token=">")


@pytest.mark.parametrize(("lora", "shard_bytes", "tie"), [(False, None, False), (True, None, False),
                                                          (True, 20_000, True)])  # fmt: skip
def test_export_hf_loads_back_with_same_logits(tmp_path, seed, lora, shard_bytes, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, opt, sched = make_run(seed, lora=lora, tie=tie)
    train_step(model, opt, sched, batch(seed))
    ids = batch(seed + 1)
    with torch.no_grad():
        want = model(ids).logits
    kw = {"max_shard_bytes": shard_bytes} if shard_bytes else {}
    out = export_hf(model, char_tokenizer(), tmp_path / "export", **kw)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shard_bytes:  # streamed into several files of at most shard_bytes (or one tensor) and an index
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(files) > 3 and set(index["weight_map"].values()) == set(files)
        assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert "lm_head.weight" not in index["weight_map"]  # tied: written once
        sizes = [(out / f).stat().st_size for f in files]
        biggest = max(p.numel() * 4 for p in model.parameters())
        assert max(sizes) < max(shard_bytes, biggest) + 4096, sizes
    else:
        assert files == ["model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        got = loaded(ids).logits
    # Merging rounds W + s*B@A once in fp32: fp32-level agreement, not bitwise.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in loaded.state_dict())
    assert AutoTokenizer.from_pretrained(str(out))("abc")["input_ids"] == [2, 3, 4]
    if lora:  # the training model keeps its unmerged adapter
        assert any("lora_A" in n for n, _ in model.named_parameters())
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temp dirs left"


def test_rotate_and_latest(tmp_path, seed):
    model = tiny_model(seed=seed)
    for step in (1, 2, 3, 10):
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, state={"step": step})
    (checkpoint_path(tmp_path, 11)).mkdir()  # a save in progress (or killed): newer, incomplete
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)  # numeric, not lexical order
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert sorted(deleted) == [checkpoint_path(tmp_path, 1), checkpoint_path(tmp_path, 2)]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-10", "checkpoint-11", "checkpoint-3"]
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="keep"):
        rotate_checkpoints(tmp_path, keep=-1)


def test_bad_arguments(tmp_path, seed):
    model, opt, _ = make_run(seed)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "x", model=model, state={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="state must be a dict"):
        save_checkpoint(tmp_path / "x", model=model, state=[1])
    with pytest.raises(ValueError, match="PEFT"):
        save_checkpoint(tmp_path / "x", model=model, state={}, adapter_only=True)
    path = save_checkpoint(tmp_path / "y", model=model, state={})
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, model=model, optimizer=opt)
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
def test_round_trip_on_cuda_restores_cuda_rng(tmp_path, seed):
    model = tiny_model(seed=seed).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lm_loss(model, batch(seed).cuda()).backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, state={"step": 1})
    want = torch.rand(4, device="cuda")
    model2 = tiny_model(seed=seed + 1).cuda()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    load_checkpoint(path, model=model2, optimizer=opt2)
    assert torch.equal(torch.rand(4, device="cuda"), want)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert_same_optimizer(opt, opt2)


def _tiny_linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


@pytest.mark.parametrize("keep", [1, 2, 3, 4, 5])
def test_rotation_keeps_the_newest_keep_checkpoints(tmp_path, seed, keep):
    # Issue 9.1: with fewer than `keep` checkpoints the slice start went negative and kept only the newest.
    model = _tiny_linear(seed)
    for n in range(1, 11):
        save_checkpoint(checkpoint_path(tmp_path, n), model=model, state={"step": n})
        rotate_checkpoints(tmp_path, keep)
        left = sorted(int(p.name.split("-")[1]) for p in tmp_path.iterdir())
        assert left == list(range(max(1, n - keep + 1), n + 1)), (keep, n, left)


def test_debris_of_killed_saves_is_cleaned(tmp_path, seed):
    model = _tiny_linear(seed)
    good = save_checkpoint(checkpoint_path(tmp_path, 2), model=model, state={"step": 2})
    # A save killed (SIGKILL) while writing, one killed between the two renames of an overwrite (the
    # `.old` is the only copy of checkpoint-4), and one whose new copy had already arrived.
    save_checkpoint(tmp_path / ".checkpoint-4.old", model=model, state={"step": 4})
    (tmp_path / ".checkpoint-7.tmp").mkdir()
    (tmp_path / ".checkpoint-7.tmp" / ckpt.MODEL_FILE).write_bytes(b"half")
    import shutil

    shutil.copytree(good, tmp_path / ".checkpoint-2.old")
    removed = ckpt.clean_debris(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint-2.old", ".checkpoint-7.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert ckpt.read_state(checkpoint_path(tmp_path, 4)) == {"step": 4}
    # The next save cleans up too.
    (tmp_path / ".checkpoint-9.tmp").mkdir()
    save_checkpoint(checkpoint_path(tmp_path, 5), model=model, state={"step": 5})
    assert not (tmp_path / ".checkpoint-9.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_with_its_marker_names_the_file(tmp_path, seed, damage):
    model, opt, sched = make_run(seed)
    train_step(model, opt, sched, batch(seed))
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, state={"step": 1})
    meta = json.loads((path / ckpt.COMPLETE).read_text())
    assert set(meta["files"]) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                                  "rng_rank0.pt"}  # fmt: skip
    victim = path / ckpt.OPTIMIZER_FILE
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        victim.unlink()
    want = {"truncate": "truncated", "flip": "CRC-32", "delete": "missing"}[damage]
    model2, opt2, sched2 = make_run(seed + 1)
    with pytest.raises(ValueError, match=f"optimizer.pt.*{want}|{want}.*optimizer.pt|optimizer.pt is {want}"):
        load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)


def test_sharded_format_round_trip_and_crash(tmp_path, seed, monkeypatch):
    """The DCP format at world size 1: exact resume, DCP files instead of model.safetensors, and a save
    that dies inside DCP never becomes the latest checkpoint (the 2-rank and cross-world-size cases run
    in test_dcp.py)."""
    model, opt, sched = make_run(seed, tie=True)
    for s in range(2):
        train_step(model, opt, sched, batch(seed + s))
    path = save_checkpoint(checkpoint_path(tmp_path, 2), model=model, optimizer=opt, scheduler=sched,
                           state={"step": 2}, format="sharded")  # fmt: skip
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert names == ["COMPLETE", "dcp/.metadata", "dcp/__0_0.distcp", "rng_rank0.pt", "scheduler.pt",
                     "trainer_state.json"]  # fmt: skip
    assert json.loads((path / ckpt.COMPLETE).read_text())["format"] == "sharded"
    after_save = draws()
    next_loss = train_step(model, opt, sched, batch(seed + 2))
    model2, opt2, sched2 = make_run(seed + 1, tie=True)
    assert load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2) == {"step": 2}
    assert draws() == after_save
    assert train_step(model2, opt2, sched2, batch(seed + 2)) == next_loss
    for (n1, p1), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p1, p2), n1
    assert_same_optimizer(opt, opt2)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight

    import torch.distributed.checkpoint as dcp

    def dying_save(*args, **kwargs):
        raise OSError("killed inside dcp.save (simulated)")

    monkeypatch.setattr(dcp, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(checkpoint_path(tmp_path, 3), model=model, optimizer=opt, state={"step": 3},
                        format="sharded")  # fmt: skip
    assert latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    with pytest.raises(ValueError, match="format must be one of"):
        save_checkpoint(tmp_path / "x", model=model, state={}, format="zip")
