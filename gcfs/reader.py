"""RemoteFile: one open remote file; reads served from blocks, read-ahead for sequential readers.

The path of a byte, cold: `_stream` asks StorageClient for a ranged GET of a run of blocks and
has the body received straight into one pooled buffer (buffers.py); as each block's last byte
arrives it becomes a `Block` (a slice of that buffer) handed to the waiting readers (`Flight`)
and to the file's window; once the whole answer arrived exactly as asked, its blocks go to the
block store in one write (a worker thread). `read` then answers with a memoryview of the
block(s): pyfuse3 copies it into the kernel's reply; the daemon never copies a body in Python
(only a read that spans two GETs' buffers joins them: one copy). Warm: the same, with the block
store's `read_into` filling the buffer instead of the socket.

Reads are served in `block_size` (1 MiB) blocks: from the window in memory, else from a fetch
already in flight for the same block (any file: the store's flight table), else from the block
store on disk, else by a ranged GET that is verified (206, exact Content-Range, exact length;
storage_http.check_partial) before a byte of it is used.

Sequential detection copes with the kernel's read-ahead: at read_ahead_kb 1024 the kernel sends
1 MiB reads, several at once, and they reach us out of order (measured at 4096: a read 2 MiB
ahead of the stream, then three more in order, then the skipped one, 5 MiB behind the newest).
A read belongs to the sequential stream when it starts within `near` of the frontier (the
furthest end of the stream's reads so far: four of the largest reads, at least 256 KiB), or
anywhere read-ahead has claimed already, or inside a hole: a range the stream skipped when a
read landed ahead of the frontier, which the kernel fills later. Blocks leave the window only
once they are `near` behind the frontier and behind every hole, so a late read finds its block
instead of fetching it again. (The old rule, "one block behind, 256 KiB ahead", fetched 3-25 %
of a file twice at read_ahead_kb 1024-4096 and restarted read-ahead each time: 3.4-3.7x the
storage requests in issue 10; tests/test_values.py checks every byte is fetched once.)

Read-ahead: the window starts at 1 block and doubles with every sequential read up to
`max_window_blocks` (32); when at most half a window is left ahead of the frontier, the next
stretch is claimed (so readers reaching it wait for it rather than fetch it again) and queued as
ranged GETs of at least 4 blocks, nearest first, of which `max_parallel` (8) per file run at
once: one connection's bandwidth cap is beaten (measured best at 8, issue 10) and a 48 MiB file
costs ~15 requests instead of 49. A file of at most 4 blocks is read ahead whole, in 1-block
ranges side by side, from its first sequential read (WHOLE_FILE_BLOCKS: a training loader's
4 MiB file in one round trip instead of three). A read elsewhere resets the window to 0, cancels
the file's
read-ahead and drops its blocks: a 64 KiB read at 3 GiB fetches just the 16 KiB-aligned range it
needs (RANDOM_READ_MAX), which is not cached on disk.

Invariants:
- A block reaches a reader only after its response passed `check_partial` and all of the
  block's bytes arrived; it reaches the disk only after the whole response was exactly as long
  as asked, so a bad response caches nothing. Block store writes run in the store's writer
  tasks, not in the reader's: closing the file (which cancels its read-ahead) loses no write. A
  write trio stops waiting for (the unmount's drain deadline) still runs to its end in its
  thread, its buffer pinned until then (content.ContentStore.in_thread).
- Read-ahead memory (blocks held by files, bytes being read ahead, bytes waiting to be written)
  stays below the store's `max_inflight_bytes` across all files; blocks a reader needs right
  now are never held back by that budget, so it cannot deadlock. (A buffer stays alive while
  any of its blocks is held, so up to 3 MiB per file can outlive the accounting of its dropped
  blocks.) Read-ahead is never fire-and-forget: it runs in the store's nursery, and `close()`
  cancels it.
- Everything here runs on the trio thread; the sections between checkpoints are atomic, which
  is what makes the flight table and the budget counters safe without locks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urljoin

import trio

from . import inject
from .background import report_bug
from .buffers import Block, Buffer, lend, span, unpin
from .errors import (
    BadResponse,
    GcfsError,
    NotInSnapshot,
    PermissionDenied,
    Unavailable,
    first_error,
)
from .resolver import file_key
from .retry import OUTAGE_PROBE_BUDGET
from .storage_http import (
    REDIRECTS,
    Expired,
    StorageResponse,
    check_partial,
    raise_for_status,
    redact,
)

if TYPE_CHECKING:
    from .content import ContentStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Jitter for retry delays. One for the module: a new random.Random per request seeded itself
# from os.urandom, a syscall on every block fetch.
_RANDOM = random.Random()

# Read-ahead requests are at least this many blocks (4 MiB) unless the window is smaller: S3's
# first byte takes 20-100 ms, about what 1 MiB takes to transfer at 10-50 MB/s, so a 1 MiB
# request spends half its time waiting; at 4 MiB the transfer dominates.
MIN_READ_AHEAD_BLOCKS = 4
# A file of at most this many blocks (4 MiB) is read ahead whole from its first sequential read,
# in 1-block ranges side by side: a training loader reads thousands of whole small files, and
# the doubling window made a 4 MiB file three dependent round trips (1, 1 and 2 MiB: ~90 ms at
# 20 ms storage latency and 100 MiB/s per connection, the epoch row of the benchmark) where
# four parallel 1 MiB ranges take one (~30 ms). A reader that wanted only the start of such a
# file fetched at most 4 MiB; larger files keep the doubling window (it reaches 4 blocks by
# the third read anyway).
WHOLE_FILE_BLOCKS = 4
# A read at most this far from the frontier, either way, is sequential: two of the kernel's
# default 128 KiB FUSE reads...
SEQUENTIAL_SLACK = 256 << 10
# ... or `OUT_OF_ORDER_READS` of the largest read seen, if that is more. The kernel keeps one
# read-ahead window in flight plus the next one it starts early (read_ahead_kb 1024: two 1 MiB
# reads that may arrive in either order); four leaves room. Reads further behind are taken for
# the stream's when they fill a hole it skipped.
OUT_OF_ORDER_READS = 4
# Skipped ranges remembered at once: the kernel leaves a few at a time (read_ahead_kb 4096:
# one or two per read-ahead window); more than 16 means the reader skips on purpose.
MAX_HOLES = 16
# A random read (not where the sequential ones are) of at most this much, of blocks we do not
# have, fetches just the 16 KiB-aligned range it needs instead of whole 1 MiB blocks: a viewer
# jumping around a 5 GiB slide pays ~20 ms of storage latency per read, not 20 ms + 1 MiB, and
# fetches about what it reads (a 64 KiB read at an odd offset: 80 KiB). Such ranges are not
# cached on disk (they are not whole blocks); the kernel's page cache keeps them for this mount.
RANDOM_READ_MAX = 256 << 10
RANDOM_READ_ALIGN = 16 << 10


class Flight:
    """One block being fetched; followers wait for `done`, then find `data` or `error`."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: Block | None = None
        self.error: GcfsError | None = None  # None with no data: the leader was cancelled


