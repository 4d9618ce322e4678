"""Where a running daemon leaves its pid (and, in the background, its log).

`gcfs umount` uses the pid file to wait until the daemon has really gone (and with it the
demo server), instead of returning while it is still shutting down. Files live in
`$XDG_RUNTIME_DIR/gcfs` (per user, tmpfs, removed at logout) or, without it,
`/tmp/gcfs-<uid>`; the directory is 0700.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "gcfs" if base else Path(f"/tmp/gcfs-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        path.chmod(0o700)
    return path


def _key(mountpoint: Path) -> str:
    return hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]


def pid_file(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.pid"


def control_socket(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.sock"


def default_log_file(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.log"


def write_pid(mountpoint: Path) -> Path:
    path = pid_file(mountpoint)
    path.write_text(f"{os.getpid()}\n{mountpoint}\n", encoding="utf-8")
    return path


def read_pid(mountpoint: Path) -> int | None:
    try:
        first = pid_file(mountpoint).read_text(encoding="utf-8").split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
