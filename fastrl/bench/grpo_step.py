"""Suite ``grpo_step``: one whole GRPO training step (generation, rewards, loss, backward, AdamW) of fastrl
and of TRL's ``GRPOTrainer`` on the same saved model, prompts, batch and lengths; tokens/s and peak memory.

Setup. One random-init model is saved once (``save_tiny``) and every method loads it from that directory.
``--gpu``: ANCHORS.md's Qwen2-0.5B architecture (V=151936, tied embeddings), fp32 weights under bf16
autocast (TRL's default recipe, ``bf16=True``; ANCHORS.md's 10.0 GiB peak with Liger implies it: fp32
weights, gradients and AdamW states are 7.9 GB of it), 2 prompts x 8 generations, 64 prompt and 256
completion tokens. CPU: a tiny Qwen2 (H=64, 2 layers, V=4096), fp32, no autocast, 2 x 8, 32 + 64 tokens.
Prompts are random strings of P characters of the character tokenizer, so exactly P tokens.
The reward is constant; beta=0; loss ``dapo`` (TRL's default); temperature 1; lr 1e-6.

Fixed lengths. TRL gets ``min_new_tokens = max_completion_length`` (its EOS logit is masked until then).
fastrl's engine has no such option, so the model's vocabulary (4096 CPU, 151936 GPU) is much larger than
the character tokenizer's 102 tokens: a random-init model samples EOS with probability about 1/V per token,
so nearly every completion runs to the limit. Tokens are counted, not assumed: the reward function adds
``P + len(completion_ids[i])`` for every completion it sees, so tokens/s is exact either way.

Isolation and timing. Each method runs in its own spawned process, the trainer's real loop (``run_grpo``,
``GRPOTrainer.train``) gated at every optimizer step by a global optimizer post-hook: the worker
synchronises, reports the step's tokens and its peak memory, and waits for the next "go". The harness
times each "go" -> "done" round trip, which is exactly one step (the IPC is microseconds); step 1 (setup,
compilation) is warmup. tokens/s = median over the timed steps of tokens / seconds.

Peak memory (worker-side, so methods never mix): on a GPU ``torch.cuda.max_memory_allocated`` over the
whole run (weights, optimizer, generation and training included); on the CPU the growth of the resident
set: ``VmHWM`` (reset through ``/proc/self/clear_refs`` after the imports) minus ``VmRSS`` at that point.
The harness itself cannot see another process's memory; the step carries ``report()`` with
``extra_mib`` and a tokens/s note, which ``python -m fastrl.bench.grpo_step`` writes into the rows.

A real model: ``python -m fastrl.bench.grpo_step --model PATH [--gguf-file F]`` runs the same two trainers
on a local Hugging Face folder (or the safetensors folder a GGUF file is dequantised to, once, by
``fastrl.models.gguf``; both trainers then load that folder), with chat prompts (arithmetic questions in
the model's own chat template, through its real tokenizer), ``--prompts`` x ``--generations`` completions
of at most ``--max-new-tokens``, fp32, temperature 1, beta 0. Both trainers stop at EOS (no
``min_new_tokens``: fastrl's engine has none), so the token count is what each actually generated, and
only completion tokens count (tokens/s = completion tokens / step seconds). fastrl's step is also split
into its parts, timed in the worker: ``generate`` (the engine), ``rollout_other`` (the rest of the rollout:
decoding, rewards, advantages, collation), ``logprob_passes`` (old / reference log-prob passes of the
rollout: none at beta 0 with one iteration), ``train_forward_loss`` (the training forward and the fused
loss, which computes the lm_head and hidden-state gradients in its forward), ``backward_other`` (the
backward through the decoder, gradient clipping, the loop) and ``optimizer`` (AdamW, from the
optimizer's pre- to post-hook).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import statistics
import string
import tempfile
import time
from typing import Any

from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Method, Skip

MiB = 2**20
STEP_TIMEOUT_S = 900.0
RESULTS: dict[tuple[str, str], dict[str, Any]] = {}  # (case, method) -> the last report, for main()
REAL_MODEL: dict[str, Any] = {}  # set by main() for --model: {"model_dir", "prompts", "sizes"}
# the exclusive parts of fastrl's step (module docstring)
PART_KEYS = (
    "generate", "rollout_other", "logprob_passes", "train_forward_loss", "backward_other", "optimizer",
)  # fmt: skip
# What one timed run of every grpo_step case is (the report prints it under the case).
STEP_TIMED = "one whole GRPO step (generation, rewards, loss, backward, AdamW); extra MiB: worker peak"


def sizes(ctx: BenchContext) -> dict[str, Any]:
    """Model architecture and step shape of this context (see the module docstring)."""
    if ctx.gpu_shapes:  # Qwen2-0.5B
        model = dict(hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, vocab=151936, tied=True)
        return dict(model=model, prompts=2, generations=8, prompt_len=64, completion_len=256, bf16=True)
    model = dict(hidden=64, layers=2, heads=1, kv_heads=1, inter=128, vocab=4096, tied=False)
    if ctx.quick:
        return dict(model=model, prompts=2, generations=4, prompt_len=8, completion_len=8, bf16=False)
    return dict(model=model, prompts=2, generations=8, prompt_len=32, completion_len=64, bf16=False)


def save_model(directory: str, s: dict[str, Any], *, seed: int) -> str:
    """Random-init Qwen2 of ``s["model"]`` (fp32 weights) with the character tokenizer, saved in HF format."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastrl.models.tiny import build_char_tokenizer, save_tiny

    tok = build_char_tokenizer()
    m = s["model"]
    config = Qwen2Config(
        vocab_size=m["vocab"],
        hidden_size=m["hidden"],
        num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"],
        intermediate_size=m["inter"],
        max_position_embeddings=max(512, s["prompt_len"] + s["completion_len"]),
        tie_word_embeddings=m["tied"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    return str(save_tiny(directory, model=model, tokenizer=tok))


def chat_prompts(n: int, *, seed: int) -> list[list[dict]]:
    """Arithmetic questions as one-turn chats (the trainers apply the tokenizer's chat template)."""
    rng = random.Random(seed)
    return [
        [
            {
                "role": "user",
                "content": f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Explain briefly.",
            }
        ]
        for _ in range(n)
    ]


def real_model_dir(path: str, gguf_file: str | None) -> str:
    """``path`` itself, or the dequantised safetensors folder of ``path/gguf_file`` (cached)."""
    if not gguf_file:
        if not os.path.isdir(path):
            raise ValueError(f"--model: {path!r} is not a folder")
        return path
    from fastrl.models import ModelConfig
    from fastrl.models.gguf import gguf_source

    return gguf_source(ModelConfig(name_or_path=path, gguf_file=gguf_file)).name_or_path


def prompts(n: int, length: int, *, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_letters, k=length)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# the worker process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _Memory:
    """Peak memory since construction: CUDA max allocated, or the resident-set growth on the CPU."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda = cuda
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0), so import-time peaks do not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.base_kib = _status_kib("VmRSS")

    def peak_mib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MiB
        return max(0, _status_kib("VmHWM") - self.base_kib) / 1024


def _fastrl_runner(spec: dict, reward, out_dir: str):
    from fastrl.data import DataConfig
    from fastrl.engine import EngineConfig
    from fastrl.losses.grpo_config import GRPOLossConfig
    from fastrl.models import ModelConfig
    from fastrl.trainers.core import OptimConfig, TrainConfig
    from fastrl.trainers.grpo import GRPOConfig, GRPORunConfig, run_grpo

    s = spec["sizes"]
    cfg = GRPORunConfig(
        model=ModelConfig(name_or_path=spec["model_dir"], torch_dtype="float32"),
        data=DataConfig(max_prompt_length=s.get("max_prompt_len", s["prompt_len"])),
        optim=OptimConfig(lr=1e-6, schedule="constant"),
        train=TrainConfig(
            output_dir=out_dir,
            max_steps=10_000,  # never reached: the parent stops the worker
            per_device_batch_size=s["prompts"] * s["generations"],
            device=spec["device"],
            bf16=s["bf16"],
            progress_bar=False,
            export_final=False,
            seed=spec["seed"],
        ),
        grpo=GRPOConfig(num_generations=s["generations"], max_completion_length=s["completion_len"]),
        loss=GRPOLossConfig(loss_type="dapo", beta=0.0),
        engine=EngineConfig(
            use_static_cache=spec["compile"], compile=spec["compile"], dtype=spec.get("engine_dtype", "auto")
        ),
    )
    data = [{"prompt": p} for p in spec["prompts"]]
    return lambda: run_grpo(cfg, dataset=data, reward_funcs=[reward])


def _trl_runner(spec: dict, reward, out_dir: str):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    s = spec["sizes"]
    args = GRPOConfig(
        output_dir=out_dir,
        max_steps=10_000,
        per_device_train_batch_size=s["prompts"] * s["generations"],
        gradient_accumulation_steps=1,
        num_generations=s["generations"],
        max_completion_length=s["completion_len"],
        generation_kwargs={"min_new_tokens": s["completion_len"]} if s.get("fixed_length", True) else None,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        bf16=s["bf16"],
        use_cpu=spec["device"] == "cpu",
        use_liger_kernel=spec["liger"],
        model_init_kwargs={"dtype": "float32"},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
    )
    data = datasets.Dataset.from_list([{"prompt": p} for p in spec["prompts"]])
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[reward], args=args, train_dataset=data)
    return trainer.train


def _time_fastrl_parts(parts: dict[str, float], cuda: bool) -> None:
    """Accumulate the seconds spent in the engine's ``generate``, the rollout's log-prob passes, the whole
    rollout (``_rollout``) and the whole micro-step (``_micro_step``: rollout plus the training forward
    and fused loss); ``_split_parts`` turns them into exclusive parts."""
    import torch

    import fastrl.trainers.grpo as grpo
    import fastrl.trainers.rollout as rollout
    from fastrl.engine.base import Engine

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                parts[key] = parts.get(key, 0.0) + time.perf_counter() - t0

        return wrapper

    rollout.completion_logps = timed(rollout.completion_logps, "logprob_passes")
    grpo.make_rollout = timed(grpo.make_rollout, "_rollout")
    grpo.GRPOStep.micro_step = timed(grpo.GRPOStep.micro_step, "_micro_step")
    for cls in _engine_classes(Engine):
        if "generate" in vars(cls):
            cls.generate = timed(cls.generate, "generate")


def _split_parts(parts: dict[str, float], step_s: float) -> dict[str, float]:
    """The exclusive ``PART_KEYS`` seconds of one step from the accumulated (nested) timings."""
    out = {k: parts.get(k, 0.0) for k in ("generate", "logprob_passes", "optimizer")}
    out["rollout_other"] = max(0.0, parts.get("_rollout", 0.0) - out["generate"] - out["logprob_passes"])
    out["train_forward_loss"] = max(0.0, parts.get("_micro_step", 0.0) - parts.get("_rollout", 0.0))
    out["backward_other"] = max(0.0, step_s - sum(out.values()))
    return {k: out[k] for k in PART_KEYS}


def _engine_classes(base) -> list[type]:
    import fastrl.engine.hf  # noqa: F401  (registers the hf engine class)

    out, todo = [], [base]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


class _Stop(BaseException):  # noqa: N818 (a signal; BaseException so the trainers' handlers let it pass)
    """Raised inside the trainer's loop when the parent has taken all the steps it wants."""


def _wait_go(conn) -> None:
    msg = conn.recv() if conn.poll(STEP_TIMEOUT_S) else "stop"
    if msg != "go":
        raise _Stop


def _worker(conn, spec: dict) -> None:
    """Body of the spawned process: build the trainer, then run its loop one gated step at a time."""
    try:
        import torch
        import torch.optim.optimizer as optim_mod

        torch.set_num_threads(spec["threads"])  # the same for every method

        if not spec.get("verbose"):  # the trainers' logs would interleave with the parent's table
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        # Import what the run will use before the memory baseline, so that code is not counted as memory.
        import transformers.models.qwen2.modeling_qwen2  # noqa: F401

        if spec["method"] == "trl":
            try:  # only a missing peer is a "skipped" row; any other ImportError later is a failure
                import datasets  # noqa: F401
                from trl import GRPOTrainer  # noqa: F401

                if spec["liger"]:
                    import liger_kernel  # noqa: F401
            except ImportError as err:
                conn.send(("skip", f"{getattr(err, 'name', None) or err} not importable"))
                return
            runner_of = _trl_runner
        else:
            import fastrl.engine.hf  # noqa: F401
            import fastrl.losses.fused_grpo  # noqa: F401
            import fastrl.ops.linear_logprobs  # noqa: F401
            import fastrl.trainers.grpo  # noqa: F401

            runner_of = _fastrl_runner
        memory = _Memory(spec["device"] == "cuda")
        prompt_len, state = spec["sizes"]["prompt_len"], {"tokens": 0}
        parts: dict[str, float] = {}
        clock = {"go": time.perf_counter(), "opt": 0.0}
        if spec["method"] == "fastrl":
            _time_fastrl_parts(parts, spec["device"] == "cuda")

        def before_optimizer_step(optimizer, args, kwargs) -> None:
            clock["opt"] = time.perf_counter()

        def constant_reward(prompts=None, completions=None, completion_ids=None, **_):
            state["tokens"] += sum(prompt_len + len(c) for c in completion_ids)
            return [1.0] * len(completion_ids)

        def after_optimizer_step(optimizer, args, kwargs) -> None:
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            parts["optimizer"] = now - clock["opt"]
            step = {"tokens": state["tokens"], "peak_mib": memory.peak_mib()}
            if spec["method"] == "fastrl":
                step["parts"] = _split_parts(parts, now - clock["go"])
            conn.send(("step", step))
            state["tokens"] = 0
            _wait_go(conn)
            parts.clear()
            clock["go"] = time.perf_counter()

        with tempfile.TemporaryDirectory() as out_dir:
            run = runner_of(spec, constant_reward, out_dir)
            optim_mod.register_optimizer_step_pre_hook(before_optimizer_step)
            optim_mod.register_optimizer_step_post_hook(after_optimizer_step)
            conn.send(("ready", None))
            _wait_go(conn)
            clock["go"] = time.perf_counter()
            run()
        conn.send(("error", "the trainer finished before the benchmark stopped it"))
    except _Stop:
        return
    except BaseException as err:  # reported to the parent, which turns it into a "fails" row
        text = str(err).strip().splitlines()
        conn.send(("error", f"{type(err).__name__}: {text[0] if text else ''}"[:300]))


# ---------------------------------------------------------------------------------------------------------
# the parent side: one worker per method, stepped by the harness


class WorkerStep:
    """A harness step: each call runs one GRPO step in the worker process and waits for it to finish."""

    def __init__(self, spec: dict, *, warmup: int, key: tuple[str, str]):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, spec), name=f"grpo_step-{spec['method']}")
        self.proc.start()
        child.close()
        self.warmup, self.key, self.steps = warmup, key, []
        kind, data = self._recv()
        if kind == "skip":
            self.close()
            raise Skip(data)
        if kind != "ready":
            self.close()
            raise RuntimeError(data)

    def _recv(self) -> tuple[str, Any]:
        if not self.conn.poll(STEP_TIMEOUT_S):
            raise TimeoutError(f"the worker gave no answer in {STEP_TIMEOUT_S:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the worker died (exit code {self.proc.exitcode})") from None

    def __call__(self) -> None:
        t0 = time.perf_counter()
        self.conn.send("go")
        kind, data = self._recv()
        if kind != "step":
            raise RuntimeError(data)
        self.steps.append({**data, "s": time.perf_counter() - t0})
        RESULTS[self.key] = self.report()

    def report(self) -> dict[str, Any]:
        """Row fields the harness cannot measure across processes: peak memory and tokens/s."""
        timed = self.steps[self.warmup :] or self.steps
        tps = statistics.median(st["tokens"] / st["s"] for st in timed)
        tokens = statistics.median(st["tokens"] for st in timed)
        peak = max(st["peak_mib"] for st in self.steps)
        parts = None
        if all("parts" in st for st in timed):
            parts = {k: statistics.median(st["parts"][k] for st in timed) for k in PART_KEYS}
        return {
            "parts_s": parts,
            "extra_mib": peak,
            "tokens_per_s": tps,
            "tokens_per_step": tokens,
            "note": f"{tps:,.0f} tokens/s; {tokens:,.0f} tokens/step; peak {peak / 1024:,.2f} GiB",
        }

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send("stop")
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.conn.close()

    def __del__(self):
        if getattr(self, "proc", None) is not None and not self.conn.closed:
            self.close()


