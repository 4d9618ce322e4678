"""BlockStore: the on-disk cache of remote file contents, one sparse data file per remote file.

Layout (the directory is 0700 and every file 0600: it holds medical images):

    <directory>/store/<hh>/<digest>.data    the remote file's bytes at their own offsets, sparse:
                                            block i lives at [i * block_size, ...)
    <directory>/store/<hh>/<digest>.index   append-only 48-byte records, one per stored block
                                            (plus size-only and "dropped" records)

`<digest>` is the sha256 of the file's key, its identity on the platform that never changes
(the /media/ URL, or a DICOM instance URL without its query; never a signed URL). `<hh>`, the
digest's first two hex digits, fans thousands of files out over 256 directories.

An index record (big-endian, 48 bytes):

    magic "GCI1" | kind (1 block, 2 size only, 3 dropped) | 3 pad | block size (u32)
    | block index (u64) | data length (u32) | crc32 of the data (u32) | file size (u64)
    | first 8 bytes of the digest | crc32 of the 44 bytes before (u32)

The last record of a block wins; every record carries the remote file's total size, so the
index replaces the old `sizes/` records and a size survives remounts.

Writing a block: `pwrite` the data at its offset, then append its record with one `write` on an
O_APPEND descriptor. A crash in between leaves data without a record: unused, never served.
No fsync: after a power loss a record may reach the disk before its data (two files), which is
why a block's crc32 is checked the first time it is read from disk in a mount's life (blocks
this mount wrote, or verified once, are trusted after that: checking every hit would cost
~0.27 CPU-s per GiB of cached re-reads). A torn record fails its own crc and is ignored; an
index whose length is not a whole number of records is rewritten without its torn tail before
anything is appended to it. A damaged block is a miss (logged once, then a "dropped" record is
appended so that the next mount does not trip over it again); a damaged record is skipped.

Why crc32: the threat is accidental damage (a crash, a disk, a user poking at files), which a
32-bit CRC catches with probability 1 - 2^-32 and every burst up to 32 bits for certain. It is
the fastest checksum in the standard library here (~270 us per MiB; sha256 with SHA-NI ~850 us,
blake2b ~2,200 us), and it runs in a worker thread with the GIL released. A forgery needs write
access to a 0700 directory, where a cryptographic hash would not help either.

Eviction: whole remote files, least recently used first, until `max_bytes` holds what is on
disk, counted as the filesystem does (st_blocks of the data file plus the index's length), so
sparse files count what they really use. A single file larger than the whole cache keeps the
blocks that fit and stores no more. The LRU order survives a remount through the index's mtime
(touched on first use in a mount's life and at most every USE_TOUCH_INTERVAL seconds).

Sharing (a later issue; nothing here locks across processes): several daemons may use one
directory because data is immutable (the same key means the same bytes: two writers of a block
write identical bytes at the same offset), records are appended whole by single O_APPEND writes
of a multiple of 48 bytes and checked by their own crc, and a reader that finds a record
missing, torn or pointing at bad data just fetches the block again. An eviction by one daemon
unlinks files another may hold open: it keeps reading intact bytes from the unlinked inode and
its appends to an unlinked index are lost, which later costs a fetch, never a wrong byte. What
sharing still needs: accounting that sees other daemons' writes (re-scan st_blocks), and index
rewrites (torn tails, compaction) that do not race with another daemon's appends.

Thread safety: the methods run in worker threads. One lock guards the in-memory tables and the
accounting; reads, writes and checksums run outside it. An entry being used by a thread keeps
its descriptors open even if it is evicted meanwhile (closed by the last user).

Invariants: bytes returned by `read_into` are byte for byte those given to `write` for that key
and block (crc-checked once per mount); total_bytes <= max_bytes after every write (as far as
this process can tell); a directory left by the old one-file-per-block cache (`blocks/`,
`sizes/`) is removed at start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# 1 MiB: large enough that a block costs one ranged GET of useful size (S3 first-byte latency
# is 20-100 ms) and one FUSE request at read_ahead_kb 1024; small enough that a random 64 KiB
# read of a huge TIFF fetches at most 1 MiB.
DEFAULT_BLOCK_SIZE = 1 << 20

_MAGIC = b"GCI1"
_RECORD = struct.Struct(">4sB3xIQIIQ8s")
_RECORD_CRC = struct.Struct(">I")
RECORD_SIZE = _RECORD.size + _RECORD_CRC.size  # 48 bytes: 0.005 % of a 1 MiB block
_KIND_BLOCK, _KIND_SIZE, _KIND_DROPPED = 1, 2, 3

STORE_DIR = "store"
_OLD_FORMAT = ("blocks", "sizes")  # the one-file-per-block cache before this one
_TMP_PREFIX = ".tmp-"
# Descriptors of recently used data and index files stay open: a sequential read of a cached
# file costs one preadv per stretch instead of open/read/close per block. 64 files are at
# most 192 descriptors (data, data with O_DIRECT, index), far below the usual 1024 limit, and
# more than the files a training loader has open at once.
MAX_OPEN_FILES = 64
# An index's mtime records its last use for the LRU order of the next mount; touching it on
# every hit would be a syscall per block.
USE_TOUCH_INTERVAL = 60.0
# Rewrite an index when it holds this many records more than it has live blocks (superseded
# and dropped records), so a file re-fetched many times does not grow its index forever.
COMPACT_SLACK = 64
# Filesystems allocate in pages: a block's real cost before it is written.
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class BlockStoreStatistics:
    hits: int  # blocks read from disk
    misses: int  # blocks asked for and not there (or damaged)
    evictions: int  # remote files evicted
    damaged: int  # blocks or records found damaged
    files: int  # remote files with something on disk
    bytes: int  # on disk, as the filesystem counts it


def key_digest(key: str) -> str:
    """The sha256 hex digest that names a key's files."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _Entry:
    """What we know of one remote file's files. Guarded by BlockStore._lock."""

    __slots__ = (
        "blocks",
        "bytes",
        "closing",
        "data_fd",
        "digest",
        "direct_fd",
        "index_fd",
        "loaded",
        "records",
        "size",
        "touched",
        "users",
        "verified",
        "warned",
    )

    def __init__(self, digest: str, on_disk: int) -> None:
        self.digest = digest
        self.bytes = on_disk
        self.loaded = False  # the index was read (lazily: at start only sizes are scanned)
        self.size: int | None = None
        self.blocks: dict[int, tuple[int, int]] = {}  # index -> (length, crc32)
        self.records = 0  # records in the index file, live or not
        self.verified: set[int] = set()  # blocks checked (or written) in this mount's life
        self.data_fd = -1
        self.direct_fd = -1  # O_DIRECT: whole pages from and to page-aligned buffers
        self.index_fd = -1
        self.users = 0  # threads doing I/O on the descriptors right now
        self.closing = False  # evicted or pushed out of the descriptor cache while in use
        self.touched = 0.0
        self.warned = False


