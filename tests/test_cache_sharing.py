"""One block cache directory shared by several daemons: two BlockStore instances on one
directory stand in for two daemons (on one machine or, with `network=True`, on two machines
over NFS). File I/O only; tests/test_cluster.py does the same with real mounts."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from gcfs import blockstore, cachedir
from gcfs.blockstore import RECORD_SIZE, STORE_DIR, BlockStore
from tests.conftest import gcfs_command
from tests.test_blockstore import blocks as view
from tests.test_blockstore import damaged_store, paths, read

BS = 4096
SIZE = 8 * BS


def content(seed: int, size: int = SIZE) -> bytes:
    return bytes((seed * 31 + i * 7) % 253 for i in range(size))


def two(tmp_path: Path, *, limit: int = 1 << 30, network: bool = False) -> list[BlockStore]:
    return [
        BlockStore(tmp_path / "shared", limit, block_size=BS, network=network) for _ in range(2)
    ]


@pytest.mark.parametrize("network", [False, True], ids=["local", "network"])
def test_a_block_stored_by_one_daemon_is_found_by_another_started_before(
    tmp_path: Path, network: bool
) -> None:
    """The second store was running, and had read the file's index, before the first
    stored the rest: a miss sends it back to the index file, where it finds the blocks."""
    first, second = two(tmp_path, network=network)
    data = content(1)
    assert read(second, "k") == {}  # looked, nothing there yet
    assert second.get_size("k") is None
    assert first.write("k", 0, view(data, 0, 4), SIZE) == 4
    assert sorted(read(second, "k")) == [0, 1, 2, 3]  # its view of the index is loaded now
    assert not second.fully_cached("k")
    assert first.write("k", 4, view(data, 4, 4), SIZE) == 4
    assert second.fully_cached("k")
    assert read(second, "k") == {i: data[i * BS : (i + 1) * BS] for i in range(8)}
    assert second.get_size("k") == SIZE
    assert second.statistics().found_later == 8  # 4 in a file new to it, 4 appended later
    assert second.statistics().damaged == 0


def test_a_block_another_daemon_stored_is_not_written_again(tmp_path: Path) -> None:
    """Writing re-reads the index first: blocks another daemon stored (same length and crc)
    count as stored and add no record."""
    first, second = two(tmp_path)
    data = content(2)
    first.write("k", 0, view(data, 0, 8), SIZE)
    _, index = paths(first, "k")
    assert index.stat().st_size == 8 * RECORD_SIZE
    assert second.write("k", 0, view(data, 0, 8), SIZE) == 8
    assert index.stat().st_size == 8 * RECORD_SIZE


def test_eviction_by_another_daemon_is_a_miss_not_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader whose file was evicted (unlinked) by another daemon keeps reading intact
    bytes through its open descriptors; once those are gone it misses, and a file written
    anew under the same name (another generation, holes where the old one had data) is
    never read as the old one: no zeros, no damage warning."""
    first, second = two(tmp_path)
    data = content(3)
    first.write("k", 0, view(data, 0, 8), SIZE)
    assert len(read(second, "k")) == 8  # checked and trusted by `second` from now on
    assert first.evict_to(0) == 1  # `first` evicts everything, as a prune would
    assert not any(p.exists() for p in paths(first, "k"))
    assert len(read(second, "k")) == 8  # still open: the unlinked inode's bytes
    second.close()  # descriptors gone (e.g. pushed out of the descriptor cache)
    with caplog.at_level(logging.WARNING, logger="gcfs.blockstore"):
        assert read(second, "k") == {}
        first.write("k", 5, view(data, 5, 1), SIZE)  # a new generation: block 5 only
        assert read(second, "k") == {5: data[5 * BS : 6 * BS]}
    assert caplog.records == []
    assert second.statistics().damaged == 0


