"""Suite ``sync``: trainer -> engine weight sync, one call per parameter against flat buckets.

Parameter sets are shaped like Qwen2 checkpoints (names, dtypes and shapes of every tensor; random
values): on the CPU a 135M-parameter one (SmolLM-135M's sizes in Qwen2's layout: 30 layers, hidden 576,
tied embeddings; 362 tensors, 269 MB in bf16), with ``--gpu`` Qwen2.5-1.5B and Qwen2.5-7B in bf16.
Each method moves every tensor of the trainer's set into an engine's own parameter set:

- ``flat copy`` (baseline): one ``copy_`` of all the bytes, buffer to buffer: the memory-bandwidth floor
  (device to device with ``--gpu``).
- ``in-process per-parameter``: ``engine[name].copy_(trainer[name])`` per tensor (a colocated engine
  that loads tensor by tensor).
- ``in-process bucketed``: :class:`fastrl.engine.sync.WeightSyncer` packing into a local buffer, the
  engine unpacking views and copying out (two copies of every byte).
- ``separate process per-parameter``: one pipe message per tensor with the tensor pickled into it (what
  an RPC such as vLLM's ``collective_rpc`` does with tensor arguments), copied into the receiver's set,
  acknowledged.
- ``separate process bucketed``: the WeightSyncer through a buffer shared once with a
  :class:`fastrl.engine.sync.receiver.ReceiverProcess` (``/dev/shm`` on the CPU, CUDA IPC with ``--gpu``);
  one small message (the bucket's slot list) and one ack per bucket.

The note gives the effective bandwidth (bytes of the set / time) and the per-tensor overhead over the
flat copy ((ms - flat ms) / tensors). Copies run on one CPU thread on each side (the receiver's too): on
a loaded 2-core machine multi-threaded copies are erratic (a 1 MB copy took 23 ms with 2 threads and
0.04 ms with one). Times are medians of ``repeats`` syncs after ``warmup``; on a shared
machine they are noisy, so compare rows of one run only.
"""

from __future__ import annotations

import statistics
import time

import torch

from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext, Case, Method, Skip

MiB = 2**20

# Qwen2 layout: q/k/v projections with bias, no o_proj bias; head_dim = hidden / heads.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden=64, layers=2, inter=128, heads=1, kv=1, vocab=1000, tied=False),
    "qwen2-135m": dict(hidden=576, layers=30, inter=1536, heads=9, kv=3, vocab=49152, tied=True),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, inter=8960, heads=12, kv=2, vocab=151936, tied=True),
    "qwen2.5-7b": dict(hidden=3584, layers=28, inter=18944, heads=28, kv=4, vocab=152064, tied=False),
}


