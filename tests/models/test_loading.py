"""load_model_and_tokenizer on a locally saved tiny model."""

from __future__ import annotations

import pytest
import torch

from fastrl.models.loading import ModelConfig, load_model_and_tokenizer
from fastrl.models.tiny import build_char_tokenizer, build_tiny_model, save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), seed=3, init_std=0.1)


@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load(tiny_dir, dtype, expected):
    model, tok = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(tiny_dir), torch_dtype=dtype), device="cpu"
    )
    assert model.lm_head.weight.dtype == expected
    assert model.training
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    assert model.generation_config.pad_token_id == 0
    reference = build_tiny_model(build_char_tokenizer(), seed=3, init_std=0.1)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q.to(expected)), n


@pytest.mark.parametrize(
    "dtype, expected", [("auto", torch.bfloat16), ("float32", torch.float32), ("float16", torch.float16)]
)
def test_dtype_of_a_bf16_checkpoint(tmp_path_factory, dtype, expected):
    # "auto" keeps the saved dtype (the fp32 checkpoint above cannot tell "auto" from a float32 default);
    # an explicit dtype converts every parameter.
    path = save_tiny(tmp_path_factory.mktemp("bf16"), seed=1, dtype=torch.bfloat16)
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(path), torch_dtype=dtype), device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}


def test_eager_attention(tiny_dir):
    model, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(tiny_dir), attn_implementation="eager"), device="cpu"
    )
    assert model.config._attn_implementation == "eager"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, seed):
    ids = torch.randint(5, 100, (2, 7))
    grads = []
    for ckpt in (False, True):
        model, _ = load_model_and_tokenizer(
            ModelConfig(name_or_path=str(tiny_dir), gradient_checkpointing=ckpt), device="cpu"
        )
        # transformers >= 5.20 names it is_activation_checkpointing; 5.19 (what vLLM allows) only has
        # is_gradient_checkpointing.
        on = getattr(model, "is_activation_checkpointing", None)
        assert (model.is_gradient_checkpointing if on is None else on) == ckpt
        model(ids).logits.logsumexp(-1).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_pad_falls_back_to_eos(tmp_path):
    tok = build_char_tokenizer()
    tok.pad_token = None
    path = save_tiny(tmp_path / "nopad", tokenizer=tok, model=build_tiny_model(build_char_tokenizer()))
    _, loaded = load_model_and_tokenizer(ModelConfig(name_or_path=str(path)), device="cpu")
    assert loaded.pad_token == loaded.eos_token


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"attn_implementation": "flex"}, "attn_implementation"),
        # Review fixes: these used to raise TypeError (unhashable) or pass until from_pretrained.
        ({"torch_dtype": ["bfloat16"]}, "torch_dtype"),
        ({"attn_implementation": ["sdpa"]}, "attn_implementation"),
        ({"name_or_path": 3}, "name_or_path"),
        ({"tokenizer_name_or_path": ""}, "tokenizer_name_or_path"),
        ({"revision": 5}, "revision"),
        ({"trust_remote_code": "yes"}, "trust_remote_code"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{"name_or_path": "x", **kwargs})


def test_bad_load(tiny_dir):
    with pytest.raises(ValueError, match="name_or_path"):
        load_model_and_tokenizer(ModelConfig(), device="cpu")
    with pytest.raises(ValueError, match="flash"):
        load_model_and_tokenizer(
            ModelConfig(name_or_path=str(tiny_dir), attn_implementation="flash_attention_2"), device="cpu"
        )


def test_every_option_has_help():
    from dataclasses import fields

    from fastrl.models.lora import LoraConfig

    for cls in (ModelConfig, LoraConfig):
        for f in fields(cls):
            assert f.kw_only and f.metadata.get("help"), f"{cls.__name__}.{f.name}"
