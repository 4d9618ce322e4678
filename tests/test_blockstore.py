"""Tests for gcfs.blockstore: sparse data files with an append-only index (file I/O only)."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from gcfs.blockstore import RECORD_SIZE, STORE_DIR, BlockStore, key_digest

BS = 4096
KEY = "http://127.0.0.1:1/media/images/aa/bb/image/file/ct.mha"
SIZE = 10 * BS + 100  # 11 blocks, the last one 100 bytes


def content(size: int = SIZE, seed: int = 1) -> bytes:
    return bytes((seed * 7 + i * 13) % 251 for i in range(size))


DATA = content()


def blocks(data: bytes, first: int, count: int) -> memoryview:
    return memoryview(data)[first * BS : (first + count) * BS]


def read(store: BlockStore, key: str, first: int = 0, count: int = 8) -> dict[int, bytes]:
    buffer = memoryview(bytearray(count * BS))
    got = store.read_into(key, first, count, buffer)
    return {i: bytes(buffer[(i - first) * BS : (i - first) * BS + n]) for i, n in got.items()}


def paths(store: BlockStore, key: str) -> tuple[Path, Path]:
    digest = key_digest(key)
    folder = store.directory / STORE_DIR / digest[:2]
    return folder / f"{digest}.data", folder / f"{digest}.index"


def damaged_store(directory: Path, data: bytes) -> tuple[Path, Path]:
    """A store in `directory` holding `data` (8 whole blocks) under key "k", block 3 damaged
    on disk (its record intact); the data and index paths."""
    assert len(data) == 8 * BS
    writer = BlockStore(directory, 1 << 30, block_size=BS)
    writer.write("k", 0, blocks(data, 0, 8), len(data))
    writer.close()
    data_path, index_path = paths(writer, "k")
    with open(data_path, "r+b") as f:
        f.seek(3 * BS)
        f.write(b"\xff" * 8)
    return data_path, index_path


def test_write_read_and_statistics(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    assert read(store, KEY, 0, 3) == {}
    assert store.write(KEY, 0, blocks(DATA, 0, 2), SIZE) == 2
    assert store.write(KEY, 10, blocks(DATA, 10, 1), SIZE) == 1  # the short last block
    assert read(store, KEY, 0, 3) == {0: DATA[:BS], 1: DATA[BS : 2 * BS]}
    assert read(store, KEY, 9, 2) == {10: DATA[10 * BS :]}
    assert read(store, "another key", 0, 1) == {}
    stats = store.statistics()
    assert (stats.hits, stats.misses, stats.evictions, stats.damaged) == (3, 3 + 1 + 1 + 1, 0, 0)
    assert store.get_size(KEY) == SIZE
    assert store.cached_blocks(KEY, 11) == 3
    assert not store.fully_cached(KEY)
    data_path, index_path = paths(store, KEY)
    assert index_path.stat().st_size == 3 * RECORD_SIZE
    # Sparse: three blocks on disk, not eleven; counted as the filesystem counts them.
    assert data_path.stat().st_size == SIZE
    assert data_path.stat().st_blocks * 512 < 11 * BS
    assert stats.bytes == data_path.stat().st_blocks * 512 + 3 * RECORD_SIZE


def test_fully_cached_and_sizes_survive_a_restart(tmp_path: Path) -> None:
    first = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    assert first.write(KEY, 0, blocks(DATA, 0, 11), SIZE) == 11
    first.put_size("size-only", 12345)
    first.put_size("empty", 0)
    assert first.fully_cached(KEY)
    first.close()
    second = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    assert second.total_bytes == first.total_bytes
    assert second.fully_cached(KEY)
    assert second.get_size(KEY) == SIZE
    assert second.get_size("size-only") == 12345
    assert second.get_size("empty") == 0
    assert second.fully_cached("empty")  # no block to fetch
    assert not second.fully_cached("size-only")
    assert second.get_size("unknown") is None
    got = read(second, KEY, 0, 11)
    assert b"".join(got[i] for i in range(11)) == DATA
    assert second.statistics().damaged == 0


def test_rejects_blocks_that_are_not_whole(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    with pytest.raises(ValueError):
        store.write(KEY, 0, memoryview(DATA)[: BS + 1], SIZE)  # a partial block mid-file
    with pytest.raises(ValueError):
        store.write(KEY, 10, memoryview(DATA)[10 * BS : 10 * BS + 50], SIZE)  # short last
    with pytest.raises(ValueError):
        store.write(KEY, 10, memoryview(DATA)[:BS], SIZE)  # past the end
    assert store.total_bytes == 0


def test_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
        store.write(KEY, 0, blocks(DATA, 0, 1), SIZE)
        store.put_size("other", 123)
    finally:
        os.umask(old)
    found = list(store.directory.rglob("*"))
    assert sum(1 for path in found if path.is_file()) >= 3
    for path in (store.directory, *found):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_an_existing_directory_loses_only_the_bits_for_others(tmp_path: Path) -> None:
    """gcfs never chmods a directory it did not create, except that the permissions of others
    go from one the user owns (it holds images); one it creates is 0700."""
    directory = tmp_path / "c"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    BlockStore(directory, max_bytes=1 << 20, block_size=BS)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    BlockStore(tmp_path / "new", max_bytes=1 << 20, block_size=BS)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_old_format_is_removed_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The one-file-per-block cache of earlier versions (blocks/, sizes/) goes away cleanly,
    but only inside a directory that carries gcfs's marker."""
    directory = tmp_path / "c"
    BlockStore(directory, max_bytes=1 << 20, block_size=BS).close()
    for name in ("blocks/ab", "sizes"):
        (directory / name).mkdir(parents=True)
    (directory / "blocks/ab/abcdef.0").write_bytes(b"x" * 100)
    (directory / "sizes/abcdef").write_bytes(b"100\n")
    with caplog.at_level(logging.INFO, logger="gcfs.blockstore"):
        store = BlockStore(directory, max_bytes=1 << 20, block_size=BS)
    assert not (directory / "blocks").exists()
    assert not (directory / "sizes").exists()
    assert store.total_bytes == 0
    assert "older gcfs" in caplog.text


