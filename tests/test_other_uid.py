"""Issue 14 #21: tests run as root, so `chmod 0500` "as another user's snapshot would be"
(test_cache_sharing.test_a_readonly_store_never_writes) had no effect: root writes anyway.
Here the reader really is another uid: a forked child drops root (setgroups, setgid,
setuid) before it opens the store, so the kernel, not the test, refuses every write."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

from gcfs.blockstore import BlockStore
from tests.test_blockstore import blocks as view
from tests.test_blockstore import damaged_store, read

BS = 4096
SIZE = 8 * BS
OTHER_UID = OTHER_GID = 54_321  # no passwd entry needed


def as_other_user(work: Callable[[], None]) -> tuple[int, str]:
    """Run `work()` in a child as OTHER_UID/OTHER_GID; (exit status, its error text)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        status = 0
        try:
            os.setgroups([])
            os.setgid(OTHER_GID)
            os.setuid(OTHER_UID)
            work()
        except BaseException:
            os.write(write_fd, traceback.format_exc().encode())
            status = 1
        os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        text = pipe.read().decode()
    _, code = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(code), text


def test_another_user_reads_a_snapshot_store_and_can_change_nothing(tmp_path: Path) -> None:
    """A store owned by root, readable by the reader's group only (0750/0640), read by
    another uid with a damaged block: every good block is served, the damaged one is a miss,
    and nothing on disk changes (no dropped record, no touch). The child first proves it
    really cannot write there."""
    os.chmod(tmp_path, 0o755)  # the path down to the store must be traversable
    for parent in tmp_path.parents:
        if parent.stat().st_mode & 0o001 == 0:
            os.chmod(parent, parent.stat().st_mode | 0o001)
    directory = tmp_path / "s"
    data = bytes((i * 7) % 251 for i in range(SIZE))
    data_path, index_path = damaged_store(directory, data)
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, 0, OTHER_GID)
        os.chmod(path, 0o750 if path.is_dir() else 0o640)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (data_path, index_path)}

    def reader() -> None:
        try:
            os.open(index_path, os.O_WRONLY | os.O_APPEND)
        except PermissionError:
            pass
        else:
            raise AssertionError("the other user can write the index: not a real test")
        store = BlockStore(directory, 1 << 30, block_size=BS, readonly=True)
        got = read(store, "k")
        assert sorted(got) == [0, 1, 2, 4, 5, 6, 7], sorted(got)
        assert all(got[i] == data[i * BS : (i + 1) * BS] for i in got)
        assert store.write("k", 3, view(data, 3, 1), SIZE) == 0
        assert store.statistics().damaged == 1

    status, error = as_other_user(reader)
    assert status == 0, error
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in before} == before
