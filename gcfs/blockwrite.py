"""The block store's writes (blockstore.py): blocks and sizes of remote files.

Writing blocks: (1) re-read the index's new tail (blocks another daemon stored meanwhile are not
written again); (2) `pwrite` the data at its offsets, whole pages with O_DIRECT (blockfiles.py);
(3) on a network filesystem, `fdatasync` the data if any of it went through the page cache;
(4) append all records with one `write` on an O_APPEND descriptor; (5) on a network filesystem,
`fdatasync` the index. Data reaches the disk (or the server) before the record that makes it
visible; a crash in between leaves data without a record: unused, never served. Room is made
first, by evicting other files (blockaccount.py).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Sequence

from .blockfiles import _PAGE, _Entry, _Files, key_digest, log
from .blockindex import KIND_BLOCK, KIND_SIZE, RECORD_SIZE, record
from .blockread import StoreReads


class StoreWrites(StoreReads):
    """Writes (this module's docstring)."""

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
