"""How fast `gcfs snapshot --verify` reads: a snapshot made directly with the block store (no
mount, no server; the same files `gcfs snapshot` writes), checked with the page cache warm
(just written) and cold (its pages dropped with POSIX_FADV_DONTNEED, for these files only).

    .venv/bin/python tests/bench/snapshot_verify.py [--mib 512] [--files 16] [--small 500]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this checkout's gcfs, not an installed one

from gcfs.blockstore import NO_LIMIT, BlockStore  # noqa: E402
from gcfs.marker import SNAPSHOT  # noqa: E402
from gcfs.snapshot import FORMAT  # noqa: E402

CHUNK = 8 << 20


def make(directory: Path, big_mib: int, files: int, small: int) -> int:
    """A snapshot of `files` files sharing `big_mib` MiB and `small` files of 40 KiB; bytes."""
    store = BlockStore(directory, NO_LIMIT, kind=SNAPSHOT)
    rng = random.Random(0)
    buffer = mmap.mmap(-1, CHUNK)
    buffer.write(rng.randbytes(CHUNK))
    entries: dict[str, object] = {}
    total = 0
    sizes = [(f"big-{n:03d}.bin", big_mib * (1 << 20) // files + n) for n in range(files)]
    sizes += [(f"small-{n:05d}.bin", 40_000 + n) for n in range(small)]
    for name, size in sizes:
        key = f"https://storage.test/bench/{name}"
        done = 0
        view = memoryview(buffer)
        while done < size:
            length = min(CHUNK, size - done)
            store.write(key, done // store.block_size, view[:length], size)
            done += length
        entries[name] = {"type": "file", "size": size, "key": key, "xattrs": {}}
        total += size
    store.sync()
    store.close()
    manifest = {"format": FORMAT, "server": "bench", "user": "bench", "files": len(sizes)}
    tree = {
        "format": FORMAT,
        "manifest": manifest,
        "root": {"type": "dir", "entries": {"data": {"type": "dir", "entries": entries}}},
    }
    (directory / "tree.json").write_text(json.dumps(tree))
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return total


def drop(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def verify(directory: Path) -> float:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gcfs", "snapshot", "--verify", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    print("   ", done.stdout.strip())
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB in the large files")
    parser.add_argument("--files", type=int, default=16, help="large files")
    parser.add_argument("--small", type=int, default=500, help="files of ~40 KiB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gcfs-verify-bench-", dir="/var/tmp") as tmp:
        directory = Path(tmp) / "snapshot"
        total = make(directory, args.mib, args.files, args.small)
        mib = total / (1 << 20)
        print(f"{args.files} + {args.small} files, {mib:.0f} MiB")
        for label, cold in (("warm", False), ("cold", True)):
            times = []
            for _ in range(args.runs):
                if cold:
                    drop(directory)
                times.append(verify(directory))
            times.sort()
            median = times[len(times) // 2]
            print(
                f"{label}: median {median:.2f} s, {mib / median:.0f} MiB/s (process start included)"
            )


if __name__ == "__main__":
    main()
