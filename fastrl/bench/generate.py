"""Suite ``generate``: fastrl's embedded ``hf`` engine against Hugging Face ``generate`` (what TRL's
GRPOTrainer calls without vLLM) on the same model, prompts, batch, lengths and sampling, in one run.

Shape: a GRPO generation round, ``prompts x G`` completions (each prompt repeated G times in a row, as
the trainer calls the engine; ``generate`` gets the same rows), temperature 1, no top-k / top-p.
CPU (default): a random-init 4-layer Qwen2, H=256 (4 heads of 64, 2 KV heads, MLP 1024), the
character tokenizer's vocabulary (V=102), fp32, 16 prompts x 8, 128 prompt + 128 new tokens.
``--gpu``: ANCHORS.md's Qwen2-0.5B architecture (V=151936, tied), bf16 weights, 2 x 8, 64 + 256.
``--quick``: a 2-layer H=64 model, 2 x 4, 16 + 16 (tests).

Methods: ``transformers generate`` (the baseline; dynamic cache, ``do_sample=True, top_k=0``); the hf
engine with its dynamic cache, with the static cache, and with the static cache compiled
(``torch.compile``, CUDA graphs on a GPU; only with ``--compile`` on the CPU, where inductor takes ~40 s
per batch bucket). The engine decodes all rows in one batch, as ``generate`` does. On an fp32 model, also
the engine generating from its bf16 weight copy (``EngineConfig(dtype="bfloat16")``; its log-probs are
the bf16 model's, the baseline stays fp32).

Early stops, made the same on both sides (a random-init model rarely ends by itself on a big vocabulary):

- ``no early stop``: no stop token at all; every row generates exactly ``new`` tokens (the engine's EOS
  is an id outside the vocabulary, ``generate`` gets ``eos_token_id=None``).
- ``early stops``: both sides stop at the same set S of ``round(V / 100)`` ids (at least EOS): with the
  near-uniform next-token distribution of a random-init model a row ends with probability about 1% per
  token, so about 72% of the rows end before 128 tokens, at varied lengths. ``generate`` keeps decoding
  finished rows until the last one ends; the engine drops them.

tokens/s: completion tokens produced (each row up to and including its stop token; prompts not counted)
over the wall time of the call, median of the timed runs; on the CPU every call runs on one thread. Each
side counts its own tokens (sampling is random, so the counts differ slightly under early stops). Extra
MiB: peak during one call beyond what was allocated before it (weights excluded): CUDA max allocated; on
the CPU the growth of the process's resident set (``VmHWM`` after the call, reset through
``/proc/self/clear_refs``, minus ``VmRSS`` before), the largest over the calls; memory the allocator kept
from an earlier call is not counted again.
Floor (``no early stop``): ``new`` decode steps that each read every weight once, parameter bytes /
measured memory bandwidth per step; the note gives the measured decode step (from a 1-token call and the
full call: ``(t_full - t_one) / (new - 1)``) against that per-step floor.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import types
from typing import Any

import torch

from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Method, Skip, synchronize

# Filled by the baseline, read by the engine rows of the same case: (case name) -> tokens/s.
_BASELINE_TPS: dict[str, float] = {}


@dataclasses.dataclass(kw_only=True)
class Shape:
    prompts: int
    generations: int
    prompt_len: int
    new_tokens: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int | None  # None: the character tokenizer's
    tied: bool
    dtype: torch.dtype


def shape(ctx: BenchContext) -> Shape:
    if ctx.gpu_shapes:  # Qwen2-0.5B, ANCHORS.md's GRPO step
        return Shape(prompts=2, generations=8, prompt_len=64, new_tokens=256, hidden=896, layers=24, heads=14,
                     kv_heads=2, inter=4864, vocab=151936, tied=True, dtype=torch.bfloat16)  # fmt: skip
    if ctx.quick:
        return Shape(prompts=2, generations=4, prompt_len=16, new_tokens=16, hidden=64, layers=2, heads=1,
                     kv_heads=1, inter=128, vocab=None, tied=False, dtype=torch.float32)  # fmt: skip
    return Shape(prompts=16, generations=8, prompt_len=128, new_tokens=128, hidden=256, layers=4, heads=4,
                 kv_heads=2, inter=1024, vocab=None, tied=False, dtype=torch.float32)  # fmt: skip


def build_model(s: Shape, device: torch.device, *, seed: int):
    """Random-init Qwen2 of shape ``s`` and the character tokenizer (eval mode, on ``device``)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastrl.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=s.vocab or len(tok),
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.inter,
        max_position_embeddings=max(512, s.prompt_len + s.new_tokens),
        tie_word_embeddings=s.tied,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=s.dtype)
    return model.to(device).eval(), tok


def stop_ids(vocab: int, eos: int, *, early: bool) -> list[int]:
    """The stop set S of the ``early stops`` case: EOS plus the highest ids, ``round(V / 100)`` in all."""
    if not early:
        return []
    m = max(1, round(vocab / 100))
    return sorted({eos} | set(range(vocab - m + 1, vocab)))[:m] if m > 1 else [eos]


