"""What a block cache directory is: private or shared by a group, on a local or a network
filesystem. The block store (blockstore.py) asks this module how to create what it creates and
how to publish what it writes; `gcfs cache status` shows the answers.

Modes (the directory's own permissions decide; nothing is configured):

    private   the default: a directory gcfs creates is made 0700, subdirectories 0700, files
              0600. Only the daemons of one user share it (two mounts, or a home directory on
              NFS). An existing directory is not chmodded, except that bits for others are
              removed when the user owns it (0755 becomes 0750).
    group     the directory exists with the setgid bit and rwx for its group (an administrator
              made it: `install -d -m 3770 -g lab /shared/gcfs-cache`). Subdirectories are made
              3770 and files 0660, so every member of the group reads what any member fetched
              and may append to its index; the setgid bit gives new files the directory's group,
              and the sticky bit keeps members from removing or replacing each other's files
              (without it, reported once: `chmod +t DIR`). Members are trusted with the
              integrity of the cached bytes (blockstore.py, "Trust"). Nothing is ever readable
              by others (these are medical images): bits for others on a directory we own are
              removed; on one we do not own they are reported once. The directory's own mode is
              otherwise left alone.

Every mode is set with fchmod on a descriptor, never by path, and only on what gcfs created
(plus removing bits for others on the cache directory the user owns).

Filesystems: on a local filesystem every process of the machine shares one page cache, so what
one daemon wrote is what another reads. Anything else (NFS, SMB, Lustre, CephFS, GPFS, BeeGFS,
FUSE, or a type we do not know) is treated as a network filesystem whose clients may cache
stale pages and see another client's writes only after that client flushed them
(close-to-open consistency at best): the block store then flushes data before publishing its
index record and re-reads fresh before calling a block damaged (blockstore.py, "Sharing"). The
type comes from /proc/self/mountinfo (the mount with the longest matching mount point).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from . import safeio

log = logging.getLogger(__name__)

# Filesystems whose processes share one page cache: the only ones where a write is visible to
# every reader as soon as it returns. Everything else is published with fsync (see above).
LOCAL_FILESYSTEMS = frozenset(
    {
        "btrfs",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "jfs",
        "overlay",
        "ramfs",
        "reiserfs",
        "tmpfs",
        "xfs",
        "zfs",
        "bcachefs",
    }
)

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
# Sticky: members of the group cannot rename or unlink each other's files (only the file's
# owner, the directory's owner and root can), so no member can swap another's file for a link.
GROUP_DIR, GROUP_FILE = 0o3770, 0o660

# Warned once per process and directory (a daemon has one or two cache directories).
_warned: set[str] = set()


@dataclass(frozen=True, slots=True)
class CacheDir:
    """How to treat one cache directory (module docstring)."""

    path: Path
    group: bool  # shared by the directory's group (setgid + g=rwx), else private
    fstype: str  # from /proc/self/mountinfo; "" when unknown
    network: bool  # not a local filesystem: flush before publishing, re-read before distrust
    sticky: bool = False  # a group directory with the sticky bit (members keep their files)

    @property
    def mode_name(self) -> str:
        return "group" if self.group else "private"

    @property
    def dir_mode(self) -> int:
        return GROUP_DIR if self.group else PRIVATE_DIR

    @property
    def file_mode(self) -> int:
        return GROUP_FILE if self.group else PRIVATE_FILE

    def fix_file_mode(self, fd: int) -> None:
        """Give a file we created (and own) the mode's permissions, whatever the umask did.
        On a descriptor, never by path: only call it for a file this process created."""
        with contextlib.suppress(OSError):
            info = os.fstat(fd)
            if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != self.file_mode:
                os.fchmod(fd, self.file_mode)


def is_group_directory(mode: int) -> bool:
    """A directory an administrator made for a group: setgid and rwx for the group (the
    sticky bit is recommended, not required: see `describe_fd`)."""
    return bool(mode & stat.S_ISGID) and mode & 0o070 == 0o070


def open_top(path: Path, *, create: bool) -> tuple[int, bool]:
    """A descriptor of the cache directory `path` (the path the user named: its links are
    followed) and whether we created it. With `create`, a missing one is made 0700 (its
    missing parents with the umask's default, as `mkdir -p` would)."""
    path = Path(path)
    try:
        return safeio.open_directory(path, follow=True), False
    except FileNotFoundError:
        if not create:
            raise
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, created = safeio.make_directory(path, PRIVATE_DIR)
    return fd, created


def inspect(path: Path, *, create: bool) -> CacheDir:
    """The mode and filesystem of cache directory `path`. With `create`, a missing directory
    is created private (0700), and bits for others are removed from one we own."""
    fd, created = open_top(path, create=create)
    try:
        return inspect_fd(Path(path), fd, created=created, fix=create)
    finally:
        os.close(fd)


def inspect_fd(path: Path, fd: int, *, created: bool, fix: bool) -> CacheDir:
    """`inspect` of the directory open as `fd`. With `fix`, its permissions are made right,
    on the descriptor: one we created gets the private mode; one we did not create is never
    chmodded, except that bits for others are removed from one we own (these are images)."""
    info = os.fstat(fd)
    group = is_group_directory(info.st_mode)
    if fix:
        _fix_top(path, fd, info, group, created)
    sticky = group and bool(info.st_mode & stat.S_ISVTX)
    if group and not sticky and str(path) not in _warned:
        _warned.add(str(path))
        log.warning(
            "group cache %s has no sticky bit: its members can remove and replace each "
            "other's files; its owner should run: chmod +t %s",
            path,
            path,
        )
    fstype = filesystem_type(path)
    return CacheDir(Path(path), group, fstype, fstype not in LOCAL_FILESYSTEMS, sticky)


def _fix_top(path: Path, fd: int, info: os.stat_result, group: bool, created: bool) -> None:
    mode = stat.S_IMODE(info.st_mode)
    mine = info.st_uid == os.geteuid()
    if created:
        if mine and mode != PRIVATE_DIR:
            os.fchmod(fd, PRIVATE_DIR)  # the umask may have loosened it
        return
    if mode & 0o007 == 0:
        return
    if mine:
        os.fchmod(fd, mode & ~0o007)
        log.info("block cache %s: removed the permissions of others (it holds images)", path)
    else:
        log.warning(
            "block cache %s is open to users outside its group (mode %o); its owner should "
            "run: chmod o-rwx %s",
            path,
            mode,
            path,
        )


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The filesystem type of the mount holding `path` ("" when it cannot be told)."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8") as f:
                mountinfo = f.read()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, found = -1, ""
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if " - " not in line or len(fields) < 5:
            continue
        point = _unescape(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best = len(point)
            found = line.split(" - ", 1)[1].split(" ", 1)[0]
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


__all__ = [
    "GROUP_DIR",
    "GROUP_FILE",
    "LOCAL_FILESYSTEMS",
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "CacheDir",
    "filesystem_type",
    "inspect",
    "inspect_fd",
    "is_group_directory",
    "open_top",
]
