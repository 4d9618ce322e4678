"""`gcfs snapshot --verify DIR`: is every byte of a snapshot there and intact?

Run at the start of a compute job (or after copying a snapshot), it answers before the job
reads anything: a file whose bytes are missing or damaged would otherwise be an EIO in the
middle of training. No mount, no network, no token: it reads DIR's files only.

What is checked, for every file in tree.json (hidden entries too: pk links' targets, `api/`),
once per store key (a file shown at several paths is stored once):
- the store holds an index and a data file for its key (store/<hh>/<digest>.index, .data);
- the index states the size the tree records and no other one (an offline mount opens a file
  by the size its index states, and refuses one that states two: blockread.get_size);
- every block of the file, 0 .. ceil(size / block size) - 1, has an intact index record (the
  record's own crc32, the length its size implies; the last record of a block wins and a
  "dropped" one removes it, as for a reader: blockread.py);
- every block's bytes are in the data file, of that length, with that crc32.
What is missing or damaged is reported by the file's path in the tree (every path that shows
it), one line per file and problem, e.g. `archives/x/items/<pk>/ct/a.mha: block 3 damaged`.
Exit status 1 when anything is, else 0 with a one-line summary.

Read-only: nothing is written, created, locked or appended (a reader of a cache appends a
"dropped" record for a damaged block; this does not), and files are opened with O_NOATIME
where the kernel allows it (files we own; others' files are opened without it), so a verify
does not even change access times. Directories are never listed (a file's names come from its
key), so their access times stay too.

Hostile directories (a shared snapshot, safeio.py): below DIR, every name is opened relative
to its parent's descriptor with O_NOFOLLOW; the index and data files must be regular files with
a single link, as the offline mount's store requires (a planted link, FIFO or hard link is
reported by the path of the file it stands for, never followed or waited on); an index is read
1 MiB at a time up to the bound a reader believes (blockread._index_limit: 4 records per block,
at least 64 KiB); loops run over records and runs of recorded blocks, never over a count that
tree.json or a record gives. Paths printed from tree.json have control characters escaped.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import marker, safeio
from .blockfiles import STORE_DIR, _pread_all, key_digest
from .blockindex import KIND_BLOCK, KIND_DROPPED, RECORD_SIZE, parse_records
from .blockstore import DEFAULT_BLOCK_SIZE, INDEX_LIMIT
from .errors import UserError
from .progress import ProgressLine, fetch_parallel
from .snapshot import (
    FORMAT,
    IDENTIFIERS,
    TREE,
    TREE_DEPTH_LIMIT,
    TREE_LIMIT,
    decode_json,
    open_snapshot_directory,
    too_deep,
    walk_files,
)
from .units import format_size

SHOWN = "the snapshot directory given with --verify"  # never its path: an option's value
# Files checked at once: on a local disk two threads keep both cores busy with crc32 (which
# releases the GIL); on NFS or Lustre more requests in flight hide the round trips. As
# `gcfs snapshot --jobs`.
DEFAULT_JOBS = 8
# Blocks read per call: 16 MiB at 1 MiB blocks, a buffer per thread (128 MiB for 8 threads).
SPAN = 16
# The index bound of a reader that knows the size (blockread._index_limit): 4 records per
# block, at least 64 KiB, at most INDEX_LIMIT; read in pieces of 1 MiB.
INDEX_SLACK_RECORDS = 4
INDEX_MIN = 64 << 10
INDEX_CHUNK = 1 << 20
# Ranges of block numbers named in one line; the rest are counted.
RANGES_SHOWN = 5
_NOATIME = getattr(os, "O_NOATIME", 0)


@dataclass
class Checked:
    """What the check of one store key found."""

    problems: list[str] = field(default_factory=list)
    blocks: int = 0  # blocks read and checked
    bytes: int = 0  # bytes read
    damaged_records: int = 0  # index records skipped (torn, clobbered, another file's)


def verify_command(directory: Path, *, jobs: int = DEFAULT_JOBS, out: TextIO | None = None) -> int:
    """`gcfs snapshot --verify DIR` (module docstring): 0 when intact, 1 when not."""
    stream = out or sys.stdout
    started = time.monotonic()
    top = open_snapshot_directory(directory.expanduser().absolute(), SHOWN)
    try:
        root = _load_tree(top)
        keys, problems = _files_by_key(root)
        checker = Checker(_open_store(top), DEFAULT_BLOCK_SIZE)
        try:
            progress = ProgressLine(
                sys.stderr,
                "verify",
                files_total=len(keys),
                bytes_total=sum(size for size, _ in keys.values()),
                suffix=" read",
                eta=True,
            )
            # Without a terminal (a job's log), a line only after 5 s: a quick check prints
            # its summary alone.
            progress.last = progress.start
            results = checker.run(keys, jobs, progress)
            if progress.out.isatty():  # a log gets the summary only
                progress.finish()
        finally:
            checker.close()
    finally:
        os.close(top)
    # Counted as the manifest and `gcfs snapshot` count files: images/<pk> and api/ hold paths
    # to files already counted under archives/, algorithms/ and reader-studies/.
    paths = [path for _, named in keys.values() for path in named] + [p for p, _ in problems]
    files = sum(1 for path in paths if not _is_identifier(path))
    also = _also(len(paths) - files)
    for key, checked in results.items():
        for path in keys[key][1]:
            problems.extend((path, problem) for problem in checked.problems)
    for path, problem in sorted(problems):
        print(f"{_printable(path)}: {problem}", file=stream)
    read = sum(c.bytes for c in results.values())
    blocks = sum(c.blocks for c in results.values())
    records = sum(c.damaged_records for c in results.values())
    elapsed = max(time.monotonic() - started, 1e-6)
    speed = f"{format_size(read / elapsed)}/s"
    skipped = (
        f"; {records} damaged index record{'s' if records != 1 else ''} skipped" if records else ""
    )
    if problems:
        bad = {path for path, _ in problems}
        damaged = sum(1 for path in bad if not _is_identifier(path))
        if len(bad) > damaged:
            also = _also(len(paths) - files, damaged=len(bad) - damaged)
        print(
            f"snapshot damaged: {damaged} of {files} files{also} missing or damaged; "
            f"{blocks} blocks ({format_size(read)}) checked in {elapsed:.1f} s{skipped}",
            file=stream,
        )
        return 1
    print(
        f"snapshot intact: {files} files{also}, {blocks} blocks ({format_size(read)}) read and "
        f"checked in {elapsed:.1f} s ({speed}){skipped}",
        file=stream,
    )
    return 0


def _is_identifier(path: str) -> bool:
    return path.split("/", 1)[0] in IDENTIFIERS


def _also(count: int, *, damaged: int = 0) -> str:
    """What the summary adds about paths under images/ and api/ (none: nothing)."""
    if not count:
        return ""
    of_them = f", {damaged} of them damaged" if damaged else ""
    return f" (and {count} paths to them under images/ and api/{of_them})"


# -- what the tree names ------------------------------------------------------------------


def _open_noatime(name: str, dir_fd: int) -> int:
    """Regular file `name` of the directory `dir_fd` with one link, read-only, without
    following a link or blocking on a FIFO (safeio), and with O_NOATIME when the kernel
    allows it (only the file's owner may ask: EPERM otherwise)."""
    if _NOATIME:
        try:
            return safeio.open_regular(name, os.O_RDONLY | _NOATIME, dir_fd=dir_fd, single=True)
        except PermissionError:
            pass
    return safeio.open_regular(name, os.O_RDONLY, dir_fd=dir_fd, single=True)


def _load_tree(top: int) -> dict[str, Any]:
    """The recorded tree of the snapshot open as `top` (read as snapshot.load_tree reads it,
    with O_NOATIME); UserError naming what DIR is when it holds no snapshot."""
    try:
        fd = safeio.open_regular(TREE, os.O_RDONLY | _NOATIME, dir_fd=top)
    except PermissionError:
        fd = -1
    except FileNotFoundError:
        kind = marker.classify_open(top)
        what = "is empty" if kind is marker.Kind.EMPTY else f"holds no gcfs snapshot ({kind.value})"
        raise UserError(f"{SHOWN} {what}: no {TREE}") from None
    except OSError as exc:
        raise UserError(f"the {TREE} in {SHOWN} cannot be read: {_reason(exc)}") from None
    try:
        if fd < 0:
            fd = safeio.open_regular(TREE, os.O_RDONLY, dir_fd=top)
        if os.fstat(fd).st_size > TREE_LIMIT:
            raise OSError(errno.EFBIG, f"larger than {TREE_LIMIT} bytes")
        with os.fdopen(os.dup(fd), "rb") as stream:
            tree = decode_json(stream.read(TREE_LIMIT + 1))
    except OSError as exc:
        raise UserError(f"the {TREE} in {SHOWN} cannot be read: {_reason(exc)}") from None
    except ValueError:
        raise UserError(f"the {TREE} in {SHOWN} is not JSON") from None
    finally:
        if fd >= 0:
            os.close(fd)
    root = tree.get("root") if isinstance(tree, dict) else None
    if not isinstance(root, dict) or root.get("type") != "dir" or tree.get("format") != FORMAT:
        raise UserError(f"the {TREE} in {SHOWN} holds no {FORMAT} tree")
    if too_deep(root):
        raise UserError(
            f"the {TREE} in {SHOWN} holds no {FORMAT} tree: its directories nest deeper"
            f" than {TREE_DEPTH_LIMIT}"
        )
    return root


def _files_by_key(
    root: dict[str, Any],
) -> tuple[dict[str, tuple[int, list[str]]], list[tuple[str, str]]]:
    """{store key: (size, paths)} of every file in the tree, and the problems of files the
    tree itself records wrongly (no key, no size, two sizes for one key)."""
    keys: dict[str, tuple[int, list[str]]] = {}
    problems: list[tuple[str, str]] = []
    for path, spec in walk_files(root):
        key, size = spec.get("key"), spec.get("size")
        if not isinstance(key, str) or not key:
            problems.append((path, f"the {TREE} records no store key for it"))
        elif not isinstance(size, int) or isinstance(size, bool) or size < 0:
            problems.append((path, f"the {TREE} records no size for it"))
        elif key in keys and keys[key][0] != size:
            problems.append((path, f"the {TREE} records two sizes for its bytes"))
        else:
            keys.setdefault(key, (size, []))[1].append(path)
    return keys, problems


def _open_store(top: int) -> int:
    """DIR's store/, not through a link; -1 when there is none (then every file is missing)."""
    try:
        return safeio.open_directory(STORE_DIR, dir_fd=top)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        raise UserError(f"the {STORE_DIR}/ of {SHOWN} cannot be opened: {_reason(exc)}") from None


# -- checking the store ---------------------------------------------------------------------


class Checker:
    """Checks store keys against the store open as `store` (-1: none), `jobs` at a time."""

    def __init__(self, store: int, block_size: int) -> None:
        self.store = store
        self.block_size = block_size
        self._local = threading.local()

    def close(self) -> None:
        if self.store >= 0:
            os.close(self.store)
            self.store = -1

    def run(
        self, keys: dict[str, tuple[int, list[str]]], jobs: int, progress: ProgressLine
    ) -> dict[str, Checked]:
        results: dict[str, Checked] = {}

        def one(item: tuple[str, int]) -> None:
            key, size = item
            checked = self.check(key, size, progress)
            results[key] = checked  # one key per item: no two threads write one entry
            progress.add(0, done=1)

        items = [(key, size) for key, (size, _) in keys.items()]
        fetch_parallel(one, items, jobs, progress, keep_going=False)
        return results

    def check(self, key: str, size: int, progress: ProgressLine | None = None) -> Checked:
        """Everything about one key (module docstring); never raises for what it finds."""
        checked = Checked()
        digest = key_digest(key)
        if self.store < 0:
            checked.problems.append("missing: the snapshot has no store/")
            return checked
        try:
            folder = safeio.open_directory(digest[:2], dir_fd=self.store)
        except FileNotFoundError:
            checked.problems.append("missing: not in the snapshot's store")
            return checked
        except OSError as exc:
            checked.problems.append(f"store/{digest[:2]}/ {_reason(exc)}")
            return checked
        try:
            self._check_in(folder, digest, size, checked, progress)
        finally:
            os.close(folder)
        return checked

    def _check_in(
        self, folder: int, digest: str, size: int, checked: Checked, progress: ProgressLine | None
    ) -> None:
        try:
            index = _open_noatime(f"{digest}.index", folder)
        except FileNotFoundError:
            checked.problems.append("missing: not in the snapshot's store (no index file)")
            return
        except OSError as exc:
            checked.problems.append(f"its index file {_reason(exc)}")
            return
        try:
            blocks, sizes = self._records(index, digest, size, checked)
        except OSError as exc:
            checked.problems.append(f"its index file cannot be read: {_reason(exc)}")
            return
        finally:
            os.close(index)
        others = sorted(sizes - {size})
        if others:
            checked.problems.append(
                f"its index states another size too ({others[0]} bytes; the tree: {size}), "
                "so an offline mount cannot open it"
            )
        elif size not in sizes:
            checked.problems.append("missing: its index records nothing of it")
            return
        bs = self.block_size
        count = -(-size // bs)
        missing = _gaps(sorted(blocks), count)
        if missing:
            checked.problems.append(_blocks_line(missing, count, "missing"))
        if not blocks:
            return
        try:
            data = _open_noatime(f"{digest}.data", folder)
        except FileNotFoundError:
            checked.problems.append(f"missing: its data file is not in the store ({count} blocks)")
            return
        except OSError as exc:
            checked.problems.append(f"its data file {_reason(exc)}")
            return
        try:
            damaged = self._read(data, blocks, checked, progress)
        except OSError as exc:
            checked.problems.append(f"its data file cannot be read: {_reason(exc)}")
            return
        finally:
            os.close(data)
        if damaged:
            ranges = _ranges(damaged)
            checked.problems.append(_blocks_line(ranges, count, "damaged"))

    def _records(
        self, fd: int, digest: str, size: int, checked: Checked
    ) -> tuple[dict[int, tuple[int, int]], set[int]]:
        """{block: (length, crc32)} as a reader believes the index open as `fd` (the last
        record of a block wins, a dropped one removes it, a block record must have the length
        the tree's size implies), and every size its intact records state."""
        bs = self.block_size
        count = -(-size // bs)
        limit = min(INDEX_LIMIT, max(INDEX_MIN, count * RECORD_SIZE * INDEX_SLACK_RECORDS))
        end = min(os.fstat(fd).st_size, limit)
        prefix = bytes.fromhex(digest[:16])
        blocks: dict[int, tuple[int, int]] = {}
        sizes: set[int] = set()
        pending = b""
        base = 0  # the file offset of pending[0]
        while base + len(pending) < end:
            want = min(INDEX_CHUNK, end - base - len(pending))
            piece = os.pread(fd, want, base + len(pending))
            if not piece:
                break
            raw = pending + piece
            records, consumed, bad = parse_records(raw, prefix, bs)
            checked.damaged_records += bad
            for kind, _, index, length, crc, stated, _ in records:
                sizes.add(stated)
                if stated != size:
                    continue  # not believed (and reported as another size)
                if kind == KIND_BLOCK:
                    if index >= count or length != min(bs, size - index * bs):
                        checked.damaged_records += 1
                        continue
                    blocks[index] = (length, crc)
                elif kind == KIND_DROPPED:
                    blocks.pop(index, None)
            base += consumed
            pending = raw[consumed:]
        if pending:
            checked.damaged_records += 1  # a torn record at the end (a cut index)
        return blocks, sizes

    def _buffer(self) -> mmap.mmap:
        buffer: mmap.mmap | None = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = mmap.mmap(-1, SPAN * self.block_size)
        return buffer

    def _read(
        self,
        fd: int,
        blocks: dict[int, tuple[int, int]],
        checked: Checked,
        progress: ProgressLine | None,
    ) -> list[int]:
        """Read every recorded block, SPAN at a time along runs of consecutive ones, and
        check its length and crc32; the blocks that fail."""
        bs = self.block_size
        view = memoryview(self._buffer())
        with_advice = hasattr(os, "posix_fadvise")
        if with_advice:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        damaged: list[int] = []
        for first, last in _runs(sorted(blocks), SPAN):
            length = (last - first) * bs + blocks[last][0]
            got = _pread_all(fd, view[:length], first * bs)
            for i in range(first, last + 1):
                size_i, crc = blocks[i]
                at = (i - first) * bs
                if at + size_i > got or zlib.crc32(view[at : at + size_i]) != crc:
                    damaged.append(i)
            checked.blocks += last - first + 1
            checked.bytes += got
            if progress is not None:
                progress.add(got)
        return damaged


def _runs(indices: list[int], span: int) -> Iterator[tuple[int, int]]:
    """(first, last) of runs of consecutive indices, at most `span` long."""
    start = previous = -2
    for index in indices:
        if index != previous + 1 or index - start >= span:
            if start >= 0:
                yield start, previous
            start = index
        previous = index
    if start >= 0:
        yield start, previous


def _gaps(present: list[int], count: int) -> list[tuple[int, int]]:
    """The ranges of 0 .. count - 1 not in `present` (sorted, all below count): computed
    from the present ones, never by a loop over `count`."""
    gaps = []
    expected = 0
    for index in present:
        if index > expected:
            gaps.append((expected, index - 1))
        expected = index + 1
    if expected < count:
        gaps.append((expected, count - 1))
    return gaps


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    return list(_runs(indices, len(indices) + 1))


def _blocks_line(ranges: list[tuple[int, int]], count: int, what: str) -> str:
    """`block 3 damaged`, `blocks 3-5, 9 missing (4 of 12)`."""
    number = sum(last - first + 1 for first, last in ranges)
    if number == 1:
        return f"block {ranges[0][0]} {what}"
    shown = ", ".join(
        str(first) if first == last else f"{first}-{last}" for first, last in ranges[:RANGES_SHOWN]
    )
    more = ", ..." if len(ranges) > RANGES_SHOWN else ""
    return f"blocks {shown}{more} {what} ({number} of {count})"


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link (not followed)"
    if isinstance(exc, safeio.NotRegular):
        return f"is {exc.strerror}"
    return exc.strerror or str(exc)


def _printable(path: str) -> str:
    """A path from tree.json with control characters escaped (a hostile tree could hide a
    line break or a terminal escape in a name)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in path)


__all__ = ["Checked", "Checker", "verify_command"]
