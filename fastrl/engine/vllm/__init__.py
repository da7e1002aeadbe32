"""vLLM generation engines (``engine.kind: vllm | vllm_server``); vLLM itself is imported lazily.

Public API::

    VLLMEngine(model, tokenizer, cfg)        vLLM in this process, or its own (cfg.separate_process)
    VLLMServerEngine(model, tokenizer, cfg)  a running ``fastrl vllm-serve`` at cfg.base_url
    fastrl.engine.vllm.worker.FastrlWorkerExtension   the engine side of a weight sync
    fastrl.engine.vllm.serve.main(argv)      ``fastrl vllm-serve``

Importing this package registers both kinds with ``fastrl.engine.build_engine`` and imports no vLLM.
"""

from __future__ import annotations

from fastrl.engine.base import register_engine


def _build_vllm(model, tokenizer, cfg):
    from fastrl.engine.vllm.engine import VLLMEngine

    return VLLMEngine(model, tokenizer, cfg)


def _build_vllm_server(model, tokenizer, cfg):
    from fastrl.engine.vllm.client import VLLMServerEngine

    return VLLMServerEngine(model, tokenizer, cfg)


register_engine("vllm", _build_vllm)
register_engine("vllm_server", _build_vllm_server)


def __getattr__(name: str):
    if name == "VLLMEngine":
        from fastrl.engine.vllm.engine import VLLMEngine

        return VLLMEngine
    if name == "VLLMServerEngine":
        from fastrl.engine.vllm.client import VLLMServerEngine

        return VLLMServerEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
