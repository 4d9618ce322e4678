"""The marker gcfs writes into the directories it makes its own: a block cache (`--cache-dir`)
or a snapshot (`gcfs snapshot --to`). Commands that delete, chmod or write into a directory
act only on one that carries the right marker, so that `gcfs cache clear --cache-dir ~/data`
or `gcfs snapshot --to ~/thesis` refuse instead of destroying what gcfs did not make.

The marker is a small JSON file, `DIR/.gcfs-directory.json`: {"gcfs": KIND, "format": N}.
It is written once, with O_EXCL, when gcfs creates or adopts the directory, and read with
O_NOFOLLOW and a size limit (a shared directory is hostile: safeio.py).

Directories made by gcfs before markers existed are adopted where they cannot be anything
else: a directory holding only `store/` is a block cache, one holding a `tree.json` of
gcfs's snapshot format is a snapshot. Anything else without a marker is somebody else's.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from . import safeio
from .errors import UserError

MARKER = ".gcfs-directory.json"
BLOCK_CACHE = "block-cache"
SNAPSHOT = "snapshot"
# The format of each kind this gcfs writes and reads; a marker with another number is from
# another version of gcfs, whose files this one does not understand.
FORMATS = {BLOCK_CACHE: 1, SNAPSHOT: 1}
# A marker is ~40 bytes; anything much larger is not ours, and is not read whole.
_LIMIT = 4096
# In a snapshot's tree.json's first bytes (snapshot.FORMAT): for snapshots older than markers.
_SNAPSHOT_TREE = "tree.json"
_SNAPSHOT_FORMAT = b'"format": "gcfs-snapshot/'


class Kind(Enum):
    """What a directory is, as far as gcfs is concerned."""

    MISSING = "missing"  # nothing there: gcfs may create it
    EMPTY = "empty"  # an empty directory: gcfs may take it
    BLOCK_CACHE = "a gcfs block cache"
    SNAPSHOT = "a gcfs snapshot"
    OLD_BLOCK_CACHE = "a gcfs block cache made before markers"
    OLD_SNAPSHOT = "a gcfs snapshot made before markers"
    OTHER_VERSION = "a gcfs directory of another version"
    NOT_DIRECTORY = "not a directory"
    FOREIGN = "not made by gcfs"

    @property
    def is_cache(self) -> bool:
        return self in (Kind.BLOCK_CACHE, Kind.OLD_BLOCK_CACHE)

    @property
    def is_snapshot(self) -> bool:
        return self in (Kind.SNAPSHOT, Kind.OLD_SNAPSHOT)


class WrongDirectory(UserError):
    """A directory gcfs was asked to use is not of the kind it expects (a snapshot given as a
    cache, somebody else's directory, ...): one line for the user, nothing touched."""


def refusal(path: Path, found: Kind, expected: str) -> str:
    """The one line that says why `path` (found to be `found`) is not used as `expected`."""
    if found.is_snapshot and expected == BLOCK_CACHE:
        return f"{path} is a gcfs snapshot; mount it with --offline"
    if found.is_cache and expected == SNAPSHOT:
        return f"{path} is a gcfs block cache, not a snapshot; use another directory"
    if found is Kind.NOT_DIRECTORY:
        return f"{path} is not a directory"
    if found is Kind.MISSING:
        return f"{path} does not exist"
    if found is Kind.OTHER_VERSION:
        return f"{path} was made by another version of gcfs; use that version or another directory"
    return f"{path} was not made by gcfs (no {MARKER} in it); use another directory, new or empty"


@dataclass(frozen=True, slots=True)
class Marker:
    kind: str
    format: int


def read(directory_fd: int) -> Marker | None:
    """The marker in the directory open as `directory_fd`; None when there is none. Raises
    OSError for a marker that is a link or special file, ValueError for one that is not ours."""
    try:
        raw = safeio.read_small(MARKER, _LIMIT, dir_fd=directory_fd)
    except FileNotFoundError:
        return None
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a gcfs marker")
    kind, version = data.get("gcfs"), data.get("format")
    if not isinstance(kind, str) or not isinstance(version, int) or isinstance(version, bool):
        raise ValueError("not a gcfs marker")
    return Marker(kind, version)


def write(directory_fd: int, kind: str, mode: int) -> None:
    """Mark the directory open as `directory_fd` as `kind`, with file mode `mode`. EEXIST if
    a marker (or anything by that name) is there already."""
    text = json.dumps({"gcfs": kind, "format": FORMATS[kind]}) + "\n"
    fd = safeio.create_exclusive(MARKER, os.O_WRONLY, mode, dir_fd=directory_fd)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure(directory_fd: int, kind: str, mode: int) -> bool:
    """Mark the directory as `kind` unless it carries that marker already (another process
    may have written it first); True when we wrote it. ValueError when another marker is
    there (the caller refuses the directory), OSError when something that is not a marker
    file is."""
    try:
        write(directory_fd, kind, mode)
        return True
    except FileExistsError:
        pass
    found = read(directory_fd)
    if found is None or found.kind != kind or FORMATS.get(kind) != found.format:
        raise ValueError(f"another marker is there: {found}")
    return False


def classify(path: Path) -> Kind:
    """What `path` is (see Kind). Reads only the marker, the names in the directory and, for
    an unmarked directory with a tree.json, that file's first bytes."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return Kind.MISSING
    if not stat.S_ISDIR(info.st_mode):
        return Kind.NOT_DIRECTORY
    fd = safeio.open_directory(path, follow=True)
    try:
        return classify_open(fd)
    finally:
        os.close(fd)


def classify_open(fd: int) -> Kind:
    """`classify` of the directory open as `fd`."""
    try:
        found = read(fd)
    except (OSError, ValueError):
        return Kind.FOREIGN
    if found is not None:
        if FORMATS.get(found.kind) != found.format:
            return Kind.OTHER_VERSION if found.kind in FORMATS else Kind.FOREIGN
        return Kind.BLOCK_CACHE if found.kind == BLOCK_CACHE else Kind.SNAPSHOT
    names = set(os.listdir(fd))
    if not names:
        return Kind.EMPTY
    if _SNAPSHOT_TREE in names and _old_snapshot(fd):
        return Kind.OLD_SNAPSHOT
    if names == {"store"} and _is_directory(fd, "store"):
        return Kind.OLD_BLOCK_CACHE
    return Kind.FOREIGN


def _old_snapshot(fd: int) -> bool:
    try:
        tree = safeio.open_regular(_SNAPSHOT_TREE, dir_fd=fd)
    except OSError:
        return False
    try:
        return _SNAPSHOT_FORMAT in os.pread(tree, 64, 0)
    except OSError:
        return False
    finally:
        os.close(tree)


def _is_directory(fd: int, name: str) -> bool:
    try:
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode)


__all__ = [
    "BLOCK_CACHE",
    "FORMATS",
    "MARKER",
    "SNAPSHOT",
    "Kind",
    "Marker",
    "WrongDirectory",
    "classify",
    "classify_open",
    "ensure",
    "read",
    "refusal",
    "write",
]
