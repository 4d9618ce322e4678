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

An index is a sequence of 48-byte records (blockindex.py): one per block stored, size-only
and "dropped" ones. The last record of a block wins; every record carries the remote file's
total size, so a size survives remounts. A record that fails its own crc is skipped and the next
one found by its magic: bytes torn by a crash, or clobbered by another NFS client's append, cost
the records they hit and nothing after them.

Writing blocks: (1) re-read the index's new tail (blocks another daemon stored meanwhile are not
written again); (2) `pwrite` the data at its offsets, whole pages with O_DIRECT; (3) on a
network filesystem, `fdatasync` the data if any of it went through the page cache; (4) append
all records with one `write` on an O_APPEND descriptor; (5) on a network filesystem,
`fdatasync` the index. Data reaches the disk (or the server) before the record that makes it
visible; a crash in between leaves data without a record: unused, never served.

Reading blocks: from the records this process has parsed. A block that is not there sends the
process back to the index file first (re-opened, so that NFS revalidates it; only the new tail
is read): other daemons append to it. Every block is checked (length and crc32) the first time
it is read in a process's life from a given data file (a file another daemon replaced is
checked again); blocks this process wrote or checked are trusted after that: checking every
hit would cost ~0.27 CPU-s per GiB of cached re-reads. A block that fails its check is a miss:
first the index is looked at again (a file replaced under us is not damage), on a network
filesystem the block is read again bypassing the page cache (a stale page is not damage
either), and only then is it damage: logged once per file, and a "dropped" record appended.

Why crc32: the threat it answers is accidental damage (a crash, a disk, a user poking at
files), which a 32-bit CRC catches with probability 1 - 2^-32 and every burst up to 32 bits for
certain. It is the fastest checksum in the standard library here (~270 us per MiB; sha256 with
SHA-NI ~850 us, blake2b ~2,200 us), and it runs in a worker thread with the GIL released. It is
not keyed and is no defence against a writer: whoever can write the directory can write
well-formed blocks and records for any key, and a keyed or cryptographic hash would not change
that (the key would have to be shared with every writer). A group cache therefore trusts every
member with the integrity of everything in it ("Trust" below).

