"""Ctrl-C and SIGTERM during training: stop at the next step boundary with a checkpoint, not a traceback.

Inside :class:`StopGuard` the first SIGINT or SIGTERM only sets a flag (and says so once on stderr);
the loop finishes the optimizer step it is in, saves a checkpoint at that boundary (the state is
consistent there, and the save is the one a ``save_steps`` checkpoint would be) and raises
:class:`TrainingInterrupted`. A second signal stops at once, without a save. Under ``torchrun`` every
rank gets the signal, perhaps a step apart: :meth:`StopGuard.requested` agrees on it across ranks (one
scalar all-reduce per step) so that they stop at the same step and save together.

``TrainingInterrupted`` is a ``SystemExit`` with the shell's code for the signal (130 for SIGINT, 143
for SIGTERM), so ``fastrl ...`` ends with that status and one line, no traceback; callers in Python can
catch it (it carries ``step``, ``checkpoint`` and ``signal``).
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(SystemExit):
    """A run stopped by a signal; ``code`` is ``128 + signal``."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, message: str):
        super().__init__(128 + signum)
        self.signal, self.step, self.checkpoint, self.message = signum, step, checkpoint, message

    def __str__(self) -> str:
        return self.message


class _StopNow(BaseException):
    """Raised from the handler at a second signal (a BaseException, so ``except Exception`` in user
    code such as a reward function does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopGuard:
    """``with StopGuard(desc) as guard:`` installs the handlers (main thread only; elsewhere a no-op) and
    restores the previous ones on exit."""

    def __init__(self, desc: str, *, announce: bool = True):
        self.desc, self.announce = desc, announce
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise _StopNow(signum)
        self.signum = signum
        if self.announce:
            print(
                f"fastrl {self.desc}: {signal.Signals(signum).name} received: finishing this step and saving "
                "a checkpoint (send it again to stop at once, without saving)",
                file=sys.stderr,
                flush=True,
            )

    def requested(self) -> int | None:
        """The signal to stop for, the same on every rank (collective under a process group)."""
        from fastrl.distributed.env import is_distributed

        if not is_distributed():
            return self.signum
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        got = int(t.item())
        return got or None


def stop_message(desc: str, signum: int, step: int, max_steps: int, saved, latest, out) -> str:
    """The one line a stopped run ends with."""
    name = signal.Signals(signum).name
    resume = f"resume with --train.resume_from_checkpoint auto --train.output_dir {out}"
    head = f"fastrl {desc}: stopped by {name}"
    if saved is not None:
        return f"{head} at step {step} of {max_steps}; saved {saved}; {resume}"
    head = f"{head} during step {step + 1} of {max_steps}"
    if latest is not None:
        return f"{head} (not saved); {resume} (from {latest})"
    return f"{head}; no checkpoint to resume from"
