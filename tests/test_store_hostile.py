"""The block store in a directory others can write (issue 14): planted links, FIFOs, hard
links and hostile index records are refused or are misses, never followed, never a hang or an
exception; files unlinked under a daemon are let go; a snapshot can be made durable; O_DIRECT
really writes; and a group cache really is shared between two uids."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gcfs import blockread, blockstore, marker
from gcfs.blockindex import KIND_BLOCK, KIND_SIZE, record
from gcfs.blockstore import BlockStore, key_digest
from tests.test_blockstore import BS, DATA, KEY, SIZE, blocks, paths, read
from tests.users import MEMBER_PYTHON, member_code

ROOT = Path(__file__).resolve().parent.parent
# A join deadline for work that must not block: generous for a loaded machine, and far
# shorter than "forever", which is what a FIFO or a loop over 2**50 blocks took.
DEADLINE = 20.0


def prompt(work: Callable[[], object]) -> object:
    """Run `work` in a thread; fail if it does not return before DEADLINE."""
    result: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "blocked"
    if errors:
        raise errors[0]
    return result[0]


def store_at(directory: Path, limit: int = 1 << 30) -> BlockStore:
    return BlockStore(directory, limit, block_size=BS)


# -- finding 1: planted symlinks ---------------------------------------------------------------


def test_planted_symlinks_are_never_followed(tmp_path: Path) -> None:
    """Data and index files replaced by links to a file outside the cache, and a `<hh>`
    directory replaced by a link to a directory outside: the store (running as root, the
    worst case) writes, creates, chmods and unlinks nothing there; the reads are misses."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    os.chmod(victim, 0o644)
    cache = tmp_path / "c"
    writer = store_at(cache)
    writer.write(KEY, 0, blocks(DATA, 0, 2), SIZE)
    writer.close()
    data_path, index_path = paths(writer, KEY)
    for path in (data_path, index_path):
        path.unlink()
        path.symlink_to(victim)
    other = "another key"
    other_digest = key_digest(other)
    folder = cache / "store" / other_digest[:2]
    if folder.exists():  # the two keys' digests share a directory: pick a third key
        other = "a third key"
        other_digest = key_digest(other)
        folder = cache / "store" / other_digest[:2]
    assert not folder.exists()
    folder.symlink_to(outside, target_is_directory=True)
    (outside / f"{other_digest}.index").write_bytes(b"not gcfs's")
    store = store_at(cache)
    assert read(store, KEY, 0, 2) == {}
    assert store.write(KEY, 0, blocks(DATA, 0, 2), SIZE) == 0
    store.put_size(KEY, SIZE)
    assert store.write(other, 0, blocks(DATA, 0, 2), SIZE) == 0
    assert read(store, other, 0, 2) == {}
    assert store.evict_to(0) >= 0
    store.sync()
    store.clear()
    assert victim.read_bytes() == b"precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert sorted(p.name for p in outside.iterdir()) == sorted(["victim", f"{other_digest}.index"])
    assert (outside / f"{other_digest}.index").read_bytes() == b"not gcfs's"


def test_a_planted_store_link_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "c"
    store_at(cache).close()
    (cache / "store").rmdir()
    (cache / "store").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError) as caught:
        store_at(cache)
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert list(outside.iterdir()) == []


def test_scans_unlink_only_gcfs_names(tmp_path: Path) -> None:
    """clear, prune and the start-up cleanup remove only names gcfs makes (a digest in its
    own `<hh>` directory, a temporary name): anything else someone put there stays."""
    cache = tmp_path / "c"
    store = store_at(cache)
    store.write(KEY, 0, blocks(DATA, 0, 1), SIZE)
    data_path, _ = paths(store, KEY)
    strangers = [
        data_path.parent / "notes.txt",
        data_path.parent / f"{'0' * 64}.data",  # a digest that does not belong in this <hh>
        cache / "store" / "zz" / "x.data",
    ]
    strangers[2].parent.mkdir()
    for path in strangers:
        path.write_bytes(b"keep")
        old = time.time() - blockstore.STALE_AGE - 60
        os.utime(path, (old, old))
    store_at(cache)  # start-up cleanup
    assert store.clear() == 2
    assert store_at(cache).evict_to(0) == 0
    assert all(path.read_bytes() == b"keep" for path in strangers)


