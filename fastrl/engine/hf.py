"""The embedded engine: batched KV-cache generation straight from the training model.

No weight copy exists, so ``sync_weights`` has nothing to do: the next ``generate`` reads the parameters
the optimizer just updated. Per micro-batch of at most ``max_batch_size`` prompts (sorted by length, so
a batch holds similar lengths):

1. left-pad the prompts, position ids counting real tokens only (``cumsum(mask) - 1``);
2. prefill the prompts, keeping the logits of the last position only;
3. decode: sample (``fastrl.engine.sampling.sample_next``), append, feed the new token, until every row
   has produced EOS / a stop id or ``max_new_tokens`` tokens. A finished row keeps running (it is cheaper
   than reshaping the cache) but its tokens are ignored.

The dynamic cache grows by one position per step and works everywhere. ``use_static_cache`` preallocates
a ``transformers.StaticCache`` of a fixed shape (batch rounded up to a power of two, length rounded up
to ``cache_length_multiple``) with a fixed-size attention mask, so every decode step has the same shapes;
``compile`` then runs the decode step through ``torch.compile`` (``reduce-overhead``: CUDA graphs). The
compiled graph captures parameter addresses, which in-place optimizer steps keep; it does not suit
FSDP-sharded models, whose parameters are gathered into new buffers per forward.
"""

from __future__ import annotations

import inspect
import numbers

import torch
from torch import nn
from transformers import StaticCache

from fastrl.engine.base import Engine, EngineConfig, GenerationOutput, SamplingParams, register_engine
from fastrl.engine.sampling import sample_next
from fastrl.models.heads import causal_lm
from fastrl.models.modes import eval_mode


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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

    # -- public interface ---------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        lm = causal_lm(self.model)
        self._check_prompts(prompt_ids, lm.get_input_embeddings().num_embeddings)
        device = lm.get_input_embeddings().weight.device
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)), device=device)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        results: list = [None] * len(prompt_ids)
        # Dropout off while sampling; each module's own mode comes back afterwards.
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, len(order), self.cfg.max_batch_size):
                chunk = order[start : start + self.cfg.max_batch_size]
                batch = self._generate_batch(
                    lm, [prompt_ids[i] for i in chunk], params, stop_ids, generator, device
                )
                for i, row in zip(chunk, batch):
                    results[i] = row
        ids, logps, truncated = zip(*results) if results else ((), (), ())
        return GenerationOutput(completion_ids=list(ids), logprobs=list(logps), truncated=list(truncated))

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to copy: the engine reads the training model's parameters. A different model object
        (e.g. one wrapped after the engine was built) replaces the engine's reference."""
        if model is not self.model:
            self.model = model

    def sleep(self) -> None:
        """Drop the static KV caches (the only memory the engine holds); they are rebuilt on demand."""
        self._static_caches.clear()

    def close(self) -> None:
        self._static_caches.clear()
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

    def _static_cache(self, lm, batch: int, length: int) -> StaticCache:
        """A reset StaticCache of this shape, reused across calls: the compiled graph keeps its addresses."""
        key = (batch, length)
        cache = self._static_caches.get(key)
        if cache is None:
            if len(self._static_caches) >= 2:  # bound the memory held by shapes no longer in use
                self._static_caches.pop(next(iter(self._static_caches)))
            cache = StaticCache(config=lm.config, max_cache_len=length)
            self._static_caches[key] = cache
        else:
            cache.reset()
        return cache

    def _generate_batch(self, lm, prompts, params: SamplingParams, stop_ids, generator, device):
        n_real, P, steps = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        static = self.cfg.use_static_cache
        # Static shapes: round the batch to a power of two (padded with one-token dummy rows) and the
        # cache length up, so consecutive calls reuse one compiled graph.
        B = min(1 << (n_real - 1).bit_length(), self.cfg.max_batch_size) if static else n_real
        B = max(B, n_real)
        rows = list(prompts) + [[self.pad_token_id]] * (B - n_real)
        L = _round_up(P + steps, self.cfg.cache_length_multiple) if static else P + steps
        input_ids = torch.full((B, P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)  # prompt padding 0, every later position 1
        for i, p in enumerate(rows):
            input_ids[i, P - len(p) :] = torch.tensor([int(t) for t in p])
            mask[i, P - len(p) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        position_ids = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)

        if static:
            cache = self._static_cache(lm, B, L)
            logits, _ = self._forward(
                lm, cache, input_ids=input_ids, attention_mask=mask, position_ids=position_ids
            )
            decode = self._decode_fn()
        else:
            logits, cache = self._forward(
                lm, None, input_ids=input_ids, attention_mask=mask[:, :P], position_ids=position_ids
            )
        next_pos = position_ids[:, -1:] + 1

        tokens = torch.full((B, steps), self.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros(B, steps, dtype=torch.float32, device=device)
        lengths = torch.full((B,), steps, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        done[n_real:] = True
        for t in range(steps):
            tok, logp = sample_next(
                logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                generator=generator,
            )  # fmt: skip
            tok = torch.where(done, self.pad_token_id, tok)
            tokens[:, t], logps[:, t] = tok, logp
            stopped = ~done & torch.isin(tok, stop_ids)
            lengths = torch.where(stopped, t + 1, lengths)
            done |= stopped
            if t == steps - 1 or bool(done.all()):
                break
            if static:
                logits = decode(lm, cache, tok[:, None], mask, next_pos).clone()  # graph outputs get reused
            else:
                logits, cache = self._forward(
                    lm,
                    cache,
                    input_ids=tok[:, None],
                    attention_mask=mask[:, : P + t + 1],
                    position_ids=next_pos,
                )
            next_pos = next_pos + 1

        tokens, logps, lengths, done = tokens.cpu(), logps.cpu(), lengths.cpu(), done.cpu()
        return [
            (tokens[i, : lengths[i]].tolist(), logps[i, : lengths[i]].tolist(), not bool(done[i]))
            for i in range(n_real)
        ]

    def _decode_fn(self):
        if not self.cfg.compile:
            return self._decode_step
        if self._compiled_decode is None:
            self._compiled_decode = torch.compile(
                self._decode_step, mode=self.cfg.compile_mode, dynamic=False
            )
        return self._compiled_decode


register_engine("hf", HFEngine)
