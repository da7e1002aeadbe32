"""Engine tests run tiny models: one intra-op thread (see tests/models/conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from fastrl.models.tiny import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture
def model(tokenizer, seed):
    from fastrl.models.tiny import build_tiny_model

    return build_tiny_model(tokenizer, seed=seed, init_std=0.1)


def prompts_of(tokenizer, lengths):
    """Random prompts of the given lengths, characters only (ids >= 5): no special token inside."""
    return [torch.randint(5, len(tokenizer), (n,)).tolist() for n in lengths]
