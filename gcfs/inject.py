"""Fault injection for the tests: `GCFS_TEST_INJECT=point[,point]` switches points on.

The tests run the daemon as a real process (tests/conftest.py), so a fault cannot be
monkeypatched into it; instead each kind of background task calls `maybe_fail(point)` as it
starts, and the block store's worker-thread calls `maybe_stall(point)`, and the test sets the
variable for the daemon it starts. The variable is read once, at import; unset (always, outside
the tests) every call is one falsy test of an empty frozenset.

Points (a task kind each; `gcfs/content.py` and `gcfs/reader.py` name them):
- `read-ahead`, `write-behind`: raise RuntimeError at the start of that background task.
- `store-stall`: the first block store call in a worker thread blocks for STALL_SECONDS (a
  hostile file: a FIFO, a hung network filesystem); later calls do not.
- `store-slow-write`: each block store write first waits SLOW_WRITE_SECONDS (a slow disk).
- `size-probe`: raise in each file's size probe (the tasks a listing starts, fs.py).
- `refresh`, `prefetch`: raise in the daemon's side of `gcfs refresh` and of `gcfs prefetch`
  (the control requests `refresh`, and `files` with `cached`: control.py).
"""

from __future__ import annotations

import os
import threading
import time

ENVIRONMENT = "GCFS_TEST_INJECT"
POINTS = frozenset(
    {
        "read-ahead",
        "write-behind",
        "store-stall",
        "store-slow-write",
        "size-probe",
        "refresh",
        "prefetch",
    }
)
# Far beyond any request's deadline (60 s by default): the thread is abandoned, never awaited.
STALL_SECONDS = 3600.0
# A slow disk: 0.2 s per write call, ~20 MB/s at 4 MiB per call, while storage on loopback
# delivers several hundred MB/s: the write-behind queue fills at once.
SLOW_WRITE_SECONDS = 0.2

_active = frozenset(
    point.strip() for point in os.environ.get(ENVIRONMENT, "").split(",") if point.strip()
)


_stalled = threading.Lock()  # held once the one stall has begun


class InjectedFault(RuntimeError):
    """An exception no code path expects: what a bug would raise."""


def active(point: str) -> bool:
    return point in _active


def maybe_fail(point: str) -> None:
    """Raise InjectedFault when `point` is switched on."""
    if _active and point in _active:
        raise InjectedFault(f"injected fault at {point}")


def maybe_stall(point: str) -> None:
    """Block the calling (worker) thread when `point` is switched on."""
    if _active and point in _active:
        if point != "store-stall":
            time.sleep(SLOW_WRITE_SECONDS)
        elif _stalled.acquire(blocking=False):
            time.sleep(STALL_SECONDS)


def switch(points: frozenset[str]) -> None:
    """Switch points on in this process (in-process tests; the daemon reads the variable)."""
    global _active
    _active = frozenset(points)


__all__ = ["ENVIRONMENT", "InjectedFault", "active", "maybe_fail", "maybe_stall", "switch"]
