"""BlockStore: the on-disk cache of remote file contents, one sparse data file per remote file,
safe to share between daemons on one machine and on many (a cluster filesystem).

Layout (modes: cachedir.py; private: 0700 directories and 0600 files, group: subdirectories
3770 (setgid, sticky) and files 0660):

    <directory>/.gcfs-directory.json        the marker (marker.py): a block cache or a snapshot
    <directory>/store/<hh>/<digest>.data    the remote file's bytes at their own offsets, sparse:
                                            block i lives at [i * block_size, ...)
    <directory>/store/<hh>/<digest>.index   append-only 48-byte records, one per stored block
                                            (plus size-only and "dropped" records)

`<digest>` is the sha256 of the file's key, its identity on the platform that never changes
(the /media/ URL, or a DICOM instance URL without its query; never a signed URL). `<hh>`, the
digest's first two hex digits, fans thousands of files out over 256 directories. Data is
immutable by key: whoever writes block i of a key writes the same bytes.

The store in parts, one job each (the methods of one `BlockStore`, built up by inheritance):

    blockfiles.py    names, the descriptors held open (let go when unlinked under us), the
                     bytes read and written (O_DIRECT), and the state every part shares
    blockaccount.py  accounting, eviction and rescans
    blockread.py     index state (the records parsed from index files) and reads
    blockwrite.py    writes of blocks and sizes
    blockmaint.py    the whole directory: usage, prune, verify, clear, sync (`gcfs cache`)
    blockstore.py    this: the overview, the state and its lock, opening the directory

Trust. A private cache (0700/0600) is the user's alone. A group cache (an administrator's
`install -d -m 3770 -g lab DIR`) trusts every member of the group with the integrity of the
cached bytes: any member can write blocks for a key that every other member's daemon then
serves. What no member can do, whatever they plant in the directory (links, hard links, FIFOs,
devices, hostile records), to a daemon of another member or one running as root:
- make it write, create, chmod or unlink anything outside the cache, or anything that is not a
  file of gcfs's own names: every name below the directory is opened relative to its parent's
  descriptor with O_NOFOLLOW (safeio.py), `store/` and `store/<hh>/` included; files are
  created with O_CREAT | O_EXCL and their mode set with fchmod on that descriptor; an existing
  file must be a regular file with one link (a planted hard link is refused); directory scans
  never follow a link and unlink only `<digest>.data`, `<digest>.index` (the digest in its own
  `<hh>`) and temporary names; the old cache format is removed only in a marked directory;
- hang it: opens use O_NONBLOCK and fstat, so a FIFO is a miss, logged once;
- crash it or make it loop or allocate by a count a record gives: an index is read 1 MiB at a
  time and at most INDEX_LIMIT bytes (less when the server's size is known), loops run over
  records, never over `range(size / block_size)`, and a record that does not fit the caller's
  buffer is a miss;
- make it serve bytes that disagree with the size it learned from the server: callers that know
  it pass it (`size=`), and records of any other size are not believed;
- remove or replace another member's files: subdirectories are sticky (3770); an eviction the
  filesystem refuses (EPERM) is skipped, its bytes stay counted, and other files are evicted
  instead; `gcfs cache prune` by the directory's owner or root removes them. A group cache
  without the sticky bit is reported once (`chmod +t DIR`).
Every member can read every cached file directly, whatever their Grand Challenge permissions.

Sharing. What is guaranteed, with any number of daemons of one user or of one group, on one
machine or on several machines sharing the directory over NFS, Lustre, CephFS, GPFS or BeeGFS:
- bytes handed out are exactly the bytes written for that key and block, by whichever daemon
  (of a trusted member) wrote them: length and crc32 are checked by every process before it
  trusts a block, data is written before its record (and flushed first on a network
  filesystem), and nothing is ever modified in place;
- a block another daemon stored is found: a miss re-reads the index (re-opened) before the
  block is fetched, so the second daemon to read a file fetches nothing that the first stored
  and flushed;
- eviction and `gcfs cache clear` only unlink whole files. A reader with open descriptors keeps
  reading intact bytes on a local filesystem; on NFS another client's unlink makes them fail
  (ESTALE), which is a miss. Two daemons evicting at once lose nothing but cache. A daemon
  notices within LINK_CHECK_INTERVAL (2 s) that files it holds open were unlinked (a link
  count of 0, or another inode under the name: checked on use and by a sweep thread) and
  closes them, so the disk space returns and its statistics drop;
- index files are never rewritten or truncated, only appended to (and unlinked whole), so no
  rewrite can race with another daemon's append. We chose that over rewriting under flock:
  Lustre refuses flock unless mounted with `-o flock`, NFS with `local_lock` takes it on one
  machine only, and what a rewrite bought (dropping a torn tail, compacting superseded records)
  is covered without it: the parser skips torn and clobbered bytes, and re-reading the index
  before appending keeps duplicates out. An index grows by 48 bytes per block stored (0.005 %
  of the data); eviction is what shrinks it.
What is not guaranteed:
- that a block is fetched only once across daemons: two daemons that miss the same block at
  the same moment both fetch and store it (identical bytes; the second record is redundant);
- that a record survives: O_APPEND is not atomic across NFS clients, so two clients appending
  at once may overwrite each other's records. A lost record is a miss, never a wrong byte;
- exact accounting: between rescans a daemon does not see what others wrote, so the directory
  may exceed `max_bytes` by what all daemons write in RESCAN_MAX_AGE seconds; and writes to a
  file another daemon has just evicted land in the unlinked file and are lost (a miss later);
- freshness on NFS beyond close-to-open: a record another client appended shows once that
  client flushed it (step 5 of a write, blockwrite.py: before its write call returns) and our
  open revalidated the index.

Thread safety: the methods run in worker threads (never on the trio thread: on NFS any syscall
may block). One lock, `BlockStore._lock` (made in `__init__` below and taken by every part of
the store; a method named `*_locked` expects it held), guards the in-memory tables and the
accounting and is never held across a read, write, open, stat or unlink (closing a descriptor
is the one syscall made under it; on a network filesystem nothing dirty is left for a close to
flush by then); each entry has a second lock that serializes re-reading its index. A set of
open descriptors (`_Files`) is counted by its users and closed by the last one once retired
(evicted, replaced, or pushed out of the descriptor cache).

Invariants: bytes returned by `read_into` are byte for byte those given to `write` for that key
and block by a writer of the directory (checked once per data file per process), of the size
the caller gave when it gave one; total_bytes <= max_bytes after every write as far as this
process can tell, except for files the filesystem refused to let it evict (counted, kept); a
read-only store (an offline snapshot) never writes, chmods, touches or unlinks anything; a
store opens only a directory of its kind (marker.py) and refuses anything else before touching
it; a directory left by the old one-file-per-block cache (`blocks/`, `sizes/`) is removed at
start only when it carries gcfs's marker; `sync()` makes everything written durable (fsync of
every file and directory: a snapshot calls it before writing the tree that names it); at most
`max_entries` files are tracked in memory (besides any a thread is using at that moment),
the rest counted as `untracked` (blockaccount.py).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from . import cachedir, marker, safeio
from .blockaccount import MAX_ENTRIES, MAX_REFUSED, RESCAN_INTERVAL, RESCAN_MAX_AGE, STALE_AGE
from .blockfiles import (
    _SWEEPER,
    LINK_CHECK_INTERVAL,
    MAX_OPEN_FILES,
    STORE_DIR,
    key_digest,
    log,
    temporary_name,
)
from .blockindex import RECORD_SIZE
from .blockmaint import StoreMaintenance, VerifyReport
from .blockread import INDEX_LIMIT, USE_TOUCH_INTERVAL
from .blockwrite import StoreWrites
from .marker import WrongDirectory

# 1 MiB: large enough that a block costs one ranged GET of useful size (S3 first-byte latency
# is 20-100 ms) and one FUSE request at read_ahead_kb 1024; small enough that a random 64 KiB
# read of a huge TIFF fetches at most 1 MiB.
DEFAULT_BLOCK_SIZE = 1 << 20
# `max_bytes` of a store that never evicts on its own: a snapshot's (it must hold every byte
# its tree records) and `gcfs cache`'s (prune evicts to the size asked, nothing else does).
# 4 EiB: no filesystem holds that much.
NO_LIMIT = 1 << 62


@dataclass(frozen=True, slots=True)
class BlockStoreStatistics:
    hits: int  # blocks read from disk
    misses: int  # blocks asked for and not there (or damaged)
    evictions: int  # remote files evicted
    damaged: int  # blocks or records found damaged
    files: int  # remote files with something on disk
    bytes: int  # on disk, as the filesystem counts it
    found_later: int  # blocks found by re-reading an index (another daemon stored them)
    rescans: int  # times the accounting was brought back to what is on disk
    untracked: int  # of `files`, those beyond the in-memory table's bound (max_entries)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        safeio.close_quietly(fd)
    fds.clear()


class BlockStore(StoreWrites, StoreMaintenance):
    """Contents of immutable remote files on disk, at most `max_bytes` (module docstring).

    `kind`: the directory this store expects, marker.BLOCK_CACHE (`--cache-dir`, the
    default) or marker.SNAPSHOT (`gcfs snapshot --to`). A writable store uses a directory
    of its kind, adopts one gcfs made before markers, and creates (and marks) a missing or
    empty one; anything else is refused with WrongDirectory (a UserError: one line), and
    nothing in it is touched. `readonly`: only read (an offline mount of a snapshot, `gcfs
    cache status`: never a write, chmod, touch or unlink); any gcfs directory, or an empty
    one, is accepted. `network`: treat the directory as on a network filesystem (None: from
    its type, see cachedir.py). `max_entries`: files tracked in memory at most (MAX_ENTRIES,
    blockaccount.py); the others are counted as `untracked`."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        readonly: bool = False,
        network: bool | None = None,
        kind: str = marker.BLOCK_CACHE,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        if block_size <= 0 or max_bytes < 0:
            raise ValueError("block_size must be positive and max_bytes not negative")
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        if kind not in marker.FORMATS:
            raise ValueError(f"unknown kind of directory {kind!r}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.readonly = readonly
        self.kind = kind
        self._lock = threading.Lock()
        self._entries = OrderedDict()  # LRU order, oldest first
        self._open = OrderedDict()  # entries with open descriptors
        self._refused = OrderedDict()  # evictions refused (EPERM)
        self._total = 0
        self.max_entries = max_entries
        self._untracked = self._untracked_bytes = 0
        self._hits = self._misses = self._evictions = self._damaged = 0
        self._found_later = self._rescans = self._damaged_blocks = 0
        self._rescanned = 0.0  # time.monotonic() of the last rescan
        self._swept = time.monotonic()  # of the last check of held descriptors
        self._direct = hasattr(os, "O_DIRECT")  # until the filesystem refuses it
        self._told = set()  # messages logged once (a handful of fixed texts)
        self.direct_writes = self.buffered_writes = 0  # statistics: pwrite calls
        # The cache directory and its store/, held open for the store's life: every name
        # below them is opened relative to these, never by a path (module docstring).
        self._fds: list[int] = []
        weakref.finalize(self, _close_fds, self._fds)
        self._top = self._store_fd = -1
        self.dir = self._open_directory()
        self.network = self.dir.network if network is None else network
        self._rescan(start=True)
        if not readonly:
            # A smaller max_bytes than last time: shrink now rather than on the next write.
            with self._lock:
                victims = self._evict_until(self.max_bytes, keep=None)
            self._unlink(victims)
        _SWEEPER.add(self)
        log.debug(
            "block store %s (%s, %s%s): %d files, %d bytes",
            self.directory,
            self.dir.mode_name,
            self.dir.fstype or "unknown filesystem",
            ", network" if self.network else "",
            len(self._entries),
            self._total,
        )

    # -- the directory ------------------------------------------------------------------------

    def _open_directory(self) -> cachedir.CacheDir:
        """Open (and when writable, create and mark) the directory and its store/; refuse one
        that is not of our kind (WrongDirectory) before anything in it is touched."""
        path, writable = self.directory, not self.readonly
        try:
            top, created = cachedir.open_top(path, create=writable)
        except FileNotFoundError:
            raise WrongDirectory(marker.refusal(path, marker.Kind.MISSING, self.kind)) from None
        except NotADirectoryError:
            raise WrongDirectory(
                marker.refusal(path, marker.Kind.NOT_DIRECTORY, self.kind)
            ) from None
        self._fds.append(top)
        self._top = top
        found = marker.classify_open(top)
        if not self._accepts(found):
            raise WrongDirectory(marker.refusal(path, found, self.kind))
        # A snapshot's directory keeps the mode it has (the user chose it: `gcfs snapshot`
        # never changes what it did not create); a cache's loses bits for others.
        fix = writable and (created or self.kind == marker.BLOCK_CACHE)
        where = cachedir.inspect_fd(path, top, created=created, fix=fix)
        if not writable:
            try:
                self._store_fd = safeio.open_directory(STORE_DIR, dir_fd=top)
                self._fds.append(self._store_fd)
            except FileNotFoundError:
                pass  # an empty directory: nothing stored
            return where
        if found in (marker.Kind.EMPTY, marker.Kind.OLD_BLOCK_CACHE, marker.Kind.OLD_SNAPSHOT):
            try:
                marker.ensure(top, self.kind, where.file_mode)
            except (OSError, ValueError) as exc:
                raise WrongDirectory(f"{path}: cannot mark it as gcfs's: {exc}") from None
            if found is not marker.Kind.EMPTY:
                log.info("%s: %s, marked as such now", path, found.value)
        self._store_fd, _ = safeio.make_directory(STORE_DIR, where.dir_mode, dir_fd=top)
        self._fds.append(self._store_fd)
        self._remove_old_format()
        return where

    def _accepts(self, found: marker.Kind) -> bool:
        kinds = marker.Kind
        if self.readonly:
            return found is kinds.EMPTY or found.is_cache or found.is_snapshot
        if found is kinds.EMPTY:
            return True
        return found.is_snapshot if self.kind == marker.SNAPSHOT else found.is_cache

    # -- the whole store --------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    @property
    def mode(self) -> str:
        """`private` or `group` (cachedir.py)."""
        return self.dir.mode_name

    def statistics(self) -> BlockStoreStatistics:
        with self._lock:
            return BlockStoreStatistics(
                self._hits,
                self._misses,
                self._evictions,
                self._damaged,
                len(self._entries) + self._untracked,
                self._total,
                self._found_later,
                self._rescans,
                self._untracked,
            )

    def close(self) -> None:
        """Close every file descriptor (the store stays usable: they are reopened on demand;
        the directory's own descriptors stay open until the store is garbage)."""
        with self._lock:
            for entry in list(self._open.values()):
                files = entry.files
                entry.files = None
                if files is not None:
                    self._retire_locked(files)
            self._open.clear()


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "INDEX_LIMIT",
    "LINK_CHECK_INTERVAL",
    "MAX_ENTRIES",
    "MAX_OPEN_FILES",
    "MAX_REFUSED",
    "NO_LIMIT",
    "RECORD_SIZE",
    "RESCAN_INTERVAL",
    "RESCAN_MAX_AGE",
    "STALE_AGE",
    "STORE_DIR",
    "USE_TOUCH_INTERVAL",
    "BlockStore",
    "BlockStoreStatistics",
    "VerifyReport",
    "WrongDirectory",
    "key_digest",
    "temporary_name",
]
