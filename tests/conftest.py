"""Fixtures: the fake Grand Challenge on 127.0.0.1, and real gcfs mounts in a subprocess.

The fake runs in a thread of the test process, so tests read its request counters directly.
The daemon runs as `python -m gcfs mount --foreground` in a subprocess (a FUSE server must
never share a process with its callers) and is driven with plain os/open/subprocess calls.
Every mount is unmounted at teardown, also when the test failed, and the teardown fails the
test if the daemon logged an unexpected error or traceback, or the token anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gcfs.fakegc import DEMO_TOKEN, FakeGC, demo_world

MOUNT_DEADLINE = 20.0  # seconds for a daemon to mount; it needs one request and pyfuse3.init


def fuse_available() -> str | None:
    """Why real mounts cannot run here, or None when they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (load the fuse kernel module)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Real mounts are the core of the suite: without FUSE, fail loudly instead of skipping.
    reason = fuse_available()
    if reason is not None:
        raise pytest.UsageError(f"gcfs tests need FUSE: {reason}")


def poll(condition: Callable[[], bool], deadline: float, what: str) -> None:
    """Wait for `condition` with a deadline; the assertion says what did not happen."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        time.sleep(0.01)


def gcfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gcfs", *args]


def run_gcfs(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`gcfs ARGS...` as a user runs it (no terminal on stdin), its output captured."""
    return subprocess.run(
        gcfs_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )


@dataclass
class Mount:
    path: Path
    process: subprocess.Popen[bytes] | None
    log_path: Path
    allowed_errors: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def unmount(self) -> None:
        if os.path.ismount(self.path) or _is_stale(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _is_stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True
    return False


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pid, log and socket files of the daemons a test starts stay in its directory..."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    # ... and so does the default block cache: no test reads another test's blocks.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests talk to 127.0.0.1 directly, whatever proxy the machine running them sets (the
    daemons inherit this environment; the proxy tests pass their proxies explicitly)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def world():  # type: ignore[no-untyped-def]
    return demo_world()


@pytest.fixture
def fake(world) -> Iterator[FakeGC]:  # type: ignore[no-untyped-def]
    with FakeGC(world) as server:
        yield server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"Bearer {DEMO_TOKEN}\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def start_mount(command: list[str], path: Path, log_path: Path, mounts: list[Mount]) -> Mount:
    """Run a foreground gcfs daemon (`command`) and wait until `path` is mounted."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    mount = Mount(path, process, log_path)
    mounts.append(mount)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gcfs exited with {process.returncode}:\n{mount.log_text()}")
        return os.path.ismount(path)

    poll(ready, MOUNT_DEADLINE, f"the mount on {path}")
    return mount


def check_logs(mounts: list[Mount]) -> None:
    """Unmount, then fail the test if a daemon logged an error, a traceback or the token."""
    failures = []
    for mount in mounts:
        mount.unmount()
        text = mount.log_text()
        if DEMO_TOKEN in text:
            failures.append(f"{mount.log_path}: the token appears in the daemon log")
        for line in text.splitlines():
            bad = " ERROR " in line or "Traceback" in line or "CRITICAL" in line
            if bad and not any(allowed in line for allowed in mount.allowed_errors):
                failures.append(f"{mount.log_path}: {line}")
    if failures:
        pytest.fail("daemon log problems:\n" + "\n".join(failures))


@pytest.fixture
def mount_gcfs(fake: FakeGC, token_file: Path, tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Factory: mount gcfs on a fresh directory against `fake`, in the foreground."""
    mounts: list[Mount] = []

    def start(*extra: str, token: Path | None = None) -> Mount:
        index = len(mounts)
        path = tmp_path / f"mnt{index}"
        path.mkdir()
        args = [
            "mount",
            str(path),
            "--foreground",
            "--base-url",
            fake.base_url,
            "--token-file",
            str(token or token_file),
            "--log-level",
            "DEBUG",
            *extra,
        ]
        return start_mount(gcfs_command(*args), path, tmp_path / f"daemon{index}.log", mounts)

    yield start
    check_logs(mounts)


@pytest.fixture
def mount_offline(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Factory: mount a snapshot with `gcfs mount --offline DIR` in the foreground; with
    `isolated`, inside a network namespace without interfaces (`unshare -n`: not even
    loopback is up there, so any connect fails). The daemon's pid is the Popen's (unshare
    execs it)."""
    mounts: list[Mount] = []

    def start(snapshot: Path, *extra: str, isolated: bool = True) -> Mount:
        index = len(mounts)
        path = tmp_path / f"offline{index}"
        path.mkdir()
        args = ["mount", str(path), "--offline", str(snapshot), "--foreground"]
        command = gcfs_command(*args, "--log-level", "DEBUG", *extra)
        if isolated:
            command = ["unshare", "--net", *command]
        return start_mount(command, path, tmp_path / f"offline{index}.log", mounts)

    yield start
    check_logs(mounts)
