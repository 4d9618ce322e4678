"""Opening cached bytes needs no request while the listing that showed them is fresh, and a
revoked permission still ends access within one TTL (issue 10, item 1).

A training loader opens thousands of files epoch after epoch; each open used to resolve the
file's /media/ URL even when every block was on disk (55 ms per open on the real site).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gcfs.fakegc import FakeGC
from tests.conftest import Mount, poll


def files_below(directory: Path) -> list[Path]:
    found = []
    for root, _, names in os.walk(directory):
        found += [Path(root) / name for name in names]
    return found


def remote_files(directory: Path) -> list[Path]:
    return [p for p in files_below(directory) if os.getxattr(p, "user.gc.kind") == b"file"]


def drop_page_cache() -> None:
    """So that a read reaches the daemon (tests run as root in CI)."""
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


def test_cached_files_open_and_read_without_a_request(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    """Within the TTL, opening and reading files whose bytes are all in the block cache sends
    no request at all: no /media/ resolution, no storage GET, no listing."""
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    items = mount.path / "archives" / "lidc-lung-ct" / "items"
    files = remote_files(items)
    assert len(files) >= 5
    expected = {path: path.read_bytes() for path in files}
    fake.reset_counts()
    drop_page_cache()
    for path, data in expected.items():
        assert path.read_bytes() == data
    assert [(r.endpoint, r.path) for r in fake.requests] == []


def test_a_revoked_permission_ends_access_to_cached_bytes_within_one_ttl(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, tmp_path: Path
) -> None:
    """After the TTL, a cached file of an archive the token lost is no longer readable, even
    through a directory the reader kept open (no fresh path lookup from the root).

    The file is a File socket's (nodule-locations.json): the archive's images stay readable
    through the reader study and the jobs that use them too, as on the real platform."""
    mount = mount_gcfs("--ttl", "1", "--cache-dir", str(tmp_path / "cache"))
    items = mount.path / "archives" / "lidc-lung-ct" / "items"
    cached = [
        path
        for path in remote_files(items)
        if b"/componentinterfacevalue/" in os.getxattr(path, "user.gc.api_url")
    ]
    assert cached
    item = cached[0].parent
    for path in cached:
        path.read_bytes()
    directories = {path.parent for path in cached}
    held = {d: os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in directories}
    try:
        archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
        archive.viewers.discard("demo")  # revoked on the server
        assert not archive.visible_to("demo")

        def refused(path: Path) -> bool:
            try:
                fd = os.open(path.name, os.O_RDONLY, dir_fd=held[path.parent])
            except OSError as exc:
                assert exc.errno in (errno.ENOENT, errno.EACCES, errno.EIO), exc
                return True
            try:
                os.read(fd, 1)
            except OSError as exc:
                assert exc.errno in (errno.ENOENT, errno.EACCES, errno.EIO), exc
                return True
            finally:
                os.close(fd)
            return False

        for path in cached:
            poll(lambda path=path: refused(path), 15, f"{path.name} to be refused")
        with pytest.raises(OSError):
            (item / "item.json").read_bytes()
    finally:
        for fd in held.values():
            os.close(fd)
