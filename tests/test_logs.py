"""Issue 15, part 5: logs that do not pile up. A log file rotates at its size and keeps
logsetup.BACKUP_COUNT backups; every mount, as it starts, removes the logs and pid files of
mounts that ended over a week ago, and nothing else; `gcfs status` says where the log is."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gcfs import logsetup, runtime
from gcfs.fakegc import DEMO_TOKEN, FakeGC
from tests.conftest import Mount, poll, run_gcfs

# Small enough that walking the demo tree at DEBUG (one line per request, ~117 requests for a
# cold walk) fills several files; large enough for any one line.
ROTATE_BYTES = 2048
WEEK = 7 * 24 * 3600
STATUS_LOG = "log:          "


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gc"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        run_gcfs("umount", str(path))
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


def mount_in_background(
    fake: FakeGC, token_file: Path, mountpoint: Path, *extra: str, env: dict[str, str] | None = None
) -> None:
    result = run_gcfs(
        "mount",
        str(mountpoint),
        "--base-url",
        fake.base_url,
        "--token-file",
        str(token_file),
        *extra,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mountpoint)


def status_log_line(mountpoint: Path) -> str:
    result = run_gcfs("status", str(mountpoint))
    assert result.returncode == 0, result.stderr
    # A line of the "Server" section, indented under its heading.
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  log:")]
    assert len(lines) == 1, result.stdout
    return lines[0]


def walk(root: Path) -> int:
    """Look at everything under `root` (listings and attributes: requests); entries seen."""
    seen = 0
    for _, directories, files in os.walk(root):
        seen += len(directories) + len(files)
    return seen


@pytest.mark.parametrize("given", [False, True], ids=["default-log", "log-file"])
def test_a_background_log_rotates_at_its_size_and_keeps_three_backups(
    fake: FakeGC, token_file: Path, mountpoint: Path, tmp_path: Path, given: bool
) -> None:
    """At DEBUG the log passes the (test's) size several times: it is rotated into .1 .. .3,
    every file stays within the size and 0600, and a rotation past .3 drops the oldest instead
    of making a .4. The default log and a --log-file alike; `gcfs status` names the file."""
    env = {**os.environ, logsetup.TEST_ROTATE_ENV: str(ROTATE_BYTES)}
    extra = ["--log-level", "DEBUG"]
    log = runtime.default_log_file(mountpoint)
    if given:
        log = tmp_path / "my.log"
        extra += ["--log-file", str(log)]
    mount_in_background(fake, token_file, mountpoint, *extra, env=env)
    backup = [Path(f"{log}.{n}") for n in range(1, logsetup.BACKUP_COUNT + 2)]
    first_oldest: list[int] = []

    def rotated_past_the_last_backup() -> bool:
        """Makes requests until .3 exists, then until .3 is another file (one more rotation
        after all three backups were there)."""
        assert run_gcfs("refresh", "--recursive", str(mountpoint)).returncode == 0
        assert walk(mountpoint / "archives") > 0
        if not backup[2].exists():
            return False
        inode = backup[2].stat().st_ino
        if not first_oldest:
            first_oldest.append(inode)
        return inode != first_oldest[0]

    poll(rotated_past_the_last_backup, 120, "the log to rotate past its last backup")
    assert not backup[3].exists(), "a fourth backup: BACKUP_COUNT not kept"
    files = [log, *backup[:3]]
    for path in files:
        info = path.stat()
        assert info.st_size <= ROTATE_BYTES, (path, info.st_size)
        assert stat.S_IMODE(info.st_mode) == 0o600, (path, oct(info.st_mode))
        text = path.read_text(encoding="utf-8")
        assert " DEBUG gcfs" in text, path
        assert DEMO_TOKEN not in text and "Traceback" not in text, path
    assert sorted(p.name for p in log.parent.iterdir() if p.name.startswith(log.name)) == sorted(
        p.name for p in files
    )

    assert status_log_line(mountpoint) == f"{STATUS_LOG}{log}"
    as_json = run_gcfs("status", "--json", str(mountpoint))
    assert json.loads(as_json.stdout)["log_file"] == str(log)
    status_file = json.loads((mountpoint / ".gcfs" / "status.json").read_bytes())
    assert status_file["log_file"] == str(log)
    assert run_gcfs("umount", str(mountpoint)).returncode == 0


def test_status_of_a_foreground_mount_says_it_logs_to_stderr(
    mount_gcfs: Callable[..., Mount],
) -> None:
    mount = mount_gcfs()
    assert status_log_line(mount.path) == f"{STATUS_LOG}stderr (the journal under systemd)"
    status_file = json.loads((mount.path / ".gcfs" / "status.json").read_bytes())
    assert status_file["log_file"] is None
    # ... and nothing grows in the runtime directory meanwhile.
    assert not runtime.default_log_file(mount.path).exists()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write(path: Path, text: str, *, age: float) -> Path:
    path.write_text(text, encoding="utf-8")
    set_age(path, age)
    return path


def bound_socket(path: Path, *, age: float) -> Path:
    """A unix socket file at `path`, as a daemon killed with -9 leaves its control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    set_age(path, age)
    return path


def set_age(path: Path, age: float) -> None:
    then = time.time() - age
    os.utime(path, (then, then), follow_symlinks=False)


def test_a_mount_removes_the_stale_logs_and_pid_files_of_ended_mounts_and_nothing_else(
    fake: FakeGC,
    token_file: Path,
    mountpoint: Path,
    mount_gcfs: Callable[..., Mount],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """What a mount starting removes: the pid files, logs (with backups) and control sockets
    of mounts whose pid is gone (or now names a process that is not gcfs), untouched for over
    a week. What it keeps: fresh ones; those
    of a running daemon, however old; a symlink, a directory, a FIFO or a hard link with a
    gcfs name; a regular file named like a socket; and names gcfs does not make (a fourth
    backup, other suffixes, capitals, 15 digits)."""
    mount_in_background(fake, token_file, mountpoint)  # the live daemon
    run = runtime.runtime_dir()
    old = WEEK + 3600  # an hour past the week
    live_pid, live_log = runtime.pid_file(mountpoint), runtime.default_log_file(mountpoint)
    live_sock = runtime.control_socket(mountpoint)
    for path in (live_pid, live_log, live_sock):
        set_age(path, old)

    dead = dead_pid()
    bystander = subprocess.Popen(["sleep", "300"])
    request.addfinalizer(bystander.kill)
    k1, k2, k3 = "1" * 16, "2" * 16, "3" * 16
    stale = [
        write(run / f"{k1}.pid", f"{dead}\n/gone\n", age=old),
        write(run / f"{k1}.log", "x\n", age=old),
        write(run / f"{k1}.log.1", "x\n", age=old),
        write(run / f"{k1}.log.3", "x\n", age=old),
        write(run / f"{k2}.log", "x\n", age=old),  # ended cleanly: no pid file
        write(run / f"{k2}.log.2", "x\n", age=old),
        bound_socket(run / f"{k2}.sock", age=old),  # a killed daemon's control socket
        # A killed daemon whose pid went to another process of ours since (not gcfs).
        write(run / f"{'a' * 16}.pid", f"{bystander.pid}\n/gone\n", age=old),
        write(run / f"{'a' * 16}.log", "x\n", age=old),
    ]
    fresh = [
        write(run / f"{k3}.pid", f"{dead}\n/gone\n", age=60),
        write(run / f"{k3}.log", "x\n", age=WEEK - 3600),
    ]
    foreign = [
        write(run / f"{k1}.log.4", "x\n", age=old),
        write(run / f"{k1}.log.bak", "x\n", age=old),
        write(run / f"{k1}.sock", "x\n", age=old),  # not a socket
        write(run / "notes.log", "x\n", age=old),
        write(run / f"{'A' * 16}.log", "x\n", age=old),
        write(run / f"{'4' * 15}.log", "x\n", age=old),
        write(run / f"{k1}.pid.old", "x\n", age=old),
    ]
    # A symlink with a gcfs name, to a file elsewhere: neither is touched.
    target = write(tmp_path / "elsewhere.log", "keep me\n", age=old)
    link = run / f"{'5' * 16}.log"
    link.symlink_to(target)
    set_age(link, old)
    # A directory, a FIFO as the pid file (its key's log is then kept too), a hard link.
    directory = run / f"{'6' * 16}.log"
    directory.mkdir()
    set_age(directory, old)
    fifo = run / f"{'7' * 16}.pid"
    os.mkfifo(fifo)
    set_age(fifo, old)
    behind_fifo = write(run / f"{'7' * 16}.log", "x\n", age=old)
    linked = write(tmp_path / "linked.log", "x\n", age=old)
    hard = run / f"{'8' * 16}.log"
    os.link(linked, hard)
    set_age(hard, old)
    kept = [*fresh, *foreign, link, directory, fifo, behind_fifo, hard, live_pid, live_log]
    kept.append(live_sock)

    starting = mount_gcfs()  # a mount starting cleans up
    assert [p.name for p in stale if os.path.lexists(p)] == []
    assert [p.name for p in kept if not os.path.lexists(p)] == []
    assert link.is_symlink() and target.read_text() == "keep me\n"
    assert linked.exists() and hard.stat().st_nlink == 2
    assert f"removed {len(stale)} log, pid and socket files" in starting.log_text()
    # The live daemon still logs to the file it kept.
    assert run_gcfs("refresh", str(mountpoint / "archives")).returncode == 0
    poll(lambda: "refresh archives" in live_log.read_text(), 10, "the live daemon's log line")


def test_a_runtime_directory_that_is_a_link_is_not_cleaned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$XDG_RUNTIME_DIR/gcfs (or /tmp/gcfs-UID) replaced by a symlink to some directory of
    the user's: nothing is removed in it, however gcfs-like and old its files."""
    base = tmp_path / "xdg"
    base.mkdir(mode=0o700)
    elsewhere = tmp_path / "somebody-elses-idea"
    elsewhere.mkdir(mode=0o700)
    (base / "gcfs").symlink_to(elsewhere)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    victim = write(elsewhere / f"{'9' * 16}.log", "x\n", age=WEEK + 3600)
    assert runtime.remove_stale() == []
    assert victim.exists()
    # The same file in a real runtime directory is removed: the link is what kept it.
    (base / "gcfs").unlink()
    real = runtime.runtime_dir()
    moved = write(real / victim.name, "x\n", age=WEEK + 3600)
    assert runtime.remove_stale() == [moved.name]
    assert not moved.exists()
