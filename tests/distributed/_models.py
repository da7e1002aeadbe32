"""Tiny random Hugging Face causal LMs for the distributed tests (built locally, nothing downloaded)."""

from __future__ import annotations

import torch

VOCAB = 97


def tiny_config(arch: str = "qwen2", *, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )


def tiny_model(arch: str = "qwen2", *, seed: int = 0, layers: int = 2, tie: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers=layers, tie=tie))
    return model.float()


def tiny_lora(model, r: int = 4):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def batch(seed: int, b: int = 4, t: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; no padding, so every row has the same token count."""
    return model(input_ids=ids, labels=ids).loss
