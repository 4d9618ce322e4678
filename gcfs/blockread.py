"""The block store's index state and reads (blockstore.py): what this process knows of each
remote file's records, brought up to date from its index file, and the reads it serves.

An index is a sequence of 48-byte records (blockindex.py): one per block stored, size-only
and "dropped" ones. The last record of a block wins; every record carries the remote file's
total size, so a size survives remounts. A record that fails its own crc is skipped and the next
one found by its magic: bytes torn by a crash, or clobbered by another NFS client's append, cost
the records they hit and nothing after them. An index is read 1 MiB at a time and at most
INDEX_LIMIT bytes (less when the server's size is known); records whose size disagrees with
the server's, when a caller said it, are not believed.

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
member with the integrity of everything in it (blockstore.py, "Trust").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import zlib
from collections.abc import Sequence

from . import safeio
from .blockaccount import StoreAccounting
from .blockfiles import (
    _GONE,
    _SWEEPER,
    LINK_CHECK_INTERVAL,
    _data_name,
    _Entry,
    _Files,
    _index_name,
    _pread_all,
    _pread_bytes,
    key_digest,
    log,
)
from .blockindex import KIND_BLOCK, KIND_DROPPED, RECORD_SIZE, Fields, parse_records, record

# An index's mtime records its last use for the LRU order of other daemons and later mounts;
# touching it on every hit would be a syscall per block.
USE_TOUCH_INTERVAL = 60.0
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


class StoreReads(StoreAccounting):
    """Index state and reads (this module's docstring)."""

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

    def _touch(self, digest: str) -> None:
        """Record the use in the index's mtime, for other daemons' LRU (never through a
        link)."""
        with contextlib.suppress(OSError), self._folder(digest) as folder:
            os.utime(_index_name(digest), dir_fd=folder, follow_symlinks=False)

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
            if exists and self._untracked:
                # Most likely one of the files the table had no room for: its bytes are
                # counted already (the next rescan counts exactly).
                self._untracked -= 1
                moved = min(on_disk, self._untracked_bytes)
                self._untracked_bytes -= moved
                self._total += on_disk - moved
            else:
                self._total += on_disk
                # Not there when we scanned or last looked: another daemon stored these.
                self._found_later += len(found.blocks)
            dropped = self._bound_locked(keep=found)
        if dropped:
            self._tell_untracked()
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

    def _replaced(self, entry: _Entry) -> bool:
        """True when the index on disk is not the one we parsed (evicted or replaced)."""
        try:
            with self._folder(entry.digest) as folder:
                info = os.stat(_index_name(entry.digest), dir_fd=folder, follow_symlinks=False)
        except OSError:
            return True
        with self._lock:
            return (info.st_dev, info.st_ino) != entry.index_id

    # -- descriptors, with the index in mind -----------------------------------------------

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


def _consecutive(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] + 1 == index:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs
