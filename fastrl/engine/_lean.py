"""The hf engine's lean decode step: one token per row through a Llama-family decoder, without the layers'
``forward`` plumbing.

Why: at decode shapes on a CPU the matrix products are memory-bound (each step reads every weight once;
at 2 x 8 rows a bf16 product costs what a 1-row one does), and what transformers does around them is not
small. Its decoder layer, attention and cache plumbing (keyword routing, mask building, rotary
``rotate_half`` copies, the cache ``update`` call, the shared-prefix attention's slot reshapes) costs
about as much as the products on SmolLM2-135M (30 layers, 16 rows): the profile of one bf16 ``generate``
showed 1.7 s in ``aten::mm`` of 4.0 s. This step calls the same submodules (``q_proj`` ... ``down_proj``,
the RMSNorms, the rotary embedding, ``lm_head``: PEFT LoRA layers included, as their own ``forward``)
with the layer's arithmetic written out, and keeps its own KV cache.

The cache: per layer, keys and values ``[rows, kv_heads, prompt + new tokens, head_dim]`` in the model's
dtype, the prompt's positions copied once from the prefill's cache (each row its prompt's; prompts are
left-padded, ``valid`` masks the padding), each step's key/value written in place. Attention runs the
``kv_heads`` groups as batched products: the ``heads / kv_heads`` query heads sharing one key/value head
are one ``[rep, head_dim]`` block, so no key is repeated. bf16/fp16 go through
``scaled_dot_product_attention`` (the fused CPU kernel: 3x cheaper than the matmul-softmax chain there),
fp32/fp64 through ``matmul -> softmax -> matmul`` (cheaper than the kernel at these shapes), both exact
attention. Greedy completions equal transformers ``generate``'s (tests/engine/test_hf_lean.py).

What it serves (``lean_decode_ok``): Llama, Qwen2, Qwen3 and Mistral causal LMs with full attention only,
SiLU MLPs, the default rotary module of their class, no hooks on the modules it bypasses (FSDP's unshard
hooks, accelerate's offload hooks). Anything else decodes through the model's own ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}
SDPA_DTYPES = (torch.bfloat16, torch.float16)  # caches in these attend through the fused kernel


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_hf_hook", None) is not None)


def lean_decode_ok(lm: nn.Module) -> bool:
    """Whether ``LeanDecoder`` computes what ``lm``'s own forward does (module docstring)."""
    cfg = lm.config
    if type(lm).__name__ not in _ARCHITECTURES or getattr(cfg, "hidden_act", None) != "silu":
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        return False
    if getattr(cfg, "use_sliding_window", False) or (
        type(lm).__name__ == "MistralForCausalLM" and getattr(cfg, "sliding_window", None) is not None
    ):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    body = getattr(lm, "model", None)
    layers = getattr(body, "layers", None)
    if body is None or layers is None or not hasattr(body, "rotary_emb") or not hasattr(body, "norm"):
        return False
    bypassed = [lm, body, *layers]
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            attn is None
            or mlp is None
            or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))
        ):
            return False
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
            return False
        bypassed += [attn, mlp]
    return not any(_has_hooks(m) for m in bypassed)


