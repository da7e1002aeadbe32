"""The embedded engine: batched KV-cache generation straight from the training model.

No weight copy exists, so ``sync_weights`` has nothing to do: the next ``generate`` reads the parameters
the optimizer just updated. The prompts are sorted by length (stably) and cut into micro-batches of at
most ``max_batch_size`` rows. Per micro-batch:

1. **Shared-prompt prefill.** Runs of identical consecutive prompts (GRPO's G completions of one prompt:
   the trainer repeats each prompt G times in a row) are prefilled once: the U distinct prompts are
   left-padded (position ids count real tokens only, ``cumsum(mask) - 1``) and run through the model,
   keeping the last position's logits; the KV cache rows are then copied to the group's rows
   (``index_select``; the eager path keeps them once, below) and every row samples its first token from
   its prompt's logits. Off with
   ``share_prompt_prefill=False``: one prefill row per completion (same tokens, U times the prefill work).
2. **Decode.** Sample (``fastrl.engine.sampling.sample_next``), record, feed the token. Every row draws
   from its own uniform number per step, taken in micro-batch row order, so a row's completion does not
   depend on which rows share its batch. The host looks at the finished flags only every ``check_every``
   steps (one device sync each; a row that finished in between keeps decoding, its tokens ignored); at a
   check, all-finished ends the batch and, with ``compact_finished``, the finished rows leave it: the
   dynamic cache keeps only the live rows, the static cache moves them into a cache of the next smaller
   power-of-two batch (so the compiled decode sees at most log2(max_batch_size) + 1 batch shapes).

The eager path (``use_static_cache=False``) decodes Llama, Qwen2, Qwen3 and Mistral models (full
attention) through ``fastrl.engine._lean.LeanDecoder`` (``lean_decode``, default on): the layers'
arithmetic written out over the same submodules, with its own preallocated per-row KV cache; on
SmolLM2-135M in bf16 it takes a 2 x 8-row ``generate`` from 3.3-3.7 s to 2.8 s (2 threads), the products
then being ~65% of it. Other models, and ``lean_decode=False``, run the model's own forward with a KV cache
in buffers preallocated for prompt + new tokens, written in place (``fastrl.engine._kv.growing_cache``;
transformers' ``DynamicCache`` copies the whole cache every step). There, when prompts are shared (and
the model is a plain full-attention decoder on ``sdpa``/``eager`` attention), the decode steps use
``fastrl.engine._kv.SharedPrefixCache`` and its attention: the prompt's keys/values are stored once per
prompt and read once per step for all the group's rows (batched matrix products over ``[prompt, rows of
the group]`` slots), each row's own generated positions apart; the two score blocks share one softmax,
so the result is exact attention. It is a decode-time implementation switch only
(``config._attn_implementation`` for the forward).

``use_static_cache`` preallocates ``transformers.StaticCache``s of a fixed shape (batch rounded up to a
power of two, length rounded up to ``cache_length_multiple``) with a fixed-size attention mask, so every
decode step of a bucket has the same shapes; the caches are kept and reused across calls. ``compile`` runs
the decode step through ``torch.compile`` (``fullgraph``, ``dynamic=False``; mode ``reduce-overhead``:
CUDA graphs on GPUs): one graph per (batch bucket, cache length), reused across decode steps and rounds.
The graph reads the live parameters, so in-place optimizer steps need no recompilation. It cannot serve
FSDP-sharded models (their parameters are gathered into new buffers by hooks on every forward):
``generate`` refuses ``compile`` on a model holding an ``FSDPModule`` with a ``ValueError`` (use the eager
static cache).

Weight dtype (``cfg.dtype``). ``auto``, the default on every device, generates from the training model's
own parameters: no copy, and exact (greedy equals transformers ``generate`` token for token; log-probs
are the trainer's up to batch rounding). Another dtype generates from a copy of the weights in it
(``fastrl.engine._shadow.WeightCopy``, LoRA merged), refreshed before the first ``generate`` after each
``sync_weights``; the reported log-probs are the copy's, as a bf16 vLLM engine's are. ``bfloat16`` on a
CPU with native bf16 (``avx512_bf16``/AMX) decodes SmolLM2-135M 1.7x faster than fp32 (2 x 8 chat
prompts, 48 tokens, 2 threads), for a weight copy per round (~35 ms there). It is not the default
because it changes what is sampled: bf16 logits carry ~3 significant digits, so an fp32 trainer sees its
rollouts slightly off-policy and greedy near-ties may split differently by batch; that trade is the
user's (the SmolLM2 demo makes it). On GPUs the trainer's model is usually bf16 already, and ``auto``
is then the bf16 path without a copy. FSDP-sharded models refuse a copy (``ValueError``).

Log-probs (the contract of ``GenerationOutput``): each token's log-prob under the distribution it was
sampled from (temperature, top-k, top-p applied, renormalised over the kept tokens). Greedy
(``temperature == 0``) reports ``log_softmax(logits)[token]`` at temperature 1 instead of its point mass's 0.
"""