def test_a_replaced_file_under_a_stale_view_is_checked_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`second` knows blocks 0-7 of generation 1 and has checked them; the files are
    replaced by generation 2 holding block 7 only (its data file has a hole where block 3
    was). A read of block 3 through a freshly opened descriptor must not return the hole's
    zeros as a block checked before: checks count per data file, so it is checked, fails,
    the store sees that the index was replaced, and it is a quiet miss."""
    first, second = two(tmp_path)
    data = content(4)
    first.write("k", 0, view(data, 0, 8), SIZE)
    assert len(read(second, "k")) == 8
    second.close()
    for path in paths(first, "k"):
        path.unlink()
    third = BlockStore(tmp_path / "shared", 1 << 30, block_size=BS)
    third.write("k", 7, view(data, 7, 1), SIZE)
    with caplog.at_level(logging.WARNING, logger="gcfs.blockstore"):
        got = read(second, "k", 3, 1)
    assert got == {}
    assert caplog.records == []
    assert read(second, "k", 7, 1) == {7: data[7 * BS :]}


def test_accounting_sees_other_daemons_writes_before_evicting(tmp_path: Path) -> None:
    """Each store counts only its own writes between rescans; before evicting it rescans the
    directory, so what the other one wrote counts and the limit holds on disk."""
    per_file = SIZE + 8 * RECORD_SIZE
    first, second = two(tmp_path, limit=3 * per_file)
    for n in range(3):
        assert second.write(f"b{n}", 0, view(content(n), 0, 8), SIZE) == 8
    assert first.total_bytes == 0  # it has not looked
    first._rescanned = 0.0  # as if RESCAN_INTERVAL had passed since its start
    assert first.write("a", 0, view(content(9), 0, 8), SIZE) == 8
    assert first.statistics().rescans >= 1
    on_disk = sum(
        (p.stat().st_blocks * 512 if p.suffix == ".data" else p.stat().st_size)
        for p in (tmp_path / "shared" / STORE_DIR).rglob("*")
        if p.is_file()
    )
    assert on_disk <= 3 * per_file
    assert read(first, "a") != {}
    assert read(first, "b0") == {}  # the least recently used file went


def test_two_daemons_evicting_at_once_lose_only_cache(tmp_path: Path) -> None:
    """Both evict the same files; unlinking what the other already unlinked is fine, and
    the files that stay read back intact."""
    first, second = two(tmp_path)
    files = {f"k{n}": content(n) for n in range(4)}
    for key, data in files.items():
        first.write(key, 0, view(data, 0, 8), SIZE)
    per_file = SIZE + 8 * RECORD_SIZE
    assert second.evict_to(2 * per_file) == 2
    assert first.evict_to(2 * per_file) == 0  # already done by the other one
    kept = [key for key in files if read(first, key)]
    assert len(kept) == 2
    for key in kept:
        assert read(second, key) == {i: files[key][i * BS : (i + 1) * BS] for i in range(8)}


def test_network_mode_flushes_data_before_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a network filesystem, data that went through the page cache is flushed before its
    record is appended, and the index is flushed after: the order other machines see."""
    calls: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}").rsplit(".", 1)[1])
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    store = BlockStore(tmp_path / "c", 1 << 30, block_size=BS, network=True)
    small = content(5, 100)  # a small file: its only block goes through the page cache
    store.write("small", 0, memoryview(small), 100)
    assert calls == ["data", "index"]
    local = BlockStore(tmp_path / "d", 1 << 30, block_size=BS, network=False)
    calls.clear()
    local.write("small", 0, memoryview(small), 100)
    assert calls == []


