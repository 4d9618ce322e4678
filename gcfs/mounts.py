"""`gcfs mounts`: every gcfs mount of the calling user on this machine, and what serves it.

The kernel's list of mounts (/proc/self/mountinfo: type `fuse.gcfs`, and `user_id=` among
the superblock options, the uid that mounted it) says which mounts exist and whose they are;
the pid files in the runtime directory (runtime.py: pid, mount point, log file) say which
daemon serves each, and its control socket answers for the rest (control.py, `status`).

Nothing here looks at a mount point itself: a stat of a mount whose daemon hangs would hang
this command, which is meant to find such mounts. Each daemon gets ASK_TIMEOUT seconds,
all of them at once, so a stopped daemon costs the command that bound once, not once each.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import control, runtime, safeio
from .control import GCFS_TYPE, format_duration

# How long a daemon has to answer. One answers `status` in milliseconds (it is counters); a
# daemon that takes seconds is stuck, and the point of listing it is to say so, promptly.
ASK_TIMEOUT = 2.0
_PID_LIMIT = 8192  # pid, mount point, log file: each at most PATH_MAX


@dataclass
class MountInfo:
    """One gcfs mount: what the kernel says, and what its daemon said (or why it did not)."""

    mountpoint: str
    # "answering"; "not answering" (a live daemon that did not answer in time); "no daemon"
    # (its daemon is gone: the mount point says "Transport endpoint is not connected"); or
    # "unknown" (no pid file of ours names it: started with another XDG_RUNTIME_DIR)
    state: str
    server: str | None = None
    offline: str | None = None  # the snapshot's directory, for an offline mount
    user: str | None = None
    pid: int | None = None
    uptime_seconds: float | None = None
    log_file: str | None = None  # None: stderr (foreground, the journal under systemd)
    problem: str | None = None  # what went wrong asking, and the next step


@dataclass(frozen=True)
class _PidFile:
    key: str
    pid: int | None
    mountpoint: str
    log_file: str | None
    directory: Path


def gcfs_mountpoints(mountinfo: str, uid: int) -> list[str]:
    """Mount points of the gcfs mounts that `uid` made, in mount order, each once."""
    found: list[str] = []
    for line in mountinfo.splitlines():
        head, separator, tail = line.partition(" - ")
        fields, rest = head.split(" "), tail.split(" ")
        if not separator or len(fields) < 5 or len(rest) < 3 or rest[0] != GCFS_TYPE:
            continue
        options = dict(option.partition("=")[::2] for option in rest[2].split(",") if "=" in option)
        # FUSE records who mounted (fusermount3's getuid()); only the caller's own mounts.
        if options.get("user_id") != str(uid):
            continue
        path = control._unescape(fields[4])
        if path not in found:
            found.append(path)
    return found


def _runtime_dirs() -> list[Path]:
    """Where daemons of this user leave pid files: the runtime directory, and /tmp/gcfs-UID
    too (a mount started without XDG_RUNTIME_DIR, from cron or a batch job, uses that)."""
    candidates = [Path(f"/tmp/gcfs-{os.getuid()}")]
    with contextlib.suppress(runtime.UnsafeRuntimeDir):
        candidates.insert(0, runtime.runtime_dir())
    found: list[Path] = []
    for directory in candidates:
        with contextlib.suppress(OSError):
            info = directory.lstat()
            # Only a directory of ours that nobody else may write: what a pid file there
            # says about a daemon is then ours to believe.
            if (
                directory.is_dir()
                and not directory.is_symlink()
                and info.st_uid == os.getuid()
                and not info.st_mode & 0o022
                and directory not in found
            ):
                found.append(directory)
    return found


def _pid_files() -> list[_PidFile]:
    files = []
    for directory in _runtime_dirs():
        try:
            fd = safeio.open_directory(directory)
        except OSError:
            continue
        try:
            for name in sorted(os.listdir(fd)):
                if not name.endswith(".pid"):
                    continue
                try:
                    data = safeio.read_small(name, _PID_LIMIT, dir_fd=fd)
                except OSError:
                    continue
                lines = data.decode("utf-8", errors="surrogateescape").split("\n")
                if len(lines) < 2:
                    continue
                try:
                    pid: int | None = int(lines[0])
                except ValueError:
                    pid = None
                log = lines[2] if len(lines) > 3 and lines[2] else None
                files.append(_PidFile(name[: -len(".pid")], pid, lines[1], log, directory))
        finally:
            os.close(fd)
    return files


def _canonical(path: str) -> str:
    """`path` as mountinfo writes it: its parent resolved (never the mount point itself,
    which would ask its daemon)."""
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name)


def ask_status(sock_path: Path, timeout: float) -> dict[str, Any]:
    """The daemon's status, within `timeout` seconds in all; OSError or ValueError if not."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(b'{"op": "status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise ValueError("the daemon refused")
    status = reply.get("status")
    if not isinstance(status, dict):
        raise ValueError("no status in the answer")
    return status


def _describe(mountpoint: str, pid_file: _PidFile | None, timeout: float) -> MountInfo:
    if pid_file is None or pid_file.pid is None:
        return MountInfo(
            mountpoint,
            "unknown",
            problem="no pid file of this user names it (mounted with another "
            "XDG_RUNTIME_DIR?); `gcfs status` may still reach it from that environment",
        )
    info = MountInfo(mountpoint, "answering", pid=pid_file.pid, log_file=pid_file.log_file)
    if not runtime.is_alive(pid_file.pid) or not runtime.is_gcfs_process(pid_file.pid):
        info.state = "no daemon"
        info.problem = (
            f"its daemon (pid {pid_file.pid}) is gone; unmount with: gcfs umount {mountpoint}"
        )
        return info
    try:
        status = ask_status(pid_file.directory / f"{pid_file.key}.sock", timeout)
    except (OSError, ValueError) as exc:
        info.state = "not answering"
        reason = f"within {timeout:g} s" if isinstance(exc, TimeoutError) else f"({exc})"
        info.problem = (
            f"the daemon (pid {pid_file.pid}) did not answer {reason}; see its log, or "
            f"unmount with: gcfs umount --lazy {mountpoint}"
        )
        return info
    info.server = status.get("server")
    info.offline = status.get("offline")
    info.user = status.get("user")
    info.pid = status.get("pid", info.pid)
    info.uptime_seconds = status.get("uptime_seconds")
    info.log_file = status.get("log_file")
    return info


def list_mounts(timeout: float = ASK_TIMEOUT) -> list[MountInfo]:
    """Every gcfs mount of this user, its daemon asked (all at once, `timeout` each)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mountpoints = gcfs_mountpoints(f.read(), os.getuid())
    by_path: dict[str, _PidFile] = {}
    # A live daemon's pid file first: one mount point reached through two paths (a symlink)
    # may also have the pid file of a killed daemon.
    for pid_file in sorted(_pid_files(), key=lambda p: not (p.pid and runtime.is_alive(p.pid))):
        by_path.setdefault(pid_file.mountpoint, pid_file)
        by_path.setdefault(_canonical(pid_file.mountpoint), pid_file)
    found: list[MountInfo | None] = [None] * len(mountpoints)

    def describe(index: int, mountpoint: str) -> None:
        found[index] = _describe(mountpoint, by_path.get(mountpoint), timeout)

    # Threads, not a pool: a daemon's answer that never comes must not hold up the exit.
    threads = [
        threading.Thread(target=describe, args=(index, path), daemon=True)
        for index, path in enumerate(mountpoints)
    ]
    for thread in threads:
        thread.start()
    end = time.monotonic() + timeout + 1.0
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return [
        each
        if each is not None
        else MountInfo(path, "not answering", problem="its daemon did not answer in time")
        for path, each in zip(mountpoints, found, strict=True)
    ]


def format_mounts(mounts: list[MountInfo]) -> list[str]:
    if not mounts:
        return ["no gcfs mounts of yours on this machine"]
    lines: list[str] = []
    for each in mounts:
        lines.append(f"{each.mountpoint}  ({each.state})")
        if each.offline:
            lines.append(f"  snapshot:  {each.offline} (offline; taken of {each.server})")
        elif each.server is not None:
            lines.append(f"  server:    {each.server}")
        if each.user is not None:
            lines.append(f"  user:      {each.user}")
        if each.pid is not None:
            lines.append(f"  pid:       {each.pid}")
        if each.uptime_seconds is not None:
            lines.append(f"  uptime:    {format_duration(each.uptime_seconds)}")
        if each.state != "unknown":
            shown = each.log_file or "stderr (the journal under systemd)"
            lines.append(f"  log:       {shown}")
        if each.problem:
            lines.append(f"  problem:   {each.problem}")
    return lines


def mounts_command(*, as_json: bool) -> int:
    """`gcfs mounts [--json]`; exit status 0 also when a daemon does not answer (that is
    what it reports), and when there is no mount."""
    mounts = list_mounts()
    if as_json:
        json.dump([asdict(each) for each in mounts], sys.stdout, indent=2)
        print()
        return 0
    for line in format_mounts(mounts):
        print(line)
    return 0
