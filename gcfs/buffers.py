"""Where file bytes live in memory: pooled buffers and the blocks that are slices of them.

A ranged GET of n blocks is received into one buffer of n blocks (storage_http reads the socket
straight into it); a stretch of blocks read from the block store likewise. A `Block` is a
slice of such a buffer: no block is ever copied out of it. Readers get `memoryview`s of blocks
(pyfuse3 copies them into the kernel's reply), the window and the flights hold `Block`s, and
the block store writes them from the same memory.

`BufferPool` hands buffers out again instead of allocating fresh ones: a new 4 MiB buffer faults
in 1,024 pages, about 0.1 CPU-s per GiB received. Pooled buffers are anonymous memory maps, so
they are page-aligned, which the block store's O_DIRECT writes require. A buffer is reused
only when nothing uses it any more, which every user says explicitly with a pin (`pin`/
`unpin`, a count on the buffer):
- `acquire` hands a buffer out pinned once, for the caller, who unpins it when it has made
  its Blocks (or failed);
- a `Block` pins its buffer for its lifetime (taken in `__init__`, given back in `__del__`,
  when the last reference to the Block goes: windows, flights, the write-behind table);
- a worker thread given a view of the buffer (a disk read into it, a write from it) holds a
  pin until the thread really ends, even when trio abandoned it (content.ContentStore.in_thread);
- the view a read returns to pyfuse3 holds a pin until the reply was sent (`lend`).
(It used to be `sys.getrefcount`; CPython 3.14 borrows references to locals, LOAD_FAST_BORROW,
so a buffer still in use could read as free and be handed out again: wrong bytes.) A pin
forgotten only delays reuse (a fresh buffer is allocated); a missing pin is a bug.

Invariant: a buffer handed out by `acquire` has no other pin; its old contents are garbage that
no Block exposes (a Block covers only bytes written into it for that Block).
"""

from __future__ import annotations

import mmap

import trio


class PooledBuffer(mmap.mmap):
    """A pooled buffer: an anonymous memory map with a count of its users' pins."""

    __slots__ = ("pins",)

    pins: int


Buffer = bytearray | mmap.mmap


def pin(buffer: Buffer) -> None:
    """One more user of `buffer` (a no-op for buffers that are never reused)."""
    if isinstance(buffer, PooledBuffer):
        buffer.pins += 1


def unpin(buffer: Buffer) -> None:
    if isinstance(buffer, PooledBuffer):
        buffer.pins -= 1
        assert buffer.pins >= 0, "a buffer unpinned more often than pinned"


def lend(data: memoryview | bytes) -> None:
    """Keep the buffer behind `data` out of reuse until the current task yields to trio.
    pyfuse3 sends a read's reply (fuse_reply_buf copies it into the kernel) right after the
    handler returns, before its task yields (handlers.pxi): the unpin runs after that. Only
    for the trio thread."""
    if isinstance(data, memoryview) and isinstance(data.obj, PooledBuffer):
        buffer = data.obj
        buffer.pins += 1
        trio.lowlevel.current_trio_token().run_sync_soon(unpin, buffer)


class Block:
    """`length` bytes of a file's block, at `start` in `buffer`."""

    __slots__ = ("buffer", "length", "start")

    def __init__(self, buffer: Buffer, start: int, length: int) -> None:
        self.buffer = buffer
        self.start = start
        self.length = length
        pin(buffer)  # for the Block's lifetime: it exposes these bytes to whoever holds it

    def __del__(self) -> None:
        unpin(self.buffer)

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
    unpin(out)  # no checkpoint until the caller lends the view (RemoteFile.read)
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
    """Buffers of whole blocks, reused once nothing pins them (module docstring).

    The pool keeps up to `max_bytes` of buffers (in use or free); beyond that a buffer is
    allocated without being kept, and the garbage collector frees it after use. Sizes below
    `min_size` (a small file's only block) are never pooled. Not thread-safe: the trio thread
    acquires; worker threads only use what they were given.
    """

    def __init__(self, max_bytes: int, min_size: int) -> None:
        self.max_bytes = max_bytes
        self.min_size = min_size
        self._buffers: list[PooledBuffer] = []
        self._bytes = 0
        self.reused = 0  # statistics
        self.allocated = 0

    def acquire(self, size: int) -> Buffer:
        """A buffer of `size` bytes, pinned once for the caller (who unpins it)."""
        if size < self.min_size:
            return bytearray(size)
        for buffer in self._buffers:
            if len(buffer) == size and buffer.pins == 0:
                self.reused += 1
                buffer.pins = 1
                return buffer
        self.allocated += 1
        buffer = PooledBuffer(-1, size)
        buffer.pins = 1
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
        kept: list[PooledBuffer] = []
        for buffer in self._buffers:
            if needed > 0 and buffer.pins == 0:
                needed -= len(buffer)
                self._bytes -= len(buffer)
            else:
                kept.append(buffer)
        self._buffers = kept


__all__ = ["Block", "Buffer", "BufferPool", "PooledBuffer", "lend", "pin", "span", "unpin"]
