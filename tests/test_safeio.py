"""safeio and marker: what a hostile directory can put in gcfs's way, refused without
following a link, blocking on a FIFO or touching a mode gcfs did not set."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from gcfs import marker, safeio


@pytest.fixture
def directory(tmp_path: Path):  # type: ignore[no-untyped-def]
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def test_open_regular_refuses_a_symlink_and_leaves_its_target_alone(directory) -> None:
    path, fd = directory
    target = path / "target"
    target.write_bytes(b"precious")
    (path / "link").symlink_to(target)
    with pytest.raises(OSError) as caught:
        safeio.open_regular("link", os.O_WRONLY, dir_fd=fd)
    assert caught.value.errno == errno.ELOOP
    with pytest.raises(FileExistsError):
        safeio.create_exclusive("link", os.O_WRONLY, 0o600, dir_fd=fd)
    assert target.read_bytes() == b"precious"


def test_open_regular_refuses_a_fifo_without_blocking(directory) -> None:
    path, fd = directory
    os.mkfifo(path / "fifo")
    done = threading.Event()
    errors: list[OSError] = []

    def attempt() -> None:
        try:
            safeio.open_regular("fifo", os.O_RDONLY, dir_fd=fd)
        except OSError as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=attempt, daemon=True).start()
    assert done.wait(10), "opening a FIFO blocked"
    assert isinstance(errors[0], safeio.NotRegular)
    with pytest.raises(safeio.NotRegular):
        safeio.open_or_create("fifo", os.O_RDONLY, 0o600, dir_fd=fd)


def test_open_regular_returns_a_blocking_descriptor(directory) -> None:
    path, fd = directory
    (path / "file").write_bytes(b"x")
    opened = safeio.open_regular("file", os.O_RDONLY, dir_fd=fd)
    try:
        import fcntl

        assert not fcntl.fcntl(opened, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(opened)


def test_open_or_create_sets_the_mode_only_on_what_it_created(directory) -> None:
    path, fd = directory
    old = os.umask(0o077)
    try:
        created_fd, created = safeio.open_or_create("new", os.O_RDWR, 0o660, dir_fd=fd)
    finally:
        os.umask(old)
    os.close(created_fd)
    assert created and stat.S_IMODE(os.stat(path / "new").st_mode) == 0o660
    (path / "theirs").write_bytes(b"")
    os.chmod(path / "theirs", 0o604)
    existing_fd, created = safeio.open_or_create("theirs", os.O_RDWR, 0o660, dir_fd=fd)
    os.close(existing_fd)
    assert not created and stat.S_IMODE(os.stat(path / "theirs").st_mode) == 0o604


def test_make_directory_refuses_a_planted_link_and_keeps_modes_it_did_not_set(directory) -> None:
    path, fd = directory
    elsewhere = path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    os.chmod(elsewhere, 0o755)
    (path / "sub").symlink_to(elsewhere)
    with pytest.raises(OSError) as caught:
        safeio.make_directory("sub", 0o2770, dir_fd=fd)
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert stat.S_IMODE(os.stat(elsewhere).st_mode) == 0o755
    (path / "existing").mkdir()
    os.chmod(path / "existing", 0o751)
    sub, created = safeio.make_directory("existing", 0o700, dir_fd=fd)
    os.close(sub)
    assert not created and stat.S_IMODE(os.stat(path / "existing").st_mode) == 0o751
    sub, created = safeio.make_directory("mine", 0o2770, dir_fd=fd)
    os.close(sub)
    assert created and stat.S_IMODE(os.stat(path / "mine").st_mode) == 0o2770


def test_read_small_is_bounded(directory) -> None:
    path, fd = directory
    (path / "big").write_bytes(b"x" * 5000)
    with pytest.raises(OSError) as caught:
        safeio.read_small("big", 4096, dir_fd=fd)
    assert caught.value.errno == errno.EFBIG
    (path / "small").write_bytes(b"abc")
    assert safeio.read_small("small", 4096, dir_fd=fd) == b"abc"


def test_markers_classify_what_gcfs_made_and_nothing_else(tmp_path: Path) -> None:
    assert marker.classify(tmp_path / "none") is marker.Kind.MISSING
    (tmp_path / "file").write_text("x")
    assert marker.classify(tmp_path / "file") is marker.Kind.NOT_DIRECTORY
    empty = tmp_path / "empty"
    empty.mkdir()
    assert marker.classify(empty) is marker.Kind.EMPTY
    for kind, expected in (
        (marker.BLOCK_CACHE, marker.Kind.BLOCK_CACHE),
        (marker.SNAPSHOT, marker.Kind.SNAPSHOT),
    ):
        d = tmp_path / kind
        d.mkdir()
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            marker.write(dfd, kind, 0o640)
            with pytest.raises(FileExistsError):
                marker.write(dfd, kind, 0o640)
        finally:
            os.close(dfd)
        assert marker.classify(d) is expected
        assert stat.S_IMODE(os.stat(d / marker.MARKER).st_mode) == 0o640
    other = tmp_path / "other-version"
    other.mkdir()
    (other / marker.MARKER).write_text(json.dumps({"gcfs": "block-cache", "format": 99}))
    assert marker.classify(other) is marker.Kind.OTHER_VERSION
    old = tmp_path / "old-cache"
    (old / "store" / "ab").mkdir(parents=True)
    assert marker.classify(old) is marker.Kind.OLD_BLOCK_CACHE
    (old / "blocks").mkdir()
    assert marker.classify(old) is marker.Kind.FOREIGN
    snap = tmp_path / "old-snapshot"
    snap.mkdir()
    (snap / "tree.json").write_text(json.dumps({"format": "gcfs-snapshot/1"}, indent=1))
    assert marker.classify(snap) is marker.Kind.OLD_SNAPSHOT
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "tree.json").write_text('{"a": 1}')
    assert marker.classify(thesis) is marker.Kind.FOREIGN
    linked = tmp_path / "linked-marker"
    linked.mkdir()
    (linked / marker.MARKER).symlink_to(tmp_path / "block-cache" / marker.MARKER)
    assert marker.classify(linked) is marker.Kind.FOREIGN


def test_single_refuses_a_planted_hard_link(directory) -> None:
    path, fd = directory
    target = path / "target"
    target.write_bytes(b"precious")
    os.link(target, path / "linked")
    with pytest.raises(safeio.NotRegular):
        safeio.open_regular("linked", os.O_WRONLY, dir_fd=fd, single=True)
    with pytest.raises(safeio.NotRegular):
        safeio.open_or_create("linked", os.O_WRONLY, 0o600, dir_fd=fd, single=True)
    plain = safeio.open_regular("linked", os.O_RDONLY, dir_fd=fd)  # without `single`: fine
    os.close(plain)
    assert target.read_bytes() == b"precious"


def test_ensure_marks_once_and_refuses_another_kind(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert marker.ensure(fd, marker.BLOCK_CACHE, 0o600) is True
        assert marker.ensure(fd, marker.BLOCK_CACHE, 0o600) is False
        with pytest.raises(ValueError):
            marker.ensure(fd, marker.SNAPSHOT, 0o600)
    finally:
        os.close(fd)
