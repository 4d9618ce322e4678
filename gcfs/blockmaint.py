"""The maintenance of a whole block store directory (blockstore.py), behind `gcfs cache
status|prune|verify|clear` (cachecmd.py) and `gcfs snapshot` (its sync): usage, eviction to a
size, verification of every block, clearing, durability, and the removal of the old format.

Clear and prune only unlink whole files of gcfs's names: a daemon reading one keeps its
descriptors until it notices (blockfiles.py, "Unlinked files") and lets go, so the space
returns within seconds. Directories and the marker stay: another daemon may be creating a
file in one right now.
"""

from __future__ import annotations

import mmap
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from . import marker, safeio
from .blockaccount import _TEMP
from .blockfiles import log
from .blockread import StoreReads

_OLD_FORMAT = ("blocks", "sizes")  # the one-file-per-block cache before this one


@dataclass(frozen=True, slots=True)
class VerifyReport:
    files: int  # remote files looked at
    blocks: int  # blocks read and checked
    damaged: int  # blocks that failed their check (dropped)
    damaged_records: int  # index records that failed their own check (skipped)


class StoreMaintenance(StoreReads):
    """The whole directory's maintenance (this module's docstring)."""

    def usage(self) -> tuple[int, int]:
        """(remote files, bytes) on disk now, whoever wrote them (tracked or not)."""
        self._rescan()
        with self._lock:
            return len(self._entries) + self._untracked, self._total

    def evict_to(self, limit: int) -> int:
        """Evict whole files, least recently used first (by every daemon's use), until at
        most `limit` bytes are on disk; the number of files evicted. Files we may not unlink
        (another member's, in a sticky group directory) stay, and count."""
        if self.readonly:
            raise ValueError("a read-only block store evicts nothing")
        evicted = 0
        while True:
            self._rescan()
            with self._lock:
                victims = self._evict_until(limit, keep=None)
                more = self._untracked > 0 and self._total > limit
            refused = self._unlink(victims)
            evicted += len(victims) - len(refused)
            # More files than the table tracks: the next rescan tracks the ones left.
            if not more or len(victims) == len(refused):
                return evicted

    def verify(self) -> VerifyReport:
        """Read every stored block and check its length and crc32; damaged blocks are dropped
        (a "dropped" record, as a reader would). A fresh store checks everything: every file
        with an index on disk, whether the table tracks it or not (blockaccount.py). Not a
        use: the LRU order stays as it was."""
        self._rescan()
        with self._lock:
            damaged_before = self._damaged
            blocks_before = self._damaged_blocks
        files = blocks = 0
        span = 64  # blocks read per call: 64 MiB of buffer at the default block size
        buffer = mmap.mmap(-1, span * self.block_size)  # page-aligned, for O_DIRECT
        try:
            for digest in self._stored():
                files += 1
                blocks += self._verify_file(digest, buffer, span)
        finally:
            buffer.close()
        with self._lock:
            damaged = self._damaged_blocks - blocks_before
            records = self._damaged - damaged_before - damaged
        return VerifyReport(files, blocks, damaged, records)

    def _stored(self) -> Iterator[str]:
        """The digest of every file with an index on disk, folder by folder (never a list of
        them all: the directory may hold more files than the table tracks)."""
        for _, names in self._folders():
            for name, _ in names:
                digest, _, suffix = name.partition(".")
                if suffix == "index" and not _TEMP.fullmatch(name):
                    yield digest

    def _verify_file(self, digest: str, buffer: mmap.mmap, span: int) -> int:
        """Read and check one file's blocks, `span` at a time; how many were read."""
        entry = self._lookup(digest)
        if entry is None:
            return 0
        with self._lock:
            indices = sorted(entry.blocks)  # the records: never a count from one
        blocks = 0
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
        return blocks

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
            self._total -= self._untracked_bytes
            self._untracked = self._untracked_bytes = 0
        self._remove_old_format()
        return removed

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