# -- finding 9: FIFOs --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["index", "data"])
def test_a_planted_fifo_is_a_miss_and_never_blocks(
    tmp_path: Path, which: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "c"
    writer = store_at(cache)
    writer.write(KEY, 0, blocks(DATA, 0, 2), SIZE)
    writer.close()
    data_path, index_path = paths(writer, KEY)
    path = index_path if which == "index" else data_path
    path.unlink()
    os.mkfifo(path)
    store = store_at(cache)
    with caplog.at_level(logging.WARNING, logger="gcfs.blockstore"):
        assert prompt(lambda: read(store, KEY, 0, 2)) == {}
        assert prompt(lambda: read(store, KEY, 0, 2)) == {}
        # With the data a FIFO, the index's records say the blocks are stored (a write of
        # them counts them stored); with the index a FIFO, nothing can be written.
        stored = prompt(lambda: store.write(KEY, 0, blocks(DATA, 0, 2), SIZE))
        assert stored == (0 if which == "index" else 2)
        prompt(store.verify)
        prompt(store.sync)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    warned = [r for r in caplog.records if "not a regular file" in r.getMessage()]
    assert 1 <= len(warned) <= 2  # once per kind of open (reading, writing), not per read


def test_a_planted_hard_link_is_not_written(tmp_path: Path) -> None:
    """A hard link to a file elsewhere (on a filesystem without protected_hardlinks, or to a
    file the member owns) is refused for writing: gcfs's files have one link."""
    cache = tmp_path / "c"
    outside = tmp_path / "elsewhere"
    outside.write_bytes(b"precious")
    store = store_at(cache)
    digest = key_digest(KEY)
    folder = cache / "store" / digest[:2]
    folder.mkdir()
    os.link(outside, folder / f"{digest}.data")
    assert store.write(KEY, 0, blocks(DATA, 0, 1), SIZE) == 0
    assert outside.read_bytes() == b"precious"


# -- finding 4: hostile records ----------------------------------------------------------------


def plant_index(store: BlockStore, key: str, raw: bytes) -> None:
    digest = key_digest(key)
    folder = store.directory / "store" / digest[:2]
    folder.mkdir(exist_ok=True)
    (folder / f"{digest}.index").write_bytes(raw)
    (folder / f"{digest}.data").write_bytes(b"")


def test_a_hostile_size_record_is_no_loop_and_no_exception(tmp_path: Path) -> None:
    """A member writes records saying the file is 2**62 bytes, with a block far out: no loop
    over 2**50 blocks, no exception; a caller that knows the server's size sees misses."""
    store = store_at(tmp_path / "c")
    digest = key_digest(KEY)
    huge = 1 << 62
    raw = record(KIND_SIZE, BS, 0, 0, 0, huge, digest) + record(
        KIND_BLOCK, BS, 10**12, BS, 0, huge, digest
    )
    plant_index(store, KEY, raw)
    assert prompt(lambda: store.fully_cached(KEY)) is False
    assert prompt(lambda: store.cached_blocks(KEY, 1 << 40)) == 1  # over the records
    assert prompt(lambda: store.fully_cached(KEY, SIZE)) is False
    assert prompt(lambda: store.cached_blocks(KEY, 11, SIZE)) == 0
    assert prompt(lambda: store.present(KEY, [0, 1], SIZE)) == []
    assert store.get_size(KEY) is None  # no record agrees with what the server said
    # Our own write with the server's size is believed, the member's records are not.
    assert store.write(KEY, 0, blocks(DATA, 0, 11), SIZE) == 11
    assert store.fully_cached(KEY, SIZE)


def test_a_record_that_does_not_fit_the_buffer_is_a_miss(tmp_path: Path) -> None:
    """Two daemons disagreeing on a size (finding 10's ValueError): a record longer than the
    buffer the caller gave, or of another size than the caller's, is a miss, never raised."""
    cache = tmp_path / "c"
    other = content_of(3 * BS)
    writer = store_at(cache)
    writer.write(KEY, 0, memoryview(other), 3 * BS)
    reader = store_at(cache)
    short = memoryview(bytearray(BS + 10))  # room for block 0 and 10 bytes of block 1
    assert reader.read_into(KEY, 0, 2, short) == {0: BS}
    assert reader.read_into(KEY, 0, 2, memoryview(bytearray(2 * BS)), SIZE) == {}
    assert reader.statistics().hits == 1


def content_of(size: int) -> bytes:
    return bytes((i * 31 + 5) % 251 for i in range(size))


def test_an_oversized_index_is_read_only_up_to_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every parser is bounded by what it reads: an index larger than the limit is read up
    to the limit (here 64 records), in pieces, and the rest ignored."""
    monkeypatch.setattr(blockread, "INDEX_LIMIT", 64 * 48)
    monkeypatch.setattr(blockread, "_INDEX_CHUNK", 10 * 48 + 7)  # pieces split records
    store = store_at(tmp_path / "c")
    digest = key_digest(KEY)
    size = 1000 * BS
    raw = b"".join(record(KIND_BLOCK, BS, i, BS, 0, size, digest) for i in range(1000))
    plant_index(store, KEY, raw)
    assert store.cached_blocks(KEY, 1000) == 64
    reads: list[int] = []
    real = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        reads.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    fresh = store_at(tmp_path / "c")
    assert fresh.cached_blocks(KEY, 1000) == 64
    assert sum(reads) <= 64 * 48 and max(reads) <= 10 * 48 + 7


# -- finding 7: clear and prune free the disk --------------------------------------------------


def deleted_descriptors(directory: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)) and target.endswith("(deleted)"):
                found.append(target)
    return found


def poll(condition: Callable[[], bool]) -> bool:
    """Poll `condition` until it holds or DEADLINE passes (a daemon's sweep every 2 s)."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("how", ["clear", "prune-command"])
def test_clear_while_a_daemon_runs_frees_the_disk(tmp_path: Path, how: str) -> None:
    cache = tmp_path / "c"
    running = store_at(cache)
    for n in range(4):
        running.write(f"k{n}", 0, blocks(DATA, 0, 8), SIZE)
        assert len(read(running, f"k{n}", 0, 8)) == 8  # descriptors held
    assert running.total_bytes > 4 * 8 * BS
    if how == "clear":
        assert store_at(cache).clear() == 8
    else:
        pruned = subprocess.run(
            [sys.executable, "-m", "gcfs", "cache", "prune", "0", "--cache-dir", str(cache)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert pruned.returncode == 0, pruned.stderr
    assert deleted_descriptors(cache)  # held: the space is still allocated now
    assert poll(lambda: not deleted_descriptors(cache)), deleted_descriptors(cache)
    assert running.total_bytes == 0
    assert running.statistics().files <= 4
    assert read(running, "k0", 0, 8) == {}  # fetched again, not served from a ghost
    assert running.write("k0", 0, blocks(DATA, 0, 8), SIZE) == 8
    assert len(read(running, "k0", 0, 8)) == 8


# -- finding 8: durability ---------------------------------------------------------------------


def test_sync_makes_every_file_and_directory_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c"
    store = store_at(cache)
    for n in range(5):
        store.write(f"k{n}", 0, blocks(DATA, 0, 2), SIZE)
    synced: set[str] = set()
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert store.sync() == 10
    wanted = {str(p) for p in (cache / "store").rglob("*")} | {str(cache / "store"), str(cache)}
    assert wanted <= synced


# -- finding 21: O_DIRECT really happens, and two uids really share a cache --------------------


def _accepts_direct(directory: Path) -> bool:
    probe = directory / ".gcfs-direct-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    page = mmap.mmap(-1, 4096)
    try:
        os.pwrite(fd, page, 0)
        return True
    except OSError:
        return False
    finally:
        page.close()
        os.close(fd)
        probe.unlink()


@pytest.fixture
def direct_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory on a filesystem that accepts O_DIRECT (tmpfs refuses it)."""
    for base in (tmp_path, Path("/var/tmp"), ROOT):
        if base.is_dir() and _accepts_direct(base):
            with tempfile.TemporaryDirectory(dir=base) as found:
                yield Path(found)
            return
    pytest.skip("no filesystem here accepts O_DIRECT")


def test_aligned_blocks_are_written_with_o_direct(direct_directory: Path) -> None:
    store = store_at(direct_directory / "c")
    buffer = mmap.mmap(-1, 8 * BS)  # page-aligned, as the buffer pool's are
    buffer[:] = DATA[: 8 * BS]
    assert store.write(KEY, 0, memoryview(buffer)[: 8 * BS], SIZE) == 8
    assert store.direct_writes > 0 and store.buffered_writes == 0
    store.close()
    assert read(store_at(direct_directory / "c"), KEY, 0, 8) == {
        i: DATA[i * BS : (i + 1) * BS] for i in range(8)
    }
    buffer.close()


MEMBER_UID, MEMBER_GID = 61234, 61234


def as_member(script: str, *args: str) -> dict[str, object]:
    """Run `script` as another uid in the cache's group (setpriv: no user entry needed)."""
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={MEMBER_UID}",
            f"--regid={MEMBER_GID}",
            "--clear-groups",
            MEMBER_PYTHON,
            "-c",
            script,
            *args,
        ],
        cwd=member_code(),  # the checkout may be unreadable to the member
        env={**os.environ, "PYTHONPATH": str(member_code()), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


MEMBER = """
import json, sys
from gcfs.blockstore import BlockStore
from tests.test_blockstore import BS, DATA, SIZE, blocks, read
store = BlockStore(sys.argv[1], 1 << 30, block_size=BS)
got = read(store, "root's", 0, 8)
stored = store.write("member's", 0, blocks(DATA, 0, 8), SIZE)
evicted = store.evict_to(0)
print(json.dumps({"read": sorted(got), "right": all(got[i] == DATA[i * BS:(i + 1) * BS]
    for i in got), "stored": stored, "evicted": evicted, "mode": store.mode,
    "bytes": store.total_bytes}))
"""


@pytest.fixture
def group_cache() -> Iterator[Path]:
    """A group cache as an administrator makes it (`install -d -m 3770 -g lab`), in a
    directory the member can reach (pytest's tmp_path is root's 0700)."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("needs root and setpriv to run a process as another uid")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as base:
        os.chmod(base, 0o755)
        cache = Path(base) / "cache"
        cache.mkdir()
        os.chown(cache, 0, MEMBER_GID)
        os.chmod(cache, 0o3770)
        yield cache


def test_two_uids_share_a_group_cache(group_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Root's daemon stores a file, a member's daemon (another uid, in the group) reads it
    byte for byte and stores another; neither can evict the other's files in the sticky
    directory except root; the member's refused evictions are skipped and stay counted."""
    root_store = BlockStore(group_cache, 1 << 30, block_size=BS)
    assert root_store.mode == "group" and root_store.dir.sticky
    assert root_store.write("root's", 0, blocks(DATA, 0, 8), SIZE) == 8
    got = as_member(MEMBER, str(group_cache))
    assert got["mode"] == "group"
    assert got["read"] == list(range(8)) and got["right"]
    assert got["stored"] == 8
    assert got["evicted"] == 1  # its own file only; root's stays (sticky), counted
    assert isinstance(got["bytes"], int) and got["bytes"] >= 8 * BS
    assert len(read(root_store, "root's", 0, 8)) == 8
    member_data, _ = paths(root_store, "member's")
    assert not member_data.exists()
    assert root_store.write("member's", 0, blocks(DATA, 0, 8), SIZE) == 8
    os.chown(member_data, MEMBER_UID, MEMBER_GID)  # as if the member had written it
    os.chown(paths(root_store, "member's")[1], MEMBER_UID, MEMBER_GID)
    for path in (group_cache / "store").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o3770 if path.is_dir() else 0o660), (path, oct(mode))
        assert path.stat().st_gid == MEMBER_GID
    again = as_member(MEMBER, str(group_cache))
    assert again["evicted"] == 1  # the member's own file; root's is refused and skipped
    assert again["read"] == list(range(8))
    assert root_store.evict_to(0) == 1  # root (as `gcfs cache prune`) removes what is left
    assert not list((group_cache / "store").rglob("*.data"))


def test_a_group_cache_without_the_sticky_bit_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "g"
    directory.mkdir()
    os.chmod(directory, 0o2770)
    with caplog.at_level(logging.WARNING, logger="gcfs.cachedir"):
        BlockStore(directory, 1 << 30, block_size=BS)
        BlockStore(directory, 1 << 30, block_size=BS)
    warned = [r for r in caplog.records if "chmod +t" in r.getMessage()]
    assert len(warned) == 1
    assert marker.classify(directory) is marker.Kind.BLOCK_CACHE


# -- every map is bounded: the table of tracked files ---------------------------------------------


def test_the_table_of_files_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A member who fills the directory with empty index files grows no daemon's table beyond
    its bound: the others are counted as untracked, and the store still reads, writes and
    prunes everything."""
    directory = tmp_path / "c"
    first = store_at(directory)
    assert first.write(KEY, 0, blocks(DATA, 0, 11), SIZE) == 11
    for n in range(100):  # what a hostile member plants: empty index files of made-up keys
        digest = key_digest(f"planted-{n}")
        folder = directory / "store" / digest[:2]
        folder.mkdir(exist_ok=True)
        (folder / f"{digest}.index").touch()
    cap = 8
    with caplog.at_level(logging.WARNING, logger="gcfs.blockstore"):
        store = BlockStore(directory, 1 << 30, block_size=BS, max_entries=cap)
        assert len(store._entries) <= cap
        statistics = store.statistics()
        assert (statistics.files, statistics.untracked) == (101, 101 - len(store._entries))
        assert read(store, KEY, 0, 11) == {i: DATA[i * BS : (i + 1) * BS] for i in range(11)}
        for n in range(20):  # files this process writes are tracked, within the bound
            key = f"new-{n}"
            assert store.write(key, 0, blocks(DATA, 0, 2), SIZE) == 2
            assert read(store, key, 0, 2) == {0: DATA[:BS], 1: DATA[BS : 2 * BS]}
            assert len(store._entries) <= cap
        assert store.usage()[0] == 121
        assert len(store._entries) <= cap
        assert store.statistics().untracked == 121 - len(store._entries)
        report = store.verify()  # every file on disk, tracked or not
        assert (report.files, report.blocks, report.damaged) == (121, 11 + 20 * 2, 0)
        assert len(store._entries) <= cap
    bound = [r for r in caplog.records if "not tracked" in r.getMessage()]
    assert len(bound) == 1  # once, naming the directory and no file
    assert str(directory) in bound[0].getMessage()
    assert "planted" not in bound[0].getMessage() and ".index" not in bound[0].getMessage()
    assert store.evict_to(0) == 121  # a prune reaches the files beyond the bound too
    assert store.usage() == (0, 0)
    assert store.statistics().untracked == 0