class _Body:
    """One response's buffer, the blocks of it that arrived, and whether all of it arrived
    exactly as asked (only then is it written to disk)."""

    __slots__ = ("buffer", "first", "length", "verified")

    def __init__(self, buffer: Buffer, first: int) -> None:
        self.buffer = buffer
        self.first = first  # block index at offset 0 of the buffer
        self.length = 0  # bytes of whole blocks received
        self.verified = False


def _runs(indices: Iterable[int], longest: int) -> list[range]:
    """Sorted block indices as ranges of consecutive blocks, none longer than `longest`."""
    runs: list[range] = []
    start = prev = -2
    for i in sorted(indices):
        if i == prev + 1 and i - start < longest:
            prev = i
            continue
        if start >= 0:
            runs.append(range(start, prev + 1))
        start = prev = i
    if start >= 0:
        runs.append(range(start, prev + 1))
    return runs


class RemoteFile:
    """One open remote file: random-access reads with read-ahead for sequential readers."""

    def __init__(self, store: ContentStore, url: str, signed: str | None, size: int) -> None:
        self.store = store
        self.url = url
        self.key = file_key(url)
        self.size = size
        self.block_size = store.block_size
        self.nblocks = math.ceil(size / self.block_size)
        self.bytes_fetched = 0
        self.requests = 0
        self._signed = signed  # None: not resolved yet (opened from the cache, or offline)
        self._generation = 0  # bumped by each re-resolution
        self._resolve_lock = trio.Lock()
        self._blocks: dict[int, Block] = {}  # the window in memory
        self._frontier = 0  # furthest end of the sequential reads; a first read at 0 is one
        self._largest_read = 0
        # Byte ranges the stream skipped (a read landed ahead of the frontier) and has not read
        # yet: the kernel's late reads, which belong to the stream however far behind.
        self._holes: list[tuple[int, int]] = []
        self._window = 0  # read-ahead window, in blocks
        self._ahead_end = 0  # blocks before this one have been read ahead (or were read)
        self._floor = 0  # blocks before this one are consumed: do not hold them
        self._scopes: set[trio.CancelScope] = set()  # one per running read-ahead task
        self._queue: deque[tuple[range, list[Flight], int]] = deque()  # waiting read-ahead
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> memoryview | bytes:
        """Exactly the bytes [offset, min(offset + size, file size)): a view of the blocks
        when they lie in one buffer. The buffer stays out of reuse until the calling task
        next yields to trio (buffers.lend): use or copy the view before the next `await`."""
        if self._closed:
            raise ValueError("read from a closed RemoteFile")
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        sequential = self._advance(offset, end, first, last)
        if not sequential and end - offset <= RANDOM_READ_MAX:
            data = await self._read_small(offset, end, range(first, last + 1))
            if data is not None:
                return data
        blocks = await self._obtain(range(first, last + 1))
        pieces = [blocks[i] for i in range(first, last + 1)]
        reply = span(pieces, offset - first * bs, end - offset, self.store.pool)
        lend(reply)  # pinned until our caller's task yields: pyfuse3 has sent the reply by then
        return reply

    def close(self) -> None:
        """Cancel outstanding read-ahead and drop the window; idempotent."""
        self._closed = True
        self._cancel_read_ahead()
        for index in list(self._blocks):
            self._drop(index)

    # -- sequential detection and read-ahead ----------------------------------------------------

    def _advance(self, offset: int, end: int, first: int, last: int) -> bool:
        """Update the window for a read of [offset, end) and start read-ahead; no checkpoint.
        True when the read belongs to the sequential stream."""
        bs = self.block_size
        self._largest_read = max(self._largest_read, end - offset)
        near = max(SEQUENTIAL_SLACK, OUT_OF_ORDER_READS * self._largest_read)
        # Ahead: anything read-ahead has claimed already is on its way.
        ahead = max(self._frontier + near, self._ahead_end * bs if self._window else 0)
        in_hole = any(start <= offset < stop for start, stop in self._holes)
        if not (in_hole or self._frontier - near <= offset <= ahead):
            self._window = 0
            self._frontier = end
            self._holes = []
            self._cancel_read_ahead()
            for index in [i for i in self._blocks if not first <= i <= last]:
                self._drop(index)
            self._floor = first
            self._ahead_end = last + 1
            return False
        self._fill(offset, end)
        small = self.nblocks <= WHOLE_FILE_BLOCKS
        self._window = min(max(1, self._window * 2), self.store.max_window_blocks)
        if small:
            self._window = self.nblocks
        # Keep what a late, out-of-order read may still need: `near` behind the frontier, the
        # holes the kernel has yet to fill, and of course this read's own blocks.
        floor = min(
            first, max(0, min([self._frontier - near] + [start for start, _ in self._holes])) // bs
        )
        if floor > self._floor:
            for index in [i for i in self._blocks if i < floor]:
                self._drop(index)
            self._floor = floor
        front = (self._frontier - 1) // bs + 1  # the first block past the frontier
        self._ahead_end = max(self._ahead_end, front)
        target = min(front + self._window, self.nblocks)
        if self._ahead_end - front > self._window // 2 or self._ahead_end >= target:
            return True  # more than half a window still ahead: no new request yet
        if self.store.nursery is None:
            return True  # the store was not entered: no read-ahead
        flights = self.store.flights
        wanted = [
            i
            for i in range(self._ahead_end, target)
            if i not in self._blocks and (self.key, i) not in flights
        ]
        # Fit the budget; what does not fit is fetched on demand or by a later read-ahead. A
        # budget that is short (the disk is behind with writes) waits for room for a request
        # of MIN_READ_AHEAD_BLOCKS rather than sending 1-block ones, which cost as much CPU
        # per request and multiply the writes (measured: 260 of 500 requests were 1 block).
        fit = max(0, self.store.room()) // bs
        if fit < len(wanted):
            wanted = wanted[: fit - fit % MIN_READ_AHEAD_BLOCKS]
        if not wanted:
            return True
        self._ahead_end = wanted[-1] + 1
        longest = max(MIN_READ_AHEAD_BLOCKS, math.ceil(len(wanted) / self.store.max_parallel))
        if small:
            longest = 1
        for run in _runs(wanted, longest):
            # Claimed now, not when a task starts: a reader that reaches these blocks while
            # they wait in the queue follows the read-ahead instead of fetching them again.
            reserved = len(run) * bs
            self.store.reserved_bytes += reserved
            self._queue.append((run, self._claim(run), reserved))
        self._pump()
        return True

    def _fill(self, offset: int, end: int) -> None:
        """Move the frontier for a sequential read of [offset, end) and keep the holes: what
        it skipped becomes one, what it read is one no longer. No checkpoint."""
        holes = self._holes
        if offset > self._frontier:
            holes.append((self._frontier, offset))
        kept: list[tuple[int, int]] = []
        for start, stop in holes:
            if stop <= offset or end <= start:
                kept.append((start, stop))
                continue
            if start < offset:
                kept.append((start, offset))
            if end < stop:
                kept.append((end, stop))
        self._frontier = max(self._frontier, end)
        # A hole the kernel never filled (the reader skipped it) is forgotten once it is a
        # whole window behind, and only the newest few are kept: bounded memory either way.
        oldest = self._frontier - self.store.max_window_blocks * self.block_size
        self._holes = [hole for hole in kept if hole[1] > oldest][-MAX_HOLES:]

    def _pump(self) -> None:
        """Start queued read-ahead, nearest blocks first, up to max_parallel at a time (a FIFO:
        trio starts tasks in no particular order, so a semaphore would let far blocks jump
        ahead of the ones the reader needs next). No checkpoint."""
        nursery = self.store.nursery
        while self._queue and len(self._scopes) < self.store.max_parallel:
            run, flights, reserved = self._queue.popleft()
            if nursery is None:
                self._unqueue(run, flights, reserved)
                continue
            scope = trio.CancelScope()
            self._scopes.add(scope)
            nursery.start_soon(self._read_ahead, run, flights, scope, reserved)

    def _unqueue(self, run: range, flights: list[Flight], reserved: int) -> None:
        self.store.reserved_bytes -= reserved
        self._settle(run, flights, None)

    def _cancel_read_ahead(self) -> None:
        """Cancel running read-ahead and drop queued read-ahead; no checkpoint."""
        for scope in self._scopes:
            scope.cancel()
        while self._queue:
            self._unqueue(*self._queue.popleft())

    async def _read_ahead(
        self, run: range, flights: list[Flight], scope: trio.CancelScope, reserved: int
    ) -> None:
        error: GcfsError | None = None
        try:
            with scope:
                inject.maybe_fail("read-ahead")
                found = await self._from_disk(run)
                for index, block in found.items():
                    self._hold(index, block)
                    flights[index - run.start].data = block
                    flights[index - run.start].done.set()
                for sub in _runs([i for i in run if i not in found], len(run)):
                    part = flights[sub.start - run.start : sub.stop - run.start]
                    await self._fetch(sub, part, self._hold)
        except GcfsError as exc:
            # Readers waiting for these blocks got the error through the flights.
            log.debug("read-ahead of %s blocks %s failed: %s", self.url, run, exc)
        except Exception as exc:
            # A bug: it must not leave the store's nursery (that would end the mount); the
            # readers waiting for these blocks get EIO.
            error = report_bug("read-ahead", exc)
        finally:
            self._scopes.discard(scope)
            self.store.reserved_bytes -= reserved
            # None: cancelled, followers fetch for themselves.
            self._settle(run, flights, error)
            if not self._closed:
                self._pump()

    def _hold(self, index: int, block: Block) -> None:
        if self._closed or index < self._floor or index in self._blocks:
            return
        self._blocks[index] = block
        self.store.held_bytes += block.length

    def _drop(self, index: int) -> None:
        block = self._blocks.pop(index, None)
        if block is not None:
            self.store.held_bytes -= block.length

    # -- obtaining blocks -----------------------------------------------------------------------

    async def _obtain(self, indices: range) -> dict[int, Block]:
        """The blocks a read needs, from memory, a flight, the block store or the network."""
        store = self.store
        out: dict[int, Block] = {}
        looked_on_disk = False
        pending = store.pending
        while True:
            for i in indices:
                if i not in out:
                    block = self._blocks.get(i)
                    if block is None and (block := pending.get((self.key, i))) is not None:
                        store.cache_hits += 1  # the store's, still on its way to disk
                    if block is not None:
                        out[i] = block
            missing = [i for i in indices if i not in out]
            if not missing:
                for index, block in out.items():
                    self._hold(index, block)  # the current block(s) stay for the next read
                return out
            waiting = {i: f for i in missing if (f := store.flights.get((self.key, i)))}
            free = [i for i in missing if i not in waiting]
            if free and not looked_on_disk:
                looked_on_disk = True
                for run in _runs(free, len(free)):
                    found = await self._from_disk(run)
                    out.update(found)
                    for index, block in found.items():
                        self._hold(index, block)
                continue  # the world moved during the checkpoints: look again
            runs = _runs(free, len(free))
            # The common cases, one fetch or one read-ahead to wait for, need no nursery.
            if not waiting and len(runs) == 1:
                await self._fetch(runs[0], self._claim(runs[0]), out.__setitem__)
                continue
            if not runs and len(waiting) == 1:
                await self._follow(*next(iter(waiting.items())), out)
                continue
            try:
                async with trio.open_nursery() as nursery:
                    for run in runs:
                        nursery.start_soon(self._fetch, run, self._claim(run), out.__setitem__)
                    for index, flight in waiting.items():
                        nursery.start_soon(self._follow, index, flight, out)
            except BaseExceptionGroup as group:
                raise first_error(group) from None

    async def _follow(self, index: int, flight: Flight, out: dict[int, Block]) -> None:
        await flight.done.wait()
        if flight.data is not None:
            self.store.shared += 1
            out[index] = flight.data
        elif flight.error is not None:
            raise flight.error
        # else: the leader was cancelled (its file closed); the next round fetches it

    async def _from_disk(self, run: range) -> dict[int, Block]:
        """The blocks of `run` that the block store has: those still waiting to be written
        (verified and in memory), then those on disk, read into one pooled buffer (in a
        worker thread). A block the store does not list costs that thread hop too: the store
        looks at its index file again, where another daemon sharing the cache directory may
        have recorded it (one open and fstat, ~10 us, against a fetch of 20 ms or more)."""
        cache = self.store.cache
        if cache is None:
            return {}
        pending = self.store.pending
        found = {i: block for i in run if (block := pending.get((self.key, i))) is not None}
        self.store.cache_hits += len(found)
        rest = [i for i in run if i not in found]
        if not rest:
            return found
        bs = self.block_size
        first = rest[0]
        count = rest[-1] - first + 1
        buffer = self.store.buffer(count * bs, min(count * bs, self.size - first * bs))
        try:
            got = await self.store.in_thread(
                cache.read_into,
                self.key,
                first,
                count,
                memoryview(buffer),
                self.size,  # records that disagree with the server's size are misses
                buffers=(buffer,),
            )
            self.store.cache_hits += len(got)
            for i, n in got.items():
                found.setdefault(i, Block(buffer, (i - first) * bs, n))
        finally:
            unpin(buffer)  # acquire's pin; the Blocks hold their own
        return found

    def _claim(self, run: range) -> list[Flight]:
        """Register this task as the fetcher of `run`; no checkpoint."""
        flights = [Flight() for _ in run]
        for index, flight in zip(run, flights, strict=True):
            self.store.flights[(self.key, index)] = flight
        return flights

    def _settle(self, run: range, flights: list[Flight], error: GcfsError | None) -> None:
        """Finish the flights of `run`: unfinished ones fail with `error` (None: the leader
        was cancelled, followers retry); all leave the table. No checkpoint."""
        table = self.store.flights
        for index, flight in zip(run, flights, strict=True):
            if not flight.done.is_set():
                flight.error = error
                flight.done.set()
            if table.get((self.key, index)) is flight:
                del table[(self.key, index)]

    async def _fetch(
        self, run: range, flights: list[Flight], sink: Callable[[int, Block], None]
    ) -> None:
        """Fetch the claimed `run`, hand each block to `sink` and the followers, then store
        the blocks of every response that arrived whole. Always completes the flights.

        After a failure, only the blocks not yet delivered are asked for again.
        """
        bodies: list[_Body] = []

        async def attempt() -> None:
            pending = next((n for n, f in enumerate(flights) if not f.done.is_set()), None)
            if pending is None:
                return
            part = range(run.start + pending, run.stop)
            await self._stream(part, flights[pending:], bodies, sink)

        try:
            await self._retry_storage(attempt, f"{self.url} blocks {run.start}-{run.stop - 1}")
        except GcfsError as exc:
            self._settle(run, flights, exc)
            raise
        finally:
            self._settle(run, flights, None)
            try:
                for body in bodies:
                    if body.verified:
                        # Not awaited (unless the store runs no nursery): a reader that got
                        # the last block may close the file at once, which must not lose the
                        # write.
                        await self.store.write_behind(
                            self.key, body.first, body.buffer, body.length, self.size
                        )
            finally:
                for body in bodies:
                    unpin(body.buffer)  # acquire's pin (`_stream`); the Blocks hold their own

    async def _stream(
        self,
        run: range,
        flights: list[Flight],
        bodies: list[_Body],
        sink: Callable[[int, Block], None],
    ) -> None:
        """One ranged GET for the blocks of `run`, received into one buffer; each block is
        released as soon as all of its bytes arrived (the headers were checked first)."""
        bs = self.block_size
        first = run.start * bs
        last = min(run.stop * bs, self.size) - 1
        expected = last - first + 1
        body = _Body(self.store.buffer(len(run) * bs, expected), run.start)
        bodies.append(body)
        buffer = body.buffer
        # Block n of the run is complete when `marks[n]` bytes have arrived.
        marks = [min((n + 1) * bs, expected) for n in range(len(run))]

        def on_mark(n: int) -> None:
            block = Block(buffer, n * bs, marks[n] - n * bs)
            body.length = marks[n]
            sink(run.start + n, block)
            flight = flights[n]
            flight.data = block
            flight.done.set()

        async with self._ranged(first, last) as (response, where):
            try:
                received = await response.readinto(memoryview(buffer)[:expected], marks, on_mark)
            finally:
                self._count(response.received)
            # Before leaving the request (which may checkpoint): a reader that got the last
            # block may close the file and cancel us there, and the write must not be lost.
            body.verified = received == expected
        if received != expected:
            raise BadResponse(f"{where}: {received} of {expected} bytes arrived")

    def _count(self, fetched: int) -> None:
        self.store.bytes_fetched += fetched
        self.bytes_fetched += fetched

    # -- random reads -----------------------------------------------------------------------------

    async def _read_small(self, offset: int, end: int, indices: range) -> memoryview | None:
        """A random read: from blocks we hold (memory or disk), else one aligned ranged GET.
        None when the blocks are held or being fetched already: the block path serves it."""
        flights = self.store.flights
        if all(i in self._blocks or (self.key, i) in flights for i in indices):
            return None
        found = await self._from_disk(indices)
        if len(found) == len(indices):
            for index, block in found.items():
                self._hold(index, block)
            return None
        align = RANDOM_READ_ALIGN
        first = offset - offset % align
        last = min(-(-end // align) * align, self.size) - 1
        buffer = bytearray(last - first + 1)
        attempt = functools.partial(self._stream_range, first, last, buffer)
        await self._retry_storage(attempt, f"{self.url} bytes {first}-{last}")
        return memoryview(buffer)[offset - first : end - first]

    async def _stream_range(self, first: int, last: int, buffer: bytearray) -> None:
        """Bytes [first, last] in one verified ranged GET; nothing of it is cached or shared."""
        async with self._ranged(first, last) as (response, where):
            try:
                received = await response.readinto(memoryview(buffer))
            finally:
                self._count(response.received)
        if received != len(buffer):
            raise BadResponse(f"{where}: {received} of {len(buffer)} bytes arrived")

    # -- storage requests -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _ranged(self, first: int, last: int) -> AsyncIterator[tuple[StorageResponse, str]]:
        """One ranged GET of bytes [first, last] of the signed URL, its head checked (206, the
        exact Content-Range and length): the open response and a description for errors."""
        signed = self._signed
        if signed is None:
            raise Unavailable(f"{self.url}: not resolved")
        headers = self.store.resolver.storage_headers(signed, {"Range": f"bytes={first}-{last}"})
        target = signed
        for hop in range(2):  # a redirect is followed once (the same headers); never a loop
            where = f"GET {redact(target)} bytes={first}-{last}"
            self.store.requests += 1
            self.requests += 1
            async with self.store.storage.request(target, headers, where=where) as response:
                location = response.headers.get("location")
                if response.status in REDIRECTS and location and hop == 0:
                    target = urljoin(target, location)
                    log.debug("%s -> %d, following once", where, response.status)
                    continue  # leaving the request drains the small body or closes it
                if response.status != 206:
                    raise_for_status(response.status, where, response.headers)
                check_partial(response.status, response.headers, first, last, self.size)
                yield response, where
            log.debug("%s -> %d", where, response.status)
            return

    async def _retry_storage(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run one storage request until it succeeds: again after an expired signature (once,
        with the /media/ URL resolved again) and after a transient failure or a garbled
        answer (a wrong Content-Range, a short body: nothing of it reached a reader or the
        cache, and the GET is idempotent), with backoff, all within the retry budget. During
        a storage outage it fails at once, or probes briefly (retry.OutageLog)."""
        store = self.store
        if store.offline:
            raise NotInSnapshot(f"{what}: not in the snapshot (an offline mount fetches nothing)")
        outage = store.storage_outage
        budget = store.retry.budget
        if outage.down_since is not None:
            if outage.hold_off():
                raise Unavailable(f"{what}: storage is failing; not asking again yet")
            budget = min(budget, OUTAGE_PROBE_BUDGET)
        rng = _RANDOM
        expired = False
        with trio.move_on_after(budget):
            for number in range(1_000):
                generation = self._generation
                try:
                    if self._signed is None:  # opened from the cache, or while the site was down
                        await self._reresolve(generation)
                        generation = self._generation
                    result = await attempt()
                    outage.succeeded()
                    return result
                except Expired as exc:
                    if expired:
                        refused = f"storage refused {self.url} after a fresh resolution"
                        if exc.status == 403:
                            raise PermissionDenied(refused) from None
                        raise Unavailable(
                            f"{refused} (HTTP {exc.status})", transient=False, status=exc.status
                        ) from None
                    expired = True
                    store.resolver.expired += 1
                    await self._reresolve(generation)
                except (Unavailable, BadResponse) as exc:
                    if isinstance(exc, Unavailable) and not exc.transient:
                        raise
                    outage.failed(exc)
                    retry_after = exc.retry_after if isinstance(exc, Unavailable) else None
                    delay = store.retry.delay(number, retry_after, rng)
                    log.debug("%s: %s; retrying in %.2f s", what, exc, delay)
                    await trio.sleep(delay)
        error = Unavailable(f"{what}: no whole answer within {budget:g} s")
        outage.gave_up(error)
        raise error

    async def _reresolve(self, generation: int) -> None:
        """Resolve the /media/ URL again, once for all the requests that saw the same 403."""
        async with self._resolve_lock:
            if self._generation == generation:
                self._signed = await self.store.resolver.resolve(self.url)
                self._generation += 1


__all__ = ["RANDOM_READ_MAX", "Flight", "RemoteFile"]