def _method(name: str, kind: str, spec: dict, ctx: BenchContext, case_name: str, note: str = "") -> Method:
    def setup(inputs: dict[str, Any]):
        needed = []
        if spec["method"] == "trl":
            needed = ["trl", "liger_kernel"] if spec["liger"] else ["trl"]
        for module in needed:  # checked here too, so no worker starts for nothing
            if importlib.util.find_spec(module) is None:
                raise Skip(f"{module} not importable (pip install 'fastrl[bench]')")
        full = {**spec, "model_dir": inputs["model_dir"], "prompts": inputs["prompts"]}
        return WorkerStep(full, warmup=ctx.warmup, key=(case_name, name))

    return Method(name=name, setup=setup, kind=kind, note=note)


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    if REAL_MODEL:
        return [_real_model_case(ctx)]
    s = sizes(ctx)
    if ctx.device.type == "cuda" and not s["bf16"]:
        s = {**s, "bf16": True}
    m = s["model"]
    name = (
        f"{'Qwen2-0.5B arch' if ctx.gpu_shapes else 'tiny Qwen2'} (H={m['hidden']}, L={m['layers']}, "
        f"V={m['vocab']}), {s['prompts']}x{s['generations']}, P={s['prompt_len']} C={s['completion_len']}"
    )
    import torch

    base = dict(
        sizes=s,
        device=ctx.device.type,
        seed=ctx.seed,
        compile=False,
        liger=False,
        # One intra-op thread on the CPU: the tiny model gains nothing from more, and on a shared machine
        # oversubscribed threads made steps up to 10x slower and the ratios noisy.
        threads=1 if ctx.device.type == "cpu" else torch.get_num_threads(),
        verbose=bool(os.environ.get("FASTRL_BENCH_VERBOSE")),
    )
    liger = importlib.util.find_spec("liger_kernel") is not None
    methods = [_method("fastrl (hf engine)", "fastrl", {**base, "method": "fastrl"}, ctx, name)]
    if ctx.device.type == "cuda":
        spec = {**base, "method": "fastrl", "compile": True}
        methods.append(_method("fastrl (static cache, compiled decode)", "method", spec, ctx, name))
    methods.append(
        _method("TRL GRPOTrainer", "peer" if liger else "baseline", {**base, "method": "trl"}, ctx, name)
    )
    if liger:
        spec = {**base, "method": "trl", "liger": True}
        methods.append(_method("TRL GRPOTrainer, use_liger_kernel", "baseline", spec, ctx, name))
    holder: dict[str, Any] = {}

    def make_inputs() -> dict[str, Any]:
        holder["dir"] = tempfile.TemporaryDirectory(prefix="fastrl-grpo-step-")  # lives with the case
        model_dir = save_model(os.path.join(holder["dir"].name, "model"), s, seed=ctx.seed)
        return {
            "model_dir": model_dir,
            "prompts": prompts(64, s["prompt_len"], seed=ctx.seed),
            "_keep": holder,
        }

    shape = {k: s[k] for k in ("prompts", "generations", "prompt_len", "completion_len")} | {"V": m["vocab"]}
    return [
        Case(
            suite="grpo_step",
            name=name,
            shape=shape,
            make_inputs=make_inputs,
            methods=methods,
            measure_memory=False,  # in the worker, see the module docstring
            timed=STEP_TIMED,
        )
    ]


