"""Where a running daemon leaves its pid (and, in the background, its log).

`gcfs umount` uses the pid file to wait until the daemon has really gone (and with it the
demo server), instead of returning while it is still shutting down. Files live in
`$XDG_RUNTIME_DIR/gcfs` (per user, tmpfs, removed at logout) or, without it,
`/tmp/gcfs-<uid>`; the directory is 0700, and one that is not private to the user (a
link, another user's, open to others) is refused, never repaired.

Each mount's files there are named by a key, 16 hex digits of a hash of its mount point:
`<key>.pid`, `<key>.sock` and, in the background, `<key>.log` with its rotated backups
`<key>.log.1` to `<key>.log.3` (logsetup.BACKUP_COUNT). A mount on a new mount point (a batch
job's `$TMPDIR/gc`) leaves a new log behind, and a killed daemon its pid file too, and
`/tmp/gcfs-<uid>` is not emptied at logout: so every mount, as it starts, removes the logs and
pid files that no running mount owns and nothing has written for a week (`remove_stale`).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import stat
import time
from pathlib import Path

from . import safeio
from .errors import UserError
from .logsetup import BACKUP_COUNT


class UnsafeRuntimeDir(UserError):
    """The runtime directory is not a private directory of the user's."""


def runtime_dir() -> Path:
    """`$XDG_RUNTIME_DIR/gcfs`, else `/tmp/gcfs-<uid>`, made 0700 if missing. /tmp is
    everybody's: another user may have made that name first, as a directory of theirs or a
    link to one (to /etc, for a daemon run as root). Such a directory is refused, never
    chmod-ed or written into (as tmux and ssh-agent refuse theirs): the pid file, the control
    socket and the log would be another user's to read, replace or point elsewhere."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "gcfs" if base else Path(f"/tmp/gcfs-{os.getuid()}")
    try:
        # O_NOFOLLOW: a link in its place is refused (ELOOP), and so is anything not a directory.
        fd, _ = safeio.make_directory(path, 0o700)
    except FileNotFoundError:
        raise UnsafeRuntimeDir(
            f"XDG_RUNTIME_DIR names {path.parent}, which does not exist: make it, or unset it"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
            what = "it is a link or not a directory: remove it, or set XDG_RUNTIME_DIR"
        else:
            what = "set XDG_RUNTIME_DIR to a directory of yours"
        raise UnsafeRuntimeDir(
            f"cannot use {path} for gcfs's pid and log files ({exc.strerror}); {what}"
        ) from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise UnsafeRuntimeDir(
            f"{path} is not private to you ({_owner_and_mode(info)}): gcfs keeps its pid and"
            f" log files there; remove it, or set XDG_RUNTIME_DIR"
        )
    return path


def _owner_and_mode(info: os.stat_result) -> str:
    owner = "yours" if info.st_uid == os.getuid() else f"owned by uid {info.st_uid}"
    return f"{owner}, mode {stat.S_IMODE(info.st_mode):04o}"


def _key(mountpoint: Path) -> str:
    return hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]


def pid_file(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.pid"


def control_socket(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.sock"


def default_log_file(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.log"


def write_pid(mountpoint: Path, log_file: Path | None = None) -> Path:
    """`<pid>\n<mount point>\n<log file>\n` (an empty third line: stderr). The log is there
    for `gcfs mounts`, which names it also when the daemon does not answer: then most of all."""
    path = pid_file(mountpoint)
    log = "" if log_file is None else str(log_file)
    path.write_text(f"{os.getpid()}\n{mountpoint}\n{log}\n", encoding="utf-8")
    return path


def read_pid(mountpoint: Path) -> int | None:
    try:
        first = pid_file(mountpoint).read_text(encoding="utf-8").split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError, UnsafeRuntimeDir):  # never a pid another user wrote
        return None


def daemon_pid(mountpoint: Path) -> int | None:
    """The pid in the mount's pid file while it is still a gcfs process of ours. A daemon
    killed with -9 leaves its pid file, and its pid may be given to another process since:
    `gcfs umount` waits for the daemon and then sends it SIGTERM, which must never reach the
    user's editor or job that got the pid."""
    pid = read_pid(mountpoint)
    return pid if pid is not None and is_alive(pid) and is_gcfs_process(pid) else None