def lean_over_shared(lm: nn.Module, rows: int, prompts: int, prompt_len: int) -> bool:
    """Whether ``rows`` completions of ``prompts`` distinct prompts (padded to ``prompt_len``) should decode
    through the lean step rather than the shared-prefix attention (``fastrl.engine._kv``). The lean cache
    holds each row's own copy of its prompt, so every step reads ``(rows - prompts) * prompt_len`` more
    positions of keys/values than the shared layout; that is worth its lower per-step overhead while those
    extra bytes stay under half the weights' (each step reads every weight once). Measured on SmolLM2-135M
    in bf16, 2 prompts, 48 new tokens: at 0.05x the weights' bytes (43-token prompts, 8 rows each) lean
    was ~17% faster (median 2.85 s against 3.45 s), at 0.7x (584 tokens, 8 each) they tied, at 3.1x
    (584 tokens, 32 each) shared-prefix decoding was 1.5x faster."""
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = lm.get_input_embeddings().weight.element_size()  # the activations', so the caches' dtype
    per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * size
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())  # tied weights once
    return (rows - prompts) * prompt_len * per_position <= weight_bytes / 2


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` (same operations, same rounding)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LeanDecoder:
    """Decode state of ``rows`` completions after a prefill: the KV cache and the padding mask."""

    def __init__(
        self, lm: nn.Module, prefix_kv, valid_prefix: torch.Tensor, row_prompt: torch.Tensor, steps: int
    ):
        """``prefix_kv``: per layer the prefill's keys, values ``[U, kv_heads, P, head_dim]``;
        ``valid_prefix [U, P]`` (bool) the non-padding positions; ``row_prompt [rows]`` each row's prompt;
        ``steps``: the most decode steps that will follow."""
        self.lm = lm
        self.layers = lm.model.layers
        U, P = valid_prefix.shape
        rows = row_prompt.shape[0]
        self.keys, self.values = [], []
        for k, v in prefix_kv:
            K = k.new_empty(rows, k.shape[1], P + steps, k.shape[3])
            V = v.new_empty(rows, v.shape[1], P + steps, v.shape[3])
            K[:, :, :P] = k[:, :, :P].index_select(0, row_prompt)
            V[:, :, :P] = v[:, :, :P].index_select(0, row_prompt)
            self.keys.append(K)
            self.values.append(V)
        valid = torch.ones(rows, P + steps, dtype=torch.bool, device=valid_prefix.device)
        valid[:, :P] = valid_prefix.bool().index_select(0, row_prompt)
        self.valid = valid
        self.length = P  # cache positions filled
        self._fused = self.keys[0].dtype in SDPA_DTYPES

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) the decode rows ``rows``; only the filled positions are copied."""
        n = self.length
        for store in (self.keys, self.values):
            for i, x in enumerate(store):
                y = x.new_empty((len(rows),) + x.shape[1:])
                y[:, :, :n] = x[:, :, :n].index_select(0, rows)
                store[i] = y
        self.valid = self.valid.index_select(0, rows)

    def _attend(self, q: torch.Tensor, i: int, scaling: float) -> torch.Tensor:
        """q ``[rows, kv_heads, rep, head_dim]`` against positions ``[0, length]`` of layer ``i``."""
        end = self.length + 1
        K, V = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        mask = self.valid[:, None, None, :end]
        if self._fused:
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scaling)
        scores = torch.matmul(q, K.transpose(-1, -2)).mul_(scaling).masked_fill_(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), V)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [rows]`` at rotary positions ``positions [rows]``; returns the next-token logits
        ``[rows, V]``."""
        lm, t = self.lm, self.length
        if t >= self.keys[0].shape[2]:  # an invariant of the engine, which sizes the cache for its steps
            raise AssertionError(f"LeanDecoder full: {self.keys[0].shape[2]} positions")
        x = lm.model.embed_tokens(tokens)  # [rows, hidden]
        rows = x.shape[0]
        cos, sin = lm.model.rotary_emb(x[:, None], positions[:, None])  # [rows, 1, head_dim]
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            d = attn.head_dim
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, -1, d)
            k = attn.k_proj(h).view(rows, -1, d)
            v = attn.v_proj(h).view(rows, -1, d)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotary embedding
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            self.keys[i][:, :, t] = k
            self.values[i][:, :, t] = v
            kvh = k.shape[1]
            o = self._attend(q.view(rows, kvh, -1, d), i, attn.scaling)  # [rows, kvh, rep, d]
            x = x + attn.o_proj(o.reshape(rows, -1))
            h = layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        self.length = t + 1
        return lm.lm_head(lm.model.norm(x))