def test_a_directory_without_the_marker_is_refused_and_left_alone(tmp_path: Path) -> None:
    """Finding 5: a directory gcfs did not make (here one holding `blocks/` and `sizes/`, as
    the old cache format did, but without a marker) is refused with one line; nothing in it
    is removed, created or chmodded. A snapshot is refused as a cache, by name."""
    from gcfs import marker

    directory = tmp_path / "thesis"
    (directory / "blocks").mkdir(parents=True)
    (directory / "sizes").mkdir()
    (directory / "blocks" / "chapter1.tex").write_text("precious")
    os.chmod(directory, 0o755)
    before = sorted(p.relative_to(directory) for p in directory.rglob("*"))
    with pytest.raises(marker.WrongDirectory, match="not made by gcfs"):
        BlockStore(directory, max_bytes=1 << 20, block_size=BS)
    with pytest.raises(marker.WrongDirectory):
        BlockStore(directory, max_bytes=1 << 20, block_size=BS, readonly=True)
    assert sorted(p.relative_to(directory) for p in directory.rglob("*")) == before
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert (directory / "blocks" / "chapter1.tex").read_text() == "precious"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(marker.WrongDirectory, match="not a directory"):
        BlockStore(afile, max_bytes=1 << 20, block_size=BS)
    snapshot = tmp_path / "snap"
    store = BlockStore(snapshot, 1 << 20, block_size=BS, kind=marker.SNAPSHOT)
    store.write(KEY, 0, blocks(DATA, 0, 1), SIZE)
    assert marker.classify(snapshot) is marker.Kind.SNAPSHOT
    with pytest.raises(marker.WrongDirectory, match="is a gcfs snapshot; mount it with --offline"):
        BlockStore(snapshot, max_bytes=1 << 20, block_size=BS)
    offline = BlockStore(snapshot, max_bytes=1 << 20, block_size=BS, readonly=True)
    assert read(offline, KEY, 0, 1) == {0: DATA[:BS]}
    cache = tmp_path / "cache"
    BlockStore(cache, max_bytes=1 << 20, block_size=BS)
    assert marker.classify(cache) is marker.Kind.BLOCK_CACHE
    with pytest.raises(marker.WrongDirectory, match="block cache, not a snapshot"):
        BlockStore(cache, max_bytes=1 << 20, block_size=BS, kind=marker.SNAPSHOT)
    with pytest.raises(marker.WrongDirectory, match="does not exist"):
        BlockStore(tmp_path / "missing", max_bytes=1 << 20, block_size=BS, readonly=True)
    assert not (tmp_path / "missing").exists()


