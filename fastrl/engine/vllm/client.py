"""``engine.kind: vllm_server``: generation over HTTP from a running ``fastrl vllm-serve``.

Generation: one ``/v1/completions`` request per prompt (token ids in; ``return_token_ids`` and the
sampled tokens' log-probs out), sent concurrently, so that each completion has its own seed (a GRPO
group repeats the prompt: one seed for a batched request would draw the same sample G times).

Weight sync, between ``/pause`` and ``/resume`` (``VLLM_SERVER_DEV_MODE`` routes, which ``fastrl
vllm-serve`` turns on), through fastrl's worker extension called by name on ``/collective_rpc``:

* ``shm`` (server on this host): one shared-memory buffer mapped once by the server's worker
  (``fastrl_open_buffer``); one RPC per bucket carries only its slot table.
* ``dist`` (server elsewhere): a two-rank torch.distributed group (gloo on the CPU, NCCL on GPUs) set up
  once (``fastrl_init_group``); per bucket the RPC is posted, then the bucket is broadcast from rank 0
  (the trainer) into the worker's own buffer.

The prefix cache is reset after every update. Every HTTP call has a deadline: an unreachable server
fails within ``connect_timeout_s``, a dead or stuck one within ``sync_timeout_s`` / ``request_timeout_s``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid

import torch

from fastrl.engine.base import Engine, EngineConfig, GenerationOutput, SamplingParams
from fastrl.engine.vllm import common

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


class ServerError(RuntimeError):
    """The vLLM server answered with an error, or not at all."""


class VLLMServerEngine(Engine):
    """Generates with a ``fastrl vllm-serve`` server at ``cfg.base_url``; syncs weights into it."""

    def __init__(self, model, tokenizer, cfg: EngineConfig):
        from fastrl.engine.sync import WeightSyncer

        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self._check_reachable()
        models = self._get("/v1/models", timeout=cfg.connect_timeout_s)["data"]
        self.model_name = models[0]["id"]
        self.known = common.unpack(self._rpc("fastrl_known_weights", timeout=cfg.sync_timeout_s))
        floating = [d for d, _ in self.known.values() if d.is_floating_point]
        self.dtype = floating[0] if floating else common.model_dtype(model)
        common.check_engine_dtypes(cfg, self.dtype)
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        backend = cfg.sync_backend
        if backend == "auto":
            backend = "shm" if _is_local(host) else "dist"
        self.backend = backend
        self._group = None
        # Under a process group (FSDP) rank 0 alone talks to the server; the other ranks take part in
        # the weight gathers only. All ranks meet at a barrier after each sync.
        from fastrl.distributed.env import dist_info, is_distributed

        self._distributed = is_distributed()
        self.sender = not self._distributed or dist_info().rank == 0
        device = f"cuda:{torch.cuda.current_device()}" if common.on_cuda() else "cpu"
        self.syncer = WeightSyncer(
            self._send_bucket,
            open_buffer=self._open_buffer if backend == "shm" else None,
            bucket_bytes=cfg.sync_bucket_mb << 20,
            device=device,
            dtype=self.dtype,
            sender=self.sender,
        )
        self.last_sync = None
        self._buffer_key = uuid.uuid4().hex  # this client's buffer in the worker
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="fastrl-http")

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, *, timeout: float):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's base_url
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise ServerError(f"vLLM server {self.base_url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(
                f"vLLM server {self.base_url}{path}: failed ({reason}; timeout {timeout:g} s)"
            ) from None
        return json.loads(raw) if raw else None

    def _get(self, path: str, *, timeout: float):
        return self._request("GET", path, timeout=timeout)

    def _post(self, path: str, body=None, *, timeout: float):
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    def _check_reachable(self) -> None:
        try:
            self._get("/health", timeout=self.cfg.connect_timeout_s)
        except ServerError as e:
            raise ServerError(
                f"engine.base_url {self.base_url!r} is unreachable (start one with `fastrl vllm-serve "
                f"--model DIR --port P`): {e}"
            ) from None

    def _rpc(self, method: str, *args: str, timeout: float | None = None):
        timeout = timeout or self.cfg.sync_timeout_s
        body = {"method": method, "args": list(args), "timeout": timeout}
        out = self._post("/collective_rpc", body, timeout=timeout + 5)
        return None if out is None else out["results"][0]

    # ---- generation ----------------------------------------------------------------------------------
    def _one(self, prompt: list[int], params: SamplingParams, seed: int | None):
        stop = list(params.stop_token_ids) + ([self.eos_token_id] if self.eos_token_id is not None else [])
        body = {
            "model": self.model_name,
            "prompt": [int(t) for t in prompt],
            "max_tokens": params.max_new_tokens,
            "temperature": float(params.temperature),
            "top_p": 1.0 if params.greedy else float(params.top_p),
            "top_k": 0 if params.greedy else int(params.top_k),
            "stop_token_ids": stop,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "detokenize": False,
        }
        if seed is not None:
            body["seed"] = seed
        choice = self._post("/v1/completions", body, timeout=self.cfg.request_timeout_s)["choices"][0]
        ids = [int(t) for t in choice["token_ids"]]
        lps = choice.get("logprobs") or {}
        token_lps = lps.get("token_logprobs")
        if token_lps is None or len(token_lps) != len(ids):
            raise ServerError(f"vLLM server returned {token_lps!r} log-probs for {len(ids)} tokens")
        return ids, [float(x) for x in token_lps], choice.get("finish_reason") == "length"

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a fastrl SamplingParams, got {type(params).__name__}")
        futures = [
            self._pool.submit(self._one, p, params, common.request_seed(params.seed, i))
            for i, p in enumerate(prompt_ids)
        ]
        results = [f.result() for f in futures]
        return GenerationOutput(
            completion_ids=[r[0] for r in results],
            logprobs=[r[1] for r in results],
            truncated=[r[2] for r in results],
        )

    # ---- weights -------------------------------------------------------------------------------------
    def _open_buffer(self, handle) -> None:
        self._rpc("fastrl_open_buffer", common.pack((self._buffer_key, handle)))

    def _ensure_group(self) -> None:
        """A two-rank process group with the server's worker (rank 1); the trainer is rank 0."""
        if self._group is not None:
            return
        from datetime import timedelta

        import torch.distributed as dist

        # The address of this host as the server sees it: the interface that routes to the server (a UDP
        # connect sends nothing). For a server on 127.0.0.1 that is 127.0.0.1.
        server = urllib.parse.urlsplit(self.base_url)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((server.hostname, server.port or 80))
            host = probe.getsockname()[0]
        with socket.socket() as s:  # a free port for the store
            s.bind((host, 0))
            port = s.getsockname()[1]
        timeout = timedelta(seconds=self.cfg.sync_timeout_s)
        store = dist.TCPStore(host, port, 2, is_master=True, timeout=timeout, wait_for_workers=False)
        backend = "nccl" if common.on_cuda() else "gloo"
        fut = self._pool.submit(self._rpc, "fastrl_init_group", common.pack((host, port, backend)))
        self._group = common.make_group(store, rank=0, world_size=2, backend=backend, timeout=timeout)
        fut.result()
        self._store = store

    def _send_bucket(self, bucket):
        request = common.pack((self._buffer_key, bucket.slots, bucket.verify))
        if self.backend == "shm":
            return common.unpack(self._rpc("fastrl_load_bucket", request))
        self._ensure_group()
        fut = self._pool.submit(
            self._rpc, "fastrl_recv_bucket", common.pack((bucket.slots, bucket.verify, bucket.nbytes))
        )
        common.broadcast(self._group, bucket.buffer[: bucket.nbytes])
        return common.unpack(fut.result())

    def sync_weights(self, model) -> None:
        from fastrl.engine.sync import check_compatible, plan_buckets, sync_specs

        plan = plan_buckets(sync_specs(model, dtype=self.dtype), bucket_bytes=self.cfg.sync_bucket_mb << 20)
        check_compatible([s for bucket in plan for s in bucket], self.known)
        if not self.sender:
            self.last_sync = self.syncer.sync(model)  # the gathers only
            self._barrier()
            return
        t = self.cfg.sync_timeout_s
        self._post("/pause?mode=wait", timeout=t)
        try:
            self._rpc("fastrl_begin_update")
            try:
                self.last_sync = self.syncer.sync(model, verify=self.cfg.verify_sync)
            except BaseException:
                # Restore layers left half-loaded if the server still answers; the first error is the one
                # that tells what happened.
                with contextlib.suppress(ServerError):
                    self._rpc("fastrl_finish_update")
                raise
            self._rpc("fastrl_finish_update")
            self._post("/reset_prefix_cache", timeout=t)
        except BaseException:
            with contextlib.suppress(ServerError):
                self._post("/resume", timeout=t)
            raise
        self._post("/resume", timeout=t)
        self._barrier()

    def _barrier(self) -> None:
        if self._distributed:
            import torch.distributed as dist

            dist.barrier()  # no rank generates before the server holds the new weights

    def close(self) -> None:
        syncer = getattr(self, "syncer", None)
        if syncer is not None:
            if syncer.buffer is not None and self.backend == "shm":
                with contextlib.suppress(ServerError):  # the server outlives us: drop our mapping there
                    self._rpc("fastrl_close_buffer", self._buffer_key, timeout=self.cfg.connect_timeout_s)
            syncer.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _is_local(host: str) -> bool:
    if host in LOCAL_HOSTS or host.startswith("127."):
        return True
    try:
        return socket.gethostbyname(host) in {socket.gethostbyname(socket.gethostname()), "127.0.0.1"}
    except OSError:
        return False
