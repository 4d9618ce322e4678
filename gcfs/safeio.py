"""Opening and creating files in a directory other users can write: a group cache, a shared
snapshot. Such a directory is hostile: a member can put a symlink, a hard link, a FIFO or a
device where gcfs expects its own file, or swap a subdirectory for a link, between any two of
our system calls. The rules here are those of OpenSSH, git and systemd-tmpfiles:

- never follow a link: every component below the directory the user named is opened with
  O_NOFOLLOW relative to its parent's descriptor (`dir_fd`), so a subdirectory replaced by a
  symlink to /etc is refused (ELOOP/ENOTDIR), not followed;
- refuse what is not a regular file, without blocking: opened with O_NONBLOCK (a FIFO opens
  at once instead of waiting for a writer), checked with fstat, O_NONBLOCK cleared after;
- create with O_CREAT | O_EXCL, so a name that appeared meanwhile is never reused, and set the
  mode with fchmod on the descriptor we created (the umask would drop the group's bits);
- a directory is created with mkdir, then opened (O_DIRECTORY | O_NOFOLLOW) and checked:
  its mode is set only when we created it and we own it, never on one somebody planted.

Every function raises OSError: ELOOP for a link, EINVAL (`NotRegular`) for something that is
not a regular file or directory, EEXIST from the exclusive creates. Callers in a cache treat
all of them as a miss or a refusal, never as a reason to fall back to a plain open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | _OPEN

# An EEXIST on create, then ENOENT on open: the name came and went between two calls (another
# daemon evicting). Three rounds: a name that keeps changing is somebody's attack, not a race.
_ATTEMPTS = 3

Name = str | Path


class NotRegular(OSError):
    """Something other than what we expect (a FIFO, a device, a socket, a directory)."""

    def __init__(self, name: Name, what: str) -> None:
        super().__init__(errno.EINVAL, f"not a {what}", os.fspath(name))


def describe(mode: int) -> str:
    """What kind of file `mode` is, for messages."""
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def open_directory(name: Name, *, dir_fd: int | None = None, follow: bool = False) -> int:
    """A descriptor of directory `name`. `follow`: only for the directory the user named
    (their path, their links); below it, never."""
    flags = _DIRECTORY if not follow else (_DIRECTORY & ~os.O_NOFOLLOW)
    return os.open(name, flags, dir_fd=dir_fd)


def make_directory(name: Name, mode: int, *, dir_fd: int | None = None) -> tuple[int, bool]:
    """Directory `name` (created with `mode` if missing): its descriptor, and whether we
    created it. The mode is set on the descriptor, and only on a directory we created and
    own: one that was there before (or planted between mkdir and open) keeps its mode."""
    created = False
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
        created = True
    except FileExistsError:
        pass
    fd = open_directory(name, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if created and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd, created


def open_regular(
    name: Name, flags: int = os.O_RDONLY, *, dir_fd: int | None = None, single: bool = False
) -> int:
    """Open an existing regular file without following a link and without blocking on a
    FIFO; anything else raises (ELOOP for a link, NotRegular otherwise). `single`: refuse
    a file with more than one link too (a hard link somebody planted to a file elsewhere;
    the files gcfs makes in a cache have exactly one)."""
    fd = os.open(name, flags | _OPEN | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular(name, "regular file")
        if single and info.st_nlink > 1:
            raise NotRegular(name, "file with a single link")
        _blocking(fd, flags)
    except OSError:
        os.close(fd)
        raise
    return fd


def create_exclusive(name: Name, flags: int, mode: int, *, dir_fd: int | None = None) -> int:
    """Create regular file `name`, which must not exist (EEXIST otherwise), with `mode` set
    on the descriptor whatever the umask."""
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | _OPEN, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_or_create(
    name: Name, flags: int, mode: int, *, dir_fd: int | None = None, single: bool = False
) -> tuple[int, bool]:
    """Regular file `name`, created with `mode` when missing: its descriptor and whether we
    created it. An existing one is opened as `open_regular` opens it (its mode untouched;
    `single` as there)."""
    for _ in range(_ATTEMPTS):
        try:
            return create_exclusive(name, flags, mode, dir_fd=dir_fd), True
        except FileExistsError:
            pass
        try:
            return open_regular(name, flags, dir_fd=dir_fd, single=single), False
        except FileNotFoundError:
            continue
    raise OSError(errno.EAGAIN, "keeps appearing and disappearing", os.fspath(name))


def read_small(name: Name, limit: int, *, dir_fd: int | None = None) -> bytes:
    """The whole content of a small regular file (a marker, a manifest), refusing links and
    special files, and a file larger than `limit` bytes (EFBIG): a parser is bounded by what
    it reads."""
    fd = open_regular(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(name))
        data = os.pread(fd, limit + 1, 0)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(name))
        return data
    finally:
        os.close(fd)


def _blocking(fd: int, flags: int) -> None:
    """Clear O_NONBLOCK, which was only for the open, unless the caller asked for it."""
    if flags & os.O_NONBLOCK:
        return
    current = fcntl.fcntl(fd, fcntl.F_GETFL)
    if current & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, current & ~os.O_NONBLOCK)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


__all__ = [
    "NotRegular",
    "close_quietly",
    "create_exclusive",
    "describe",
    "make_directory",
    "open_directory",
    "open_or_create",
    "open_regular",
    "read_small",
]
