"""The block store's files (blockstore.py): their names, the descriptors held open for them,
and the bytes read from and written to them.

Every name below the cache directory is opened relative to its parent's descriptor, never
through a link, a FIFO or a hard link (safeio.py; blockstore.py, "Trust"). A set of open
descriptors of one remote file (`_Files`) is counted by its users and closed by the last one
once retired (evicted, replaced, unlinked under us, or pushed out of the descriptor cache of
MAX_OPEN_FILES files); what this process knows of a file is its `_Entry`. Both are guarded by
the store's lock (blockstore.py, "Thread safety").

Unlinked files: held descriptors of a file that `gcfs cache clear/prune` or another daemon
unlinked keep its disk space allocated. Each held file is checked (a link count of 0, or
another inode under its name) on use and by a sweep thread every LINK_CHECK_INTERVAL seconds,
and let go: closed once its users are done, forgotten, its bytes no longer counted.

O_DIRECT: whole pages are written and read with O_DIRECT on every filesystem that accepts it
(EINVAL switches to the page cache). On a local disk it saves the page-cache copy (writing
1 GiB: 0.04 CPU-s instead of 0.58-1.1 here). On NFS it is what makes sharing cheap: a direct
write returns once the server has the data (the Linux client commits it before completing the
write), so no fdatasync is needed for those pages, and a direct read asks the server, never a
stale page of the client's cache. Lustre and CephFS accept page-aligned direct I/O too and are
coherent without it. The cost on NFS: cached re-reads always go to the server (the kernel's
page cache of the gcfs mount still keeps what users read). The fdatasync of the write's steps
3 and 5 (blockwrite.py) costs one round trip to the server each per write call (writes are
batched per file, 4 MiB or more of a large file, one call per small file); on a local
filesystem neither is done: one page cache serves every process of the machine.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from . import cachedir, safeio

# One logger for the whole store, whichever module logs: its messages and their configuration
# stay those of gcfs.blockstore.
log = logging.getLogger("gcfs.blockstore")

STORE_DIR = "store"
_TMP_PREFIX = ".tmp-"
# Descriptors of recently used data and index files stay open: a sequential read of a cached
# file costs one preadv per stretch instead of open/read/close per block. 64 files are at
# most 192 descriptors (data, data with O_DIRECT, index), far below the usual 1024 limit, and
# more than the files a training loader has open at once.
MAX_OPEN_FILES = 64
# Held descriptors of a file that `gcfs cache clear/prune` or another daemon unlinked keep its
# disk space allocated. Each held file is checked (fstat, and a stat of its name: 3 syscalls)
# at most this often, on use and by a sweep of every store in a background thread, so the
# space comes back within a few seconds; 64 held files cost ~100 syscalls per second at most.
LINK_CHECK_INTERVAL = 2.0
# Filesystems allocate in pages: a block's real cost before it is written.
_PAGE = 4096
# Errors that mean "the file is gone" (unlinked here, or by another NFS client): a miss.
_GONE = frozenset({errno.ENOENT, errno.ESTALE})


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


class StoreFiles:
    """The store's shared state, and its files' descriptors and bytes. The state is created
    by BlockStore.__init__ and guarded by `_lock` as blockstore.py ("Thread safety") says;
    the other parts of the store (blockaccount, blockread, blockwrite, blockmaint) build on
    this class."""

    directory: Path
    max_bytes: int
    block_size: int
    readonly: bool
    kind: str  # marker.BLOCK_CACHE or marker.SNAPSHOT: the directory this store expects
    network: bool
    dir: cachedir.CacheDir
    _lock: threading.Lock
    _entries: OrderedDict[str, _Entry]  # LRU order, oldest first
    _open: OrderedDict[str, _Entry]  # entries with open descriptors
    _refused: OrderedDict[str, None]  # evictions refused (EPERM)
    _total: int  # bytes on disk, as far as this process knows (untracked files' too)
    max_entries: int  # files tracked in `_entries` at most (blockaccount.MAX_ENTRIES)
    _untracked: int  # files on disk not in `_entries` (beyond max_entries), at the last count
    _untracked_bytes: int  # their bytes
    _hits: int
    _misses: int
    _evictions: int
    _damaged: int
    _found_later: int
    _rescans: int
    _damaged_blocks: int
    _rescanned: float  # time.monotonic() of the last rescan
    _swept: float  # of the last check of held descriptors
    _direct: bool  # O_DIRECT, until the filesystem refuses it
    _told: set[str]  # messages logged once (a handful of fixed texts)
    direct_writes: int  # statistics: pwrite calls
    buffered_writes: int
    _top: int  # the cache directory, held open
    _store_fd: int  # its store/, held open (-1: none, in a read-only store)

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

    def _data_path(self, digest: str) -> Path:
        """For messages only: every open goes through `_folder`."""
        return self.directory / STORE_DIR / digest[:2] / _data_name(digest)

    def _index_path(self, digest: str) -> Path:
        """For messages only: every open goes through `_folder`."""
        return self.directory / STORE_DIR / digest[:2] / _index_name(digest)

    # -- descriptors --------------------------------------------------------------------------

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

    # -- files unlinked under us --------------------------------------------------------------

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

    # -- reading and writing data -----------------------------------------------------------

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
        clients it may not: blockstore.py, "Sharing"). On a network filesystem the index is
        flushed before we return, which is when other machines can see the records. For
        descriptors opened for reading only (a dropped record), the index is opened; never
        created."""
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

    def _write_data(self, files: _Files, offset: int, data: memoryview) -> bool:
        """Write `data` at `offset`: whole pages with O_DIRECT when the filesystem and the
        buffer allow it, the rest (a file's short last block, a small file, an unaligned
        buffer) through the page cache; True when some of it went through the page cache.

        O_DIRECT because the page cache copy is most of a cold read's cost: writing 1 GiB
        in 4 MiB pieces took 0.58-1.1 CPU-s buffered and 0.04 CPU-s with O_DIRECT, measured
        on this project's machine (the disk does the copying); on NFS because the data is on
        the server when the write returns (this module's docstring). O_DIRECT needs the buffer,
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

    def _measure(self, files: _Files) -> int:
        """Bytes on disk of the open files, as the filesystem counts them (st_blocks of the
        data, the index's length)."""
        total = 0
        for fd, whole in ((files.data, True), (files.index, False)):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    info = os.fstat(fd)
                    total += info.st_blocks * 512 if whole else info.st_size
        return total

    def _measure_paths(self, digest: str) -> int:
        """`_measure` by name (regular files only, never through a link)."""
        total = 0
        with contextlib.suppress(OSError), self._folder(digest) as folder:
            for name, whole in ((_data_name(digest), True), (_index_name(digest), False)):
                with contextlib.suppress(OSError):
                    info = os.stat(name, dir_fd=folder, follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        total += info.st_blocks * 512 if whole else info.st_size
        return total


class _Sweeper:
    """One background thread per process that checks, every LINK_CHECK_INTERVAL seconds,
    the descriptors every live store holds (StoreFiles.sweep): an idle daemon gives the
    space of files cleared under it back too. Restarted in a forked child on next use."""

    def __init__(self) -> None:
        self._stores: weakref.WeakSet[StoreFiles] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = -1
        self._wake = threading.Event()

    def add(self, store: StoreFiles) -> None:
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
