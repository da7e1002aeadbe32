"""The character tokenizer and the tiny random models: round trips, chat template, HF save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastrl.models.tiny import DEFAULT_CHARS, EOS, IM_START, build_char_tokenizer, build_tiny_model, save_tiny

TEXTS = ["ab c\nd  x\t!", "  Hello, World 123 ", "(1+2)*3=9?", ""]


def test_one_token_per_character(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
    assert len({tokenizer.convert_tokens_to_ids(t) for t in tokenizer.convert_ids_to_tokens(range(10))}) == 10
    # Every character of the alphabet has its own id, distinct from the special tokens.
    char_ids = [tokenizer(c)["input_ids"] for c in dict.fromkeys(DEFAULT_CHARS)]
    assert all(len(i) == 1 for i in char_ids)
    assert len({i[0] for i in char_ids}) == len(char_ids)
    assert min(i[0] for i in char_ids) >= 5


def test_special_tokens(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.eos_token == EOS
    assert tokenizer.padding_side == "left"
    ids = tokenizer(f"{IM_START}hi{EOS}")["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids(IM_START), *tokenizer("hi")["input_ids"], 2]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    batch = tokenizer(["a", "abc"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[:2] == [0, 0]  # left padding
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]


def test_restricted_alphabet_drops_unknown_characters():
    tok = build_char_tokenizer("abc")
    assert tok.decode(tok("abXc")["input_ids"]) == "abc"
    with pytest.raises(ValueError, match="chars"):
        build_char_tokenizer("")


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "be short"}, {"role": "user", "content": "2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nbe short<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_save_and_reload(tmp_path, tokenizer, arch):
    model = build_tiny_model(tokenizer, arch=arch, tie_word_embeddings=arch == "llama")
    path = save_tiny(tmp_path / arch, model=model, tokenizer=tokenizer)
    tok2 = AutoTokenizer.from_pretrained(path)
    for text in TEXTS + [f"{IM_START}user\nhi{EOS}"]:
        assert tok2(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (tok2.pad_token_id, tok2.eos_token_id) == (0, 2)
    assert tok2.chat_template == tokenizer.chat_template
    model2 = AutoModelForCausalLM.from_pretrained(path)
    assert model2.config.model_type == arch
    ids = torch.tensor([tokenizer("(1+2)*3")["input_ids"]])
    torch.testing.assert_close(model2(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_build_options(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=3)
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (
        64,
        1,
        3,
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    tied = build_tiny_model(tokenizer, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert build_tiny_model(tokenizer, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_init_is_a_function_of_the_seed(tokenizer, seed):
    before = torch.get_rng_state()
    a = build_tiny_model(tokenizer, seed=seed)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    b = build_tiny_model(tokenizer, seed=seed)
    c = build_tiny_model(tokenizer, seed=seed + 1)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), n


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "gpt2"}, "arch"),
        ({"hidden_size": 64, "num_heads": 2}, "head_dim"),
        ({"hidden_size": 96, "num_heads": 2}, "head_dim"),
        ({"hidden_size": 128, "num_heads": 2, "num_kv_heads": 3}, "num_kv_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_bad_options(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_tiny_model(tokenizer, **kwargs)


def test_save_tiny_builds_what_is_missing(tmp_path):
    path = save_tiny(tmp_path / "m", chars="0123456789+=", num_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 1
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(path))
    with pytest.raises(ValueError, match="model_kwargs"):
        save_tiny(tmp_path / "n", model=model, num_layers=2)
