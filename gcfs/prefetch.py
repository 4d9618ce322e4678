"""`gcfs prefetch PATH`: warm the block cache for a subtree, for offline work or a compute job.

It walks PATH through the mount (sizes are true, so the total is known before any byte is
fetched), refuses when the files that still need fetching do not fit in the daemon's block
cache, then reads every file that is not completely cached yet through the mount, PARALLEL_FILES
at a time (threads): each file is read sequentially, which the daemon's read-ahead turns into a
few large ranged GETs, and reading several at once makes a subtree of many small files cost
what the link allows instead of one /media/ resolution plus one storage round trip per file
after another. What the daemon fetches lands in its block store. Run it again after an
interruption and it skips what is already cached (resumable). Progress (files, bytes, speed,
ETA) goes to stderr, redrawn in place on a terminal and as a line every 5 s otherwise; the
line and the parallel loop are progress.py's, shared with `gcfs snapshot`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .control import files_info, find_mount, request
from .errors import UserError
from .progress import ProgressLine, fetch_parallel
from .units import format_size

CHUNK = 1 << 20  # read size: the daemon's block size
# Files read at once. Each costs a /media/ resolution and a storage round trip (20-100 ms on
# S3) before its first byte; eight overlap those for small files, and for large ones the
# daemon's 64 MiB read-ahead budget is what they share (one file alone fills 32 MiB).
PARALLEL_FILES = 8


@dataclass
class Plan:
    files: list[tuple[Path, str, int, int]]  # path, path in the mount, size, cached bytes

    @property
    def total(self) -> int:
        return sum(size for _, _, size, _ in self.files)

    @property
    def missing(self) -> int:
        return sum(size - cached for _, _, size, cached in self.files)


def require_existing(path: Path) -> None:
    """A path inside a mount that the mount does not show is an error naming it as the user
    gave it (a typo would otherwise be "0 files, all 0 B already cached", exit 0)."""
    if not os.path.lexists(path):
        raise UserError(f"{path}: no such file or directory")


def make_plan(path: Path, mountpoint: Path, relative: str) -> Plan:
    """The files under PATH with their sizes and what the block cache holds of them, asked
    of the daemon in batches (control.files_info)."""
    files: list[tuple[Path, str, int, int]] = []
    walk_root = mountpoint / relative if relative != "." else mountpoint
    candidates = [walk_root] if walk_root.is_file() else []
    for directory, _, names in os.walk(walk_root):
        candidates.extend(Path(directory) / name for name in sorted(names))
    inside = [str(candidate.relative_to(mountpoint)) for candidate in candidates]
    answers = files_info(mountpoint, inside, cached=True)
    for candidate, where, info in zip(candidates, inside, answers, strict=True):
        files.append((candidate, where, int(info["size"]), int(info["cached_bytes"])))
    return Plan(files)


def prefetch_command(
    path: Path, *, out: TextIO | None = None, parallel: int = PARALLEL_FILES
) -> int:
    """`gcfs prefetch PATH [--jobs N]` (module docstring); `parallel`: files read at once."""
    stream = out or sys.stderr
    mountpoint, relative = find_mount(path)
    require_existing(path)
    status = request(mountpoint, {"op": "status"})["status"]
    cache = status.get("block_cache")
    if cache is None:
        raise UserError("the block cache of this mount is off (--cache-size 0): nothing to fill")
    plan = make_plan(path, mountpoint, relative)
    room = int(cache["max_bytes"])
    if plan.missing > room:
        raise UserError(
            f"{path} needs {format_size(plan.missing)} more in the block cache, which holds at "
            f"most {format_size(room)}; remount with a larger --cache-size, or prefetch a smaller "
            "subtree"
        )
    todo = [(file_path, size, cached) for file_path, _, size, cached in plan.files if cached < size]
    progress = ProgressLine(
        stream, "prefetch", files_total=len(todo), bytes_total=plan.missing, eta=True
    )
    if not todo:
        print(
            f"prefetch: {len(plan.files)} files, all {format_size(plan.total)} already cached",
            file=stream,
        )
        return 0

    def fetch(item: tuple[Path, int, int]) -> None:
        """Read one file through the mount (in a worker thread); only the bytes not cached
        yet count, spread over the file (the daemon skips the cached blocks)."""
        file_path, size, cached = item
        try:
            with open(file_path, "rb", buffering=0) as handle:
                while chunk := handle.read(CHUNK):
                    progress.add(len(chunk) * (size - cached) // max(size, 1))
        except OSError as exc:
            raise UserError(
                f"cannot read {file_path}: {exc.strerror}; run prefetch again to carry on"
            ) from None
        progress.add(0, done=1)

    fetch_parallel(fetch, todo, parallel, progress, keep_going=False)
    progress.bytes_done = progress.bytes_total
    progress.finish()
    print(f"prefetch: done, {len(plan.files)} files, {format_size(plan.total)} cached", file=stream)
    return 0
