"""The block store's accounting (blockstore.py): what is on disk, eviction, and rescans.

Eviction: whole remote files, least recently used first, until `max_bytes` holds what is on
disk, counted as the filesystem does (st_blocks of the data file plus the index's length), so
sparse files count what they really use. A single file larger than the whole cache keeps the
blocks that fit and stores no more. Use is recorded for other daemons and later mounts in the
index's mtime (touched on first use and at most every USE_TOUCH_INTERVAL seconds: blockread.py).
The accounting is this process's view, brought back to what is on disk by a rescan of the
directory before evicting (at most every RESCAN_INTERVAL seconds) and while writing (every
RESCAN_MAX_AGE seconds), so other daemons' writes count.

An eviction the filesystem refuses (EPERM: another member's file in a sticky group directory)
is skipped: the file stays counted, is remembered (at most MAX_REFUSED of them) and not tried
again, and other files are evicted instead.

Bounded: at most `max_entries` files are tracked in memory (MAX_ENTRIES); the others are
counted (`untracked`, with their bytes, so that the limit still holds) and found on disk when
used. Eviction sees the least recently used ones, so it evicts in the right order; a rescan
after it tracks more.

A scan looks only at gcfs's own names (`store/<hh>/<digest>.data|.index` with the digest in
its own `<hh>`, and temporary names), never follows a link, and at start removes only those
of them a crash left behind (STALE_AGE).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Iterator

from . import safeio
from .blockfiles import (
    _GONE,
    STORE_DIR,
    StoreFiles,
    _data_name,
    _Entry,
    _index_name,
    log,
)

# The only names gcfs makes below store/ (and so the only ones it ever unlinks there).
_FOLDER = re.compile(r"[0-9a-f]{2}")
_FILE = re.compile(r"([0-9a-f]{64})\.(data|index)")
_TEMP = re.compile(r"\.tmp-(?:.*-)?([0-9a-f]{64})\.(?:data|index)")
# Before evicting, the accounting is brought back to what is on disk (other daemons write
# too), at most this often: a rescan stats every file (~20 ms per 1,000 files locally).
RESCAN_INTERVAL = 5.0
# ... and while writing, at least this often, so that several daemons that each see only their
# own writes overshoot the limit by at most what they write in this time.
RESCAN_MAX_AGE = 30.0
# A data file without an index, or a temporary file, this old is left over by a crash; younger
# ones may belong to another daemon that is creating them right now.
STALE_AGE = 3600.0
# Files tracked in memory (`_entries`): one `_Entry` per remote file in the directory costs
# ~750 bytes before its index is read (measured with tracemalloc: 100,000 entries in their
# OrderedDict, digest strings included), so 131,072 files cost at most ~94 MiB. That is six times
# the files the default 10 GiB cache holds at DICOM sizes (~512 KiB per instance), and what a
# hostile member who creates millions of empty index files can make a daemon hold. Beyond it a
# rescan tracks the least recently used files (eviction's order) and counts the rest as
# `untracked` (their bytes still count); a file this process uses is looked up on disk, tracked,
# and pushes the most recently used idle one out of the table (not off the disk).
MAX_ENTRIES = 1 << 17
# Digests whose eviction the filesystem refused (a member's file in a sticky group directory):
# remembered so that they are not tried again on every eviction; bounded, oldest forgotten.
MAX_REFUSED = 65536


class StoreAccounting(StoreFiles):
    """Accounting, eviction and rescans (this module's docstring)."""

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
            dropped = 0
            with self._lock:
                if digest not in self._entries:
                    self._entries[digest] = _Entry(digest, on_disk, time.time())
                    self._entries.move_to_end(digest, last=False)
                    self._total += on_disk
                    dropped = self._bound_locked(keep=None)
            if dropped:
                self._tell_untracked()

    # -- rescans --------------------------------------------------------------------------------

    def _rescan(self, *, start: bool = False) -> None:
        """Bring the accounting and the LRU order back to what is on disk: files other daemons
        wrote count, files they evicted are forgotten, and their use (the index's mtime)
        orders the LRU. At start, also remove what a crash left (old enough: STALE_AGE)."""
        used: dict[str, float] = {}  # digest -> mtime of its index
        sizes: dict[str, int] = {}  # digest -> bytes on disk of both files
        untracked = [0, 0]  # files and bytes left out of the maps so far (_thin)
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
            if len(used) > 2 * self.max_entries:
                self._thin(used, sizes, untracked)
        self._recount(used, sizes, untracked, start=start)

    def _recount(
        self, used: dict[str, float], sizes: dict[str, int], untracked: list[int], *, start: bool
    ) -> None:
        """The rescan's findings into the accounting and the LRU order: at most `max_entries`
        files tracked, the least recently used first; `untracked`: files and bytes the scan
        left out already."""
        with self._lock:
            self._forget_gone_locked(used)
            for digest, entry in self._entries.items():
                if digest in used:
                    entry.bytes = sizes[digest]
                    entry.used = max(entry.used, used[digest])
            new = [digest for digest in used if digest not in self._entries]
            pinned = [e for e in self._entries.values() if e.files is not None]
            others = [(e.used, e.digest) for e in self._entries.values() if e.files is None]
            others += [(used[digest], digest) for digest in new]
            others.sort()
            room = max(0, self.max_entries - len(pinned))
            tracked = pinned + [
                self._entries.get(digest) or _Entry(digest, sizes[digest], mtime)
                for mtime, digest in others[:room]
            ]
            left = others[room:]
            self._untracked = untracked[0] + len(left)
            self._untracked_bytes = untracked[1] + sum(sizes.get(digest, 0) for _, digest in left)
            tracked.sort(key=lambda e: e.used)
            self._entries = OrderedDict((e.digest, e) for e in tracked)
            self._total = sum(e.bytes for e in tracked) + self._untracked_bytes
            self._rescanned = time.monotonic()
            if not start:
                self._rescans += 1
        if left:
            self._tell_untracked()

    def _forget_gone_locked(self, used: dict[str, float]) -> None:
        """Forget the files the rescan did not find (evicted by another daemon), unless a
        thread is using them. Lock held."""
        for digest, entry in list(self._entries.items()):
            in_use = entry.files is not None and entry.files.users > 0
            if digest not in used and not in_use:
                del self._entries[digest]
                files = entry.files
                entry.files = None
                if files is not None:
                    self._retire_locked(files)
                    self._open.pop(digest, None)

    def _thin(self, used: dict[str, float], sizes: dict[str, int], untracked: list[int]) -> None:
        """Keep a scan's maps at most `max_entries` long (and the files held open): the least
        recently used ones, those eviction wants; count the others in `untracked`. So that a
        scan of millions of files holds at most twice the bound between two folders."""
        with self._lock:
            held = set(self._open)
        ordered = sorted(used, key=lambda digest: used[digest])
        for digest in ordered[self.max_entries :]:
            if digest not in held:
                untracked[0] += 1
                untracked[1] += sizes.pop(digest)
                del used[digest]

    def _bound_locked(self, *, keep: _Entry | None) -> int:
        """Keep `_entries` at most `max_entries` long after an entry was added: the most
        recently used files go out of the table first (eviction wants the oldest ones), those
        without open descriptors before those with (closed once idle), never `keep` nor a
        file a thread is using. Their bytes stay counted, as untracked. How many went. Lock
        held."""
        dropped = 0
        for idle_only in (True, False):
            for digest in list(reversed(self._entries)):
                if len(self._entries) <= self.max_entries:
                    return dropped
                entry = self._entries[digest]
                files = entry.files
                if entry is keep or (files is not None and (idle_only or files.users > 0)):
                    continue
                del self._entries[digest]
                if files is not None:
                    entry.files = None
                    self._retire_locked(files)
                    self._open.pop(digest, None)
                self._untracked += 1
                self._untracked_bytes += entry.bytes
                dropped += 1
        return dropped

    def _tell_untracked(self) -> None:
        self._tell_once(
            logging.WARNING,
            "entries",
            "block store %s: more than %d files in it; the most recently used ones beyond "
            "that are counted but not tracked (found on disk when used)",
            self.directory,
            self.max_entries,
        )

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
