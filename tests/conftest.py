"""Shared fixtures: a fresh printed seed per test, GPU tests skipped without CUDA."""

from __future__ import annotations

import os
import random

import pytest
import torch

# One intra-op thread per test process: CI runs two xdist workers on two cores, and oversubscribed threads
# made tiny-model forwards 15-30x slower there.
torch.set_num_threads(int(os.environ.get("FASTRL_TEST_THREADS", "1")))


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed on failure; FASTRL_TEST_SEED pins it to reproduce a run."""
    value = int(os.environ.get("FASTRL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