def test_a_cache_made_before_markers_is_adopted(tmp_path: Path) -> None:
    """A directory holding only `store/` is a block cache of an older gcfs: marked, used."""
    from gcfs import marker

    directory = tmp_path / "c"
    store = BlockStore(directory, max_bytes=1 << 20, block_size=BS)
    store.write(KEY, 0, blocks(DATA, 0, 2), SIZE)
    store.close()
    (directory / marker.MARKER).unlink()
    assert marker.classify(directory) is marker.Kind.OLD_BLOCK_CACHE
    again = BlockStore(directory, max_bytes=1 << 20, block_size=BS)
    assert marker.classify(directory) is marker.Kind.BLOCK_CACHE
    assert read(again, KEY, 0, 2) == {0: DATA[:BS], 1: DATA[BS : 2 * BS]}


def test_old_data_without_index_and_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    """What a crash left (a data file whose index was never written, a temporary file) goes
    at the next start once it is older than STALE_AGE; younger ones may belong to another
    daemon creating them right now, and stay."""
    from gcfs import blockstore

    store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    store.write(KEY, 0, blocks(DATA, 0, 1), SIZE)
    data_path, index_path = paths(store, KEY)
    store.close()
    orphan_digest = key_digest("orphan")
    orphan = data_path.parent.parent / orphan_digest[:2] / f"{orphan_digest}.data"
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"y" * BS)
    leftover = index_path.with_name(f".tmp-{index_path.name}")
    leftover.write_bytes(b"half written")
    young = data_path.with_name(f"{key_digest('being created')}.data")
    young.write_bytes(b"z" * BS)
    old = os.stat(orphan).st_mtime - blockstore.STALE_AGE - 60
    for path in (orphan, leftover):
        os.utime(path, (old, old))
    again = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    assert not orphan.exists()
    assert not leftover.exists()
    assert young.exists()
    assert read(again, KEY, 0, 1) == {0: DATA[:BS]}


