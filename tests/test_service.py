"""gcfs as a service: systemd units, sd_notify, the journal, fstab helpers, allow_other.

Everything that needs a mount mounts for real against the fake server on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gcfs import logsetup, notify
from gcfs.fakegc import DEMO_TOKEN, FakeGC
from tests.conftest import MOUNT_DEADLINE, gcfs_command, poll

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"


def mounted(path: Path) -> str | None:
    """The /proc/mounts line of the mount on `path`, or None."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return line
    return None


def unmount_quietly(path: Path) -> None:
    if os.path.ismount(path) or mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gc"
    path.mkdir()
    yield path
    unmount_quietly(path)


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a gcfs subprocess: no config file, notify socket or journal."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "GRAND_CHALLENGE_AUTHORIZATION")
    }
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["PYTHONPATH"] = str(REPO)
    return env


def foreground(args: list[str], env: dict[str, str], stderr_path: Path) -> subprocess.Popen[bytes]:
    with open(stderr_path, "ab") as stderr:
        return subprocess.Popen(
            gcfs_command(*args), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env
        )


def stop(process: subprocess.Popen[bytes], path: Path) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    unmount_quietly(path)


# -- systemd units ------------------------------------------------------------------------


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    # Not a skip: .ci/install installs the Debian package systemd, which has the tool.
    assert tool is not None, "systemd-analyze is missing: apt-get install systemd (.ci/install)"
    return tool


