"""Tests for gcfs.blockcache: the on-disk block cache (pure file I/O, no network)."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from gcfs.blockcache import HEADER_SIZE, BlockCache, key_digest

BS = 4096
KEY = "http://127.0.0.1:1/media/images/aa/bb/image/file/ct.mha"


def block(n: int, size: int = BS) -> bytes:
    return bytes([n % 256]) * size


def block_path(cache: BlockCache, key: str, index: int) -> Path:
    digest = key_digest(key)
    return cache.directory / "blocks" / digest[:2] / f"{digest}.{index}"


def test_put_get_and_statistics(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
    assert cache.get(KEY, 0) is None
    cache.put(KEY, 0, block(1))
    cache.put(KEY, 1, b"short last block")
    assert cache.get(KEY, 0) == block(1)
    assert cache.get(KEY, 1) == b"short last block"
    assert cache.get("another key", 0) is None
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.evictions) == (2, 2, 0)
    assert stats.bytes == cache.total_bytes == 2 * HEADER_SIZE + BS + len(b"short last block")


def test_overwrite_counts_once(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    cache.put(KEY, 0, block(1))
    cache.put(KEY, 0, block(2))
    assert cache.get(KEY, 0) == block(2)
    assert cache.total_bytes == HEADER_SIZE + BS


def test_rejects_oversized_block_and_ignores_put_bigger_than_cache(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BlockCache(tmp_path / "a", max_bytes=1 << 20, block_size=BS).put(KEY, 0, block(1, BS + 1))
    tiny = BlockCache(tmp_path / "b", max_bytes=BS, block_size=BS)  # header does not fit
    tiny.put(KEY, 0, block(1))
    assert tiny.get(KEY, 0) is None
    assert tiny.total_bytes == 0


def test_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        cache = BlockCache(tmp_path / "c", max_bytes=1 << 20, block_size=BS)
        cache.put(KEY, 0, block(1))
        cache.put_size(KEY, 123)
    finally:
        os.umask(old)
    for path in (cache.directory, *cache.directory.rglob("*")):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_existing_directory_is_made_private(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir(mode=0o755)
    BlockCache(directory, max_bytes=1 << 20, block_size=BS)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_restart_finds_blocks_and_sizes(tmp_path: Path) -> None:
    first = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    for i in range(5):
        first.put(KEY, i, block(i))
    first.put_size(KEY, 5 * BS)
    second = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    assert second.total_bytes == first.total_bytes
    assert [second.get(KEY, i) for i in range(5)] == [block(i) for i in range(5)]
    assert second.get_size(KEY) == 5 * BS
    assert second.get_size("unknown") is None


def test_leftover_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    cache.put(KEY, 0, block(1))
    torn = block_path(cache, KEY, 0).parent / ".tmp-crashed"
    torn.write_bytes(b"half a block")
    again = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    assert not torn.exists()
    assert again.total_bytes == HEADER_SIZE + BS


@pytest.mark.parametrize(
    "damage",
    ["flip-data", "flip-header", "truncate", "truncate-header", "append", "empty"],
)
def test_damaged_block_is_a_miss_and_deleted(tmp_path: Path, damage: str) -> None:
    cache = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    cache.put(KEY, 3, block(7))
    path = block_path(cache, KEY, 3)
    raw = bytearray(path.read_bytes())
    if damage == "flip-data":
        raw[HEADER_SIZE + 100] ^= 0x01
    elif damage == "flip-header":
        raw[20] ^= 0x01  # inside the data length field
    elif damage == "truncate":
        del raw[-1:]
    elif damage == "truncate-header":
        del raw[10:]
    elif damage == "append":
        raw += b"x"
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    assert cache.get(KEY, 3) is None
    assert not path.exists()
    assert cache.total_bytes == 0
    assert cache.statistics().misses == 1
    # A new instance that indexed the damaged file at start gets the same answer.
    cache.put(KEY, 3, block(7))
    path.write_bytes(path.read_bytes()[:-5])
    assert BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS).get(KEY, 3) is None


def test_block_under_the_wrong_name_or_block_size_is_a_miss(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    cache.put(KEY, 0, block(1))
    os.replace(block_path(cache, KEY, 0), block_path(cache, KEY, 1))
    assert cache.get(KEY, 1) is None  # the header says index 0
    cache.put(KEY, 0, block(1))
    other = BlockCache(tmp_path, max_bytes=1 << 20, block_size=2 * BS)
    assert other.get(KEY, 0) is None  # 4 KiB blocks are not 8 KiB blocks


def test_lru_eviction(tmp_path: Path) -> None:
    per_block = HEADER_SIZE + BS
    cache = BlockCache(tmp_path, max_bytes=3 * per_block, block_size=BS)
    for i in range(3):
        cache.put(KEY, i, block(i))
    assert cache.get(KEY, 0) == block(0)  # 0 is now the most recently used
    cache.put(KEY, 3, block(3))  # evicts 1, the least recently used
    assert cache.total_bytes == 3 * per_block <= cache.max_bytes
    assert cache.get(KEY, 1) is None
    assert not block_path(cache, KEY, 1).exists()
    assert [cache.get(KEY, i) for i in (0, 2, 3)] == [block(0), block(2), block(3)]
    assert cache.statistics().evictions == 1


def test_lru_order_survives_restart_and_smaller_limit(tmp_path: Path) -> None:
    per_block = HEADER_SIZE + BS
    cache = BlockCache(tmp_path, max_bytes=10 * per_block, block_size=BS)
    for i in range(4):
        cache.put(KEY, i, block(i))
        os.utime(block_path(cache, KEY, i), (1000 + i, 1000 + i))
    cache.get(KEY, 0)  # a hit sets the mtime: 0 becomes the newest
    smaller = BlockCache(tmp_path, max_bytes=2 * per_block, block_size=BS)
    assert smaller.total_bytes == 2 * per_block
    assert smaller.get(KEY, 0) == block(0)
    assert smaller.get(KEY, 3) == block(3)
    assert smaller.get(KEY, 1) is None and smaller.get(KEY, 2) is None


def test_damaged_size_record_is_dropped(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    cache.put_size(KEY, 42)
    path = tmp_path / "sizes" / key_digest(KEY)
    path.write_bytes(b"4x\n")
    assert cache.get_size(KEY) is None
    assert not path.exists()
    cache.put_size("empty", 0)
    assert cache.get_size("empty") == 0


def test_threads(tmp_path: Path) -> None:
    """Concurrent puts and gets from 8 threads keep the accounting exact and the limit."""
    per_block = HEADER_SIZE + BS
    cache = BlockCache(tmp_path, max_bytes=50 * per_block, block_size=BS)
    errors: list[str] = []

    def work(n: int) -> None:
        for i in range(200):
            index = (n * 7 + i) % 120
            cache.put(KEY, index, block(index))
            got = cache.get(KEY, (index * 3) % 120)
            if got is not None and got != block((index * 3) % 120):
                errors.append(f"wrong data for block {(index * 3) % 120}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start < 30
    assert errors == []
    on_disk = sum(p.stat().st_size for p in (tmp_path / "blocks").rglob("*") if p.is_file())
    assert cache.total_bytes == on_disk <= cache.max_bytes
