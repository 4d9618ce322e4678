"""Faults in the data path's background tasks and worker threads (issue 14: 9, 10, 11).

In-process (ContentStore against the fake): a block store call that blocks past the caller's
deadline is abandoned, not waited for; a slow disk never lets the write-behind queue outgrow the
budget. On a real mount (the daemon started with GCFS_TEST_INJECT, gcfs/inject.py): an
exception in each kind of background task, and a block store call that hangs, leave the mount
answering with the server's bytes or EIO, never wrong bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gcfs import control, inject
from gcfs.blockstore import BlockStore
from gcfs.fakegc import DEMO_TOKEN, FakeGC
from tests.conftest import Mount, gcfs_command, poll
from tests.test_content import (
    BS,
    LARGE_BYTES,
    SMALL_BYTES,
    MiB,
    content_store,
    file_url,
    gc,  # noqa: F401 (the fixture)
    read_all,
)

# -- in-process ---------------------------------------------------------------------------------


async def test_a_store_call_that_hangs_is_abandoned_at_the_deadline(
    gc: FakeGC,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A read waiting on a block store thread that blocks (a FIFO planted in a shared cache)
    gives up at its deadline while the thread still blocks; the thread keeps one of the
    store's thread tokens until it returns, and the next read works."""
    release, returned = threading.Event(), threading.Event()
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url)
        cache = store.cache
        assert isinstance(cache, BlockStore)
        real = cache.read_into

        def hang(*args: Any) -> dict[int, int]:
            release.wait(10)  # bounded: a regression fails the test, not the run
            returned.set()
            return {}

        cache.read_into = hang  # type: ignore[method-assign]
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.5):
                await f.read(0, 300 * 1024)
        assert not returned.is_set()  # the read did not wait for the thread
        assert store.threads.borrowed_tokens >= 1  # the stuck threads (read, read-ahead) hold one
        cache.read_into = real  # type: ignore[method-assign]
        assert await f.read(2 * BS, 300 * 1024) == SMALL_BYTES[2 * BS : 2 * BS + 300 * 1024]
        release.set()
        with trio.fail_after(10):
            while store.threads.borrowed_tokens:  # noqa: ASYNC110 (a thread, not a task)
                await trio.sleep(0.01)
        f.close()