def test_a_torn_index_record_is_skipped_and_later_records_found(tmp_path: Path) -> None:
    """A crash in the middle of an append leaves a torn record; the index is never rewritten
    (another daemon may be appending), so later appends land after the torn bytes and the
    parser finds them by their magic."""
    store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    store.write(KEY, 0, blocks(DATA, 0, 2), SIZE)
    store.close()
    _, index_path = paths(store, KEY)
    with open(index_path, "ab") as f:
        f.write(bytes(RECORD_SIZE // 2))  # a crash in the middle of an append
    again = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    assert read(again, KEY, 0, 2) == {0: DATA[:BS], 1: DATA[BS : 2 * BS]}
    assert again.write(KEY, 2, blocks(DATA, 2, 1), SIZE) == 1
    assert index_path.stat().st_size == 3 * RECORD_SIZE + RECORD_SIZE // 2  # appended, as is
    again.close()
    third = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    assert read(third, KEY, 0, 3) == {i: DATA[i * BS : (i + 1) * BS] for i in range(3)}
    assert third.statistics().damaged == 1  # the torn stretch, counted once


def test_the_parser_resynchronises_after_clobbered_bytes() -> None:
    """Records found after garbage at any offset; a record still being appended (a partial
    tail) is left for the next read instead of being counted as damage."""
    from gcfs.blockindex import parse_records, record

    digest = key_digest(KEY)
    prefix = bytes.fromhex(digest[:16])
    records = [record(1, BS, i, BS, i, SIZE, digest) for i in range(3)]
    raw = records[0] + b"\x07" * 29 + records[1] + records[2][:20]
    parsed, consumed, damaged = parse_records(raw, prefix, BS)
    assert [fields[2] for fields in parsed] == [0, 1]
    assert damaged == 1
    assert consumed == len(raw) - 20  # the partial record waits
    parsed, consumed, damaged = parse_records(raw[consumed:] + records[2][20:], prefix, BS)
    assert ([fields[2] for fields in parsed], damaged) == ([2], 0)


@pytest.mark.parametrize("damage", ["flip-data", "hole", "truncate-data", "flip-record"])
def test_damaged_block_or_record_is_a_miss_logged_once(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    store.write(KEY, 0, blocks(DATA, 0, 4), SIZE)
    store.close()
    data_path, index_path = paths(store, KEY)
    with open(data_path, "r+b") as f:
        if damage == "flip-data":
            f.seek(2 * BS + 100)
            byte = f.read(1)
            f.seek(2 * BS + 100)
            f.write(bytes([byte[0] ^ 1]))
        elif damage == "hole":  # the record reached the disk, the data did not (power loss)
            f.seek(2 * BS)
            f.write(b"\x00" * BS)
        elif damage == "truncate-data":
            f.truncate(2 * BS + 10)
    if damage == "flip-record":
        raw = bytearray(index_path.read_bytes())
        raw[2 * RECORD_SIZE + 20] ^= 1  # inside block 2's record
        index_path.write_bytes(bytes(raw))
    # This mount has verified nothing yet: a fresh instance.
    fresh = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    with caplog.at_level(logging.WARNING, logger="gcfs.blockstore"):
        first = read(fresh, KEY, 0, 4)
        second = read(fresh, KEY, 0, 4)
    good = {0: DATA[:BS], 1: DATA[BS : 2 * BS]}
    if damage != "truncate-data":
        good[3] = DATA[3 * BS : 4 * BS]
    assert first == second == good  # block 2 is a miss; nothing wrong is ever returned
    assert fresh.statistics().damaged >= 1
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
    # The next mount knows block 2 is gone without tripping over it, and a new write of it
    # is served.
    fresh.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gcfs.blockstore"):
        later = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
        assert 2 not in read(later, KEY, 0, 4)
        later.write(KEY, 2, blocks(DATA, 2, 1), SIZE)
        assert read(later, KEY, 2, 1) == {2: DATA[2 * BS : 3 * BS]}
    if damage != "flip-record":
        assert "damaged" not in caplog.text


def test_checksums_are_checked_once_per_mount(tmp_path: Path) -> None:
    """A block read from disk is checked the first time only: damage after that first check
    goes unnoticed until the next mount (the trade the module docstring explains)."""
    store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    store.write(KEY, 0, blocks(DATA, 0, 1), SIZE)
    store.close()
    fresh = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    assert read(fresh, KEY, 0, 1) == {0: DATA[:BS]}  # checked now
    data_path, _ = paths(fresh, KEY)
    with open(data_path, "r+b") as f:
        f.write(b"\xff")
    assert read(fresh, KEY, 0, 1) == {0: b"\xff" + DATA[1:BS]}  # not checked again
    fresh.close()
    assert read(BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS), KEY, 0, 1) == {}


def test_a_size_change_drops_the_old_blocks(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    store.write(KEY, 0, blocks(DATA, 0, 2), SIZE)
    other = content(3 * BS, seed=5)
    store.write(KEY, 2, blocks(other, 2, 1), 3 * BS)
    assert read(store, KEY, 0, 3) == {2: other[2 * BS :]}
    assert store.get_size(KEY) == 3 * BS


def test_lru_eviction_by_whole_files(tmp_path: Path) -> None:
    files = {f"key-{n}": content(4 * BS, seed=n) for n in range(4)}
    per_file = 4 * BS + 4 * RECORD_SIZE
    store = BlockStore(tmp_path / "c", max_bytes=3 * per_file + BS, block_size=BS)
    for key in ["key-0", "key-1", "key-2"]:
        assert store.write(key, 0, blocks(files[key], 0, 4), 4 * BS) == 4
    assert read(store, "key-0", 0, 1)  # key-0 is now the most recently used
    assert store.write("key-3", 0, blocks(files["key-3"], 0, 4), 4 * BS) == 4
    assert read(store, "key-1", 0, 4) == {}  # the least recently used file went, whole
    assert not any(p.exists() for p in paths(store, "key-1"))
    for key in ["key-0", "key-2", "key-3"]:
        assert len(read(store, key, 0, 4)) == 4
    stats = store.statistics()
    assert stats.evictions == 1
    assert stats.files == 3
    assert store.total_bytes <= store.max_bytes


def test_a_file_larger_than_the_cache_keeps_what_fits(tmp_path: Path) -> None:
    big = content(20 * BS, seed=3)
    store = BlockStore(tmp_path / "c", max_bytes=8 * BS, block_size=BS)
    stored = [store.write("big", i, blocks(big, i, 1), 20 * BS) for i in range(20)]
    assert 5 <= sum(stored) < 8
    assert store.total_bytes <= store.max_bytes
    assert store.cached_blocks("big", 20) == sum(stored)


def test_lru_order_survives_restart_and_smaller_limit(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    for n in range(4):
        store.write(f"key-{n}", 0, blocks(DATA, 0, 1), SIZE)
        _, index_path = paths(store, f"key-{n}")
        os.utime(index_path, (1000 + n, 1000 + n))
    store.close()
    os.utime(paths(store, "key-0")[1], (2000, 2000))  # key-0 was used last
    per_file = os.stat(paths(store, "key-0")[0]).st_blocks * 512 + RECORD_SIZE
    smaller = BlockStore(tmp_path / "c", max_bytes=2 * per_file, block_size=BS)
    assert smaller.statistics().files == 2
    assert read(smaller, "key-0", 0, 1) == {0: DATA[:BS]}
    assert read(smaller, "key-3", 0, 1) == {0: DATA[:BS]}
    assert read(smaller, "key-1", 0, 1) == read(smaller, "key-2", 0, 1) == {}


def test_open_descriptors_are_bounded(tmp_path: Path) -> None:
    from gcfs import blockstore

    store = BlockStore(tmp_path / "c", max_bytes=1 << 30, block_size=BS)
    before = len(os.listdir("/proc/self/fd"))
    for n in range(blockstore.MAX_OPEN_FILES * 2):
        store.write(f"key-{n}", 0, blocks(DATA, 0, 1), SIZE)
    opened = len(os.listdir("/proc/self/fd")) - before
    assert opened <= 3 * blockstore.MAX_OPEN_FILES
    assert all(len(read(store, f"key-{n}", 0, 1)) == 1 for n in range(0, 128, 7))
    store.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_threads(tmp_path: Path) -> None:
    """Concurrent writes and reads from 8 threads over 30 files under a tight limit: every
    block read is right, and the accounting matches the disk."""
    files = {f"key-{n}": content(8 * BS, seed=n) for n in range(30)}
    store = BlockStore(tmp_path / "c", max_bytes=60 * BS, block_size=BS)
    errors: list[str] = []

    def work(n: int) -> None:
        try:
            work_on(n)
        except Exception as exc:
            errors.append(repr(exc))

    def work_on(n: int) -> None:
        for i in range(300):
            key = f"key-{(n * 7 + i) % 30}"
            index = (n + i) % 8
            store.write(key, index, blocks(files[key], index, 1), 8 * BS)
            for got_index, got in read(store, key, 0, 8).items():
                if got != files[key][got_index * BS : (got_index + 1) * BS]:
                    errors.append(f"wrong data for {key} block {got_index}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store.close()
    on_disk = 0
    for path in (tmp_path / "c" / STORE_DIR).rglob("*"):
        if path.is_file():
            info = path.stat()
            on_disk += info.st_blocks * 512 if path.suffix == ".data" else info.st_size
    assert store.total_bytes == on_disk <= store.max_bytes
