"""Generation engines behind one interface (``Engine.generate`` / ``Engine.sync_weights``).

Public API::

    EngineConfig, SamplingParams, GenerationOutput, Engine, build_engine(cfg, model, tokenizer)
    fastrl.engine.hf.HFEngine                    the embedded engine (KV cache, shares the weights)
    fastrl.engine.sampling.sample_next / filter_logits   its sampler
    fastrl.engine.vllm.VLLMEngine / VLLMServerEngine     vLLM in-process, in its own process, or a server
    fastrl.engine.sync                           bucketed weight sync shared by the engines
    fastrl.engine.base.register_engine(kind, builder)    how a kind plugs into build_engine
"""

from __future__ import annotations

from fastrl.engine.base import (
    ENGINE_KINDS,
    Engine,
    EngineConfig,
    GenerationOutput,
    SamplingParams,
    build_engine,
)

__all__ = ["ENGINE_KINDS", "Engine", "EngineConfig", "GenerationOutput", "SamplingParams", "build_engine"]