def _useful_tokens(rows: list[list[int]], stops: set[int]) -> int:
    """Tokens per row up to and including the first stop id (``generate`` pads after it)."""
    total = 0
    for row in rows:
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        total += end
    return total


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rss_reset() -> int | None:
    """Reset the resident-set high-water mark to the current RSS (Linux); that RSS in KiB, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except (OSError, StopIteration):
        return None


class _Timed:
    """A harness step that also times each call and counts its tokens; ``report()`` gives tokens/s of the
    timed calls (the last ``repeats``), the ratio to the baseline and the decode step's time."""

    def __init__(
        self, run, device, *, repeats: int, case: str, baseline: bool, new_tokens: int, one_token, floor_ms
    ):
        self.run, self.device, self.repeats, self.case = run, device, repeats, case
        self.baseline, self.new_tokens = baseline, new_tokens
        self.one_token, self.floor_ms = one_token, floor_ms
        self.calls: list[tuple[int, float]] = []

    def __call__(self) -> None:
        synchronize(self.device)
        base = _rss_reset() if self.device.type == "cpu" else None
        threads = torch.get_num_threads()
        if (
            self.device.type == "cpu"
        ):  # as grpo_step: oversubscribed threads on a shared CPU made runs erratic
            torch.set_num_threads(1)
        try:
            t0 = time.perf_counter()
            tokens = self.run()
            synchronize(self.device)
        finally:
            torch.set_num_threads(threads)
        self.calls.append((tokens, time.perf_counter() - t0))
        if base is not None:
            self.peak_mib = max(getattr(self, "peak_mib", 0.0), (_status_kib("VmHWM") - base) / 1024)

    def report(self) -> dict[str, Any]:
        timed = self.calls[-self.repeats :]
        tps = statistics.median(n / s for n, s in timed)
        tokens = statistics.median(n for n, _ in timed)
        note = [f"{tps:,.0f} tokens/s", f"{tokens:,.0f} tokens/call"]
        if self.baseline:
            _BASELINE_TPS[self.case] = tps
        elif self.case in _BASELINE_TPS:
            note.append(f"{tps / _BASELINE_TPS[self.case]:.2f}x generate's tokens/s")
        if self.one_token is not None and self.floor_ms:
            one, threads = [], torch.get_num_threads()
            if self.device.type == "cpu":
                torch.set_num_threads(1)
            for _ in range(self.repeats):
                synchronize(self.device)
                t0 = time.perf_counter()
                self.one_token()
                synchronize(self.device)
                one.append(time.perf_counter() - t0)
            torch.set_num_threads(threads)
            full = statistics.median(s for _, s in timed)
            step_ms = max(full - statistics.median(one), 0.0) / max(self.new_tokens - 1, 1) * 1e3
            note.append(f"decode step {step_ms:.3g} ms = {step_ms / self.floor_ms:.1f}x weight-read floor")
        out = {"note": "; ".join(note)}
        if getattr(self, "peak_mib", None) is not None:
            out["extra_mib"] = self.peak_mib
        return out


def _generate_method(s: Shape, ctx: BenchContext, case: str, *, early: bool) -> Method:
    def setup(inputs: dict[str, Any]):
        from transformers import GenerationConfig

        model, tok = inputs["model"], inputs["tokenizer"]
        V = model.config.vocab_size
        stops = stop_ids(V, tok.eos_token_id, early=early)
        rows = inputs["rows"]
        batch = tok.pad({"input_ids": rows}, return_tensors="pt").to(ctx.device)

        def config(max_new: int):
            return GenerationConfig(
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                eos_token_id=stops or None, pad_token_id=tok.pad_token_id,
            )  # fmt: skip

        full, one = config(s.new_tokens), config(1)

        def run(cfg=full) -> int:
            with torch.no_grad():
                out = model.generate(**batch, generation_config=cfg)
            return _useful_tokens(out[:, batch["input_ids"].shape[1] :].tolist(), set(stops))

        return _Timed(
            run, ctx.device, repeats=ctx.repeats, case=case, baseline=True, new_tokens=s.new_tokens,
            one_token=(lambda: run(one)) if not early else None, floor_ms=inputs["step_floor_ms"],
        )  # fmt: skip

    return Method(name="transformers generate", setup=setup, kind="baseline")


