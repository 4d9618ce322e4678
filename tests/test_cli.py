"""The `gcfs` command as a user runs it: background mount, umount, demo, and clear failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from gcfs import runtime
from gcfs.fakegc import DEMO_TOKEN, FakeGC, demo_world
from tests.conftest import gcfs_command, poll


def run_gcfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gcfs_command(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def mountpoint(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "gc"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gcfs: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_background_mount_then_umount(fake: FakeGC, token_file: Path, mountpoint: Path) -> None:
    """`gcfs mount` returns once the mount answers; `gcfs umount` unmounts and stops it."""
    result = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(token_file)
    )
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mountpoint)
    assert "archives" in os.listdir(mountpoint)
    pid = runtime.read_pid(mountpoint)
    assert pid is not None and runtime.is_alive(pid)
    # The token is not among the daemon's arguments.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert DEMO_TOKEN.encode() not in cmdline
    result = run_gcfs("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)
    assert not runtime.is_alive(pid)


def test_token_from_environment(fake: FakeGC, mountpoint: Path) -> None:
    """Without --token-file, GRAND_CHALLENGE_AUTHORIZATION is used, as gcapi does."""
    env = {**os.environ, "GRAND_CHALLENGE_AUTHORIZATION": f"Bearer {DEMO_TOKEN}"}
    result = run_gcfs("mount", str(mountpoint), "--base-url", fake.base_url, env=env)
    assert result.returncode == 0, result.stderr
    assert "Signed in as: demo" in (mountpoint / "README.md").read_text()
    assert run_gcfs("umount", str(mountpoint)).returncode == 0


def test_bad_token_fails_clearly(fake: FakeGC, tmp_path: Path, mountpoint: Path) -> None:
    """A rejected token ends the command with one line, and nothing stays mounted."""
    bad = tmp_path / "bad-token"
    bad.write_text("0" * 64)
    bad.chmod(0o600)
    result = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(bad)
    )
    assert_one_clear_line(result, "rejected the API token", "settings/api-tokens")
    assert "0" * 64 not in result.stderr
    assert not os.path.ismount(mountpoint)


def test_bad_token_fails_clearly_in_foreground(
    fake: FakeGC, tmp_path: Path, mountpoint: Path
) -> None:
    bad = tmp_path / "bad-token"
    bad.write_text("Bearer " + "1" * 64)
    bad.chmod(0o600)
    result = run_gcfs(
        "mount",
        str(mountpoint),
        "--foreground",
        "--base-url",
        fake.base_url,
        "--token-file",
        str(bad),
    )
    assert_one_clear_line(result, "rejected the API token")
    assert not os.path.ismount(mountpoint)


def test_unreachable_server_fails_clearly(token_file: Path, mountpoint: Path) -> None:
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_gcfs(
        "mount",
        str(mountpoint),
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--token-file",
        str(token_file),
    )
    assert_one_clear_line(result, "cannot reach")
    assert not os.path.ismount(mountpoint)


def test_bad_mountpoint_fails_clearly(fake: FakeGC, token_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = run_gcfs(
        "mount", str(missing), "--base-url", fake.base_url, "--token-file", str(token_file)
    )
    assert_one_clear_line(result, "not a directory", "mkdir -p")


def test_readable_token_file_is_refused(fake: FakeGC, token_file: Path, mountpoint: Path) -> None:
    token_file.chmod(0o644)
    result = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(token_file)
    )
    assert_one_clear_line(result, f"chmod 600 {token_file}")
    assert not os.path.ismount(mountpoint)


def test_plain_http_elsewhere_is_refused(token_file: Path, mountpoint: Path) -> None:
    result = run_gcfs(
        "mount",
        str(mountpoint),
        "--base-url",
        "http://grand-challenge.org",
        "--token-file",
        str(token_file),
    )
    assert_one_clear_line(result, "https")


def test_umount_of_something_not_mounted(mountpoint: Path) -> None:
    assert_one_clear_line(run_gcfs("umount", str(mountpoint)), "not mounted")


def test_demo_then_umount(mountpoint: Path) -> None:
    """The newcomer's first command: the demo server and the mount, stopped by umount."""
    result = run_gcfs("demo", str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        archives = os.listdir(mountpoint / "archives")
        assert archives
        obj = json.loads((mountpoint / "archives" / archives[0] / "archive.json").read_text())
        assert obj["url"].endswith(f"/archives/{archives[0]}/")
        hidden = next(a for a in demo_world().algorithms.values() if not a.visible_to("demo"))
        stub = mountpoint / "algorithms" / hidden.slug
        assert os.listdir(stub) == ["README.md"]
        assert "permission-requests/create/" in (stub / "README.md").read_text()
        assert os.listdir(mountpoint / "reader-studies")
        pid = runtime.read_pid(mountpoint)
        assert pid is not None
    finally:
        result = run_gcfs("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)
    poll(lambda: not runtime.is_alive(pid), 10, "the demo daemon to exit")
