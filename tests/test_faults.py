"""Never down, never wrong, never leaking: the mount under faults, revoked tokens, crashes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gcfs.fakegc import DEMO_TOKEN, FakeGC
from tests.conftest import Mount, gcfs_command, poll

NEW_TOKEN = "f" * 64


def test_revoked_token_gives_eacces_then_a_new_token_is_picked_up(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, token_file: Path
) -> None:
    """A token revoked while mounted: EACCES, a log line and a note in the root README; a
    new token written to the token file works without a remount."""
    mount = mount_gcfs("--ttl", "0.5")
    os.listdir(mount.path / "archives")
    demo = world.users_by_token.pop(DEMO_TOKEN)  # revoked on the server

    def refused() -> bool:
        try:
            os.listdir(mount.path / "algorithms")
        except PermissionError:
            return True
        return False

    poll(refused, 15, "EACCES once the listing expired")
    assert "rejects the API token" in (mount.path / "README.md").read_text()
    assert "rejected the API token" in mount.log_text()

    world.users_by_token[NEW_TOKEN] = demo
    token_file.write_text(f"Bearer {NEW_TOKEN}\n")

    def accepted() -> bool:
        try:
            return bool(os.listdir(mount.path / "algorithms"))
        except PermissionError:
            return False

    poll(accepted, 15, "the new token to be used")
    assert "rejects the API token" not in (mount.path / "README.md").read_text()
    assert NEW_TOKEN not in mount.log_text()
    mount.allowed_errors.append("rejected the API token")


def test_stale_mount_is_cleaned_up_by_the_next_mount(
    fake: FakeGC, token_file: Path, tmp_path: Path
) -> None:
    """A daemon killed with SIGKILL leaves "Transport endpoint is not connected"; the next
    `gcfs mount` on that directory unmounts the remains and mounts again."""
    mountpoint = tmp_path / "gc"
    mountpoint.mkdir()
    args = ["mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(token_file)]
    process = subprocess.Popen(
        gcfs_command(*args, "--foreground"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll(lambda: os.path.ismount(mountpoint), 20, "the first mount")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        with pytest.raises(OSError) as info:
            os.listdir(mountpoint)
        assert info.value.errno == errno.ENOTCONN
        result = subprocess.run(
            gcfs_command(*args), capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "archives" in os.listdir(mountpoint)
        assert subprocess.run(gcfs_command("umount", str(mountpoint)), check=False).returncode == 0
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def test_the_token_is_nowhere(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    """After a full walk with DEBUG logging: the token is in no file of the mount, no log
    line, no file of the cache directory, and not in the daemon's arguments or environment."""
    cache = tmp_path / "cache"
    mount = mount_gcfs("--cache-dir", str(cache))
    token = DEMO_TOKEN.encode()
    read = 0
    for directory, _, files in os.walk(mount.path):
        for name in files:
            path = Path(directory) / name
            if path.stat().st_size <= 8 * 2**20:
                assert token not in path.read_bytes(), path
                read += 1
    assert read > 50
    for directory, _, files in os.walk(cache):
        for name in files:
            assert token not in (Path(directory) / name).read_bytes()
    assert mount.process is not None
    proc = Path(f"/proc/{mount.process.pid}")
    assert token not in (proc / "cmdline").read_bytes()
    assert token not in (proc / "environ").read_bytes()
    assert DEMO_TOKEN not in mount.log_text()
    assert "DEBUG" in mount.log_text()  # the log was as talkative as it gets
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700)
    for directory, _, files in os.walk(cache):
        for name in files:
            assert (Path(directory) / name).stat().st_mode & 0o077 == 0