async def test_a_slow_disk_never_queues_more_than_the_budget(
    gc: FakeGC,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every write slowed (store-slow-write), a 48 MiB sequential read: the bytes waiting
    for the disk never exceed the 16 MiB budget; what did not fit was served, not cached."""
    monkeypatch.setattr(inject, "_active", frozenset({"store-slow-write"}))
    budget = 16 * MiB
    url = file_url(gc, "large")
    async with content_store(gc, tmp_path / "cache", max_inflight_bytes=budget) as store:
        f = await store.open(url)
        assert await read_all(f, 1 * MiB) == LARGE_BYTES
        f.close()
        stats = store.statistics()
        await store.wait_written()
    assert stats.writing_peak_bytes <= budget
    assert stats.writes_skipped > 0  # the disk was behind: some blocks were not cached


# -- on a real mount ----------------------------------------------------------------------------


def remote_files(directory: Path) -> list[Path]:
    found = []

    def fail(exc: OSError) -> None:
        raise exc

    for root, _, names in os.walk(directory, onerror=fail):
        for name in names:
            path = Path(root) / name
            if os.getxattr(path, "user.gc.kind") == b"file":
                found.append(path)
    return sorted(found)


def served_bytes(mount: Mount, path: Path, first: int = 0, length: int = -1) -> bytes:
    """The file's bytes as the fake serves them, by its /media/ URL (its key, which the
    daemon's control socket tells): `length` bytes from `first`, or all."""
    relative = str(path.relative_to(mount.path))
    (info,) = control.request(mount.path, {"op": "files", "paths": [relative]})["files"]
    url = str(info["key"])
    headers = {"Authorization": f"Bearer {DEMO_TOKEN}"}
    answer = httpx.get(url, headers=headers, follow_redirects=False)
    assert answer.status_code == 302
    last = "" if length < 0 else str(first + length - 1)
    ranged = {"Range": f"bytes={first}-{last}"}
    return httpx.get(answer.headers["location"], headers=ranged).content


def read_or_eio(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes in 128 KiB reads from the start (a sequential reader: read-ahead)."""
    try:
        with open(path, "rb", buffering=0) as stream:
            parts = []
            while limit > 0 and (part := stream.read(min(limit, 128 * 1024))):
                parts.append(part)
                limit -= len(part)
            return b"".join(parts)
    except OSError as exc:
        assert exc.errno == errno.EIO
        return None


def drop_page_cache() -> None:
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


@pytest.mark.parametrize("point", ["read-ahead", "write-behind"])
def test_a_bug_in_a_background_task_leaves_the_mount_answering(
    mount_gcfs: Callable[..., Mount],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    point: str,
) -> None:
    """Every read-ahead (or every block write) raises an unexpected exception: logged once
    with its traceback, the reads that waited get EIO or the right bytes, and the mount goes
    on answering: listings, stat, and a random read of another file."""
    monkeypatch.setenv(inject.ENVIRONMENT, point)
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    mount.allowed_errors += [f"bug in {point}", "Traceback (most recent call last)"]
    items = mount.path / "archives" / "prostate-mri-picai" / "items"
    files = remote_files(items)
    assert len(files) >= 2
    files.sort(key=lambda path: path.stat().st_size)
    first, other = files[-1], files[0]  # the largest (a whole-slide TIFF): read ahead
    wanted = 8 * MiB
    assert first.stat().st_size > wanted
    expected = served_bytes(mount, first, 0, wanted)
    got = read_or_eio(first, wanted)
    assert got is None or got == expected
    drop_page_cache()
    got = read_or_eio(first, wanted)  # a second time: the bug is hit again, logged at DEBUG
    assert got is None or got == expected
    assert mount.process.poll() is None
    assert sorted(os.listdir(items))
    size = other.stat().st_size
    offset = size // 3
    with open(other, "rb") as stream:  # a small read away from the start: no read-ahead
        assert os.pread(stream.fileno(), 1000, offset) == served_bytes(mount, other, offset, 1000)
    log = mount.log_text()
    assert log.count(f"bug in {point} (answering EIO)") == 1
    assert f"injected fault at {point}" in log


def test_a_hung_store_call_answers_eio_within_the_deadline(
    mount_gcfs: Callable[..., Mount], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first block store call blocks for an hour (store-stall): the request waiting on
    it answers EIO at its 3 s deadline, and the mount answers everything afterwards."""
    monkeypatch.setenv(inject.ENVIRONMENT, "store-stall")
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"), "--timeout", "3")
    mount.allowed_errors.append("did not finish within")
    items = mount.path / "archives" / "lidc-lung-ct" / "items"
    failed = 0
    for _ in range(2):
        try:
            files = remote_files(items)
            break
        except OSError as exc:
            assert exc.errno == errno.EIO
            failed += 1
    assert failed == 1  # the request that met the stall, and only it
    for path in files[:3]:
        assert path.read_bytes() == served_bytes(mount, path)
    assert mount.process.poll() is None
    assert "did not finish within 3 s; answering EIO" in mount.log_text()


@pytest.mark.parametrize("point", ["size-probe", "refresh", "prefetch"])
def test_a_bug_in_a_probe_refresh_or_prefetch_leaves_the_mount_answering(
    mount_gcfs: Callable[..., Mount],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    point: str,
) -> None:
    """The other kinds of work the daemon starts for a request (each file's size probe in a
    listing, `gcfs refresh`, `gcfs prefetch`) raise an unexpected exception: the request
    fails cleanly (EIO, or one line and exit 1), and the mount goes on answering."""
    monkeypatch.setenv(inject.ENVIRONMENT, point)
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    mount.allowed_errors += ["unexpected error", "control request failed", "Traceback"]
    archive = mount.path / "archives" / "prostate-mri-picai"
    items = archive / "items"
    if point == "size-probe":
        with pytest.raises(OSError) as caught:
            remote_files(items)  # a listing of files probes their sizes
        assert caught.value.errno == errno.EIO
    else:
        command = ["refresh", str(archive)] if point == "refresh" else ["prefetch", str(items)]
        done = subprocess.run(
            gcfs_command(*command), capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 1, done
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert "internal error" in done.stderr
    assert mount.process.poll() is None
    assert "archives" in os.listdir(mount.path)
    described = json.loads((archive / "archive.json").read_bytes())
    assert described["url"].rstrip("/").endswith("prostate-mri-picai")
    assert f"injected fault at {point}" in mount.log_text()


def test_a_cache_cleared_under_a_mount_frees_the_disk_and_is_fetched_again(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    """Issue 14 #7 over a real mount: a daemon holds a cached file's descriptors open;
    `gcfs cache clear` from outside unlinks the files; within a poll the daemon has closed
    them (no deleted file left among its descriptors), its block cache counts nothing, and
    the next read of the file (page cache dropped) fetches from storage again, byte for
    byte."""
    cache = tmp_path / "cache"
    mount = mount_gcfs("--cache-dir", str(cache))
    assert mount.process is not None
    items = mount.path / "archives" / "prostate-mri-picai" / "items"
    path = remote_files(items)[0]
    expected = served_bytes(mount, path, 0, -1)
    with open(path, "rb") as held:  # the daemon keeps its descriptors while the file is open
        assert held.read() == expected
        status = mount.path / ".gcfs" / "status.json"

        def block_cache() -> dict[str, Any]:
            return dict(json.loads(status.read_bytes())["block_cache"])

        poll(lambda: block_cache()["bytes"] > 0, 20, "the block writes")
        fd_dir = Path(f"/proc/{mount.process.pid}/fd")

        def deleted() -> list[str]:
            found = []
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(str(cache)) and target.endswith(" (deleted)"):
                        found.append(target)
            return found

        cleared = subprocess.run(
            gcfs_command("cache", "clear", "--cache-dir", str(cache)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert cleared.returncode == 0, cleared.stderr
        poll(lambda: not deleted(), 20, "the daemon to let go of the cleared files")
        poll(lambda: block_cache()["bytes"] == 0, 20, "the block cache to count nothing")
    sent = fake.storage_bytes_sent
    drop_page_cache()
    assert path.read_bytes() == expected
    assert fake.storage_bytes_sent - sent >= len(expected)  # from storage, not from a ghost
