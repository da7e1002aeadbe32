"""Tiny models shared by the model tests (built locally, a few milliseconds each)."""

from __future__ import annotations

import pytest
import torch

from fastrl.models.tiny import build_char_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models' matrices are far too small for intra-op threads: on a loaded 2-core machine two
    threads made a forward 10-30x slower than one. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()