def verify(*units: Path, user: bool, home: Path, runtime: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify`, which needs no running systemd, only a runtime directory."""
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    command = [systemd_analyze(), "verify", *(["--user"] if user else []), *map(str, units)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)


def fake_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The user unit as shipped, instantiated as gcfs@gc; verify also checks that ExecStart's
    %h/.local/bin/gcfs is executable, so HOME points at a home that has one."""
    home = tmp_path / "home"
    fake_executable(home / ".local" / "bin" / "gcfs")
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(UNITS / "gcfs@.service", units / "gcfs@.service")
    (units / "gcfs@gc.service").symlink_to("gcfs@.service")
    runtime = Path(os.environ["XDG_RUNTIME_DIR"])  # conftest's private runtime directory
    result = verify(
        units / "gcfs@gc.service", units / "gcfs@.service", user=True, home=home, runtime=runtime
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_system_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The system unit, instantiated for /srv/gc. Its ExecStart runs /usr/local/bin/gcfs, which
    this machine need not have; verify refuses a missing executable, so the copy verified runs
    a stand-in at another path. Every other line is verified as shipped."""
    text = (UNITS / "gcfs-system@.service").read_text()
    assert "ExecStart=/usr/local/bin/gcfs mount --foreground --allow-other" in text
    stand_in = fake_executable(tmp_path / "bin" / "gcfs")
    units = tmp_path / "units"
    units.mkdir()
    (units / "gcfs-system@.service").write_text(text.replace("/usr/local/bin/gcfs", str(stand_in)))
    (units / "gcfs-system@srv-gc.service").symlink_to("gcfs-system@.service")
    runtime = Path(os.environ["XDG_RUNTIME_DIR"])  # conftest's private runtime directory
    result = verify(
        units / "gcfs-system@srv-gc.service",
        units / "gcfs-system@.service",
        user=False,
        home=tmp_path,
        runtime=runtime,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_catches_what_systemd_252_does_not_know(tmp_path: Path) -> None:
    """The check above can fail: RestartSteps= (systemd 254) is flagged on this systemd, and a
    missing executable fails verify; so neither can hide in the shipped units."""
    home = tmp_path / "home"
    fake_executable(home / ".local" / "bin" / "gcfs")
    runtime = Path(os.environ["XDG_RUNTIME_DIR"])  # conftest's private runtime directory
    version = subprocess.run(
        [systemd_analyze(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/nonexistent/gcfs\nRestartSteps=5\n")
    result = verify(bad, user=True, home=home, runtime=runtime)
    assert result.returncode != 0
    assert "/nonexistent/gcfs" in result.stderr
    if int(version.split()[1]) < 254:
        assert "Unknown key 'RestartSteps'" in result.stderr
    for name in ("gcfs@.service", "gcfs-system@.service"):
        for line in (UNITS / name).read_text().splitlines():
            assert not line.startswith(("RestartSteps=", "RestartMaxDelaySec=")), line


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_user_unit_contents() -> None:
    unit = unit_settings("gcfs@.service")
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == [
        "%h/.local/bin/gcfs mount --foreground --token-file ${GCFS_TOKEN_FILE} %h/%I"
    ]
    assert unit["Environment"] == ["GCFS_TOKEN_FILE=%h/.gctoken"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartSec"] == ["10s"]
    assert unit["WantedBy"] == ["default.target"]
    assert "ExecStop" not in unit  # SIGTERM unmounts


def test_system_unit_contents() -> None:
    unit = unit_settings("gcfs-system@.service")
    assert unit["Type"] == ["notify"]
    assert unit["User"] == ["gcfs"]
    assert unit["LoadCredential"] == ["token:/etc/gcfs/token"]
    assert "--token-file ${CREDENTIALS_DIRECTORY}/token" in unit["ExecStart"][0]
    assert unit["ExecStart"][0].endswith(" %f")
    assert unit["Restart"] == ["on-failure"]
    assert unit["WantedBy"] == ["multi-user.target"]
    assert any("read_ahead_kb" in command for command in unit["ExecStartPost"])


# -- sd_notify ----------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield sock, str(path)


def receive(sock: socket.socket, deadline: float, what: str) -> set[str]:
    sock.settimeout(deadline)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        raise AssertionError(f"no notification within {deadline} s; expected {what}") from None
    return set(data.decode().split("\n"))


def test_ready_only_once_the_mount_answers_and_stopping_on_sigterm(
    fake: FakeGC,
    token_file: Path,
    mountpoint: Path,
    notify_socket: tuple[socket.socket, str],
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    sock, address = notify_socket
    env = {**clean_env, "NOTIFY_SOCKET": address}
    args = ["mount", str(mountpoint), "--foreground", "--base-url", fake.base_url]
    process = foreground([*args, "--token-file", str(token_file)], env, tmp_path / "log")
    try:
        state = receive(sock, MOUNT_DEADLINE, "READY=1")
        # At the moment READY=1 arrives, the mount is there and answers.
        assert mounted(mountpoint) is not None
        assert "archives" in os.listdir(mountpoint)
        assert "READY=1" in state, state
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receive(sock, 10, "STOPPING=1")
        assert process.wait(timeout=10) == 0
        assert mounted(mountpoint) is None
    finally:
        stop(process, mountpoint)


def test_no_ready_before_a_failed_mount(
    fake: FakeGC,
    tmp_path: Path,
    mountpoint: Path,
    notify_socket: tuple[socket.socket, str],
    clean_env: dict[str, str],
) -> None:
    """A rejected token: the unit fails without ever having been READY."""
    sock, address = notify_socket
    bad = tmp_path / "bad-token"
    bad.write_text("1" * 64)
    bad.chmod(0o600)
    env = {**clean_env, "NOTIFY_SOCKET": address}
    args = ["mount", str(mountpoint), "--foreground", "--base-url", fake.base_url]
    process = foreground([*args, "--token-file", str(bad)], env, tmp_path / "log")
    try:
        assert process.wait(timeout=MOUNT_DEADLINE) == 1
    finally:
        stop(process, mountpoint)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_background_daemon_does_not_claim_ready(
    fake: FakeGC,
    token_file: Path,
    mountpoint: Path,
    notify_socket: tuple[socket.socket, str],
    clean_env: dict[str, str],
) -> None:
    """Only a --foreground daemon is a unit's main process; a forked one stays silent."""
    sock, address = notify_socket
    env = {**clean_env, "NOTIFY_SOCKET": address}
    args = ["mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(token_file)]
    result = subprocess.run(gcfs_command(*args), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    umount = subprocess.run(gcfs_command("umount", str(mountpoint)), env=env, check=False)
    assert umount.returncode == 0
    sock.setblocking(False)  # the daemon has exited: anything it sent is here by now
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"gcfs-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify.ready()
        sock.settimeout(5)
        assert "READY=1" in sock.recv(4096).decode().split("\n")


def test_notify_without_a_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert notify.notify("READY=1") is False  # a warning, never an exception


# -- the journal --------------------------------------------------------------------------

JOURNAL_LINE = re.compile(r"^<[0-7]>\S+: ")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def test_journal_priority_prefixes_under_systemd(
    fake: FakeGC,
    token_file: Path,
    mountpoint: Path,
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """With JOURNAL_STREAM naming stderr, every line carries its priority and no timestamp;
    DEBUG gives one <7> line per request."""
    log_path = tmp_path / "journal"
    log_path.touch()
    info = log_path.stat()
    env = {**clean_env, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    args = ["mount", str(mountpoint), "--foreground", "--base-url", fake.base_url]
    args += ["--token-file", str(token_file), "--log-level", "DEBUG"]
    process = foreground(args, env, log_path)
    try:
        poll(lambda: mounted(mountpoint) is not None, MOUNT_DEADLINE, "the mount")
        os.listdir(mountpoint / "archives")
    finally:
        stop(process, mountpoint)
    lines = log_path.read_text().splitlines()
    assert lines
    for line in lines:
        assert JOURNAL_LINE.match(line), line
        assert not TIMESTAMP.search(line), line
    assert any(line.startswith("<6>") and "mounted" in line for line in lines), lines
    debug = [line for line in lines if line.startswith("<7>")]
    assert len(debug) >= 2, lines  # whoami and the archives listing
    assert DEMO_TOKEN not in log_path.read_text()


def test_journal_stream_of_another_file_is_not_the_journal(
    fake: FakeGC,
    token_file: Path,
    mountpoint: Path,
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    other = tmp_path / "other"
    other.touch()
    info = other.stat()
    env = {**clean_env, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    log_path = tmp_path / "stderr"
    args = ["mount", str(mountpoint), "--foreground", "--base-url", fake.base_url]
    process = foreground([*args, "--token-file", str(token_file)], env, log_path)
    try:
        poll(lambda: mounted(mountpoint) is not None, MOUNT_DEADLINE, "the mount")
    finally:
        stop(process, mountpoint)
    lines = log_path.read_text().splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines), lines
    # SIGTERM came as soon as the mount appeared: it is handled (a clean unmount, exit 0), not
    # the default action that killed a daemon whose signal handler was not yet running.
    assert process.returncode == 0, lines
    assert any("unmounted" in line for line in lines), lines


def test_journal_formatter_priorities_and_tracebacks() -> None:
    formatter = logsetup.JournalFormatter()

    def line(level: int, message: str = "text") -> str:
        return formatter.format(logging.LogRecord("gcfs.x", level, __file__, 1, message, (), None))

    assert line(logging.DEBUG) == "<7>gcfs.x: text"
    assert line(logging.INFO) == "<6>gcfs.x: text"
    assert line(logging.WARNING) == "<4>gcfs.x: text"
    assert line(logging.ERROR) == "<3>gcfs.x: text"
    assert line(logging.CRITICAL) == "<2>gcfs.x: text"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "gcfs.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    lines = formatter.format(record).splitlines()
    assert len(lines) > 3
    assert all(text.startswith("<3>") for text in lines), lines
    assert lines[-1] == "<3>ValueError: boom"


# -- fstab: mount.fuse3 and mount.gcfs ----------------------------------------------------


@pytest.fixture
def helper_bin(tmp_path: Path) -> Path:
    """A PATH directory with `gcfs` and `mount.gcfs` of this checkout, as pip installs them."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for name, module in (("gcfs", "gcfs"), ("mount.gcfs", "gcfs.mount_helper")):
        script = directory / name
        script.write_text(f'#!/bin/sh\nexec {sys.executable} -m {module} "$@"\n')
        script.chmod(0o755)
    return directory


def helper_env(clean_env: dict[str, str], helper_bin: Path) -> dict[str, str]:
    return {**clean_env, "PATH": f"{helper_bin}:{clean_env['PATH']}"}


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL
    )


def test_fstab_fuse_gcfs_through_mount_fuse3(
    fake: FakeGC,
    token_file: Path,
    mountpoint: Path,
    clean_env: dict[str, str],
    helper_bin: Path,
) -> None:
    """`gcfs /x fuse.gcfs noauto,user,_netdev,token_file=...`: mount(8) runs mount.fuse3,
    which runs `gcfs gcfs /x -o <options>,dev,suid`; then `gcfs umount`."""
    mount_fuse3 = shutil.which("mount.fuse3") or "/sbin/mount.fuse3"
    env = helper_env(clean_env, helper_bin)
    options = (
        f"rw,noauto,user,_netdev,nofail,x-systemd.automount,comment=gcfs,"
        f"token_file={token_file},base_url={fake.base_url},ttl=5"
    )
    result = run([mount_fuse3, "gcfs", str(mountpoint), "-t", "fuse.gcfs", "-o", options], env)
    assert result.returncode == 0, result.stderr
    line = mounted(mountpoint)
    assert line is not None and " fuse.gcfs " in line, line
    assert "archives" in os.listdir(mountpoint)
    result = run(gcfs_command("umount", str(mountpoint)), env)
    assert result.returncode == 0, result.stderr
    assert mounted(mountpoint) is None


def test_fstab_gcfs_through_mount_gcfs(
    fake: FakeGC,
    token_file: Path,
    mountpoint: Path,
    clean_env: dict[str, str],
    helper_bin: Path,
) -> None:
    """Type `gcfs`: mount(8) runs `/sbin/mount.gcfs SPEC DIR [-sfnv] -o OPTIONS`; the site
    URL as SPEC sets the base URL."""
    env = helper_env(clean_env, helper_bin)
    options = f"rw,noauto,user,_netdev,token_file={token_file}"
    command = [str(helper_bin / "mount.gcfs"), fake.base_url, str(mountpoint), "-n", "-v"]
    result = run([*command, "-o", options], env)
    assert result.returncode == 0, result.stderr
    line = mounted(mountpoint)
    assert line is not None and line.startswith("gcfs ") and " fuse.gcfs " in line, line
    assert "Signed in as: demo" in (mountpoint / "README.md").read_text()
    result = run(gcfs_command("umount", str(mountpoint)), env)
    assert result.returncode == 0, result.stderr
    assert mounted(mountpoint) is None


def test_mount_gcfs_errors_and_fake_mode(
    fake: FakeGC,
    token_file: Path,
    mountpoint: Path,
    clean_env: dict[str, str],
    helper_bin: Path,
    tmp_path: Path,
) -> None:
    env = helper_env(clean_env, helper_bin)
    helper = str(helper_bin / "mount.gcfs")
    good = f"token_file={token_file},base_url={fake.base_url}"
    # An unknown option: status 1 (wrong usage), one line naming it, nothing mounted.
    result = run([helper, "gcfs", str(mountpoint), "-o", f"{good},tll=5"], env)
    assert result.returncode == 1
    assert result.stderr.startswith("mount.gcfs: unknown mount option 'tll=5'"), result.stderr
    assert mounted(mountpoint) is None
    # -s (sloppy) skips it.
    result = run([helper, "gcfs", str(mountpoint), "-s", "-f", "-o", f"{good},tll=5"], env)
    assert result.returncode == 0, result.stderr
    # -f (fake) checks everything but does not mount.
    result = run([helper, "gcfs", str(mountpoint), "-f", "-o", good], env)
    assert result.returncode == 0, result.stderr
    assert mounted(mountpoint) is None
    missing = tmp_path / "missing-token"
    result = run([helper, "gcfs", str(mountpoint), "-f", "-o", f"token_file={missing}"], env)
    # Named by its option, never by the value (issue 14 #2: a value may be a secret).
    assert result.returncode == 32, result.stderr
    assert "the token file given with --token-file" in result.stderr, result.stderr
    # A mount that fails (a rejected token): status 32, mount(8)'s "mount failure".
    bad = tmp_path / "bad-token"
    bad.write_text("2" * 64)
    bad.chmod(0o600)
    result = run(
        [helper, "gcfs", str(mountpoint), "-o", f"token_file={bad},base_url={fake.base_url}"], env
    )
    assert result.returncode == 32
    assert "rejected the API token" in result.stderr
    assert mounted(mountpoint) is None


def test_mistyped_subcommand_is_not_a_mount(mountpoint: Path, clean_env: dict[str, str]) -> None:
    """`gcfs SOURCE DIR -o ...` is a mount; `gcfs mout DIR` is a usage error."""
    result = run(gcfs_command("mout", str(mountpoint)), clean_env)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "mout" not in result.stderr
    assert mounted(mountpoint) is None


# -- allow_other --------------------------------------------------------------------------


def test_allow_other_reaches_the_mount(mount_gcfs) -> None:  # type: ignore[no-untyped-def]
    plain = mount_gcfs()
    shared = mount_gcfs("--allow-other")
    plain_line, shared_line = mounted(plain.path), mounted(shared.path)
    assert plain_line is not None and shared_line is not None
    assert "allow_other" not in plain_line.split()[3].split(",")
    assert "allow_other" in shared_line.split()[3].split(",")
    assert "archives" in os.listdir(shared.path)