def _base_spec(ctx: BenchContext, s: dict[str, Any], threads: int) -> dict[str, Any]:
    return dict(
        sizes=s, device=ctx.device.type, seed=ctx.seed, compile=False, liger=False, threads=threads,
        verbose=bool(os.environ.get("FASTRL_BENCH_VERBOSE")),
    )  # fmt: skip


def _real_model_case(ctx: BenchContext) -> Case:
    """fastrl and TRL on ``REAL_MODEL``'s folder and chat prompts (module docstring)."""
    import torch

    s = REAL_MODEL["sizes"]
    # A real model's matrices use every core: both trainers get all of this process's threads.
    base = {
        **_base_spec(ctx, s, torch.get_num_threads()),
        "engine_dtype": REAL_MODEL.get("engine_dtype", "auto"),
    }
    engine = "hf engine" + (f", {base['engine_dtype']} weights" if base["engine_dtype"] != "auto" else "")
    name = (
        f"{os.path.basename(os.path.normpath(REAL_MODEL['model_dir']))}: {s['prompts']}x{s['generations']} "
        f"chat prompts, <= {s['completion_len']} new tokens"
    )
    methods = [
        _method(f"fastrl ({engine})", "fastrl", {**base, "method": "fastrl"}, ctx, name),
        _method("TRL GRPOTrainer", "baseline", {**base, "method": "trl"}, ctx, name),
    ]
    inputs = {"model_dir": REAL_MODEL["model_dir"], "prompts": REAL_MODEL["prompts"]}
    shape = {k: s[k] for k in ("prompts", "generations", "completion_len")}
    return Case(
        suite="grpo_step", name=name, shape=shape, make_inputs=lambda: dict(inputs), methods=methods,
        measure_memory=False, timed=STEP_TIMED,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m fastrl.bench.grpo_step [--gpu] [--out DIR] [--model PATH [--gguf-file F]]``: this suite
    alone, with the worker-side peak memory and tokens/s written into the rows; warmup 1 and 3 timed steps
    (steps 2-4) unless given. ``--model``: a real local model instead of the random-init one."""
    from pathlib import Path

    from fastrl.bench import report, runner

    p = runner.parser()
    p.add_argument("--model", default=None, help="a local Hugging Face folder (or the folder of --gguf-file)")
    p.add_argument("--gguf-file", default=None, help="a .gguf file in --model, dequantised once (cached)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (--model)")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (--model)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="most new tokens per completion (--model)")
    p.add_argument(
        "--engine-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="fastrl's hf engine weights (--model): auto = the model's; another dtype = a weight copy",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = 3 if args.repeats is None else args.repeats
    ctx = runner.context_from_args(args)
    module = importlib.import_module("fastrl.bench.grpo_step")  # the registry's copy, not __main__'s
    module.REAL_MODEL.clear()
    if args.gguf_file and not args.model:
        raise ValueError("--gguf-file needs --model (the folder that holds it)")
    if args.model:
        for key in ("prompts", "generations", "max_new_tokens"):
            if getattr(args, key) < 1 or (key == "generations" and args.generations < 2):
                raise ValueError(f"--{key.replace('_', '-')} must be >= {2 if key == 'generations' else 1}")
        s = dict(
            prompts=args.prompts,
            generations=args.generations,
            prompt_len=0,
            completion_len=args.max_new_tokens,
            bf16=ctx.device.type == "cuda",
            fixed_length=False,
        )  # fmt: skip; prompt_len 0: only completion tokens are counted
        module.REAL_MODEL.update(
            model_dir=real_model_dir(args.model, args.gguf_file),
            prompts=chat_prompts(64, seed=args.seed),
            sizes={**s, "max_prompt_len": 256},
            engine_dtype=args.engine_dtype,
        )
    payload = runner.run(ctx, ["grpo_step"], progress=not args.no_progress)
    results = module.RESULTS
    parts_lines = []
    for rec in payload["cases"]:
        for row in rec["rows"]:
            got = results.get((rec["case"], row["method"]))
            if got is not None and row["status"] == "ok":
                # extra_mib and the tokens/s note arrive through the harness (WorkerStep.report)
                row["tokens_per_s"] = got["tokens_per_s"]
                row["tokens_per_step"] = got["tokens_per_step"]
                if got.get("parts_s"):
                    row["parts_s"] = got["parts_s"]
                    parts_lines.append(format_parts(rec["case"], row["method"], got["parts_s"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", payload)
    table = report.markdown(payload)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    if not args.no_plot:
        report.plot(out / "results.png", payload)
    if parts_lines:
        table += "\n\n" + "\n".join(parts_lines)
        (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


def format_parts(case: str, method: str, parts: dict[str, float]) -> str:
    """One markdown line: the median seconds of each part of the step and its share."""
    total = sum(parts.values()) or 1.0
    cells = ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in parts.items())
    return f"- {method}, {case}: step {total:.2f} s = {cells}"


if __name__ == "__main__":
    raise SystemExit(importlib.import_module("fastrl.bench.grpo_step").main())