def is_gcfs_process(pid: int) -> bool:
    """Whether `pid` is a process of this user running gcfs: its command line names gcfs
    (`gcfs ...`, `mount.gcfs ...`, `python .../bin/gcfs ...`, `python -m gcfs ...`), as every
    daemon's does (a background daemon is a fork of its `gcfs mount`; `mount.gcfs` runs the
    daemon in its own process, `python -m gcfs.mount_helper` in the tests)."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = cmdline.read(1 << 16).split(b"\0")
    except OSError:
        return False
    head = words[:4]  # the program, or an interpreter and its script or `-m MODULE`
    if any(os.path.basename(word) in (b"gcfs", b"mount.gcfs") for word in head[:2]):
        return True
    return any(
        flag == b"-m" and (module == b"gcfs" or module.startswith(b"gcfs."))
        for flag, module in itertools.pairwise(head)
    )


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


# A week: long enough to read the log of last week's failed job (a weekend included), short
# enough that a user mounting on a new mount point for each of 100 jobs a day keeps at most
# ~700 ended mounts' files rather than every one since the machine was installed.
STALE_AFTER = 7 * 24 * 3600.0
# What remove_stale may remove: the pid file, the logs and the control socket of a key,
# exactly as named above. The daemon removes its socket as it stops; a killed one's stays
# until the next mount on that mount point replaces it (control.serve_control), which for a
# batch job's one-off mount point is never: so it goes with the pid file.
_BACKUPS = "|".join(str(n) for n in range(1, BACKUP_COUNT + 1))
_STALE_NAME = re.compile(rf"([0-9a-f]{{16}})\.(?:pid|sock|log(?:\.(?:{_BACKUPS}))?)")
_PID_LIMIT = 4096  # a pid file holds a pid and a mount point (PATH_MAX is 4096)


def remove_stale(now: float | None = None) -> list[str]:
    """Remove the pid files, logs and sockets of mounts that no longer run and that nothing
    has changed for STALE_AFTER seconds; the names removed. Only names that match gcfs's own
    exactly, only regular files (a socket for `.sock`) with one link that the user owns
    (lstat: a link is never followed, and is left alone), only in a runtime directory that is
    not a link and that only the user may write. A key whose pid file holds a live pid keeps
    all its files (the mount's own too: it writes its pid file first); one whose pid file
    cannot be read (a link, a FIFO) also does. Never raises OSError: cleaning up is no reason
    for a mount to fail."""
    now = time.time() if now is None else now
    try:
        fd = safeio.open_directory(runtime_dir())
    except (OSError, UnsafeRuntimeDir):
        return []
    removed: list[str] = []
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            return []
        alive: dict[str, bool] = {}
        for name in sorted(os.listdir(fd)):
            match = _STALE_NAME.fullmatch(name)
            if match is None:
                continue
            try:
                found = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            kind_ok = (
                stat.S_ISSOCK(found.st_mode)
                if name.endswith(".sock")
                else stat.S_ISREG(found.st_mode)
            )
            if (
                not kind_ok
                or found.st_uid != os.getuid()
                or found.st_nlink != 1
                or now - found.st_mtime < STALE_AFTER
            ):
                continue
            key = match.group(1)
            if key not in alive:
                alive[key] = _key_alive(key, fd)
            if alive[key]:
                continue
            try:
                os.unlink(name, dir_fd=fd)
            except OSError:  # gone already (another mount starting removed it first)
                continue
            removed.append(name)
    except OSError:
        pass
    finally:
        os.close(fd)
    return removed


def _key_alive(key: str, dir_fd: int) -> bool:
    """Whether the pid file of `key` names a running process (or cannot be read: then what it
    stands for is kept). No pid file, or none gcfs could have written, is a mount that ended."""
    try:
        data = safeio.read_small(f"{key}.pid", _PID_LIMIT, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        pid = int(data.split(b"\n", 1)[0])
    except ValueError:
        return False
    return pid > 0 and is_alive(pid) and is_gcfs_process(pid)