class BlockStore:
    """Contents of immutable remote files on disk, at most `max_bytes` (module docstring)."""

    def __init__(
        self, directory: Path, max_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        if block_size <= 0 or max_bytes < 0:
            raise ValueError("block_size must be positive and max_bytes not negative")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._store = self.directory / STORE_DIR
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order, oldest first
        self._open: OrderedDict[str, _Entry] = OrderedDict()  # entries with open descriptors
        self._total = 0
        self._hits = self._misses = self._evictions = self._damaged = 0
        self._direct = hasattr(os, "O_DIRECT")  # until the filesystem refuses it
        self.direct_writes = self.buffered_writes = 0  # statistics: pwrite calls
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # An existing directory may have been created with a looser umask.
        os.chmod(self.directory, 0o700)
        self._store.mkdir(mode=0o700, exist_ok=True)
        self._remove_old_format()
        self._scan()

    # -- public API -------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def statistics(self) -> BlockStoreStatistics:
        with self._lock:
            return BlockStoreStatistics(
                self._hits,
                self._misses,
                self._evictions,
                self._damaged,
                len(self._entries),
                self._total,
            )

    def get_size(self, key: str) -> int | None:
        """The remote file's size if a record of it is on disk."""
        with self._lock:
            entry = self._loaded(key_digest(key), create=False)
            return None if entry is None else entry.size

    def put_size(self, key: str, size: int) -> None:
        """Remember a file's total size across remounts (a size-only record)."""
        if size < 0:
            raise ValueError("a size is not negative")
        digest = key_digest(key)
        with self._lock:
            entry = self._loaded(digest, create=True)
            assert entry is not None
            if entry.size == size:
                return
            if not self._make_room(entry, RECORD_SIZE):
                return
            entry.users += 1
        try:
            record = _record(_KIND_SIZE, self.block_size, 0, 0, 0, size, digest)
            self._append(entry, record)
        except OSError as exc:
            log.warning("block store: cannot store a size: %s", exc)
            self._release(entry)
            return
        with self._lock:
            entry.size = size
            entry.records += 1
        self._release(entry, account=True)

    def cached_blocks(self, key: str, count: int) -> int:
        """How many of the first `count` blocks of `key` are stored (not read or checked)."""
        with self._lock:
            entry = self._loaded(key_digest(key), create=False)
            if entry is None:
                return 0
            return sum(1 for index in entry.blocks if index < count)

    def fully_cached(self, key: str) -> bool:
        """True when the size is known and every block of the file has a record (the data
        is checked when it is read, as always)."""
        with self._lock:
            entry = self._loaded(key_digest(key), create=False)
            if entry is None or entry.size is None:
                return False
            blocks = -(-entry.size // self.block_size)
            return all(index in entry.blocks for index in range(blocks))

    def present(self, key: str, indices: Sequence[int]) -> list[int]:
        """Which of `indices` have a record (cheap: no data is read)."""
        with self._lock:
            entry = self._loaded(key_digest(key), create=False)
            if entry is None:
                return []
            return [index for index in indices if index in entry.blocks]

    def present_nowait(self, key: str, indices: Sequence[int]) -> list[int] | None:
        """Which of `indices` have a record, if that is known without reading the index
        from disk (None: it is not loaded yet). For the trio thread: no I/O."""
        with self._lock:
            entry = self._entries.get(key_digest(key))
            if entry is None:
                return []
            if not entry.loaded:
                return None
            return [index for index in indices if index in entry.blocks]

    def read_into(self, key: str, first: int, count: int, buffer: memoryview) -> dict[int, int]:
        """Read the stored blocks among `first .. first+count-1` into `buffer` (block `first`
        at offset 0, each block at its own place); return {block index: length} of those that
        are there and intact. A damaged block is a miss, logged once per file."""
        bs = self.block_size
        digest = key_digest(key)
        with self._lock:
            entry = self._loaded(digest, create=False)
            if entry is None:
                self._misses += count
                return {}
            wanted = {i: entry.blocks[i] for i in range(first, first + count) if i in entry.blocks}
            self._misses += count - len(wanted)
            if not wanted:
                return {}
            if any((i - first) * bs + wanted[i][0] > len(buffer) for i in wanted):
                raise ValueError("the buffer is smaller than the blocks asked for")
            verified = {i for i in wanted if i in entry.verified}
            entry.users += 1
            self._entries.move_to_end(digest)
            touch = time.monotonic() - entry.touched > USE_TOUCH_INTERVAL
            if touch:
                entry.touched = time.monotonic()
        good: dict[int, int] = {}
        bad: list[int] = []
        try:
            for run in _consecutive(sorted(wanted)):
                start = (run[0] - first) * bs
                length = (run[-1] - run[0]) * bs + wanted[run[-1]][0]
                got = self._read_data(entry, buffer, start, length, run[0] * bs)
                for i in run:
                    size_i, crc = wanted[i]
                    at = (i - first) * bs
                    # A short read means the data never reached the disk (a hole at the end).
                    if at + size_i - start > got:
                        bad.append(i)
                    elif i in verified or zlib.crc32(buffer[at : at + size_i]) == crc:
                        good[i] = size_i
                    else:
                        bad.append(i)
            if touch:
                with contextlib.suppress(OSError):
                    os.utime(self._index_path(digest))
        except OSError as exc:
            log.warning("block store: cannot read %s: %s", self._data_path(digest), exc)
            self._release(entry)
            with self._lock:
                self._misses += len(wanted)
            return {}
        with self._lock:
            self._hits += len(good)
            entry.verified.update(good)
            if bad:
                self._misses += len(bad)
                self._damaged += len(bad)
                for i in bad:
                    entry.blocks.pop(i, None)
                    entry.verified.discard(i)
                if not entry.warned:
                    entry.warned = True
                    log.warning(
                        "block store: %d damaged block(s) of %s (first: %d); fetching again",
                        len(bad),
                        self._data_path(digest),
                        bad[0],
                    )
        if bad:
            size = entry.size or 0
            records = b"".join(_record(_KIND_DROPPED, bs, i, 0, 0, size, digest) for i in bad)
            with contextlib.suppress(OSError):
                self._append(entry, records)
                with self._lock:
                    entry.records += len(bad)
        self._release(entry)
        return good

    def write(self, key: str, first: int, data: memoryview, size: int) -> int:
        """Store consecutive whole blocks starting at block `first`: `data` is their bytes
        (each block `block_size` long, except the file's last one) of a `size`-byte remote
        file. Returns how many blocks were stored (0 when they do not fit)."""
        return self.write_many(key, [(first, data)], size)

    def write_many(self, key: str, pieces: Sequence[tuple[int, memoryview]], size: int) -> int:
        """`write` for several stretches of one file at once: one index append for all."""
        bs = self.block_size
        blocks = 0
        cost = 0
        for first, data in pieces:
            if first < 0 or size < 0:
                raise ValueError("block index and size must not be negative")
            end = first * bs + len(data)
            if end > size or (len(data) % bs and end != size):
                raise ValueError("blocks must be whole, and only the file's last one short")
            count = -(-len(data) // bs)
            blocks += count
            cost += -(-len(data) // _PAGE) * _PAGE + count * RECORD_SIZE
        if blocks == 0:
            return 0
        digest = key_digest(key)
        with self._lock:
            entry = self._loaded(digest, create=True)
            assert entry is not None
            if entry.size is not None and entry.size != size:
                # Files are immutable by key: another size means the key was reused. Start over.
                log.warning("block store: %s changed size; dropping it", self._data_path(digest))
                self._evict(entry)
                entry = self._loaded(digest, create=True)
                assert entry is not None
            if not self._make_room(entry, cost):
                return 0
            entry.users += 1
        stored: list[tuple[int, int, int]] = []  # block index, length, crc32
        try:
            for first, data in pieces:
                self._write_data(entry, first * bs, data)
                for n in range(-(-len(data) // bs)):
                    block = data[n * bs : (n + 1) * bs]
                    stored.append((first + n, len(block), zlib.crc32(block)))
            records = b"".join(
                _record(_KIND_BLOCK, bs, index, length, crc, size, digest)
                for index, length, crc in stored
            )
            self._append(entry, records)
        except OSError as exc:
            log.warning("block store: cannot write %s: %s", self._data_path(digest), exc)
            self._release(entry, account=True)
            return 0
        with self._lock:
            entry.size = size
            entry.records += len(stored)
            for index, length, crc in stored:
                entry.blocks[index] = (length, crc)
                entry.verified.add(index)
            if self._entries.get(digest) is entry:  # not evicted meanwhile
                self._entries.move_to_end(digest)
        self._release(entry, account=True)
        return len(stored)

    def _write_data(self, entry: _Entry, offset: int, data: memoryview) -> None:
        """Write `data` at `offset`: whole pages with O_DIRECT when the filesystem and the
        buffer allow it, the rest (a file's short last block, a small file) through the page
        cache. Called by the entry's user.

        O_DIRECT because the page cache copy is most of a cold read's cost: writing 1 GiB
        in 4 MiB pieces took 0.58-1.1 CPU-s buffered and 0.04 CPU-s with O_DIRECT, measured
        on this project's machine (the disk does the copying). It also keeps a second copy of
        every byte out of the page cache (the kernel caches the FUSE file's pages already).
        O_DIRECT needs the buffer, the offset and the length aligned (4 KiB covers every
        device); the buffer pool's buffers are page-aligned memory maps, block offsets are
        multiples of the block size."""
        buffered = self._data_fd(entry)  # opens (creates) the files
        whole = len(data) - len(data) % _PAGE if offset % _PAGE == 0 else 0
        if whole and self._direct:
            fd = self._direct_fd(entry)
            if fd >= 0:
                try:
                    _pwrite_all(fd, data[:whole], offset)
                    self.direct_writes += 1
                    data, offset = data[whole:], offset + whole
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: an unaligned buffer
                        raise
        if data:
            _pwrite_all(buffered, data, offset)
            self.buffered_writes += 1

    def _read_data(
        self, entry: _Entry, buffer: memoryview, start: int, length: int, offset: int
    ) -> int:
        """Read `length` bytes at `offset` into buffer[start:]; return how many arrived
        (fewer at the end of the file). With O_DIRECT where possible: the disk writes into
        the buffer, with no copy out of the page cache and no second cached copy of bytes
        the kernel caches for the FUSE file already (a cached re-read with the page cache
        dropped spent 16 % of the daemon's cycles in that copy)."""
        rounded = -(-length // _PAGE) * _PAGE
        if self._direct and offset % _PAGE == 0 and start + rounded <= len(buffer):
            fd = self._direct_fd(entry)
            if fd >= 0:
                try:
                    return min(length, _pread_all(fd, buffer[start : start + rounded], offset))
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: an unaligned buffer
                        raise
        return _pread_all(self._data_fd(entry), buffer[start : start + length], offset)

    def _direct_fd(self, entry: _Entry) -> int:
        if entry.direct_fd < 0 and self._direct:
            path = self._data_path(entry.digest)
            try:
                fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.debug("block store: %s refuses O_DIRECT; writing through the page cache", path)
                self._direct = False
                return -1
            with self._lock:
                if entry.direct_fd < 0:
                    entry.direct_fd = fd
                    fd = -1
            if fd >= 0:
                os.close(fd)  # another thread opened it meanwhile
        return entry.direct_fd

    def close(self) -> None:
        """Close every descriptor (the store stays usable: they are reopened on demand)."""
        with self._lock:
            for entry in list(self._open.values()):
                if entry.users == 0:
                    self._close_fds(entry)
                else:
                    entry.closing = True

    # -- entries, descriptors and accounting (lock held where it says so) ------------------

    def _loaded(self, digest: str, *, create: bool) -> _Entry | None:
        """The entry of `digest` with its index read. Lock held; reads a small file."""
        entry = self._entries.get(digest)
        if entry is None:
            if not create:
                return None
            entry = _Entry(digest, 0)
            entry.loaded = True
            self._entries[digest] = entry
            return entry
        if not entry.loaded:
            self._load_index(entry)
        return entry

    def _load_index(self, entry: _Entry) -> None:
        """Parse an index file into `entry`. Lock held (index files are small: 48 KiB per
        GiB of data)."""
        entry.loaded = True
        path = self._index_path(entry.digest)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("block store: cannot read %s: %s", path, exc)
            return
        prefix = bytes.fromhex(entry.digest[:16])
        bs = self.block_size
        damaged = 0
        whole = len(raw) - len(raw) % RECORD_SIZE
        for offset in range(0, whole, RECORD_SIZE):
            fields = _parse(raw[offset : offset + RECORD_SIZE])
            if fields is None or fields[6] != prefix or fields[1] != bs:
                damaged += 1
                continue
            kind, _, index, length, crc, size, _ = fields
            if entry.size is not None and size != entry.size:
                damaged += 1  # records disagree about the size: trust none of them
                entry.blocks.clear()
                entry.size = None
                break
            entry.size = size
            if kind == _KIND_BLOCK:
                expected = min(bs, size - index * bs)
                if expected <= 0 or length != expected:
                    damaged += 1
                    continue
                entry.blocks[index] = (length, crc)
            elif kind == _KIND_DROPPED:
                entry.blocks.pop(index, None)
        entry.records = whole // RECORD_SIZE
        torn = len(raw) != whole
        if damaged or torn:
            self._damaged += damaged + int(torn)
            entry.warned = True
            log.warning(
                "block store: %s had %d damaged record(s)%s; ignored",
                path,
                damaged,
                " and a torn tail" if torn else "",
            )
        if torn or entry.records > len(entry.blocks) + COMPACT_SLACK:
            self._rewrite_index(entry)

    def _rewrite_index(self, entry: _Entry) -> None:
        """Replace the index with one record per live block (atomically). Lock held; only
        while nobody has the entry's descriptors open."""
        if entry.index_fd >= 0 and entry.users:
            return
        self._close_fds(entry)
        path = self._index_path(entry.digest)
        size = entry.size or 0
        records = [
            _record(_KIND_BLOCK, self.block_size, i, length, crc, size, entry.digest)
            for i, (length, crc) in sorted(entry.blocks.items())
        ]
        if not records and entry.size is not None:
            records = [_record(_KIND_SIZE, self.block_size, 0, 0, 0, size, entry.digest)]
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, b"".join(records))
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("block store: cannot rewrite %s: %s", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        entry.records = len(records)

    def _data_fd(self, entry: _Entry) -> int:
        """The entry's data descriptor, opened on demand. Called by its user (users > 0)."""
        if entry.data_fd < 0:
            self._open_fds(entry)
        return entry.data_fd

    def _append(self, entry: _Entry, records: bytes) -> None:
        """Append whole records with one write: O_APPEND makes concurrent appends (threads
        here, daemons later) land one after the other, never interleaved."""
        if entry.index_fd < 0:
            self._open_fds(entry)
        _write_all(entry.index_fd, records)

    def _open_fds(self, entry: _Entry) -> None:
        path = self._data_path(entry.digest)
        with self._lock:
            if entry.data_fd >= 0 and entry.index_fd >= 0:
                return
            path.parent.mkdir(mode=0o700, exist_ok=True)
            flags = os.O_CLOEXEC | os.O_CREAT
            data_fd = os.open(path, os.O_RDWR | flags, 0o600)
            try:
                index_fd = os.open(
                    self._index_path(entry.digest), os.O_WRONLY | os.O_APPEND | flags, 0o600
                )
            except OSError:
                os.close(data_fd)
                raise
            entry.data_fd, entry.index_fd = data_fd, index_fd
            self._open[entry.digest] = entry
            # Bounded: close the least recently opened idle ones.
            for digest in list(self._open):
                if len(self._open) <= MAX_OPEN_FILES:
                    break
                other = self._open[digest]
                if other.users == 0 and other is not entry:
                    self._close_fds(other)

    def _release(self, entry: _Entry, *, account: bool = False) -> None:
        """The calling thread is done with the entry's descriptors; with `account`, bring its
        size on disk up to date first (the files only grow while in use)."""
        on_disk = -1
        if account:
            on_disk = self._measure(entry)
        with self._lock:
            if on_disk > entry.bytes and self._entries.get(entry.digest) is entry:
                self._total += on_disk - entry.bytes
                entry.bytes = on_disk
            entry.users -= 1
            if entry.users == 0 and entry.closing:
                self._close_fds(entry)

    def _measure(self, entry: _Entry) -> int:
        total = 0
        for fd in (entry.data_fd, entry.index_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    info = os.fstat(fd)
                    total += info.st_blocks * 512 if fd == entry.data_fd else info.st_size
        return total

    def _close_fds(self, entry: _Entry) -> None:
        """Lock held; the entry has no users."""
        for fd in (entry.data_fd, entry.direct_fd, entry.index_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        entry.data_fd = entry.direct_fd = entry.index_fd = -1
        entry.closing = False
        if self._open.get(entry.digest) is entry:
            del self._open[entry.digest]

    def _make_room(self, entry: _Entry, cost: int) -> bool:
        """Evict other files, least recently used first, until `cost` more bytes fit; False
        when they cannot (the file alone would exceed the limit). Lock held."""
        if entry.bytes + cost > self.max_bytes:
            return False
        for digest in list(self._entries):
            if self._total + cost <= self.max_bytes:
                break
            other = self._entries[digest]
            if other is not entry:
                self._evict(other)
                self._evictions += 1
        return self._total + cost <= self.max_bytes

    def _evict(self, entry: _Entry) -> None:
        """Forget a file and unlink its files. Lock held. A thread still reading it keeps its
        descriptors until it is done (module docstring)."""
        if self._entries.get(entry.digest) is entry:
            del self._entries[entry.digest]
            self._total -= entry.bytes
        for path in (self._data_path(entry.digest), self._index_path(entry.digest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if entry.users:
            entry.closing = True
        else:
            self._close_fds(entry)

    # -- start ------------------------------------------------------------------------------

    def _remove_old_format(self) -> None:
        for name in _OLD_FORMAT:
            old = self.directory / name
            if old.is_dir() and not old.is_symlink():
                log.info("block store: removing %s, left by an older gcfs", old)
                shutil.rmtree(old, ignore_errors=True)

    def _scan(self) -> None:
        """Account for the files on disk, oldest use first; indexes are read lazily."""
        used: dict[str, float] = {}  # digest -> mtime of its index
        sizes: dict[str, int] = {}  # digest -> bytes on disk of both files
        data_paths: dict[str, str] = {}
        for entry in _scan(self._store):
            name = entry.name
            if name.startswith(_TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            digest, _, suffix = name.partition(".")
            if suffix not in ("data", "index") or len(digest) != 64:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if suffix == "index":
                used[digest] = info.st_mtime
                sizes[digest] = sizes.get(digest, 0) + info.st_size
            else:
                sizes[digest] = sizes.get(digest, 0) + info.st_blocks * 512
                data_paths[digest] = entry.path
        for digest in set(sizes) - set(used):  # data whose index never got written: unusable
            del sizes[digest]
            with contextlib.suppress(OSError):
                os.unlink(data_paths[digest])
        with self._lock:
            for digest in sorted(used, key=used.__getitem__):
                self._entries[digest] = _Entry(digest, sizes[digest])
                self._total += sizes[digest]
            # A smaller max_bytes than last time: shrink now rather than on the next write.
            while self._entries and self._total > self.max_bytes:
                self._evict(next(iter(self._entries.values())))
                self._evictions += 1
        log.debug("block store %s: %d files, %d bytes", self.directory, len(used), self._total)

    def _data_path(self, digest: str) -> Path:
        return self._store / digest[:2] / f"{digest}.data"

    def _index_path(self, digest: str) -> Path:
        return self._store / digest[:2] / f"{digest}.index"


def _record(kind: int, bs: int, index: int, length: int, crc: int, size: int, digest: str) -> bytes:
    body = _RECORD.pack(_MAGIC, kind, bs, index, length, crc, size, bytes.fromhex(digest[:16]))
    return body + _RECORD_CRC.pack(zlib.crc32(body))


def _parse(raw: bytes) -> tuple[int, int, int, int, int, int, bytes] | None:
    """(kind, block size, index, length, crc, size, digest prefix), or None if damaged."""
    body = raw[: _RECORD.size]
    (check,) = _RECORD_CRC.unpack_from(raw, _RECORD.size)
    if zlib.crc32(body) != check:
        return None
    magic, kind, bs, index, length, crc, size, prefix = _RECORD.unpack(body)
    if magic != _MAGIC or kind not in (_KIND_BLOCK, _KIND_SIZE, _KIND_DROPPED):
        return None
    return kind, bs, index, length, crc, size, prefix


def _consecutive(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] + 1 == index:
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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # pwrite may write less (a signal, a full disk)
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _scan(directory: Path) -> list[os.DirEntry[str]]:
    """Regular files in the subdirectories of `directory`."""
    entries: list[os.DirEntry[str]] = []
    try:
        with os.scandir(directory) as it:
            for sub in it:
                if sub.is_dir(follow_symlinks=False):
                    with os.scandir(sub.path) as inner:
                        entries.extend(e for e in inner if e.is_file(follow_symlinks=False))
    except OSError as exc:
        log.warning("block store: cannot scan %s: %s", directory, exc)
    return entries


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "RECORD_SIZE",
    "BlockStore",
    "BlockStoreStatistics",
    "key_digest",
]
