"""Where file bytes live in memory: pooled buffers and the blocks that are slices of them.

A ranged GET of n blocks is received into one buffer of n blocks (storage_http reads the socket
straight into it); a stretch of blocks read from the block store likewise. A `Block` is a
slice of such a buffer: no block is ever copied out of it. Readers get `memoryview`s of blocks
(pyfuse3 copies them into the kernel's reply), the window and the flights hold `Block`s, and
the block store writes them from the same memory.

`BufferPool` hands buffers out again instead of allocating fresh ones: a new 4 MiB buffer faults
in 1,024 pages, about 0.1 CPU-s per GiB received. Pooled buffers are anonymous memory maps, so
they are page-aligned, which the block store's O_DIRECT writes require. A buffer is reused
only when nothing refers to it any more: no block held by a window or a flight, no disk write in
a worker thread, no reply being sent. Every such use holds a reference to the buffer (a Block,
or a memoryview, which keeps its exporter alive), so `sys.getrefcount` tells exactly when it is
free: CPython's count, which cannot miss a reference (it can only over-count one that is about
to go, which delays reuse; never the other way round).

Invariant: a buffer handed out by `acquire` is referred to by nothing else; its old contents are
garbage that no Block exposes (a Block covers only bytes written into it for that Block).
"""

from __future__ import annotations

import mmap
import sys

# References to a free buffer as `acquire` sees it: the pool's list, the loop variable, and
# getrefcount's own argument.
_FREE_REFS = 3


Buffer = bytearray | mmap.mmap


class Block:
    """`length` bytes of a file's block, at `start` in `buffer`."""

    __slots__ = ("buffer", "length", "start")

    def __init__(self, buffer: Buffer, start: int, length: int) -> None:
        self.buffer = buffer
        self.start = start
        self.length = length

    def view(self) -> memoryview:
        return memoryview(self.buffer)[self.start : self.start + self.length]


def span(
    blocks: list[Block], start: int, length: int, pool: BufferPool | None = None
) -> memoryview | bytes:
    """Bytes [start, start + length) of consecutive blocks, counted from the first block's
    start. A view when they are consecutive slices of one buffer (a read within one ranged
    GET: no copy); else copied once into a buffer from `pool` (a read across two GETs'
    buffers: at read_ahead_kb 1024 the kernel's 1 MiB reads straddle blocks, so one read in
    four with read-ahead's 4-block ranges; a fresh 1 MiB bytearray each time cost a memset
    and 256 page faults)."""
    first = blocks[0]
    position = first.start
    for block in blocks:
        if block.buffer is not first.buffer or block.start != position:
            break
        position += block.length
    else:
        return memoryview(first.buffer)[first.start + start : first.start + start + length]
    out = pool.acquire(length) if pool is not None else bytearray(length)
    filled = 0
    for block in blocks:
        view = block.view()
        if start >= len(view):
            start -= len(view)
            continue
        piece = view[start : start + length - filled]
        out[filled : filled + len(piece)] = piece
        filled += len(piece)
        start = 0
        if filled == length:
            break
    return memoryview(out)[:length]


class BufferPool:
    """Buffers of whole blocks, reused once nothing refers to them (module docstring).

    The pool keeps up to `max_bytes` of buffers (in use or free); beyond that a buffer is
    allocated without being kept, and the garbage collector frees it after use. Sizes below
    `min_size` (a small file's only block) are never pooled. Not thread-safe: the trio thread
    acquires; worker threads only use what they were given.
    """

    def __init__(self, max_bytes: int, min_size: int) -> None:
        self.max_bytes = max_bytes
        self.min_size = min_size
        self._buffers: list[mmap.mmap] = []
        self._bytes = 0
        self.reused = 0  # statistics
        self.allocated = 0

    def acquire(self, size: int) -> Buffer:
        if size < self.min_size:
            return bytearray(size)
        for buffer in self._buffers:
            if len(buffer) == size and sys.getrefcount(buffer) == _FREE_REFS:
                self.reused += 1
                return buffer
        self.allocated += 1
        buffer = mmap.mmap(-1, size)
        if self._bytes + size > self.max_bytes:
            self._drop_free(self._bytes + size - self.max_bytes)
        if self._bytes + size <= self.max_bytes:
            self._buffers.append(buffer)
            self._bytes += size
        return buffer

    @property
    def pooled_bytes(self) -> int:
        return self._bytes

    def _drop_free(self, needed: int) -> None:
        """Forget free buffers (of other sizes) until `needed` bytes are freed."""
        kept: list[mmap.mmap] = []
        for buffer in self._buffers:
            if needed > 0 and sys.getrefcount(buffer) == _FREE_REFS:
                needed -= len(buffer)
                self._bytes -= len(buffer)
            else:
                kept.append(buffer)
        self._buffers = kept


__all__ = ["Block", "Buffer", "BufferPool", "span"]