Eviction: whole remote files, least recently used first, until `max_bytes` holds what is on
disk, counted as the filesystem does (st_blocks of the data file plus the index's length), so
sparse files count what they really use. A single file larger than the whole cache keeps the
blocks that fit and stores no more. Use is recorded for other daemons and later mounts in the
index's mtime (touched on first use and at most every USE_TOUCH_INTERVAL seconds). The
accounting is this process's view, brought back to what is on disk by a rescan of the directory
before evicting (at most every RESCAN_INTERVAL seconds) and while writing (every
RESCAN_MAX_AGE seconds), so other daemons' writes count.

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
  client flushed it (step 5: before its write call returns) and our open revalidated the index.

O_DIRECT: whole pages are written and read with O_DIRECT on every filesystem that accepts it
(EINVAL switches to the page cache). On a local disk it saves the page-cache copy (writing
1 GiB: 0.04 CPU-s instead of 0.58-1.1 here). On NFS it is what makes sharing cheap: a direct
write returns once the server has the data (the Linux client commits it before completing the
write), so no fdatasync is needed for those pages, and a direct read asks the server, never a
stale page of the client's cache. Lustre and CephFS accept page-aligned direct I/O too and are
coherent without it. The cost on NFS: cached re-reads always go to the server (the kernel's
page cache of the gcfs mount still keeps what users read). The fdatasync of steps 3 and 5 costs
one round trip to the server each per write call (writes are batched per file, 4 MiB or more of
a large file, one call per small file); on a local filesystem neither is done: one page cache
serves every process of the machine.

Thread safety: the methods run in worker threads (never on the trio thread: on NFS any syscall
may block). One lock guards the in-memory tables and the accounting and is never held across a
read, write, open, stat or unlink (closing a descriptor is the one syscall made under it; on a
network filesystem nothing dirty is left for a close to flush by then); each entry has a second
lock that serializes re-reading its index. A set of open descriptors (`_Files`) is counted by
its users and closed by the last one once retired (evicted, replaced, or pushed out of the
descriptor cache).

Invariants: bytes returned by `read_into` are byte for byte those given to `write` for that key
and block by a writer of the directory (checked once per data file per process), of the size
the caller gave when it gave one; total_bytes <= max_bytes after every write as far as this
process can tell, except for files the filesystem refused to let it evict (counted, kept); a
read-only store (an offline snapshot) never writes, chmods, touches or unlinks anything; a
store opens only a directory of its kind (marker.py) and refuses anything else before touching
it; a directory left by the old one-file-per-block cache (`blocks/`, `sizes/`) is removed at
start only when it carries gcfs's marker; `sync()` makes everything written durable (fsync of
every file and directory: a snapshot calls it before writing the tree that names it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import re
import shutil
import socket
import stat
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import cachedir, marker, safeio
from .blockindex import (
    KIND_BLOCK,
    KIND_DROPPED,
    KIND_SIZE,
    RECORD_SIZE,
    Fields,
    parse_records,
    record,
)
from .marker import WrongDirectory

log = logging.getLogger(__name__)

# 1 MiB: large enough that a block costs one ranged GET of useful size (S3 first-byte latency
# is 20-100 ms) and one FUSE request at read_ahead_kb 1024; small enough that a random 64 KiB
# read of a huge TIFF fetches at most 1 MiB.
DEFAULT_BLOCK_SIZE = 1 << 20

STORE_DIR = "store"
_OLD_FORMAT = ("blocks", "sizes")  # the one-file-per-block cache before this one
_TMP_PREFIX = ".tmp-"
# The only names gcfs makes below store/ (and so the only ones it ever unlinks there).
_FOLDER = re.compile(r"[0-9a-f]{2}")
_FILE = re.compile(r"([0-9a-f]{64})\.(data|index)")
_TEMP = re.compile(r"\.tmp-(?:.*-)?([0-9a-f]{64})\.(?:data|index)")
# Descriptors of recently used data and index files stay open: a sequential read of a cached
# file costs one preadv per stretch instead of open/read/close per block. 64 files are at
# most 192 descriptors (data, data with O_DIRECT, index), far below the usual 1024 limit, and
# more than the files a training loader has open at once.
MAX_OPEN_FILES = 64
# An index's mtime records its last use for the LRU order of other daemons and later mounts;
# touching it on every hit would be a syscall per block.
USE_TOUCH_INTERVAL = 60.0
# Before evicting, the accounting is brought back to what is on disk (other daemons write
# too), at most this often: a rescan stats every file (~20 ms per 1,000 files locally).
RESCAN_INTERVAL = 5.0
# ... and while writing, at least this often, so that several daemons that each see only their
# own writes overshoot the limit by at most what they write in this time.
RESCAN_MAX_AGE = 30.0
# A data file without an index, or a temporary file, this old is left over by a crash; younger
# ones may belong to another daemon that is creating them right now.
STALE_AGE = 3600.0
# Held descriptors of a file that `gcfs cache clear/prune` or another daemon unlinked keep its
# disk space allocated. Each held file is checked (fstat, and a stat of its name: 3 syscalls)
# at most this often, on use and by a sweep of every store in a background thread, so the
# space comes back within a few seconds; 64 held files cost ~100 syscalls per second at most.
LINK_CHECK_INTERVAL = 2.0
# An index holds 48 bytes per block stored (plus a few size and dropped records): 64 MiB is
# the index of a 1.3 TiB file at 1 MiB blocks. A larger one is not ours to believe: what lies
# beyond is ignored (and counted as damage). Read in pieces of 1 MiB, so that no parse holds
# more than that at once.
INDEX_LIMIT = 64 << 20
_INDEX_CHUNK = 1 << 20
# When the caller knows the file's size from the server, an index larger than 4 records per
# block (and 64 KiB) is not believed beyond that either.
_INDEX_SLACK_RECORDS = 4
_INDEX_MIN = 64 << 10
# Digests whose eviction the filesystem refused (a member's file in a sticky group directory):
# remembered so that they are not tried again on every eviction; bounded, oldest forgotten.
MAX_REFUSED = 65536
# Filesystems allocate in pages: a block's real cost before it is written.
_PAGE = 4096
# Errors that mean "the file is gone" (unlinked here, or by another NFS client): a miss.
_GONE = frozenset({errno.ENOENT, errno.ESTALE})


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


@dataclass(frozen=True, slots=True)
class VerifyReport:
    files: int  # remote files looked at
    blocks: int  # blocks read and checked
    damaged: int  # blocks that failed their check (dropped)
    damaged_records: int  # index records that failed their own check (skipped)


def key_digest(key: str) -> str:
    """The sha256 hex digest that names a key's files."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _data_name(digest: str) -> str:
    return f"{digest}.data"


def _index_name(digest: str) -> str:
    return f"{digest}.index"


class _Files:
    """Open descriptors of one remote file's data (and index, once needed for appending).
    Counted by its users; closed by the last one once retired."""

    __slots__ = (
        "checked",
        "data",
        "data_id",
        "digest",
        "direct",
        "index",
        "index_id",
        "retired",
        "users",
    )

    def __init__(
        self, digest: str, data: int, index: int, data_id: tuple[int, int], index_id: object
    ) -> None:
        self.digest = digest
        self.data = data
        self.direct = -1  # O_DIRECT: whole pages from and to page-aligned buffers
        self.index = index  # O_WRONLY | O_APPEND, or -1
        self.data_id = data_id  # (st_dev, st_ino) of the data file
        self.index_id = index_id  # of the index file, None when not opened
        self.users = 0
        self.retired = False
        self.checked = time.monotonic()  # last time we saw the files still linked

    def close(self) -> None:
        for fd in (self.data, self.direct, self.index):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.data = self.direct = self.index = -1


class _Entry:
    """What this process knows of one remote file. Guarded by BlockStore._lock, except
    `sync`, which serializes re-reading the index (outside the store's lock)."""

    __slots__ = (
        "blocks",
        "bytes",
        "conflicting",
        "digest",
        "expected",
        "files",
        "index_id",
        "loaded",
        "parsed",
        "size",
        "sync",
        "touched",
        "used",
        "verified",
        "verified_id",
        "warned",
    )

    def __init__(self, digest: str, on_disk: int = 0, used: float = 0.0) -> None:
        self.digest = digest
        self.bytes = on_disk
        self.used = used  # wall-clock time of the last use we know of (LRU across daemons)
        self.loaded = False  # the index was read
        self.index_id: object = None  # (st_dev, st_ino) of the index file parsed
        self.parsed = 0  # bytes of it consumed
        self.size: int | None = None
        # The size the server told this process (given by a caller): records that say
        # otherwise are not believed. None until a caller says.
        self.expected: int | None = None
        # Records of two sizes for one key (keys are immutable: a member's lie, or damage):
        # get_size answers None, so the caller asks the server and passes its size.
        self.conflicting = False
        self.blocks: dict[int, tuple[int, int]] = {}  # index -> (length, crc32)
        self.verified: set[int] = set()  # blocks checked (or written) in this process ...
        self.verified_id: object = None  # ... in the data file with this (st_dev, st_ino)
        self.files: _Files | None = None
        self.touched = 0.0
        self.warned = False
        self.sync = threading.Lock()


class _Sweeper:
    """One background thread per process that checks, every LINK_CHECK_INTERVAL seconds,
    the descriptors every live BlockStore holds (BlockStore.sweep): an idle daemon gives the
    space of files cleared under it back too. Restarted in a forked child on next use."""

    def __init__(self) -> None:
        self._stores: weakref.WeakSet[BlockStore] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = -1
        self._wake = threading.Event()

    def add(self, store: BlockStore) -> None:
        with self._lock:
            self._stores.add(store)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(
                    target=self._run, name="gcfs-blockstore-sweep", daemon=True
                ).start()

    def _run(self) -> None:
        failed = False
        while True:
            self._wake.wait(LINK_CHECK_INTERVAL)  # a timer, not a test's wait
            with self._lock:
                stores = list(self._stores)
            for store in stores:
                try:
                    store.sweep()
                except Exception:  # no exception leaves a background thread
                    if not failed:
                        failed = True
                        log.exception("block store: the sweep of held files failed")
            del stores


_SWEEPER = _Sweeper()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        safeio.close_quietly(fd)
    fds.clear()


class BlockStore:
    """Contents of immutable remote files on disk, at most `max_bytes` (module docstring).

    `kind`: the directory this store expects, marker.BLOCK_CACHE (`--cache-dir`, the
    default) or marker.SNAPSHOT (`gcfs snapshot --to`). A writable store uses a directory
    of its kind, adopts one gcfs made before markers, and creates (and marks) a missing or
    empty one; anything else is refused with WrongDirectory (a UserError: one line), and
    nothing in it is touched. `readonly`: only read (an offline mount of a snapshot, `gcfs
    cache status`: never a write, chmod, touch or unlink); any gcfs directory, or an empty
    one, is accepted. `network`: treat the directory as on a network filesystem (None: from
    its type, see cachedir.py)."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        readonly: bool = False,
        network: bool | None = None,
        kind: str = marker.BLOCK_CACHE,
    ) -> None:
        if block_size <= 0 or max_bytes < 0:
            raise ValueError("block_size must be positive and max_bytes not negative")
        if kind not in marker.FORMATS:
            raise ValueError(f"unknown kind of directory {kind!r}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.readonly = readonly
        self.kind = kind
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order, oldest first
        self._open: OrderedDict[str, _Entry] = OrderedDict()  # entries with open descriptors
        self._refused: OrderedDict[str, None] = OrderedDict()  # evictions refused (EPERM)
        self._total = 0
        self._hits = self._misses = self._evictions = self._damaged = 0
        self._found_later = self._rescans = self._damaged_blocks = 0
        self._rescanned = 0.0  # time.monotonic() of the last rescan
        self._swept = time.monotonic()  # of the last check of held descriptors
        self._direct = hasattr(os, "O_DIRECT")  # until the filesystem refuses it
        self._told: set[str] = set()  # messages logged once (a handful of fixed texts)
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

    @contextlib.contextmanager
    def _folder(self, digest: str, *, create: bool = False) -> Iterator[int]:
        """The descriptor of `store/<hh>/` for `digest`, opened without following a link
        (created, mode set on what we create, with `create`)."""
        if self._store_fd < 0:
            raise FileNotFoundError(errno.ENOENT, "no store directory", str(self.directory))
        if create:
            fd, _ = safeio.make_directory(digest[:2], self.dir.dir_mode, dir_fd=self._store_fd)
        else:
            fd = safeio.open_directory(digest[:2], dir_fd=self._store_fd)
        try:
            yield fd
        finally:
            os.close(fd)

    def _tell_once(self, level: int, key: str, message: str, *args: object) -> None:
        """Log a message once per store (`key`: one of a handful of fixed kinds)."""
        if key not in self._told:
            self._told.add(key)
            log.log(level, message, *args)

    # -- public API -------------------------------------------------------------------------

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
                len(self._entries),
                self._total,
                self._found_later,
                self._rescans,
            )

    def get_size(self, key: str) -> int | None:
        """The remote file's size if a record of it is on disk (a member of a group cache
        may have written it: callers that know the server's size pass it elsewhere); None
        also when the index states two sizes for the key (then only the server can tell)."""
        entry = self._lookup(key_digest(key))
        if entry is not None and entry.size is None:
            self._sync(entry)
        if entry is None or entry.conflicting:
            return None
        return entry.size

    def put_size(self, key: str, size: int) -> None:
        """Remember a file's total size (the server's) across remounts (a size-only record)."""
        if size < 0:
            raise ValueError("a size is not negative")
        if self.readonly:
            return
        digest = key_digest(key)
        entry = self._lookup(digest, create=True, size=size)
        assert entry is not None
        self._sync(entry)
        if entry.size == size:
            return
        self._maybe_rescan(RECORD_SIZE)
        with self._lock:
            room, victims = self._make_room(entry, RECORD_SIZE)
        self._unlink(victims)
        if not room:
            return
        size_record = record(KIND_SIZE, self.block_size, 0, 0, 0, size, digest)
        try:
            files = self._writable(entry)
        except OSError as exc:
            log.warning("block store: cannot store a size: %s", exc)
            return
        try:
            self._append(files, size_record)
        except OSError as exc:
            log.warning("block store: cannot store a size: %s", exc)
        else:
            with self._lock:
                if entry.index_id == files.index_id:
                    entry.size = size
        finally:
            self._release(entry, files, account=True)

    def cached_blocks(self, key: str, count: int, size: int | None = None) -> int:
        """How many of the first `count` blocks of `key` are stored (not read or checked).
        `size`: the file's size as the server gave it, when the caller knows it (records
        that say otherwise are not believed)."""
        entry = self._lookup(key_digest(key), size=size)
        if entry is None:
            return 0
        found = self._count_below(entry, count)
        if found < count:
            self._sync(entry)
            found = self._count_below(entry, count)
        return found

    def fully_cached(self, key: str, size: int | None = None) -> bool:
        """True when the size is known and every block of the file has a record (the data
        is checked when it is read, as always). `size` as for cached_blocks."""
        entry = self._lookup(key_digest(key), size=size)
        if entry is None:
            return False
        for attempt in range(2):
            with self._lock:
                # Every block in entry.blocks lies below the size (_apply_locked), so
                # counting them is enough: no loop over a count a record gave us.
                size = entry.size
                if size is not None and len(entry.blocks) >= -(-size // self.block_size):
                    return True
            if attempt == 0:
                self._sync(entry)  # another daemon may have stored the rest
        return False

    def present(self, key: str, indices: Sequence[int], size: int | None = None) -> list[int]:
        """Which of `indices` have a record (cheap: no data is read). `size` as for
        cached_blocks."""
        entry = self._lookup(key_digest(key), size=size)
        if entry is None:
            return []
        found = self._present(entry, indices)
        if len(found) < len(indices):
            self._sync(entry)
            found = self._present(entry, indices)
        return found

    def read_into(
        self, key: str, first: int, count: int, buffer: memoryview, size: int | None = None
    ) -> dict[int, int]:
        """Read the stored blocks among `first .. first+count-1` into `buffer` (block `first`
        at offset 0, each block at its own place); return {block index: length} of those that
        are there and intact. Blocks missing from what this process knows send it back to the
        index file first (another daemon may have stored them). A damaged block is a miss,
        logged once per file; so is a block whose record disagrees with `size` (the file's
        size as the server gave it, when the caller knows it) or does not fit `buffer`."""
        return self._read(key_digest(key), first, count, buffer, size)

    # -- reading, in steps ----------------------------------------------------------------

    def _read(
        self,
        digest: str,
        first: int,
        count: int,
        buffer: memoryview,
        size: int | None = None,
        *,
        use: bool = True,
    ) -> dict[int, int]:
        """read_into; `use`: a use of the file for the LRU order (not for `verify`)."""
        entry = self._lookup(digest, size=size)
        if entry is None:
            self._count_misses(count)
            return {}
        wanted, touch = self._wanted(entry, first, count, len(buffer), use=use)
        if not wanted:
            return {}
        files = self._files_for_reading(entry)
        if files is None:
            self._count_misses(len(wanted))
            return {}
        try:
            good, bad = self._read_checked(entry, files, wanted, first, buffer)
            if touch:
                self._touch(digest)
        except OSError as exc:
            self._release(entry, files)
            self._read_failed(entry, files, exc)
            self._count_misses(len(wanted))
            return {}
        self._settle(entry, files, good, bad)
        self._release(entry, files)
        return good

    def _count_misses(self, count: int) -> None:
        with self._lock:
            self._misses += count

    def _wanted(
        self, entry: _Entry, first: int, count: int, room: int, *, use: bool
    ) -> tuple[dict[int, tuple[int, int]], bool]:
        """Step 1: the records of the blocks asked for that fit the buffer, looking at the
        index again when some are missing; and whether to touch the LRU time."""
        bs = self.block_size
        span = range(first, first + count)
        if len(self._present(entry, span)) < count:
            self._sync(entry)
        with self._lock:
            wanted = {
                i: entry.blocks[i]
                for i in span
                if i in entry.blocks and (i - first) * bs + entry.blocks[i][0] <= room
            }
            self._misses += count - len(wanted)
            if not wanted or not use:
                return wanted, False
            if self._entries.get(entry.digest) is entry:
                self._entries.move_to_end(entry.digest)
            entry.used = time.time()
            touch = not self.readonly and time.monotonic() - entry.touched > USE_TOUCH_INTERVAL
            if touch:
                entry.touched = time.monotonic()
        return wanted, touch

    def _files_for_reading(self, entry: _Entry) -> _Files | None:
        """Step 2: the data file's descriptors; None (and the index looked at again) when the
        files are gone (evicted, cleared) or not a regular file."""
        try:
            files = self._readable(entry)
        except OSError as exc:
            self._tell_once(
                logging.WARNING,
                "open",
                "block store: cannot open %s: %s (a miss)",
                self._data_path(entry.digest),
                exc,
            )
            files = None
        if files is None:
            self._sync(entry)
        return files

    def _read_checked(
        self,
        entry: _Entry,
        files: _Files,
        wanted: dict[int, tuple[int, int]],
        first: int,
        buffer: memoryview,
    ) -> tuple[dict[int, int], list[int]]:
        """Step 3: read the blocks, stretch by stretch, and check those not checked before in
        this data file; (good blocks and their lengths, bad blocks)."""
        bs = self.block_size
        with self._lock:
            verified = set(entry.verified) if entry.verified_id == files.data_id else set()
        good: dict[int, int] = {}
        bad: list[int] = []
        for run in _consecutive(sorted(wanted)):
            start = (run[0] - first) * bs
            length = (run[-1] - run[0]) * bs + wanted[run[-1]][0]
            got = self._read_data(files, buffer, start, length, run[0] * bs)
            for i in run:
                size_i, crc = wanted[i]
                at = (i - first) * bs
                # A short read means the data never reached the disk (a hole at the end).
                if at + size_i - start <= got and (
                    i in verified or zlib.crc32(buffer[at : at + size_i]) == crc
                ):
                    good[i] = size_i
                else:
                    bad.append(i)
        if bad and self.network:
            bad = self._reread_uncached(entry.digest, wanted, bad, first, buffer, good)
        return good, bad

    def _read_failed(self, entry: _Entry, files: _Files, exc: OSError) -> None:
        if exc.errno in _GONE:  # unlinked by another NFS client: a miss, not a failure
            log.debug("block store: %s vanished: %s", self._data_path(entry.digest), exc)
            self._retire(entry, files)
            self._sync(entry)
        else:
            log.warning("block store: cannot read %s: %s", self._data_path(entry.digest), exc)

    def _settle(self, entry: _Entry, files: _Files, good: dict[int, int], bad: list[int]) -> None:
        """Step 4: count, remember what was checked, and drop what failed its check (unless
        the files were replaced under us, which is not damage)."""
        if bad and self._replaced(entry):
            # Not damage: the files were evicted or replaced by another daemon since we read
            # the index. Forget what we knew; the blocks are misses.
            self._retire(entry, files)
            self._sync(entry)
            with self._lock:
                self._hits += len(good)
                self._misses += len(bad)
            return
        with self._lock:
            self._hits += len(good)
            if entry.verified_id != files.data_id:
                entry.verified = set()
                entry.verified_id = files.data_id
            entry.verified.update(good)
            if bad:
                self._misses += len(bad)
                self._damaged += len(bad)
                self._damaged_blocks += len(bad)
                for i in bad:
                    entry.blocks.pop(i, None)
                    entry.verified.discard(i)
                if not entry.warned:
                    entry.warned = True
                    log.warning(
                        "block store: %d damaged block(s) of %s (first: %d); fetching again",
                        len(bad),
                        self._data_path(entry.digest),
                        bad[0],
                    )
        if bad and not self.readonly:
            bs, size = self.block_size, entry.size or 0
            records = b"".join(record(KIND_DROPPED, bs, i, 0, 0, size, entry.digest) for i in bad)
            with contextlib.suppress(OSError):
                self._append(files, records)

    def _touch(self, digest: str) -> None:
        """Record the use in the index's mtime, for other daemons' LRU (never through a
        link)."""
        with contextlib.suppress(OSError), self._folder(digest) as folder:
            os.utime(_index_name(digest), dir_fd=folder, follow_symlinks=False)

    # -- writing, in steps ----------------------------------------------------------------

    def write(self, key: str, first: int, data: memoryview, size: int) -> int:
        """Store consecutive whole blocks starting at block `first`: `data` is their bytes
        (each block `block_size` long, except the file's last one) of a `size`-byte remote
        file. Returns how many blocks were stored (0 when they do not fit)."""
        return self.write_many(key, [(first, data)], size)

    def write_many(self, key: str, pieces: Sequence[tuple[int, memoryview]], size: int) -> int:
        """`write` for several stretches of one file at once: one index append for all.
        Blocks another daemon has stored already (same length and crc) are not written again
        and count as stored. `size` is the server's: records of another size are ignored."""
        blocks, where = self._split_blocks(pieces, size)
        if not blocks or self.readonly:
            return 0
        crcs = {index: zlib.crc32(block) for index, block in blocks.items()}
        digest = key_digest(key)
        entry = self._lookup(digest, create=True, size=size)
        assert entry is not None
        self._sync(entry)  # what others stored meanwhile, and whether the files were replaced
        with self._lock:
            todo = [i for i in sorted(blocks) if entry.blocks.get(i) != (len(blocks[i]), crcs[i])]
        if not todo:
            return len(blocks)
        if not self._room_for(entry, blocks, todo):
            return 0
        try:
            files = self._writable(entry)
        except OSError as exc:
            log.warning("block store: cannot write %s: %s", self._data_path(digest), exc)
            return 0
        try:
            self._write_blocks(files, pieces, blocks, where, todo)
            records = b"".join(
                record(KIND_BLOCK, self.block_size, i, len(blocks[i]), crcs[i], size, digest)
                for i in todo
            )
            self._append(files, records)
        except OSError as exc:
            log.warning("block store: cannot write %s: %s", self._data_path(digest), exc)
            self._release(entry, files, account=True)
            return 0
        self._written(entry, files, size, {i: (len(blocks[i]), crcs[i]) for i in todo})
        self._release(entry, files, account=True)
        return len(blocks)

    def _split_blocks(
        self, pieces: Sequence[tuple[int, memoryview]], size: int
    ) -> tuple[dict[int, memoryview], dict[int, tuple[int, int]]]:
        """Step 1: the pieces' blocks, checked to be whole (only the file's last one short);
        {block index: its bytes} and {block index: (piece, offset in it)}."""
        bs = self.block_size
        blocks: dict[int, memoryview] = {}
        where: dict[int, tuple[int, int]] = {}
        for number, (first, data) in enumerate(pieces):
            if first < 0 or size < 0:
                raise ValueError("block index and size must not be negative")
            end = first * bs + len(data)
            if end > size or (len(data) % bs and end != size):
                raise ValueError("blocks must be whole, and only the file's last one short")
            for n in range(-(-len(data) // bs)):
                blocks[first + n] = data[n * bs : (n + 1) * bs]
                where[first + n] = (number, n * bs)
        return blocks, where

    def _room_for(self, entry: _Entry, blocks: dict[int, memoryview], todo: list[int]) -> bool:
        """Step 2: make room for the blocks to write (evicting other files); False when they
        do not fit."""
        cost = sum(-(-len(blocks[i]) // _PAGE) * _PAGE for i in todo) + len(todo) * RECORD_SIZE
        self._maybe_rescan(cost)
        with self._lock:
            room, victims = self._make_room(entry, cost)
        self._unlink(victims)
        return room

    def _write_blocks(
        self,
        files: _Files,
        pieces: Sequence[tuple[int, memoryview]],
        blocks: dict[int, memoryview],
        where: dict[int, tuple[int, int]],
        todo: list[int],
    ) -> None:
        """Step 3: the data, one pwrite per stretch that lies in one piece; flushed on a
        network filesystem before its record is appended."""
        buffered = False
        for run in _stretches(todo, where):
            piece, offset = where[run[0]]
            length = sum(len(blocks[i]) for i in run)
            data = pieces[piece][1][offset : offset + length]
            buffered |= self._write_data(files, run[0] * self.block_size, data)
        if buffered and self.network:
            os.fdatasync(files.data)  # the data is on the server before its record

    def _written(
        self, entry: _Entry, files: _Files, size: int, stored: dict[int, tuple[int, int]]
    ) -> None:
        """Step 4: what we know now (unless the files were replaced meanwhile)."""
        with self._lock:
            if entry.index_id == files.index_id:  # not replaced meanwhile
                entry.size = size
                if entry.verified_id != files.data_id:
                    entry.verified = set()
                    entry.verified_id = files.data_id
                entry.blocks.update(stored)
                entry.verified.update(stored)
            if self._entries.get(entry.digest) is entry:  # not evicted meanwhile
                self._entries.move_to_end(entry.digest)
                entry.used = time.time()

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

    def sync(self) -> int:
        """Make everything in the store durable: fsync every data and index file, every
        `store/<hh>/` directory, `store/` and the directory itself (for a snapshot, before
        the tree that names its records is written). The number of files synced. Raises
        OSError when one cannot be synced: the caller must not declare the data complete."""
        if self.readonly:
            return 0
        synced = 0
        for folder, names in self._folders():
            for name, _ in names:
                if _TEMP.fullmatch(name):
                    continue
                try:
                    fd = safeio.open_regular(name, dir_fd=folder, single=True)
                except FileNotFoundError:
                    continue  # evicted meanwhile
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                synced += 1
            os.fsync(folder)
        if self._store_fd >= 0:
            os.fsync(self._store_fd)
        os.fsync(self._top)
        return synced

    def sweep(self) -> int:
        """Close the held descriptors of files that were unlinked under us (`gcfs cache
        clear`/`prune`, another daemon's eviction), so that their space returns to the disk,
        and forget what we knew of them. Each held file is checked at most every
        LINK_CHECK_INTERVAL seconds. The number of files let go. Runs in the sweeper thread
        of the process and on use."""
        now = time.monotonic()
        with self._lock:
            self._swept = now
            due = [
                (entry, entry.files)
                for entry in self._open.values()
                if entry.files is not None and now - entry.files.checked > LINK_CHECK_INTERVAL
            ]
            for _, files in due:
                assert files is not None
                files.users += 1
        gone = 0
        for entry, files in due:
            assert files is not None
            try:
                if self._unlinked(files):
                    self._let_go(entry, files)
                    gone += 1
            finally:
                self._release(entry, files)
        return gone

    # -- the whole directory: `gcfs cache` ---------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """(remote files, bytes) on disk now, whoever wrote them."""
        self._rescan()
        with self._lock:
            return len(self._entries), self._total

    def evict_to(self, limit: int) -> int:
        """Evict whole files, least recently used first (by every daemon's use), until at
        most `limit` bytes are on disk; the number of files evicted. Files we may not unlink
        (another member's, in a sticky group directory) stay, and count."""
        if self.readonly:
            raise ValueError("a read-only block store evicts nothing")
        self._rescan()
        with self._lock:
            victims = self._evict_until(limit, keep=None)
        refused = self._unlink(victims)
        return len(victims) - len(refused)

    def verify(self) -> VerifyReport:
        """Read every stored block and check its length and crc32; damaged blocks are dropped
        (a "dropped" record, as a reader would). A fresh store checks everything. Not a use:
        the LRU order stays as it was."""
        self._rescan()
        with self._lock:
            digests = list(self._entries)
            damaged_before = self._damaged
            blocks_before = self._damaged_blocks
        blocks = 0
        span = 64  # blocks read per call: 64 MiB of buffer at the default block size
        buffer = mmap.mmap(-1, span * self.block_size)  # page-aligned, for O_DIRECT
        try:
            for digest in digests:
                entry = self._lookup(digest)
                if entry is None:
                    continue
                with self._lock:
                    indices = sorted(entry.blocks)  # the records: never a count from one
                for start in range(0, len(indices), span):
                    chunk = indices[start : start + span]
                    first = chunk[0]
                    count = chunk[-1] - first + 1
                    if count > span:  # sparse: one call per block
                        for i in chunk:
                            self._read(digest, i, 1, memoryview(buffer), use=False)
                            blocks += 1
                        continue
                    self._read(digest, first, count, memoryview(buffer), use=False)
                    blocks += len(chunk)
        finally:
            buffer.close()
        with self._lock:
            damaged = self._damaged_blocks - blocks_before
            records = self._damaged - damaged_before - damaged
        return VerifyReport(len(digests), blocks, damaged, records)

    def clear(self) -> int:
        """Unlink every file of the store (gcfs's names only; a running daemon keeps reading
        what it has open, then lets go within LINK_CHECK_INTERVAL s: `sweep`); the number of
        files removed. Directories and the marker stay: another daemon may be creating a file
        in one right now."""
        if self.readonly:
            raise ValueError("a read-only block store clears nothing")
        removed = refused = 0
        for folder, names in self._folders():
            for name, _ in names:
                try:
                    os.unlink(name, dir_fd=folder)
                    removed += 1
                except FileNotFoundError:
                    pass
                except PermissionError:
                    refused += 1
        if refused:
            log.info(
                "block store %s: %d files of other members stay (a sticky directory); its "
                "owner or root can remove them",
                self.directory,
                refused,
            )
        with self._lock:
            for entry in list(self._entries.values()):
                self._evict_entry(entry)
        self._remove_old_format()
        return removed

    # -- looking things up ------------------------------------------------------------------

    def _lookup(
        self, digest: str, *, create: bool = False, size: int | None = None
    ) -> _Entry | None:
        """The entry of `digest` with its index read. An unknown one is looked for on disk
        (another daemon may have created it since we scanned); with `create`, one is made
        for a file about to be written. `size`: the server's, when the caller knows it."""
        if time.monotonic() - self._swept > LINK_CHECK_INTERVAL:
            _SWEEPER.add(self)  # restarts the sweeper in a forked child
            self.sweep()
        with self._lock:
            entry = self._entries.get(digest)
        if entry is not None:
            if size is not None:
                self._expect(entry, size)
            if not entry.loaded:
                self._sync(entry)
            return entry
        found = _Entry(digest, used=time.time())
        found.expected = size
        exists = self._sync(found)
        if not exists and not create:
            return None
        on_disk = self._measure_paths(digest) if exists else 0
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:  # another thread got there first
                return entry
            found.bytes = on_disk
            self._entries[digest] = found
            self._total += on_disk
            # Not there when we scanned or last looked: another daemon stored these.
            self._found_later += len(found.blocks)
            return found

    def _expect(self, entry: _Entry, size: int) -> None:
        """The caller learned the file's size from the server: records that say otherwise are
        not believed from now on (the index is parsed again with that in mind)."""
        with self._lock:
            if entry.expected == size:
                return
            entry.expected = size
            self._forget_locked(entry)
            entry.loaded = False

    def _present(self, entry: _Entry, indices: Sequence[int]) -> list[int]:
        with self._lock:
            return [index for index in indices if index in entry.blocks]

    def _count_below(self, entry: _Entry, count: int) -> int:
        """How many recorded blocks lie below `count` (a loop over the records, never over a
        count)."""
        with self._lock:
            return sum(1 for index in entry.blocks if index < count)

    def _index_limit(self, entry: _Entry) -> int:
        """The bytes of an index we believe: INDEX_LIMIT, or less when the server's size is
        known (4 records per block)."""
        if entry.expected is None:
            return INDEX_LIMIT
        blocks = -(-entry.expected // self.block_size)
        return min(INDEX_LIMIT, max(_INDEX_MIN, blocks * RECORD_SIZE * _INDEX_SLACK_RECORDS))

    def _sync(self, entry: _Entry) -> bool:
        """Bring what we know of the entry up to date with its index file: the new tail only,
        or all of it when the file was replaced (evicted and written again by another daemon)
        or is new to us. False when there is no index file (or it is not a regular file: a
        miss). Opens it anew every time: on NFS, an open is what revalidates a file
        (close-to-open consistency). Reads at most the index limit, 1 MiB at a time."""
        with entry.sync:
            with self._lock:
                start, known = entry.parsed, entry.index_id
            try:
                with self._folder(entry.digest) as folder:
                    fd = safeio.open_regular(_index_name(entry.digest), dir_fd=folder, single=True)
            except OSError as exc:
                if exc.errno not in _GONE:
                    self._tell_once(
                        logging.WARNING,
                        "index",
                        "block store: cannot read %s: %s (a miss)",
                        self._index_path(entry.digest),
                        exc,
                    )
                with self._lock:
                    if entry.index_id is not None:  # evicted or cleared by someone
                        self._forget_locked(entry)
                        if self._entries.get(entry.digest) is entry:
                            self._total -= entry.bytes
                            entry.bytes = 0
                    entry.loaded = True
                return False
            try:
                self._parse_index(entry, fd, start, known)
            except OSError as exc:
                log.warning("block store: cannot read %s: %s", self._index_path(entry.digest), exc)
                return known is not None
            finally:
                os.close(fd)
            return True

    def _parse_index(self, entry: _Entry, fd: int, start: int, known: object) -> None:
        """Parse the index open as `fd` from `start` (0 when it is not the file `known`),
        applying its records piece by piece, at most up to the index limit. entry.sync held."""
        info = os.fstat(fd)
        ident = (info.st_dev, info.st_ino)
        if ident != known:
            start = 0
        limit = self._index_limit(entry)
        end = min(info.st_size, limit)
        prefix = bytes.fromhex(entry.digest[:16])
        pending = b""  # bytes read and not consumed yet (a record still being appended)
        base = start  # the file offset of pending[0]
        first = True
        damaged = found = 0
        while first or base + len(pending) < end:
            want = min(_INDEX_CHUNK, end - base - len(pending))
            raw = pending + _pread_bytes(fd, base + len(pending), want)
            records, consumed, bad = parse_records(raw, prefix, self.block_size)
            with self._lock:
                if first and ident != entry.index_id:  # replaced (or new to us): start over
                    self._forget_locked(entry)
                    entry.index_id = ident
                found += self._apply_locked(entry, records)
                entry.parsed = base + consumed
            first = False
            damaged += bad
            if len(raw) == len(pending):  # nothing more arrived: the file ends here
                break
            base += consumed
            pending = raw[consumed:]
        with self._lock:
            if known is not None:  # not the first reading: another daemon stored these
                self._found_later += found
            entry.loaded = True
            self._damaged += damaged
        if info.st_size > limit:
            self._tell_once(
                logging.WARNING,
                "limit",
                "block store: %s is larger than %d bytes; what lies beyond is ignored",
                self._index_path(entry.digest),
                limit,
            )
        if damaged and not entry.warned:
            entry.warned = True
            log.warning(
                "block store: %s had %d damaged record(s); ignored",
                self._index_path(entry.digest),
                damaged,
            )

    def _apply_locked(self, entry: _Entry, records: list[Fields]) -> int:
        """Apply parsed records in order (the last one of a block wins); how many blocks
        are new. A record whose size disagrees with the server's (when known) is ignored,
        and a block record must have the length its size implies. Lock held."""
        bs = self.block_size
        new = 0
        for kind, _, index, length, crc, size, _ in records:
            if entry.expected is not None and size != entry.expected:
                self._damaged += 1  # not what the server says: a miss, never believed
                continue
            if entry.size is not None and size != entry.size:
                # Two sizes for one key: the newest statement wins until the server's size
                # is known, but no size is believed from this index alone (get_size).
                entry.conflicting = True
                entry.blocks.clear()
                entry.verified.clear()
            entry.size = size
            if kind == KIND_BLOCK:
                expected = min(bs, size - index * bs)
                if expected <= 0 or length != expected:
                    self._damaged += 1
                    continue
                if entry.blocks.get(index) != (length, crc):
                    new += 1
                    entry.verified.discard(index)
                entry.blocks[index] = (length, crc)
            elif kind == KIND_DROPPED:
                entry.blocks.pop(index, None)
                entry.verified.discard(index)
        return new

    def _forget_locked(self, entry: _Entry) -> None:
        """The entry's files were replaced or removed: forget what we knew. Lock held."""
        entry.blocks.clear()
        entry.verified.clear()
        entry.verified_id = None
        entry.size = None
        entry.conflicting = False
        entry.parsed = 0
        entry.index_id = None
        files = entry.files
        entry.files = None
        if files is not None:
            self._retire_locked(files)
            self._open.pop(entry.digest, None)

    def _replaced(self, entry: _Entry) -> bool:
        """True when the index on disk is not the one we parsed (evicted or replaced)."""
        try:
            with self._folder(entry.digest) as folder:
                info = os.stat(_index_name(entry.digest), dir_fd=folder, follow_symlinks=False)
        except OSError:
            return True
        with self._lock:
            return (info.st_dev, info.st_ino) != entry.index_id

    # -- descriptors --------------------------------------------------------------------------

    def _readable(self, entry: _Entry) -> _Files | None:
        """The entry's descriptors for reading (opened if needed; None if the data file is
        gone). Counted: call _release when done."""
        return self._acquire(entry, write=False)

    def _writable(self, entry: _Entry) -> _Files:
        """The entry's descriptors for writing: the files are created when missing. When the
        index on disk is not the one we parsed (replaced meanwhile), we read it first."""
        for _ in range(3):
            files = self._acquire(entry, write=True)
            assert files is not None
            with self._lock:
                if entry.index_id is None:
                    entry.index_id = files.index_id  # we created it, or it is new to us
                    entry.loaded = True
                if entry.index_id == files.index_id:
                    return files
            # Replaced under us: read the new index, and write to the new files.
            self._release(entry, files)
            self._retire(entry, files)
            self._sync(entry)
        raise OSError(errno.EAGAIN, "the files keep being replaced")

    def _acquire(self, entry: _Entry, *, write: bool) -> _Files | None:
        with self._lock:
            files = entry.files
            if files is not None and (not write or files.index >= 0):
                files.users += 1
                due = time.monotonic() - files.checked > LINK_CHECK_INTERVAL
            else:
                files = None
        if files is not None:
            if not (due and self._unlinked(files)):
                return files
            self._let_go(entry, files)  # cleared or evicted under us: open what is there now
            self._release(entry, files)
        opened = self._open_files(entry.digest, write=write)
        if opened is None:
            return None
        with self._lock:
            files = entry.files
            if files is not None and (not write or files.index >= 0):
                opened.close()
                files.users += 1
                return files
            if files is not None:  # read-only descriptors: replaced by writable ones
                self._retire_locked(files)
            entry.files = opened
            opened.users = 1
            self._open[entry.digest] = entry
            self._open.move_to_end(entry.digest)
            # Bounded: retire the least recently opened ones (closed once idle).
            for digest in list(self._open):
                if len(self._open) <= MAX_OPEN_FILES:
                    break
                other = self._open[digest]
                if other is not entry and other.files is not None:
                    self._retire_locked(other.files)
                    other.files = None
                    del self._open[digest]
            return opened

    def _open_files(self, digest: str, *, write: bool) -> _Files | None:
        """Open (with `write`: create) the data file, and the index for appending, never
        through a link, a FIFO or a hard link (safeio); None when there is nothing to read."""
        try:
            with self._folder(digest, create=write) as folder:
                if write:
                    data, index = self._create_files(digest, folder)
                    info = os.fstat(index)
                    index_id: object = (info.st_dev, info.st_ino)
                else:
                    access = os.O_RDONLY if self.readonly else os.O_RDWR
                    data = safeio.open_regular(
                        _data_name(digest), access, dir_fd=folder, single=True
                    )
                    index, index_id = -1, None
        except OSError as exc:
            if not write and exc.errno in _GONE:
                return None
            raise
        info = os.fstat(data)
        return _Files(digest, data, index, (info.st_dev, info.st_ino), index_id)

    def _create_files(self, digest: str, folder: int) -> tuple[int, int]:
        mode = self.dir.file_mode
        data, _ = safeio.open_or_create(
            _data_name(digest), os.O_RDWR, mode, dir_fd=folder, single=True
        )
        try:
            index, _ = safeio.open_or_create(
                _index_name(digest), os.O_WRONLY | os.O_APPEND, mode, dir_fd=folder, single=True
            )
        except OSError:
            os.close(data)
            raise
        return data, index

    def _release(self, entry: _Entry, files: _Files, *, account: bool = False) -> None:
        """The calling thread is done with `files`; with `account`, bring the entry's size on
        disk up to date first (the files only grow while in use)."""
        on_disk = self._measure(files) if account else -1
        with self._lock:
            # Only up: a thread that measured before another's append must not undo its count.
            current = self._entries.get(entry.digest) is entry and entry.files is files
            if current and on_disk > entry.bytes:
                self._total += on_disk - entry.bytes
                entry.bytes = on_disk
            files.users -= 1
            if files.users == 0 and files.retired:
                files.close()

    def _retire(self, entry: _Entry, files: _Files) -> None:
        with self._lock:
            if entry.files is files:
                entry.files = None
                self._open.pop(entry.digest, None)
            self._retire_locked(files)

    def _retire_locked(self, files: _Files) -> None:
        files.retired = True
        if files.users == 0:
            files.close()

    def _unlinked(self, files: _Files) -> bool:
        """Whether the held files were unlinked (or replaced) under us: a link count of 0,
        or another inode under the data file's name. The caller holds a use of `files`."""
        try:
            for fd in (files.data, files.index):
                if fd >= 0 and os.fstat(fd).st_nlink == 0:
                    return True
            with self._folder(files.digest) as folder:
                info = os.stat(_data_name(files.digest), dir_fd=folder, follow_symlinks=False)
        except OSError as exc:
            return exc.errno in _GONE
        files.checked = time.monotonic()
        return (info.st_dev, info.st_ino) != files.data_id

    def _let_go(self, entry: _Entry, files: _Files) -> None:
        """The held files were unlinked: close them (once their users are done) and forget
        what we knew, so that the space returns, statistics drop and the next read looks on
        disk again."""
        with self._lock:
            if entry.files is files:
                entry.files = None
                self._open.pop(entry.digest, None)
            self._retire_locked(files)
            if entry.index_id == files.index_id or files.index_id is None:
                self._forget_locked(entry)
                entry.loaded = False
            if self._entries.get(entry.digest) is entry:
                self._total -= entry.bytes
                entry.bytes = 0

    def _direct_fd(self, files: _Files) -> int:
        """An O_DIRECT descriptor of the data file, opened on demand (-1 if refused). Opened
        through /proc/self/fd, so it is the same inode as `files.data` even if the path was
        replaced meanwhile (checks are trusted per inode); by name where /proc is missing,
        without following a link, and then only if it is still the same inode."""
        if files.direct >= 0 or not self._direct:
            return files.direct
        access = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_DIRECT | os.O_CLOEXEC
        try:
            try:
                fd = os.open(f"/proc/self/fd/{files.data}", access)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise
                with self._folder(files.digest) as folder:
                    fd = safeio.open_regular(_data_name(files.digest), access, dir_fd=folder)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                return -1  # the page cache then: slower, never wrong
            log.debug("block store: %s refuses O_DIRECT; using the page cache", self.directory)
            self._direct = False
            return -1
        info = os.fstat(fd)
        with self._lock:
            if files.direct < 0 and files.data >= 0 and (info.st_dev, info.st_ino) == files.data_id:
                files.direct = fd
                fd = -1
        if fd >= 0:
            os.close(fd)  # another thread opened it meanwhile, or not the same file
        return files.direct

    def _append(self, files: _Files, records: bytes) -> None:
        """Append whole records with one write: O_APPEND makes concurrent appends of threads
        and processes of one machine land one after the other, never interleaved (across NFS
        clients it may not: module docstring). On a network filesystem the index is flushed
        before we return, which is when other machines can see the records. For descriptors
        opened for reading only (a dropped record), the index is opened; never created."""
        if files.index < 0:
            with self._folder(files.digest) as folder:
                fd = safeio.open_regular(
                    _index_name(files.digest), os.O_WRONLY | os.O_APPEND, dir_fd=folder, single=True
                )
            info = os.fstat(fd)
            with self._lock:
                if files.index < 0 and files.data >= 0:
                    files.index, fd = fd, -1
                    files.index_id = (info.st_dev, info.st_ino)
            if fd >= 0:
                os.close(fd)
        _write_all(files.index, records)
        if self.network:
            os.fdatasync(files.index)

    # -- reading and writing data -----------------------------------------------------------

    def _write_data(self, files: _Files, offset: int, data: memoryview) -> bool:
        """Write `data` at `offset`: whole pages with O_DIRECT when the filesystem and the
        buffer allow it, the rest (a file's short last block, a small file, an unaligned
        buffer) through the page cache; True when some of it went through the page cache.

        O_DIRECT because the page cache copy is most of a cold read's cost: writing 1 GiB
        in 4 MiB pieces took 0.58-1.1 CPU-s buffered and 0.04 CPU-s with O_DIRECT, measured
        on this project's machine (the disk does the copying); on NFS because the data is on
        the server when the write returns (module docstring). O_DIRECT needs the buffer,
        the offset and the length aligned (4 KiB covers every device); the buffer pool's
        buffers are page-aligned memory maps, block offsets are multiples of the block size."""
        whole = len(data) - len(data) % _PAGE if offset % _PAGE == 0 else 0
        if whole and self._direct:
            fd = self._direct_fd(files)
            if fd >= 0:
                try:
                    _pwrite_all(fd, data[:whole], offset)
                    self.direct_writes += 1
                    data, offset = data[whole:], offset + whole
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: an unaligned buffer
                        raise
        if data:
            _pwrite_all(files.data, data, offset)
            self.buffered_writes += 1
            return True
        return False

    def _read_data(
        self, files: _Files, buffer: memoryview, start: int, length: int, offset: int
    ) -> int:
        """Read `length` bytes at `offset` into buffer[start:]; return how many arrived
        (fewer at the end of the file). With O_DIRECT where possible: the disk writes into
        the buffer, with no copy out of the page cache and no second cached copy of bytes
        the kernel caches for the FUSE file already (a cached re-read with the page cache
        dropped spent 16 % of the daemon's cycles in that copy)."""
        rounded = -(-length // _PAGE) * _PAGE
        if self._direct and offset % _PAGE == 0 and start + rounded <= len(buffer):
            fd = self._direct_fd(files)
            if fd >= 0:
                try:
                    return min(length, _pread_all(fd, buffer[start : start + rounded], offset))
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: an unaligned buffer
                        raise
        return _pread_all(files.data, buffer[start : start + length], offset)

    def _reread_uncached(
        self,
        digest: str,
        wanted: dict[int, tuple[int, int]],
        bad: list[int],
        first: int,
        buffer: memoryview,
        good: dict[int, int],
    ) -> list[int]:
        """On a network filesystem, a block that failed its check may be a stale page of our
        client's cache (another client wrote it after we cached the hole): read it again
        from a fresh descriptor with those pages dropped. The blocks still bad."""
        bs = self.block_size
        still: list[int] = []
        try:
            with self._folder(digest) as folder:
                fd = safeio.open_regular(_data_name(digest), dir_fd=folder, single=True)
        except OSError:
            return bad
        try:
            for i in bad:
                length, crc = wanted[i]
                at = (i - first) * bs
                os.posix_fadvise(fd, i * bs, length, os.POSIX_FADV_DONTNEED)
                got = _pread_all(fd, buffer[at : at + length], i * bs)
                if got == length and zlib.crc32(buffer[at : at + length]) == crc:
                    good[i] = length
                else:
                    still.append(i)
        finally:
            os.close(fd)
        return still

    # -- accounting and eviction ----------------------------------------------------------------

    def _maybe_rescan(self, cost: int) -> None:
        """Before a write: rescan when it would evict (at most every RESCAN_INTERVAL s) or
        when the last rescan is older than RESCAN_MAX_AGE."""
        with self._lock:
            age = time.monotonic() - self._rescanned
            over = self._total + cost > self.max_bytes
        if (over and age > RESCAN_INTERVAL) or age > RESCAN_MAX_AGE:
            self._rescan()

    def _make_room(self, entry: _Entry, cost: int) -> tuple[bool, list[str]]:
        """Evict other files, least recently used first, until `cost` more bytes fit. Returns
        whether they fit (not when the file alone would exceed the limit) and the digests
        whose files to unlink (outside the lock). Lock held."""
        if entry.bytes + cost > self.max_bytes:
            return False, []
        victims = self._evict_until(self.max_bytes - cost, keep=entry)
        return self._total + cost <= self.max_bytes, victims

    def _evict_until(self, limit: int, *, keep: _Entry | None) -> list[str]:
        """Lock held: forget files, least recently used first, until at most `limit` bytes
        are counted; their digests, for _unlink. Files whose eviction was refused before
        (another member's, in a sticky directory) are skipped: they stay counted."""
        victims: list[str] = []
        for digest in list(self._entries):
            if self._total <= limit:
                break
            other = self._entries[digest]
            if other is not keep and digest not in self._refused:
                victims.append(self._evict_entry(other))
        return victims

    def _evict_entry(self, entry: _Entry) -> str:
        """Forget a file; the caller unlinks it (`_unlink`). Lock held. A thread still reading
        it keeps its descriptors until it is done."""
        if self._entries.get(entry.digest) is entry:
            del self._entries[entry.digest]
            self._total -= entry.bytes
            self._evictions += 1
        files = entry.files
        entry.files = None
        if files is not None:
            self._retire_locked(files)
            self._open.pop(entry.digest, None)
        return entry.digest

    def _unlink(self, digests: list[str]) -> list[str]:
        """Unlink evicted files: data first, so that no index ever outlives its data on disk
        for long (a record without data is a miss anyway). Gone already: another daemon
        evicted them too. Refused (EPERM/EACCES: another member's file in a sticky group
        directory): the file stays, counted again and never tried again (`_refused`); the
        digests refused."""
        refused: list[str] = []
        for digest in digests:
            try:
                with self._folder(digest) as folder:
                    for name in (_data_name(digest), _index_name(digest)):
                        try:
                            os.unlink(name, dir_fd=folder)
                        except FileNotFoundError:
                            pass
                        except PermissionError:
                            refused.append(digest)
                            break
                        except OSError as exc:
                            log.warning("block store: cannot evict %s: %s", name, exc)
            except OSError as exc:
                if exc.errno not in _GONE:
                    log.warning("block store: cannot evict %s: %s", digest, exc)
        if refused:
            self._keep(refused)
        return refused

    def _keep(self, digests: list[str]) -> None:
        """Files we may not unlink: counted again, and never chosen for eviction again."""
        self._tell_once(
            logging.INFO,
            "refused",
            "block store %s: other members' files cannot be evicted by this user (a sticky "
            "group directory); evicting others instead. `gcfs cache prune` by the directory's "
            "owner or root removes them",
            self.directory,
        )
        with self._lock:
            self._evictions -= len(digests)
            for digest in digests:
                self._refused[digest] = None
                self._refused.move_to_end(digest)
            while len(self._refused) > MAX_REFUSED:
                self._refused.popitem(last=False)
        for digest in digests:
            on_disk = self._measure_paths(digest)
            with self._lock:
                if digest not in self._entries:
                    self._entries[digest] = _Entry(digest, on_disk, time.time())
                    self._entries.move_to_end(digest, last=False)
                    self._total += on_disk

    def _measure(self, files: _Files) -> int:
        total = 0
        for fd, whole in ((files.data, True), (files.index, False)):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    info = os.fstat(fd)
                    total += info.st_blocks * 512 if whole else info.st_size
        return total

    def _measure_paths(self, digest: str) -> int:
        total = 0
        with contextlib.suppress(OSError), self._folder(digest) as folder:
            for name, whole in ((_data_name(digest), True), (_index_name(digest), False)):
                with contextlib.suppress(OSError):
                    info = os.stat(name, dir_fd=folder, follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        total += info.st_blocks * 512 if whole else info.st_size
        return total

    # -- rescans --------------------------------------------------------------------------------

    def _rescan(self, *, start: bool = False) -> None:
        """Bring the accounting and the LRU order back to what is on disk: files other daemons
        wrote count, files they evicted are forgotten, and their use (the index's mtime)
        orders the LRU. At start, also remove what a crash left (old enough: STALE_AGE)."""
        used: dict[str, float] = {}  # digest -> mtime of its index
        sizes: dict[str, int] = {}  # digest -> bytes on disk of both files
        clean = start and not self.readonly
        now = time.time()
        for folder, names in self._folders():
            data_only: dict[str, tuple[str, float]] = {}
            for name, info in names:
                if _TEMP.fullmatch(name):
                    if clean and now - info.st_mtime > STALE_AGE:
                        with contextlib.suppress(OSError):
                            os.unlink(name, dir_fd=folder)
                    continue
                digest, _, suffix = name.partition(".")
                if suffix == "index":
                    used[digest] = info.st_mtime
                    sizes[digest] = sizes.get(digest, 0) + info.st_size
                else:
                    sizes[digest] = sizes.get(digest, 0) + info.st_blocks * 512
                    data_only[digest] = (name, info.st_mtime)
            for digest in set(data_only) - set(used):  # data whose index was never written
                del sizes[digest]
                name, mtime = data_only[digest]
                if clean and now - mtime > STALE_AGE:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=folder)
        self._recount(used, sizes, start=start)

    def _recount(self, used: dict[str, float], sizes: dict[str, int], *, start: bool) -> None:
        """The rescan's findings into the accounting and the LRU order."""
        with self._lock:
            for digest, entry in list(self._entries.items()):
                in_use = entry.files is not None and entry.files.users > 0
                if digest not in used and not in_use:  # evicted by another daemon
                    del self._entries[digest]
                    self._total -= entry.bytes
                    files = entry.files
                    entry.files = None
                    if files is not None:
                        self._retire_locked(files)
                        self._open.pop(digest, None)
            for digest, mtime in used.items():
                known = self._entries.get(digest)
                if known is None:
                    self._entries[digest] = _Entry(digest, sizes[digest], mtime)
                    self._total += sizes[digest]
                else:
                    self._total += sizes[digest] - known.bytes
                    known.bytes = sizes[digest]
                    known.used = max(known.used, mtime)
            ordered = sorted(self._entries.values(), key=lambda e: e.used)
            self._entries = OrderedDict((e.digest, e) for e in ordered)
            self._rescanned = time.monotonic()
            if not start:
                self._rescans += 1

    def _folders(self) -> Iterator[tuple[int, list[tuple[str, os.stat_result]]]]:
        """Each `store/<hh>/` directory (opened without following a link; the descriptor is
        valid until the next step) with its regular files that bear gcfs's names (`<digest>
        .data`, `<digest>.index` with the digest in that directory, and temporary names):
        a scan never follows a link, and nothing else in the store is ever looked at again
        or removed."""
        if self._store_fd < 0:
            return
        try:
            with os.scandir(self._store_fd) as it:
                subdirectories = [
                    sub.name
                    for sub in it
                    if _FOLDER.fullmatch(sub.name) and sub.is_dir(follow_symlinks=False)
                ]
        except OSError as exc:
            log.warning("block store: cannot scan %s: %s", self.directory / STORE_DIR, exc)
            return
        for sub in sorted(subdirectories):
            try:
                folder = safeio.open_directory(sub, dir_fd=self._store_fd)
            except OSError as exc:
                if exc.errno not in _GONE:
                    log.warning("block store: cannot scan %s: %s", sub, exc)
                continue
            try:
                names = _names(folder, sub)
                yield folder, names
            finally:
                os.close(folder)

    def _remove_old_format(self) -> None:
        """The one-file-per-block cache of earlier versions, only in a directory that carries
        gcfs's marker (the caller checked), removed without following a link. Never in a
        snapshot's directory: snapshots came after that format, so a `blocks/` there is not
        ours."""
        if self.kind != marker.BLOCK_CACHE:
            return
        for name in _OLD_FORMAT:
            try:
                info = os.stat(name, dir_fd=self._top, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                log.info("block store: removing %s, left by an older gcfs", self.directory / name)
                shutil.rmtree(name, dir_fd=self._top, ignore_errors=True)

    def _data_path(self, digest: str) -> Path:
        """For messages only: every open goes through `_folder`."""
        return self.directory / STORE_DIR / digest[:2] / _data_name(digest)

    def _index_path(self, digest: str) -> Path:
        """For messages only: every open goes through `_folder`."""
        return self.directory / STORE_DIR / digest[:2] / _index_name(digest)


def _names(folder: int, prefix: str) -> list[tuple[str, os.stat_result]]:
    """The regular files of the directory open as `folder` that bear gcfs's names, with
    their lstat."""
    found: list[tuple[str, os.stat_result]] = []
    try:
        with os.scandir(folder) as inner:
            for item in inner:
                name = item.name
                ours = _FILE.fullmatch(name) or _TEMP.fullmatch(name)
                if ours is None or not ours.group(1).startswith(prefix):
                    continue
                try:
                    info = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    found.append((name, info))
    except OSError as exc:
        if exc.errno not in _GONE:
            log.warning("block store: cannot scan %s: %s", prefix, exc)
    return found


def _consecutive(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] + 1 == index:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _stretches(indices: list[int], where: dict[int, tuple[int, int]]) -> list[list[int]]:
    """Runs of consecutive block indices that lie one after the other in one piece (one
    pwrite each: a 4 MiB O_DIRECT write costs little more than a 1 MiB one)."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] + 1 == index and where[index][0] == where[runs[-1][-1]][0]:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _pread_all(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; the bytes read, fewer only at the end of the file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _pread_bytes(fd: int, offset: int, length: int) -> bytes:
    if length <= 0:
        return b""
    buffer = bytearray(length)
    got = _pread_all(fd, memoryview(buffer), offset)
    return bytes(buffer[:got])


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # pwrite may write less (a signal, a full disk)
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def temporary_name(path: Path) -> Path:
    """A temporary name beside `path`, unique to this machine and process (several daemons
    may write one directory)."""
    return path.with_name(f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{path.name}")


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "RECORD_SIZE",
    "STORE_DIR",
    "BlockStore",
    "BlockStoreStatistics",
    "VerifyReport",
    "WrongDirectory",
    "key_digest",
    "temporary_name",
]
