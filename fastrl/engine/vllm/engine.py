"""``engine.kind: vllm``: a vLLM ``LLM`` driven from the trainer's process.

Two layouts, one weight path:

* colocated (default): vLLM runs inside the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
  under torchrun every rank runs its own engine through vLLM's ``external_launcher`` backend. Each
  bucket's tensors are handed to the worker directly (no shared memory needed).
* ``separate_process=True``: vLLM's engine core runs in its own process (V1 multiprocessing). The
  trainer creates one buffer (a ``/dev/shm`` file on the CPU, CUDA IPC memory on GPUs), the worker maps
  it once (``fastrl_open_buffer``), and every bucket is one ``collective_rpc("fastrl_load_bucket")``
  carrying only the bucket's slot table.

Either way the worker side is ``fastrl.engine.vllm.worker.FastrlWorkerExtension``; the prefix cache is
reset after every update (cached prompts' KV blocks belong to the old weights: measured 8-37 nats of
log-prob error without it). On CUDA with ``enable_sleep_mode``, the engine sleeps after each
``generate`` (level 1: weights offloaded to host memory, KV cache freed) and a sync wakes the weights,
loads, then wakes the KV cache.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
import weakref

import torch

from fastrl.engine.base import Engine, EngineConfig, GenerationOutput, SamplingParams
from fastrl.engine.vllm import common


class VLLMEngine(Engine):
    """vLLM generating with the trainer's weights, synced in buckets after each optimizer step."""

    def __init__(self, model, tokenizer, cfg: EngineConfig):
        common.require_vllm()
        from vllm import LLM

        from fastrl.distributed.env import dist_info, is_distributed
        from fastrl.engine.sync import WeightSyncer

        self.cfg = cfg
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.dtype = common.engine_dtype(cfg, model)
        common.check_engine_dtypes(cfg, self.dtype)
        common.warn_sleep_mode_off(cfg)
        external = is_distributed() and dist_info().world_size > 1
        if external and cfg.separate_process:
            raise ValueError("engine.separate_process is not supported under torchrun (one engine per rank "
                             "runs in the rank's own process through vLLM's external launcher)")  # fmt: skip
        self.sleep_mode = cfg.enable_sleep_mode and common.on_cuda()
        self._asleep = False
        self._dir = common.write_start_checkpoint(model, self.dtype)
        # Removed at close(), or at exit for an engine nobody closed.
        self._dir_finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        try:
            common.set_vllm_env(multiprocessing=cfg.separate_process, cfg=cfg)
            kw = common.engine_kwargs(cfg, str(self._dir), dtype=self.dtype, external_launcher=external)
            started = time.perf_counter()
            self.llm = LLM(**kw)
            self.start_seconds = time.perf_counter() - started
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.known = common.unpack(self._rpc("fastrl_known_weights"))
        device = f"cuda:{torch.cuda.current_device()}" if common.on_cuda() else "cpu"
        self.syncer = WeightSyncer(
            self._send_bucket,
            open_buffer=self._open_buffer if cfg.separate_process else None,
            bucket_bytes=cfg.sync_bucket_mb << 20,
            device=device,
            dtype=self.dtype,
        )
        self.last_sync = None
        self._buffer_key = uuid.uuid4().hex  # this client's buffer in the worker

    # ---- RPC -----------------------------------------------------------------------------------------
    def engine_pid(self) -> int | None:
        """The vLLM engine process's pid (separate_process), else None."""
        resources = getattr(self.llm.llm_engine.engine_core, "resources", None)
        procs = getattr(getattr(resources, "engine_manager", None), "processes", None)
        return procs[0].pid if procs else None

    def _alive(self) -> bool:
        client = self.llm.llm_engine.engine_core
        resources = getattr(client, "resources", None)
        if resources is not None and getattr(resources, "engine_dead", False):
            return False
        procs = getattr(getattr(resources, "engine_manager", None), "processes", None) or []
        return all(p.is_alive() for p in procs)

    def _rpc(self, method: str, *args, timeout_s: float | None = None):
        def call():
            return self.llm.collective_rpc(method, args=args)[0]

        if not self.cfg.separate_process:
            return call()  # same process: nothing to wait for but the work itself
        return common.call_with_deadline(
            call, timeout_s or self.cfg.sync_timeout_s, f"vLLM {method}", alive=self._alive
        )

    # ---- weights -------------------------------------------------------------------------------------
    def _open_buffer(self, handle) -> None:
        self._rpc("fastrl_open_buffer", common.pack((self._buffer_key, handle)))

    def _send_bucket(self, bucket):
        from fastrl.engine.sync import unpack_bucket

        if self.cfg.separate_process:
            return common.unpack(
                self._rpc("fastrl_load_bucket", common.pack((self._buffer_key, bucket.slots, bucket.verify)))
            )
        return self._rpc("fastrl_load_tensors", unpack_bucket(bucket.buffer, bucket.slots), bucket.verify)

    def sync_weights(self, model) -> None:
        from fastrl.engine.sync import check_compatible, plan_buckets, sync_specs

        # Every name, dtype and shape is checked before the engine's weights are touched.
        plan = plan_buckets(sync_specs(model, dtype=self.dtype), bucket_bytes=self.cfg.sync_bucket_mb << 20)
        check_compatible([s for bucket in plan for s in bucket], self.known)
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        self._rpc("fastrl_begin_update")
        try:
            self.last_sync = self.syncer.sync(model, verify=self.cfg.verify_sync)
        except BaseException:
            # Layers left half-loaded get their previous weights back (if the engine still runs); the
            # first error is the one raised.
            if self._alive():
                with contextlib.suppress(Exception):
                    self._rpc("fastrl_finish_update")
            raise
        self._rpc("fastrl_finish_update")
        self.llm.reset_prefix_cache()
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    # ---- generation ----------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a fastrl SamplingParams, got {type(params).__name__}")
        if self._asleep:
            self.wake_up()
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_ids]
        vparams = [
            common.to_vllm_params(params, self.eos_token_id, common.request_seed(params.seed, i))
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, vparams, use_tqdm=False)
        out = common.from_request_outputs(outputs)
        if self.sleep_mode:
            self.sleep()
        return out

    def sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        syncer = getattr(self, "syncer", None)
        if syncer is not None:
            syncer.close()
        llm = getattr(self, "llm", None)
        if llm is not None:
            # Best effort, bounded: the engine process may be gone already (shutdown then waits on it).
            with contextlib.suppress(Exception):
                common.call_with_deadline(llm.llm_engine.engine_core.shutdown, 30.0, "vLLM shutdown")
            self.llm = None
        if getattr(self, "_dir", None) is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
