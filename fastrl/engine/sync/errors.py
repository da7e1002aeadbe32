"""The errors weight sync raises. Bad input (unknown names, wrong dtype or shape) is a ``ValueError``."""

from __future__ import annotations


class SyncError(RuntimeError):
    """A sync could not complete: the receiver died, refused a bucket or answered something unexpected."""


class SyncTimeoutError(SyncError, TimeoutError):
    """The receiver did not answer within the timeout (stuck, or too slow for the configured limit)."""


class ChecksumMismatchError(SyncError):
    """What the receiver holds differs from what was sent; the message lists the tensor names."""


def name_list(names, limit: int = 20) -> str:
    """``a, b, c`` with at most ``limit`` names, then ``... (+N more)``."""
    names = list(names)
    head = ", ".join(names[:limit])
    return head + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")