def qwen2_specs(shape: dict, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(hf_name, dtype, shape)`` of every parameter of a Qwen2 checkpoint with these sizes, in the
    order ``iter_sync_weights`` yields a transformers ``Qwen2ForCausalLM``'s."""
    h, i, v = shape["hidden"], shape["inter"], shape["vocab"]
    d = h // shape["heads"]
    kv = shape["kv"] * d
    out = [("model.embed_tokens.weight", dtype, (v, h))]
    for n in range(shape["layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", dtype, (h, h)),
            (p + "self_attn.q_proj.bias", dtype, (h,)),
            (p + "self_attn.k_proj.weight", dtype, (kv, h)),
            (p + "self_attn.k_proj.bias", dtype, (kv,)),
            (p + "self_attn.v_proj.weight", dtype, (kv, h)),
            (p + "self_attn.v_proj.bias", dtype, (kv,)),
            (p + "self_attn.o_proj.weight", dtype, (h, h)),
            (p + "mlp.gate_proj.weight", dtype, (i, h)),
            (p + "mlp.up_proj.weight", dtype, (i, h)),
            (p + "mlp.down_proj.weight", dtype, (h, i)),
            (p + "input_layernorm.weight", dtype, (h,)),
            (p + "post_attention_layernorm.weight", dtype, (h,)),
        ]
    out.append(("model.norm.weight", dtype, (h,)))
    if not shape["tied"]:
        out.append(("lm_head.weight", dtype, (v, h)))
    return out


def _size(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // 1024} KiB"


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def flat_params(specs, device, *, seed: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One flat allocation holding every tensor of ``specs`` back to back, and the named views into it.
    Random values (``seed``) or zeros (``None``)."""
    dtype = specs[0][1]
    flat = torch.empty(sum(numel(s) for _, _, s in specs), dtype=dtype, device=device)
    if seed is None:
        flat.zero_()
    else:
        g = torch.Generator(device=device).manual_seed(seed)
        for start in range(0, flat.numel(), 1 << 26):  # chunks: no fp32 copy of a 7B set
            chunk = flat[start : start + (1 << 26)]
            chunk.copy_(torch.randn(chunk.shape, generator=g, device=device, dtype=torch.float32))
    views, offset = {}, 0
    for name, _, shape in specs:
        views[name] = flat[offset : offset + numel(shape)].view(shape)
        offset += numel(shape)
    return flat, views


class _Timed:
    """A step that records its own wall times, and reports bandwidth and per-tensor overhead."""

    def __init__(self, fn, inputs, *, key: str, device, cleanup=None, skip: int = 1):
        self.fn, self.inputs, self.key, self.device, self.cleanup = fn, inputs, key, device, cleanup
        self.skip = skip  # warm-up runs, not timed
        self.times: list[float] = []

    def __call__(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the receiver process: one copy thread per side, whatever the load
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times.append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)

    def report(self) -> dict:
        if self.cleanup is not None:
            self.cleanup()
        seconds = statistics.median(self.times[self.skip :] or self.times)
        self.inputs["_seconds"][self.key] = seconds
        nbytes, n = self.inputs["nbytes"], self.inputs["n_tensors"]
        note = f"{nbytes / seconds / 1e9:.2f} GB/s"
        flat = self.inputs["_seconds"].get("flat")
        if flat is not None and self.key != "flat":
            note += f"; {(seconds - flat) / n * 1e6:.1f} us/tensor over the flat copy; "
            note += f"{flat / seconds:.0%} of its bandwidth"
        return {"note": note}


def _flat(ctx):
    def setup(inputs):
        src, dst = inputs["src_flat"], inputs["engine_flat"]
        return _Timed(lambda: dst.copy_(src), inputs, key="flat", device=ctx.device, skip=ctx.warmup)

    where = "device-to-device" if ctx.device.type == "cuda" else "memcpy"
    return Method(name=f"flat copy ({where}, 1 call)", setup=setup, kind="baseline")


def _in_process_per_param(ctx):
    def setup(inputs):
        src, dst = inputs["src"], inputs["engine"]

        def run():
            for name, t in src.items():
                dst[name].copy_(t)

        return _Timed(run, inputs, key="inproc_param", device=ctx.device, skip=ctx.warmup)

    return Method(name="in-process per-parameter (copy_ per tensor)", setup=setup)


def _in_process_bucketed(ctx, bucket_bytes):
    def setup(inputs):
        from fastrl.engine.sync import WeightSyncer, unpack_bucket

        src, dst, specs = inputs["src"], inputs["engine"], inputs["specs"]

        def send_bucket(bucket):
            for name, view in unpack_bucket(bucket.buffer, bucket.slots):
                dst[name].copy_(view)

        syncer = WeightSyncer(send_bucket, bucket_bytes=bucket_bytes, device=ctx.device)
        return _Timed(
            lambda: syncer.sync_stream(specs, src.items()),
            inputs,
            key="inproc_bucket",
            device=ctx.device,
            cleanup=syncer.close,
            skip=ctx.warmup,
        )

    return Method(name=f"in-process bucketed ({_size(bucket_bytes)})", setup=setup)


def _receiver(ctx, inputs):
    """The case's receiver process, started by the first method that needs one and shared by the rest
    (each start costs seconds); it is killed when the case's inputs are dropped (its finalizer)."""
    from fastrl.engine.sync.receiver import ReceiverProcess

    rx = inputs.get("_receiver")
    if rx is None or rx.proc is None or not rx.proc.is_alive():
        rx = ReceiverProcess(inputs["specs"], timeout_s=120, device=str(ctx.device), threads=1).start()
        inputs["_receiver"] = rx
    return rx


def _process_per_param(ctx):
    def setup(inputs):
        if ctx.device.type == "cuda":
            raise Skip("CPU only (a pickled CUDA tensor per message is a device->host->device copy)")
        # Tensors with storages of their own, as real parameters have: pickling a view of the flat
        # set would serialise the whole storage each time.
        src = {n: t.clone() for n, t in inputs["src"].items()}
        rx = _receiver(ctx, inputs)

        def run():
            for name, t in src.items():
                rx.send_tensor(name, t)

        return _Timed(run, inputs, key="proc_param", device=ctx.device, skip=ctx.warmup)

    return Method(name="separate process per-parameter (pickled tensor per message)", setup=setup)


def _process_bucketed(ctx, bucket_bytes, kind):
    def setup(inputs):
        from fastrl.engine.sync import WeightSyncer

        src, specs = inputs["src"], inputs["specs"]
        rx = _receiver(ctx, inputs)
        syncer = WeightSyncer(
            rx.send_bucket, open_buffer=rx.open_buffer, bucket_bytes=bucket_bytes, device=ctx.device
        )

        cleanup = syncer.close

        key = f"proc_bucket{bucket_bytes}"
        run = lambda: syncer.sync_stream(specs, src.items())  # noqa: E731
        return _Timed(run, inputs, key=key, device=ctx.device, cleanup=cleanup, skip=ctx.warmup)

    how = "CUDA IPC" if ctx.device.type == "cuda" else "/dev/shm"
    return Method(name=f"separate process bucketed ({how}, {_size(bucket_bytes)})", setup=setup, kind=kind)


def sets(ctx: BenchContext) -> list[str]:
    if ctx.quick:
        return ["tiny"]
    if ctx.gpu_shapes:
        return ["qwen2.5-1.5b", "qwen2.5-7b"]
    return ["qwen2-135m"]


def build(ctx: BenchContext, ceil: Ceilings) -> list[Case]:
    return cases_for(ctx, sets(ctx))


def cases_for(ctx: BenchContext, set_names: list[str]) -> list[Case]:
    """One case per parameter set of :data:`SHAPES` (bf16 on CUDA, ``ctx.dtype`` on the CPU)."""
    unknown = [n for n in set_names if n not in SHAPES]
    if unknown:
        raise ValueError(f"unknown parameter sets {unknown}; known: {', '.join(SHAPES)}")
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else ctx.dtype
    cases = []
    for set_name in set_names:
        specs = qwen2_specs(SHAPES[set_name], dtype)
        nbytes = sum(numel(s) * dtype.itemsize for _, _, s in specs)

        def make_inputs(specs=specs, nbytes=nbytes):
            src_flat, src = flat_params(specs, ctx.device, seed=ctx.seed)
            engine_flat, engine = flat_params(specs, ctx.device, seed=None)
            return dict(
                specs=specs,
                src_flat=src_flat,
                src=src,
                engine_flat=engine_flat,
                engine=engine,
                nbytes=nbytes,
                n_tensors=len(specs),
                _seconds={},
            )

        small = 64 * MiB if not ctx.quick else 16 * 2**10
        big = 512 * MiB if not ctx.quick else 64 * 2**10
        methods = [
            _flat(ctx),
            _in_process_per_param(ctx),
            _in_process_bucketed(ctx, big),
            _process_per_param(ctx),
            _process_bucketed(ctx, big, "fastrl"),
        ]
        if not ctx.quick:  # the bucket size's effect (one more receiver start-up: not in smoke tests)
            methods.insert(-1, _process_bucketed(ctx, small, "method"))
        cases.append(
            Case(
                suite="sync",
                name=f"{set_name} {str(dtype).removeprefix('torch.')} ({len(specs)} tensors, "
                f"{nbytes / 1e6:,.0f} MB)",
                shape={"tensors": len(specs), "bytes": nbytes},
                make_inputs=make_inputs,
                methods=methods,
                measure_memory=False,
            )
        )
    return cases
