"""A tiny local model (saved once per session) and small run configs for the trainer tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from fastrl.models.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_layers=2))


def addition_rows(n: int = 60) -> list[dict]:
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)][:n]


class InterruptedRunError(Exception):
    """Raised by a test to stop a run mid-way, as a crash would."""


def interrupt_after(monkeypatch, cls, calls: int) -> None:
    """Make ``cls.micro_step`` raise ``InterruptedRunError`` on its ``calls + 1``-th call."""
    original = cls.micro_step
    count = {"n": 0}

    def micro_step(self, index):
        count["n"] += 1
        if count["n"] > calls:
            raise InterruptedRunError
        return original(self, index)

    monkeypatch.setattr(cls, "micro_step", micro_step)


def assert_same_history(
    a: list[dict], b: list[dict], keys: tuple[str, ...], *, rel: float = 1e-6, abs: float = 1e-7
) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=abs), (ra["step"], k, ra[k], rb[k])


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models' matrices are too small to gain from threads; one thread also keeps the shared CI
    machine's cores from oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