def _engine_method(s: Shape, ctx: BenchContext, case: str, *, early: bool, name: str, **cfg) -> Method:
    def setup(inputs: dict[str, Any]):
        from fastrl.engine import EngineConfig, SamplingParams
        from fastrl.engine.hf import HFEngine

        if cfg.get("compile") and not ctx.compile:
            raise Skip("torch.compile off (pass --compile; on by default with --gpu)")
        model, tok = inputs["model"], inputs["tokenizer"]
        if cfg.get("dtype") not in (None, "auto") and model.dtype == getattr(torch, cfg["dtype"]):
            raise Skip(f"the model is {cfg['dtype']} already (no weight copy to make)")
        V = model.config.vocab_size
        stops = stop_ids(V, tok.eos_token_id, early=early)
        # No early stop: an EOS id no token can have, and none from the generation config.
        eos = tok.eos_token_id if early else V
        shim = types.SimpleNamespace(eos_token_id=eos, pad_token_id=tok.pad_token_id)
        saved = model.generation_config.eos_token_id
        model.generation_config.eos_token_id = None
        try:
            engine = HFEngine(model, shim, EngineConfig(max_batch_size=len(inputs["rows"]), **cfg))
        finally:
            model.generation_config.eos_token_id = saved
        params = SamplingParams(max_new_tokens=s.new_tokens, temperature=1.0, stop_token_ids=stops)
        one = dataclasses.replace(params, max_new_tokens=1)

        def run(p=params) -> int:
            out = engine.generate(inputs["rows"], p)
            return sum(len(c) for c in out.completion_ids)

        return _Timed(
            run, ctx.device, repeats=ctx.repeats, case=case, baseline=False, new_tokens=s.new_tokens,
            one_token=(lambda: run(one)) if not early else None, floor_ms=inputs["step_floor_ms"],
        )  # fmt: skip

    return Method(name=name, setup=setup, kind="fastrl" if not cfg else "method")


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    s = shape(ctx)
    holder: dict[str, Any] = {}

    def make_inputs() -> dict[str, Any]:
        if "model" not in holder:  # one model for both cases
            import random
            import string

            model, tok = build_model(s, ctx.device, seed=ctx.seed)
            rng = random.Random(ctx.seed)
            prompts = [tok("".join(rng.choices(string.ascii_letters, k=s.prompt_len)))["input_ids"]
                       for _ in range(s.prompts)]  # fmt: skip
            n_params = sum(p.numel() for p in model.parameters())
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            holder.update(
                model=model, tokenizer=tok, rows=[p for p in prompts for _ in range(s.generations)],
                step_floor_ms=ceil.memory_ms(weight_bytes), n_params=n_params,
            )  # fmt: skip
        return dict(holder)

    vocab = s.vocab or 102
    n_weights = _param_bytes(s, vocab)
    label = (
        f"{'Qwen2-0.5B arch' if ctx.gpu_shapes else 'Qwen2'} (H={s.hidden}, L={s.layers}, V={vocab}), "
        f"{s.prompts}x{s.generations}, P={s.prompt_len} new={s.new_tokens}"
    )
    cases = []
    for early in (False, True):
        name = f"{label}, {'early stops' if early else 'no early stop'}"
        methods = [
            _generate_method(s, ctx, name, early=early),
            _engine_method(s, ctx, name, early=early, name="hf engine (dynamic cache)"),
            _engine_method(s, ctx, name, early=early, name="hf engine (static cache)", use_static_cache=True),
            _engine_method(s, ctx, name, early=early, name="hf engine (bf16 weight copy)", dtype="bfloat16"),
            _engine_method(
                s,
                ctx,
                name,
                early=early,
                name="hf engine (static cache, compiled)",
                use_static_cache=True,
                compile=True,
            ),  # fmt: skip
        ]
        floor = ceil.memory_ms(n_weights) * s.new_tokens
        cases.append(
            Case(
                suite="generate",
                name=name,
                shape={
                    "prompts": s.prompts,
                    "G": s.generations,
                    "P": s.prompt_len,
                    "new": s.new_tokens,
                    "H": s.hidden,
                    "L": s.layers,
                    "V": vocab,
                },  # fmt: skip
                make_inputs=make_inputs,
                methods=methods,
                # CPU: the profiler's event replay is far too slow for whole generate calls; the step
                # reports the resident-set growth instead (see the module docstring).
                measure_memory=ctx.device.type == "cuda",
                floor_ms=None if early else floor,
                floor_note=f"{s.new_tokens} decode steps x {n_weights / 2**20:,.0f} MiB of weights read once",
            )
        )
    return cases


def _param_bytes(s: Shape, vocab: int) -> int:
    """Weight bytes of the Qwen2 of shape ``s`` (embedding, layers, norm, untied lm_head)."""
    head_dim = s.hidden // s.heads
    attn = s.hidden * s.hidden * 2 + s.hidden * s.kv_heads * head_dim * 2  # q, o; k, v
    attn += s.hidden + 2 * s.kv_heads * head_dim  # q, k, v biases
    mlp = 3 * s.hidden * s.inter
    per_layer = attn + mlp + 2 * s.hidden
    n = vocab * s.hidden * (1 if s.tied else 2) + s.layers * per_layer + s.hidden
    return n * (2 if s.dtype in (torch.bfloat16, torch.float16) else 4)
