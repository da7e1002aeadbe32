"""Shared set-up of the vLLM engine tests (they run where vLLM is importable: .venv-vllm, see
scripts/setup_vllm_env.sh; elsewhere every module skips).

Engines are expensive to start (10-60 s on 2 busy cores), so each test module starts one engine of its kind
(module-scoped fixture) and every test syncs its own fresh trainer model into it. vLLM's CPU KV cache is
1 GiB per engine so that several fit in the machine's memory; the sampler's compiled kernels are cached
in one folder that every run reuses.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "fastrl-test-inductor"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory) -> str:
    """A tiny Qwen2 (head_dim 64, vLLM's CPU minimum) on disk: what the server serves and every test's
    trainer model starts from. A larger init spreads the logits, so top-k/top-p cut real mass."""
    from fastrl.models.tiny import save_tiny

    path = tmp_path_factory.mktemp("vllm_tiny") / "model"
    return str(save_tiny(path, hidden_size=64, num_layers=2, init_std=0.2, seed=3))