from __future__ import annotations

import inspect
import numbers

import torch
from torch import nn
from transformers import StaticCache

from fastrl.engine._kv import (
    SHARED_PREFIX_ATTENTION,
    SharedPrefixCache,
    growing_cache,
    register_shared_prefix_attention,
)
from fastrl.engine._lean import LeanDecoder, lean_decode_ok, lean_over_shared
from fastrl.engine._shadow import WeightCopy
from fastrl.engine.base import Engine, EngineConfig, GenerationOutput, SamplingParams, register_engine
from fastrl.engine.sampling import sample_next
from fastrl.models.heads import causal_lm
from fastrl.models.modes import eval_mode

_MAX_STATIC_CACHES = 8  # one per batch bucket of one cache length, in practice


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def prompt_groups(prompts: list[list[int]]) -> list[int]:
    """Sizes of the runs of identical consecutive prompts: ``[a, a, b, a] -> [2, 1, 1]``."""
    sizes: list[int] = []
    for i, p in enumerate(prompts):
        if i and p == prompts[i - 1]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


class HFEngine(Engine):
    """Generation with the Hugging Face model being trained (PEFT-wrapped models included)."""

    def __init__(self, model: nn.Module, tokenizer, cfg: EngineConfig | None = None):
        cfg = EngineConfig() if cfg is None else cfg
        if not isinstance(cfg, EngineConfig):
            raise ValueError(f"cfg must be an EngineConfig, got {type(cfg).__name__}")
        if cfg.kind != "hf":
            raise ValueError(f"HFEngine needs an EngineConfig of kind 'hf', got {cfg.kind!r}")
        self.cfg = cfg
        self.model = model
        if not hasattr(tokenizer, "eos_token_id") or not hasattr(tokenizer, "pad_token_id"):
            raise ValueError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        lm = causal_lm(model)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        gen_eos = getattr(lm.generation_config, "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos} - {None}
        if not eos:
            raise ValueError("tokenizer has no eos_token_id and the model's generation_config names none")
        self.eos_token_ids = sorted(eos)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        params = inspect.signature(lm.forward).parameters
        # transformers 5 calls the cache argument `cache`, earlier releases `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last_only = "logits_to_keep" in params
        self._static_caches: dict[tuple[int, int], StaticCache] = {}
        self._compiled_decode = None
        # cfg.dtype: generate from a copy of the weights in that dtype when it is not the model's own.
        own = lm.get_input_embeddings().weight.dtype
        want = own if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self._copy = WeightCopy(want) if want != own else None
        if self._copy is not None and _is_fsdp(model):
            raise ValueError(
                f"engine dtype={cfg.dtype!r} (a {cfg.dtype} weight copy) cannot serve an FSDP-sharded model; "
                "use dtype='auto' (the model's own weights) or a vllm engine"
            )

    # -- public interface ---------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        lm = causal_lm(self.model) if self._copy is None else self._copy.get(self.model)
        self._check_prompts(prompt_ids, lm.get_input_embeddings().num_embeddings)
        if self.cfg.compile and _is_fsdp(self.model):
            raise ValueError(
                "engine compile=True cannot serve an FSDP-sharded model (its parameters are re-gathered into "
                "new buffers on every forward); use compile=False (use_static_cache=True still works)"
            )
        device = lm.get_input_embeddings().weight.device
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)), device=device)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # stable: runs stay runs
        results: list = [None] * len(prompt_ids)
        # Dropout off while sampling; each module's own mode comes back afterwards.
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, len(order), self.cfg.max_batch_size):
                chunk = order[start : start + self.cfg.max_batch_size]
                batch = self._generate_batch(
                    lm, [list(prompt_ids[i]) for i in chunk], params, stop_ids, generator, device
                )
                for i, row in zip(chunk, batch):
                    results[i] = row
        ids, logps, truncated = zip(*results) if results else ((), (), ())
        return GenerationOutput(completion_ids=list(ids), logprobs=list(logps), truncated=list(truncated))

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to copy: the engine reads the training model's parameters. A different model object
        (e.g. one wrapped after the engine was built) replaces the engine's reference. With a weight copy
        (``cfg.dtype`` not the model's), the next ``generate`` first refreshes the copy from ``model``."""
        if model is not self.model:
            self.model = model
        if self._copy is not None:
            self._copy.mark_stale()

    def sleep(self) -> None:
        """Drop the static KV caches (and the weight copy, if any); they are rebuilt on demand."""
        self._static_caches.clear()
        if self._copy is not None:
            self._copy.drop()

    def close(self) -> None:
        self.sleep()
        self._compiled_decode = None

    # -- internals ----------------------------------------------------------------------------------------

    @staticmethod
    def _check_prompts(prompt_ids, vocab: int) -> None:
        if not isinstance(prompt_ids, (list, tuple)):
            raise ValueError(
                f"prompt_ids must be a list of lists of token ids, got {type(prompt_ids).__name__}"
            )
        for i, p in enumerate(prompt_ids):
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"prompt_ids[{i}] must be a non-empty list of token ids, got {p!r}")
            bad = [
                t
                for t in p
                if isinstance(t, bool) or not (isinstance(t, numbers.Integral) and 0 <= t < vocab)
            ]
            if bad:
                raise ValueError(f"prompt_ids[{i}] must hold ints in [0, {vocab}), found {bad[0]!r}")

    def _forward(self, lm, cache, **inputs) -> tuple[torch.Tensor, object]:
        """Logits of the last position [B, V] and the cache, through the eager model."""
        if self._keep_last_only:
            inputs["logits_to_keep"] = 1
        out = lm(**inputs, **{self._cache_arg: cache}, use_cache=True)
        new_cache = getattr(out, "cache", None) if self._cache_arg == "cache" else out.past_key_values
        return out.logits[:, -1], new_cache

    def _decode_step(self, lm, cache, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """One static-shape decode step (the function ``compile`` compiles): logits [B, V]."""
        out = lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1]

    @staticmethod
    def _shared_attention_ok(lm) -> bool:
        """Shared-prefix attention serves plain full-attention decoders only (Qwen2, Llama, ...)."""
        cfg = lm.config
        types_ = getattr(cfg, "layer_types", None) or ["full_attention"]
        return (
            cfg._attn_implementation in ("sdpa", "eager")
            and all(t == "full_attention" for t in types_)
            and not getattr(cfg, "use_sliding_window", False)
        )

    def _shared_decode(self, lm, cache, input_ids, position_ids) -> torch.Tensor:
        """One eager decode step whose attention reads each shared prompt once (fastrl.engine._kv). The
        mask mapping given as a dict skips transformers' mask building (the attention masks the prompt
        padding itself); the attention implementation is switched for this forward only."""
        register_shared_prefix_attention()
        saved = lm.config._attn_implementation
        lm.config._attn_implementation = SHARED_PREFIX_ATTENTION
        try:
            out = lm(
                input_ids=input_ids,
                attention_mask={"full_attention": None},
                position_ids=position_ids,
                use_cache=True,
                fastrl_shared=cache,
                **{self._cache_arg: cache},
                **({"logits_to_keep": 1} if self._keep_last_only else {}),
            )
        finally:
            lm.config._attn_implementation = saved
        return out.logits[:, -1]

    def _decode_fn(self):
        if not self.cfg.compile:
            return self._decode_step
        if self._compiled_decode is None:
            self._compiled_decode = torch.compile(
                self._decode_step,
                mode=self.cfg.compile_mode,
                backend=self.cfg.compile_backend,
                fullgraph=True,  # a graph break is a bug here, not a silent slowdown
                dynamic=False,
            )
        return self._compiled_decode

    def _static_cache(self, lm, batch: int, length: int) -> StaticCache:
        """A reset StaticCache of this shape, reused across calls: the compiled graph keeps its addresses."""
        key = (batch, length)
        cache = self._static_caches.pop(key, None)
        if cache is None:
            while len(self._static_caches) >= _MAX_STATIC_CACHES:  # bound the memory of unused shapes
                other = next((k for k in self._static_caches if k[1] != length), None)
                self._static_caches.pop(other if other is not None else next(iter(self._static_caches)))
            cache = StaticCache(config=lm.config, max_cache_len=length)
        else:
            cache.reset()
        self._static_caches[key] = cache  # most recently used last
        return cache

    def _fill_static(
        self, lm, batch: int, length: int, layers_kv, rows: torch.Tensor, cur: int
    ) -> StaticCache:
        """The static cache (batch, length) holding, in its row r, the first ``cur`` positions of row
        ``rows[r]`` of ``layers_kv`` (per layer: keys, values [b, heads, >= cur, head_dim])."""
        cache = self._static_cache(lm, batch, length)
        position = torch.arange(cur, device=rows.device)
        for i, (k, v) in enumerate(layers_kv):
            k_rows, v_rows = k[:, :, :cur].index_select(0, rows), v[:, :, :cur].index_select(0, rows)
            cache.update(k_rows, v_rows, i, {"cache_position": position})
        return cache

    def _generate_batch(self, lm, prompts, params: SamplingParams, stop_ids, generator, device):
        n, steps, cfg = len(prompts), params.max_new_tokens, self.cfg
        groups = prompt_groups(prompts) if cfg.share_prompt_prefill else [1] * n
        starts = [sum(groups[:g]) for g in range(len(groups))]
        unique = [prompts[s] for s in starts]
        U, P = len(unique), max(len(p) for p in prompts)
        static = cfg.use_static_cache
        L = _round_up(P + steps, cfg.cache_length_multiple) if static else P + steps

        # 1. Prefill the U distinct prompts, left-padded.
        input_ids = torch.full((U, P), self.pad_token_id, dtype=torch.long)
        mask_U = torch.zeros(U, L, dtype=torch.long)  # prompt padding 0, every later position 1
        for i, p in enumerate(unique):
            input_ids[i, P - len(p) :] = torch.tensor([int(t) for t in p])
            mask_U[i, P - len(p) :] = 1
        input_ids, mask_U = input_ids.to(device), mask_U.to(device)
        position_ids = (mask_U[:, :P].cumsum(-1) - 1).clamp(min=0)
        # Eager decoding grows a preallocated cache (no per-step copy of it, see fastrl.engine._kv); the
        # static path copies the prefill out of a plain one.
        lean = not static and cfg.lean_decode and lean_decode_ok(lm) and not _is_fsdp(self.model)
        shared_ok = n > U and self._shared_attention_ok(lm)
        if lean and shared_ok:  # long shared prompts: the shared-prefix layout reads them once instead
            lean = lean_over_shared(lm, n, U, P)
        prefill_cache = None if static else growing_cache(lm.config, P if lean else P + steps)
        logits_U, cache = self._forward(
            lm, prefill_cache, input_ids=input_ids, attention_mask=mask_U[:, :P], position_ids=position_ids
        )
        # Decode rows: the n completions, plus (static) dummy rows up to a power-of-two bucket. `row_of`
        # maps a decode row to its completion; dummies map to n, a scratch row of the outputs.
        B = max(min(_pow2(n), cfg.max_batch_size), n) if static else n
        src = torch.repeat_interleave(torch.arange(U), torch.tensor(groups)).to(device)  # row -> prompt
        src_B = torch.cat([src, src.new_zeros(B - n)])
        row_of = torch.cat([torch.arange(n), torch.full((B - n,), n)]).to(device)
        logits = logits_U.index_select(0, src_B)
        mask = mask_U.index_select(0, src_B)
        next_pos = position_ids[:, -1:].index_select(0, src_B) + 1
        # Per layer [U, heads, P, d], for the caches built from the prefill's (the plain eager one is reused).
        prefill_kv = [(ly.keys, ly.values) for ly in cache.layers] if static or lean or shared_ok else None
        if static:
            cache = self._fill_static(lm, B, L, prefill_kv, src_B, P)
        elif lean:
            cache = LeanDecoder(lm, prefill_kv, mask_U[:, :P], src, steps)
        elif shared_ok:
            cache = SharedPrefixCache(prefill_kv, mask_U[:, :P], src.tolist(), capacity=steps)
        elif n > U:
            cache.batch_select_indices(src_B)
        del prefill_kv  # the decode cache holds what it needs (the shared-prefix one: these tensors)
        shared = isinstance(cache, SharedPrefixCache)
        decode = self._decode_fn() if static else None
        cuda_graphs = static and cfg.compile and device.type == "cuda"

        # 2. Decode. Outputs are indexed by completion, time-major so a step writes one contiguous row.
        tokens_TN = torch.full((steps, n + 1), self.pad_token_id, dtype=torch.long, device=device)
        logps_TN = torch.zeros(steps, n + 1, dtype=torch.float32, device=device)
        done = row_of == n
        cur = P  # cache positions filled
        for t in range(steps):
            # One uniform per completion per step, in completion order, whatever the batch holds.
            u_N = torch.rand(n + 1, generator=generator, device=device) if not params.greedy else None
            tok, logp = sample_next(
                logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                uniform_B=None if u_N is None else u_N.index_select(0, row_of),
            )  # fmt: skip
            tok = torch.where(done, self.pad_token_id, tok)
            tokens_TN[t].index_copy_(0, row_of, tok)
            logps_TN[t].index_copy_(0, row_of, logp)
            done = done | torch.isin(tok, stop_ids)
            if t == steps - 1:
                break
            if (t + 1) % cfg.check_every == 0:
                done_host = done.cpu()  # the only device sync of the loop
                if bool(done_host.all()):
                    break
                live = (~done_host).nonzero().squeeze(-1)
                new_B = max(_pow2(len(live)), 1) if static else len(live)
                if cfg.compact_finished and new_B < len(done_host):
                    keep = torch.cat([live, live[:1].expand(new_B - len(live))]).to(device)
                    tok, mask, next_pos = tok[keep], mask[keep], next_pos[keep]
                    row_of = torch.where(torch.arange(new_B, device=device) < len(live), row_of[keep], n)
                    done = row_of == n
                    if static:
                        layers_kv = [(layer.keys, layer.values) for layer in cache.layers]
                        cache = self._fill_static(lm, new_B, L, layers_kv, keep, cur)
                        del layers_kv
                    elif lean:
                        cache.select(keep)
                    else:
                        cache.batch_select_indices(keep)
            if static:
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = decode(lm, cache, tok[:, None], mask, next_pos)
            elif lean:
                logits = cache.step(tok, next_pos[:, 0])
            elif shared:
                logits = self._shared_decode(lm, cache, tok[:, None], next_pos)
            else:
                logits, cache = self._forward(
                    lm,
                    cache,
                    input_ids=tok[:, None],
                    attention_mask=mask[:, : cur + 1],
                    position_ids=next_pos,
                )
            next_pos = next_pos + 1
            cur += 1

        # Each completion ends at its first stop token (tokens after it are padding); none: truncated.
        tokens, logps = tokens_TN[:, :n].T.cpu(), logps_TN[:, :n].T.cpu()
        stops = torch.isin(tokens, stop_ids.cpu())
        first = torch.where(stops.any(-1), stops.int().argmax(-1) + 1, steps)
        return [
            (tokens[i, : first[i]].tolist(), logps[i, : first[i]].tolist(), not bool(stops[i].any()))
            for i in range(n)
        ]


register_engine("hf", HFEngine)
