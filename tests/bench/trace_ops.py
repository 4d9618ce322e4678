"""A diagnostic daemon: `gcfs` with every FUSE handler counted and timed (run.py --trace-ops).

    GCFS_BENCH_TRACE=/tmp/trace python tests/bench/trace_ops.py mount MNT --foreground ...

Wraps the handlers of `gcfs.fuse_ops.GcfsOperations` (without touching gcfs's files), then
runs gcfs's own command line. At exit it writes `$GCFS_BENCH_TRACE.<pid>.json`: calls and
seconds per operation, a histogram of the kernel's read sizes, how many reads continued
where the previous read of the same handle ended, and how many `read` calls were in
progress at once.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
from collections import Counter
from typing import Any

OPS = (
    "lookup",
    "getattr",
    "readlink",
    "open",
    "read",
    "release",
    "opendir",
    "readdir",
    "releasedir",
    "forget",
    "statfs",
    "getxattr",
    "listxattr",
    "access",
    "flush",
)

calls: Counter[str] = Counter()
seconds: dict[str, float] = {}
read_sizes: Counter[int] = Counter()
state: dict[str, Any] = {"in_read": 0, "peak_reads": 0, "sequential": 0, "jumps": 0}
last_end: dict[int, int] = {}


def _wrap(cls: type, name: str) -> None:
    original = getattr(cls, name, None)
    if original is None:
        return

    @functools.wraps(original)
    async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        if name == "read":
            fh, offset, size = args[0], args[1], args[2]
            read_sizes[size] += 1
            if last_end.get(fh) == offset:
                state["sequential"] += 1
            elif fh in last_end:
                state["jumps"] += 1
            last_end[fh] = offset + size
            state["in_read"] += 1
            state["peak_reads"] = max(state["peak_reads"], state["in_read"])
        started = time.perf_counter()
        try:
            return await original(self, *args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
            if name == "read":
                state["in_read"] -= 1

    setattr(cls, name, traced)


def _dump() -> None:
    target = os.environ.get("GCFS_BENCH_TRACE")
    if not target:
        return
    report = {
        "calls": dict(calls.most_common()),
        "seconds": {k: round(v, 4) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
        "read_sizes": {str(k): v for k, v in sorted(read_sizes.items())},
        "sequential_reads": state["sequential"],
        "non_sequential_reads": state["jumps"],
        "peak_concurrent_reads": state["peak_reads"],
    }
    with open(f"{target}.{os.getpid()}.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)


def main() -> int:
    from gcfs import fuse_ops  # the snapshot on PYTHONPATH
    from gcfs.cli import main as gcfs_main

    for name in OPS:
        _wrap(fuse_ops.GcfsOperations, name)
    atexit.register(_dump)
    sys.argv[0] = "gcfs"
    return int(gcfs_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