def test_network_mode_reads_a_stale_page_again_before_calling_it_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A block that fails its check on a network filesystem is read again from a fresh
    descriptor with the cached pages dropped; the right bytes then are not damage."""
    first, second = two(tmp_path, network=True)
    data = content(6)
    first.write("k", 0, view(data, 0, 8), SIZE)
    real = BlockStore._read_data
    stale = {"left": 1}

    def read_data(self: BlockStore, files, buffer, start, length, offset):  # type: ignore[no-untyped-def]
        got = real(self, files, buffer, start, length, offset)
        if stale["left"]:
            stale["left"] -= 1
            buffer[start : start + length] = bytes(length)  # what a stale cached hole holds
        return got

    monkeypatch.setattr(BlockStore, "_read_data", read_data)
    with caplog.at_level(logging.WARNING, logger="gcfs.blockstore"):
        assert read(second, "k") == {i: data[i * BS : (i + 1) * BS] for i in range(8)}
    assert caplog.records == []
    assert second.statistics().damaged == 0


def test_a_readonly_store_never_writes(tmp_path: Path) -> None:
    """An offline mount's store reads, and changes nothing on disk: no write, no touch of
    the LRU time, no dropped record for a damaged block. (This runs as root, whom no mode
    stops: it tests the store's own restraint. test_other_uid.py reads as another uid, where
    the kernel refuses writes too.)"""
    data = content(7)
    data_path, index_path = damaged_store(tmp_path / "s", data)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (data_path, index_path)}
    reader = BlockStore(tmp_path / "s", 1 << 30, block_size=BS, readonly=True)
    got = read(reader, "k")
    assert sorted(got) == [0, 1, 2, 4, 5, 6, 7]
    assert reader.write("k", 3, view(data, 3, 1), SIZE) == 0
    reader.put_size("other", 5)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in before} == before
    assert reader.statistics().damaged == 1


def test_group_mode_permissions(tmp_path: Path) -> None:
    """A setgid directory with group rwx is a group cache: subdirectories 2770 and files 0660
    whatever the umask, the directory itself not made 0700, bits for others removed."""
    directory = tmp_path / "group"
    directory.mkdir()
    os.chmod(directory, 0o2775)
    old = os.umask(0o022)
    try:
        store = BlockStore(directory, 1 << 30, block_size=BS)
        store.write("k", 0, view(content(8), 0, 8), SIZE)
        store.put_size("other", 123)
    finally:
        os.umask(old)
    assert store.mode == "group"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o2770
    found = list(directory.rglob("*"))
    assert sum(1 for p in found if p.is_file()) >= 3
    for path in found:
        mode = stat.S_IMODE(path.stat().st_mode)
        # Sticky subdirectories: members cannot remove or replace each other's files.
        assert mode == (0o3770 if path.is_dir() else 0o660), (path, oct(mode))


def test_private_mode_is_unchanged(tmp_path: Path) -> None:
    directory = tmp_path / "private"
    directory.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        store = BlockStore(directory, 1 << 30, block_size=BS)
        store.write("k", 0, view(content(9), 0, 8), SIZE)
    finally:
        os.umask(old)
    assert store.mode == "private"
    # Not created by gcfs: only the bits for others go (the user chose the group's).
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    for path in directory.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_verify_clear_and_usage(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "c", 1 << 30, block_size=BS)
    for n in range(3):
        store.write(f"k{n}", 0, view(content(n), 0, 8), SIZE)
    store.close()
    data_path, _ = paths(store, "k1")
    with open(data_path, "r+b") as f:
        f.seek(2 * BS + 1)
        f.write(b"\x00\x01")
    checker = BlockStore(tmp_path / "c", 1 << 30, block_size=BS)
    report = checker.verify()
    assert (report.files, report.blocks, report.damaged, report.damaged_records) == (3, 24, 1, 0)
    again = BlockStore(tmp_path / "c", 1 << 30, block_size=BS).verify()
    assert (again.blocks, again.damaged) == (23, 0)  # the damaged block was dropped
    files, used = checker.usage()
    assert files == 3 and used > 0
    running = BlockStore(tmp_path / "c", 1 << 30, block_size=BS)
    assert len(read(running, "k0")) == 8
    assert checker.clear() == 6
    assert checker.usage() == (0, 0)
    assert len(read(running, "k0")) == 8  # a running daemon keeps what it has open ...
    running.close()
    assert read(running, "k0") == {}  # ... and then misses


def test_filesystem_type_from_mountinfo() -> None:
    mountinfo = "\n".join(
        [
            "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
            "60 27 0:50 / /shared rw,relatime - nfs4 server:/export rw,vers=4.2",
            r"61 60 0:51 / /shared/lab\040data rw - lustre 10.0.0.1@tcp:/fs rw",
        ]
    )
    assert cachedir.filesystem_type(Path("/home/me/.cache"), mountinfo) == "ext4"
    assert cachedir.filesystem_type(Path("/shared/gcfs"), mountinfo) == "nfs4"
    assert cachedir.filesystem_type(Path("/shared/lab data/x"), mountinfo) == "lustre"
    assert cachedir.filesystem_type(Path("/sharedx"), mountinfo) == "ext4"
    assert "nfs4" not in cachedir.LOCAL_FILESYSTEMS
    assert cachedir.is_group_directory(0o42770)
    assert not cachedir.is_group_directory(0o40770)
    assert not cachedir.is_group_directory(0o42750)


def test_temporary_names_are_unique_per_process(tmp_path: Path) -> None:
    name = blockstore.temporary_name(tmp_path / "tree.json").name
    assert name.startswith(".tmp-") and str(os.getpid()) in name and name.endswith("tree.json")


def cache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gcfs_command("cache", *args), capture_output=True, text=True, timeout=120, check=False
    )


def test_gcfs_cache_commands_without_a_mount(tmp_path: Path) -> None:
    """status, prune, verify and clear work on a directory with no daemon at all."""
    directory = tmp_path / "c"
    store = BlockStore(directory, 1 << 30)  # the default block size, as daemons use
    big = 1 << 20
    for n in range(4):
        store.write(f"k{n}", 0, memoryview(content(n, 2 * big)), 2 * big)
        os.utime(paths(store, f"k{n}")[1], (1000 + n, 1000 + n))  # k0 is the least recent
    store.close()
    shown = cache("status", "--cache-dir", str(directory), "--json")
    assert shown.returncode == 0, shown.stderr
    described = json.loads(shown.stdout)
    assert (described["files"], described["mode"], described["permissions"]) == (
        4,
        "private",
        "0700",
    )
    assert described["bytes"] >= 8 * big
    text = cache("status", "--cache-dir", str(directory)).stdout
    assert str(directory) in text and "4 remote files" in text and "private" in text
    with open(paths(store, "k3")[0], "r+b") as f:
        f.seek(big + 10)
        f.write(b"\x00\x00\x00")
    verified = cache("verify", "--cache-dir", str(directory))
    assert verified.returncode == 0, verified.stderr
    assert "8 blocks of 4 files" in verified.stdout and " 1 damaged (a daemon" in verified.stdout
    pruned = cache("prune", "5M", "--cache-dir", str(directory))
    assert pruned.returncode == 0, pruned.stderr
    assert "evicted 2 files" in pruned.stdout
    assert not paths(store, "k0")[1].exists() and not paths(store, "k1")[1].exists()
    assert paths(store, "k2")[1].exists()
    cleared = cache("clear", "--cache-dir", str(directory))
    assert cleared.returncode == 0 and "removed 4 files" in cleared.stdout
    assert json.loads(cache("status", "--cache-dir", str(directory), "--json").stdout)["files"] == 0
    missing = cache("status", "--cache-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_gcfs_cache_status_of_a_group_directory(tmp_path: Path) -> None:
    directory = tmp_path / "g"
    directory.mkdir()
    os.chmod(directory, 0o2770)
    shown = cache("status", "--cache-dir", str(directory))
    assert shown.returncode == 0
    assert "2770, shared by group" in shown.stdout


def test_gcfs_cache_takes_cache_dir_from_the_config_file(tmp_path: Path) -> None:
    directory = tmp_path / "from-config"
    BlockStore(directory, 1 << 30).put_size("k", 5)
    config = tmp_path / "config.toml"
    config.write_text(f'cache_dir = "{directory}"\n')
    shown = cache("status", "--config", str(config), "--json")
    assert json.loads(shown.stdout)["path"] == str(directory)
