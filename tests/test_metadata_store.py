"""Issue 15: metadata on disk. Listings stream into a SQLite store per server and user, readdir
answers from it as pages arrive, and a daemon started again within the TTL asks nothing.

Real mounts against the fake on 127.0.0.1; the store is found where a user's is
($XDG_CACHE_HOME/gcfs-metadata, per test through the conftest's XDG_CACHE_HOME).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gcfs import metastore
from gcfs.fakegc import DEMO_TOKEN, FakeGC
from tests.conftest import Mount, poll, run_gcfs

ITEMS = 50_000  # the size: a first page of 100 and 50 pages of 1000


def big_archive(world: Any, count: int = ITEMS, slug: str = "big") -> list[str]:
    """An archive of `count` generated items (made per page by the fake); their pks."""
    archive = world.add_archive(slug, viewers={"demo"})
    socket = world.add_socket(f"{slug}-age", kind="Integer")
    generated = world.add_generated_items(archive, count, socket)
    return [generated.pk(index) for index in range(count)]


def items_requests(fake: FakeGC) -> list[int]:
    """The offsets of the item listing requests the fake answered, in order."""
    return [int(r.query["offset"]) for r in fake.requests if r.endpoint == "archives-items-list"]


def store_dir() -> Path:
    return Path(os.environ["XDG_CACHE_HOME"]) / "gcfs-metadata"


def store_files() -> list[Path]:
    return sorted(store_dir().glob(f"*{metastore.SUFFIX}"))


def test_first_entry_is_read_while_later_pages_are_held(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """`readdir` answers the first page's entries before the other pages arrived: the first
    entry is read while the fake holds every page but the first (so the request log shows the
    first page only), and once they are released the listing ends with every item once."""
    pks = big_archive(world)
    mount = mount_gcfs()
    items = mount.path / "archives" / "big" / "items"
    os.stat(items.parent)
    fake.reset_counts()
    fake.faults.hold_pages_from = 100
    first: list[str] = []
    names: list[str] = []
    failure: list[BaseException] = []

    def walk() -> None:
        try:
            with os.scandir(items) as entries:
                for entry in entries:
                    if not first:
                        first.append(entry.name)
                    names.append(entry.name)
        except BaseException as exc:
            failure.append(exc)

    reader = threading.Thread(target=walk)
    reader.start()
    try:
        poll(lambda: bool(first) or bool(failure), 20, "the first entry")
        assert not failure, failure
        # `stat` of an entry needs its page only: one of the first page answers now.
        assert (items / pks[50]).is_dir()
        assert items_requests(fake) == [0]
    finally:
        fake.faults.hold_pages_from = None
    reader.join(60)
    assert not reader.is_alive() and not failure, failure
    assert sorted(names) == sorted(pks)
    assert len(names) == len(set(names)) == ITEMS
    assert sorted(items_requests(fake)) == [0, *range(100, ITEMS, 1000)]


def test_remount_within_ttl_lists_and_opens_with_no_request(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """A daemon started again within the TTL serves what the first one stored: `ls -lR` of
    the whole tree and reading every file it had read make no request beyond the mount's
    token check, and give the same bytes."""
    first = mount_gcfs()
    before = _tree(first.path)
    first.unmount()
    assert store_files(), "no metadata store was written"
    fake.reset_counts()
    second = mount_gcfs()
    assert [r.endpoint for r in fake.requests] == ["profiles-self"]
    fake.reset_counts()
    assert _tree(second.path) == before
    assert fake.requests == []
    status = json.loads((second.path / ".gcfs" / "status.json").read_bytes())
    assert status["metadata_store"]["path"] == str(store_files()[0])
    assert status["metadata_store"]["loaded"] > 0  # the first daemon's answers
    assert status["metadata_store"]["pages_stored"] == 0


def _tree(root: Path) -> dict[str, Any]:
    """Every path below the archives: its type, size, link target, and the bytes of files."""
    found: dict[str, Any] = {}
    for directory, dirs, files in os.walk(root / "archives"):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            info = os.lstat(path)
            relative = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                found[relative] = ("file", info.st_size, path.read_bytes())
            else:
                found[relative] = ("dir", info.st_ino)
    return found


def test_kill_in_the_middle_of_a_listing_never_leaves_half_a_listing(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """A daemon killed (-9) while a listing is half stored: the next daemon does not take the
    half for the listing; it fetches it again and lists every item."""
    pks = big_archive(world, 3000)
    first = mount_gcfs()
    items = first.path / "archives" / "big" / "items"
    os.stat(items.parent)
    fake.faults.hold_pages_from = 1100  # the first two pages (1,100 items) get stored
    fake.reset_counts()
    seen: list[str] = []

    def partial() -> None:
        try:
            with os.scandir(items) as entries:
                for entry in entries:
                    seen.append(entry.name)
        except OSError:
            pass  # the daemon is killed under it

    reader = threading.Thread(target=partial, daemon=True)
    reader.start()
    poll(lambda: len(seen) >= 1100, 20, "the first two pages to be read")
    assert first.process is not None
    first.process.kill()
    first.process.wait(10)
    first.unmount()
    fake.faults.hold_pages_from = None
    reader.join(20)
    [path] = store_files()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM listings WHERE complete=0").fetchone()[0] >= 1
    fake.reset_counts()
    second = mount_gcfs()
    names = os.listdir(second.path / "archives" / "big" / "items")
    assert sorted(names) == sorted(pks)
    assert 0 in items_requests(fake)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM listings WHERE complete=0").fetchone()[0] == 0


@pytest.mark.parametrize("damage", ["garbage", "other-version", "truncated"])
def test_damaged_or_foreign_store_is_set_aside(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, damage: str
) -> None:
    """A store file that is not one gcfs can trust is renamed `*.set-aside` and a new one is
    made; the mount lists as usual and asks the server (nothing of the old file is served)."""
    first = mount_gcfs()
    expected = sorted(os.listdir(first.path / "archives"))
    first.unmount()
    [path] = store_files()
    if damage == "garbage":
        path.write_bytes(b"not a database at all\n" * 100)
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:4096] + b"\0" * (len(data) - 4096))  # the schema page only
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET value='999' WHERE name='format'")
    fake.reset_counts()
    second = mount_gcfs()
    assert sorted(os.listdir(second.path / "archives")) == expected
    assert fake.count("archives-list") >= 1
    assert Path(f"{path}{metastore.SET_ASIDE}").exists()
    assert "set aside" in second.log_text()
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store_dir()).st_mode) == 0o700


def test_store_is_private(mount_gcfs: Callable[..., Mount]) -> None:
    """0600 files in a 0700 directory; the token appears nowhere in them."""
    mount = mount_gcfs()
    os.listdir(mount.path / "archives")
    mount.unmount()
    assert stat.S_IMODE(os.stat(store_dir()).st_mode) == 0o700
    for path in store_dir().iterdir():
        assert stat.S_IMODE(os.lstat(path).st_mode) & 0o077 == 0, path
        assert DEMO_TOKEN.encode() not in path.read_bytes(), path


def _server_down(fake: FakeGC, how: str, down: bool) -> None:
    """`stopped`: nothing listens on the port (a real connection refused), then the fake
    serves again on the same port; `reset`: every connection reset on accept; `black-hole`:
    requests read and never answered."""
    if how == "stopped" and down:
        fake.stop()
    elif how == "stopped":
        fake.start()
    else:
        setattr(fake.faults, "down" if how == "reset" else "blackhole", down)


@pytest.mark.parametrize("how", ["stopped", "reset", "black-hole"])
def test_a_mount_started_while_the_server_is_down_serves_its_store(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, token_file: Path, tmp_path: Path, how: str
) -> None:
    """A reboot during the server's maintenance: `gcfs mount` finds a store filled with this
    token, says in one line that it serves what it saw (as of when) and mounts; what was seen
    answers, what was not fails with EIO, and once the server answers again the mount is
    back to normal. With another token (or no store) the mount fails as it always did."""
    first = mount_gcfs()
    archives = sorted(os.listdir(first.path / "archives"))
    some = archives[0]
    item_names = sorted(os.listdir(first.path / "archives" / "lidc-lung-ct" / "items"))
    first.unmount()
    _server_down(fake, how, True)
    mountpoint = tmp_path / "background"
    mountpoint.mkdir()
    started = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(token_file)
    )
    try:
        assert started.returncode == 0, started.stderr
        [notice] = started.stderr.strip().splitlines()
        assert "does not answer" in notice and "as of" in notice and "UTC" in notice
        assert DEMO_TOKEN not in started.stderr
        # The bars: what was seen within 2 s, what was not EIO within 5 s (each
        # operation here is one or a few FUSE requests answered from the store or at once).
        start = time.monotonic()
        assert sorted(os.listdir(mountpoint / "archives")) == archives
        assert sorted(os.listdir(mountpoint / "archives" / "lidc-lung-ct" / "items")) == (
            item_names
        )
        assert (mountpoint / "archives" / some).is_dir()
        assert time.monotonic() - start < 2.0
        start = time.monotonic()
        with pytest.raises(OSError) as unseen:
            os.listdir(mountpoint / "reader-studies" / "never-seen-study-x")
        assert unseen.value.errno == errno.EIO  # its collection was never listed
        assert time.monotonic() - start < 5.0
        readme = (mountpoint / "README.md").read_text()
        assert "offline since" in readme
        _server_down(fake, how, False)
        poll(
            lambda: "offline since" not in (mountpoint / "README.md").read_text(),
            60,
            "the probe to notice that the server is back",
        )
    finally:
        run_gcfs("umount", str(mountpoint))
    other = tmp_path / "other-token"
    other.write_text("Bearer not-the-token-that-filled-the-store\n")
    other.chmod(0o600)
    _server_down(fake, how, True)
    refused = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(other)
    )
    _server_down(fake, how, False)
    assert refused.returncode == 1
    assert "cannot reach" in refused.stderr
    assert not os.path.ismount(mountpoint)


def test_an_ls_that_straddles_a_refresh_sees_every_entry_once(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """A directory handle keeps the generation of the listing it started with: `gcfs refresh`
    in the middle of reading (with a new item that shifts every later position by one on the
    server) neither repeats nor skips an entry of it; the next listing shows the new item."""
    pks = big_archive(world, 5000)
    mount = mount_gcfs()
    items = mount.path / "archives" / "big" / "items"
    assert len(os.listdir(items)) == 5000
    archive = world.find_by_slug(world.archives.values(), "big")
    fake.reset_counts()
    names: list[str] = []
    with os.scandir(items) as entries:
        for entry in entries:
            names.append(entry.name)
            if len(names) == 10:
                added = world.add_archive_item(archive, title="listed first from now on")
                refreshed = run_gcfs("refresh", str(items))
                assert refreshed.returncode == 0, refreshed.stderr
                # The new generation is complete before we read on.
                assert len(os.listdir(items)) == 5001
    assert sorted(names) == sorted(pks)
    assert fake.count("archives-items-list") >= 1
    assert added.pk in os.listdir(items)


def test_a_second_mount_of_the_same_user_keeps_its_metadata_in_memory(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """One daemon owns a store (a lock): a second mount of the same user and server at the
    same time says so and keeps its metadata in memory, so neither deletes rows the other
    is reading; both list the same tree."""
    first = mount_gcfs()
    second = mount_gcfs()
    assert sorted(os.listdir(first.path / "archives")) == sorted(
        os.listdir(second.path / "archives")
    )
    assert "another gcfs daemon" in second.log_text()
    assert "another gcfs daemon" not in first.log_text()
    assert len(store_files()) == 1


def test_a_listing_longer_than_the_operation_deadline_still_lists(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """Each page has its deadline, not the listing: with a 6 s operation deadline and every
    item page taking 2.5 s, 18 pages (16 at a time) take about 7.5 s, and `ls` lists them all
    (before, `opendir` waited for the whole listing and answered EIO at the deadline)."""
    count = 100 + 17 * 1000
    pks = big_archive(world, count)
    mount = mount_gcfs("--timeout", "6")
    items = mount.path / "archives" / "big" / "items"
    os.stat(items.parent)
    fake.faults.configure(stall_rate=1.0, stall_seconds=2.5, only={"archives-items-list"})
    fake.reset_counts()
    names = os.listdir(items)
    fake.faults.clear()
    assert sorted(names) == sorted(pks)
    # 18 pages stalled 2.5 s each, at most 16 at a time, the first alone: >= 7.5 s in all.
    assert fake.count("archives-items-list") == 18
    assert fake.faults.injected.get("stall") == 18
