"""Never down, never wrong, never leaking: the mount under faults, revoked tokens, crashes."""

from __future__ import annotations

import errno
import os
import random
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
    """After a full walk with DEBUG logging: the token is in no file or extended attribute of
    the mount, no log line, no file of the cache directory, and not in the daemon's arguments
    or environment."""
    cache = tmp_path / "cache"
    mount = mount_gcfs("--cache-dir", str(cache))
    token = DEMO_TOKEN.encode()
    read = 0
    for directory, dirs, files in os.walk(mount.path):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            for attribute in os.listxattr(path, follow_symlinks=False):
                assert token not in os.getxattr(path, attribute, follow_symlinks=False), path
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


GARBAGE: list[Any] = [
    None,
    0,
    -1,
    True,
    3.5,
    "",
    "x" * 100_000,
    "../../etc",
    "a/b\x00c",
    ".",
    "..",
    [],
    [None, {"a": 1}],
    {},
    {"pk": None},
    "not-a-url",
    "http://[",
    "http://127.0.0.1:1/media/x",
]


def mangle(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """A copy of `value` with keys dropped, values replaced by garbage, kinds renamed."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            roll = rng.random()
            if roll < 0.05:
                continue  # a missing field
            if roll < 0.12:
                out[key] = rng.choice(GARBAGE)  # a wrong type, a hostile name, a huge string
            else:
                out[key] = mangle(rng, item, depth + 1)
        if rng.random() < 0.05:
            out["an_unknown_new_field"] = {"socket": "of the future"}
        return out
    if isinstance(value, list):
        return [mangle(rng, item, depth + 1) for item in value]
    if isinstance(value, str) and value in ("Image", "File", "Value") and rng.random() < 0.2:
        return "Hologram"  # an unknown kind
    return value


@pytest.mark.parametrize(
    "seed", [int(s) for s in os.environ.get("GCFS_MANGLE_SEEDS", "1,2,3").split(",")]
)
def test_malformed_json_never_takes_the_mount_down(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path, seed: int
) -> None:
    """The server answers with mangled JSON (missing fields, wrong types, nulls, huge and
    hostile strings, unknown kinds): a full walk and read of the tree gives data or an errno
    for each object, every name is safe, and the daemon logs no bug (the fixture fails the
    test on an ERROR or traceback in its log)."""
    rng = random.Random(seed)
    fake.mutate = lambda endpoint, body: body if endpoint == "profiles-self" else mangle(rng, body)
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"), "--timeout", "10")
    seen = errors = 0
    pending = [mount.path]
    while pending and seen < 3000:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            assert exc.errno in (errno.EIO, errno.ENOENT, errno.EACCES), exc
            errors += 1
            continue
        for entry in entries:
            seen += 1
            name = entry.name
            assert name not in (".", "..", "") and "/" not in name and "\0" not in name
            assert len(os.fsencode(name)) <= 255
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and entry.stat().st_size < 2**20:
                    Path(entry.path).read_bytes()
            except OSError as exc:
                assert exc.errno in (errno.EIO, errno.ENOENT, errno.EACCES), exc
                errors += 1
    assert seen > 20  # the walk got past the top levels (some listings are garbage)
    assert mount.process is not None and mount.process.poll() is None  # still serving
    fake.mutate = None
    assert "archives" in os.listdir(mount.path)
