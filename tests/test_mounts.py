"""`gcfs mounts`, `gcfs status` as people read it, the daemon's last log line, and the demo's
port and fixed job filters (issue 16)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gcfs import cli, mounts, runtime
from gcfs.control import format_duration
from gcfs.fakegc import DEMO_TOKEN, FakeGC
from gcfs.units import format_size
from tests.conftest import Mount, poll, run_gcfs

JOB_INPUT = "cases/images/?job_input"


def gcfs_ok(*args: str) -> str:
    result = run_gcfs(*args, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def mounts_json() -> dict[str, dict[str, Any]]:
    """`gcfs mounts --json` by mount point. Other gcfs mounts of this user (other tests, other
    checkouts) may be listed too: tests look only at their own."""
    return {m["mountpoint"]: m for m in json.loads(gcfs_ok("mounts", "--json"))}


def block_of(text: str, mountpoint: Path) -> list[str]:
    """The lines `gcfs mounts` prints for one mount: its header and the indented lines after."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{mountpoint}  ("))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def snapshot_of(online: Mount, tmp_path: Path) -> Path:
    snapshot = tmp_path / "snapshot"
    taken = run_gcfs(
        "snapshot", str(online.path / "archives" / "lidc-lung-ct"), "--to", str(snapshot)
    )
    assert taken.returncode == 0, taken.stderr
    return snapshot


# -- gcfs mounts ----------------------------------------------------------------------------


def test_mounts_lists_an_online_and_an_offline_mount_with_their_logs(
    mount_gcfs: Callable[..., Mount],
    mount_offline: Callable[..., Mount],
    fake: FakeGC,
    tmp_path: Path,
) -> None:
    """Both mounts with server (the snapshot for the offline one), user, pid, uptime and log;
    a daemon that is stopped (SIGSTOP: it cannot answer) is listed as not answering, within
    the bound, and the other mount is still listed in full."""
    online_log, offline_log = tmp_path / "online.log", tmp_path / "offline.log"
    online = mount_gcfs("--log-file", str(online_log))
    snapshot = snapshot_of(online, tmp_path)
    offline = mount_offline(snapshot, "--log-file", str(offline_log))
    assert online.process is not None and offline.process is not None

    found = mounts_json()
    assert found[str(online.path)] == {
        "mountpoint": str(online.path),
        "state": "answering",
        "server": fake.base_url,
        "offline": None,
        "user": "demo",
        "pid": online.process.pid,
        "uptime_seconds": found[str(online.path)]["uptime_seconds"],
        "log_file": str(online_log),
        "problem": None,
    }
    assert 0 <= found[str(online.path)]["uptime_seconds"] < 120
    shown = found[str(offline.path)]
    assert (shown["state"], shown["offline"], shown["server"]) == (
        "answering",
        str(snapshot),
        fake.base_url,
    )
    assert (shown["user"], shown["pid"], shown["log_file"]) == (
        "demo",
        offline.process.pid,  # unshare execs the daemon: the same pid
        str(offline_log),
    )
    assert "mounted the snapshot" in offline_log.read_text()

    text = gcfs_ok("mounts")
    assert block_of(text, online.path)[1:] == [
        f"  server:    {fake.base_url}",
        "  user:      demo",
        f"  pid:       {online.process.pid}",
        block_of(text, online.path)[4],
        f"  log:       {online_log}",
    ]
    assert block_of(text, online.path)[4].startswith("  uptime:    ")
    offline_block = block_of(text, offline.path)
    assert offline_block[0] == f"{offline.path}  (answering)"
    assert f"  snapshot:  {snapshot} (offline; taken of {fake.base_url})" in offline_block
    assert f"  log:       {offline_log}" in offline_block

    # From another runtime directory (another XDG_RUNTIME_DIR) the pid files are not found:
    # the mounts are still listed, as unknown, with where to look.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    other = run_gcfs("mounts", "--json", env={**os.environ, "XDG_RUNTIME_DIR": str(elsewhere)})
    unknown = {m["mountpoint"]: m for m in json.loads(other.stdout)}
    for mount in (online, offline):
        assert unknown[str(mount.path)]["state"] == "unknown"
        assert "XDG_RUNTIME_DIR" in unknown[str(mount.path)]["problem"]

    os.kill(online.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        stuck = mounts_json()
        took = time.monotonic() - started
    finally:
        os.kill(online.process.pid, signal.SIGCONT)
    # The bound is per command, not per mount: the daemons are asked at the same time.
    assert took < mounts.ASK_TIMEOUT + 3.0, took
    assert stuck[str(online.path)]["state"] == "not answering"
    assert stuck[str(online.path)]["log_file"] == str(online_log)  # from the pid file
    assert stuck[str(online.path)]["pid"] == online.process.pid
    assert "gcfs umount --lazy" in stuck[str(online.path)]["problem"]
    assert stuck[str(offline.path)]["state"] == "answering"
    assert mounts_json()[str(online.path)]["state"] == "answering"  # back once continued


def test_a_mount_whose_daemon_was_killed_is_listed_with_the_fix(
    mount_gcfs: Callable[..., Mount],
) -> None:
    mount = mount_gcfs()
    assert mount.process is not None
    mount.process.kill()
    mount.process.wait(timeout=10)
    shown = mounts_json()[str(mount.path)]
    assert shown["state"] == "no daemon"
    assert shown["log_file"] is None  # a foreground mount logs to stderr
    assert f"gcfs umount {mount.path}" in shown["problem"]
    text = block_of(gcfs_ok("mounts"), mount.path)
    assert text[0] == f"{mount.path}  (no daemon)"
    assert "  log:       stderr (the journal under systemd)" in text


def test_a_killed_daemons_pid_given_to_another_process_is_never_signalled(
    mount_gcfs: Callable[..., Mount],
) -> None:
    """A daemon killed with -9 leaves its pid file; the kernel may give its pid to another
    process of the user since (here: that file names a `sleep` of ours). `gcfs mounts` says
    the daemon is gone, and `gcfs umount` unmounts at once without waiting for that process
    or sending it SIGTERM, which it did after waiting 10 s before."""
    mount = mount_gcfs()
    assert mount.process is not None
    mount.process.kill()
    mount.process.wait(timeout=10)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        pid_file = runtime.pid_file(mount.path)
        pid_file.write_text(f"{bystander.pid}\n{mount.path}\n\n", encoding="utf-8")
        shown = mounts_json()[str(mount.path)]
        assert shown["state"] == "no daemon", shown
        assert run_gcfs("umount", str(mount.path), timeout=60).returncode == 0
        assert not os.path.ismount(mount.path)
        assert bystander.poll() is None  # alive: neither waited for nor signalled
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def test_only_the_callers_gcfs_mounts_are_listed() -> None:
    """From mountinfo: type fuse.gcfs, and user_id (who mounted it) the caller's uid."""
    mountinfo = "\n".join(
        [
            "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
            "50 30 0:45 / /home/me/gc rw,nosuid,nodev - fuse.gcfs gcfs ro,user_id=1000,"
            "group_id=1000",
            "51 30 0:46 / /home/other/gc rw - fuse.gcfs gcfs ro,user_id=1001,group_id=1001",
            r"52 30 0:47 / /home/me/my\040gc rw - fuse.gcfs gcfs ro,user_id=1000,group_id=100",
            "53 30 0:48 / /home/me/sshfs rw - fuse.sshfs me@host: rw,user_id=1000,group_id=1000",
        ]
    )
    assert mounts.gcfs_mountpoints(mountinfo, 1000) == ["/home/me/gc", "/home/me/my gc"]
    assert mounts.gcfs_mountpoints(mountinfo, 1001) == ["/home/other/gc"]


# -- gcfs status ----------------------------------------------------------------------------


def status_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = line
            sections[current] = []
        else:
            assert current is not None, text
            sections[current].append(line)
    return sections


def test_status_reads_in_sections_with_sizes_and_says_what_routing_around_costs(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    """Headed sections, binary sizes in the text and exact bytes in JSON, the log, and a
    failing job image listing (the real server's 500) said to be routed around at a request
    per image, as many as the server saw. The daemon's last log line uses the same words."""
    log = tmp_path / "status.log"
    mount = mount_gcfs("--log-file", str(log))
    item = next((mount.path / "archives" / "lidc-lung-ct" / "items").iterdir())
    read = sum(len(f.read_bytes()) for f in item.rglob("*") if f.is_file())
    jobs = mount.path / "algorithms" / "corads-ai" / "jobs"
    for job in jobs.iterdir():
        os.listdir(job / "inputs")
    poll(
        lambda: (
            json.loads((mount.path / ".gcfs" / "status.json").read_bytes())["content"][
                "pending_writes"
            ]
            == 0
        ),
        30,
        "the block writes",
    )

    text = gcfs_ok("status", str(mount.path))
    exact = json.loads(gcfs_ok("status", "--json", str(mount.path)))
    sections = status_sections(text)
    assert list(sections) == ["Server", "Caches", "Traffic", "Problems"], text
    assert f"  log:          {log}" in sections["Server"]
    assert f"  server:       {fake.base_url}" in sections["Server"]
    assert exact["bytes_read"] >= read > 0  # reading .gcfs/status.json counts too
    assert isinstance(exact["block_cache"]["bytes"], int)
    size_line = f"  read:         {format_size(exact['bytes_read'])} to readers, "
    assert any(line.startswith(size_line) for line in sections["Traffic"]), text
    cache_line = (
        f"  block cache:  {format_size(exact['block_cache']['bytes'])} of 10.0 GiB in "
        f"{exact['block_cache']['directory']} (private)"
    )
    assert cache_line in sections["Caches"], text

    cost = exact["routed_around"][JOB_INPUT]
    assert cost["directories"] == len(os.listdir(jobs))
    assert cost["requests"] == fake.count("cases-images-detail") > 0
    assert exact["routing_around"] == [JOB_INPUT]
    problems = sections["Problems"]
    failing = next(i for i, line in enumerate(problems) if f"{JOB_INPUT}: HTTP 500" in line)
    routed = problems[failing + 1]
    assert "routed around" in routed and "a request per object" in routed, problems
    assert "instead of one listing per directory" in routed
    assert f"so far {cost['requests']} requests for {cost['directories']} directories" in routed
    assert any(line.startswith("  fallbacks:    ") for line in sections["Traffic"])

    mount.unmount()
    last = [line for line in log.read_text().splitlines() if "unmounted" in line]
    assert len(last) == 1, last
    assert "Statistics(" not in last[0] and "hits=" not in last[0]
    assert "hit rate" in last[0] and f"{format_size(exact['bytes_read'])} to readers" in last[0]


def test_status_problems_name_a_rejected_token(
    mount_gcfs: Callable[..., Mount], world: Any
) -> None:
    mount = mount_gcfs("--ttl", "0.3")
    before = status_sections(gcfs_ok("status", str(mount.path)))["Problems"]
    assert not any(line.startswith("  token:") for line in before), before
    world.users_by_token.pop(DEMO_TOKEN)  # revoked on the server

    def refused() -> bool:
        try:
            os.listdir(mount.path / "algorithms")
        except PermissionError:
            return True
        return False

    poll(refused, 15, "EACCES once the listing expired")
    problems = status_sections(gcfs_ok("status", str(mount.path)))["Problems"]
    assert any(line.startswith("  token:        rejected by the server") for line in problems)
    mount.allowed_errors.append("rejected the API token")


def test_sizes_and_durations_read_as_people_write_them() -> None:
    assert [format_size(n) for n in (0, 512, 1023, 1024, 1536, 10 * 2**30)] == [
        "0 B",
        "512 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "10.0 GiB",
    ]
    assert format_size(int(1.2 * 2**30)) == "1.2 GiB"
    assert format_size(2**20 - 1) == "1.0 MiB"  # never "1024.0 KiB"
    assert format_size(3 * 2**60) == "3.0 EiB"
    assert [format_duration(s) for s in (0, 59.9, 192, 7500, 3 * 86400 + 4 * 3600)] == [
        "0 s",
        "59 s",
        "3 min 12 s",
        "2 h 05 min",
        "3 d 4 h",
    ]


# -- gcfs demo ------------------------------------------------------------------------------


@pytest.fixture
def demo_point(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "demo"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_server(mountpoint: Path) -> str:
    result = run_gcfs("demo", str(mountpoint))
    assert result.returncode == 0, result.stderr
    server = json.loads(gcfs_ok("status", "--json", str(mountpoint)))["server"]
    return str(server)


def test_the_demo_keeps_its_port_across_runs_and_takes_another_when_busy(
    demo_point: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two demos in a row on the user's port (here a test's, so that a demo someone runs
    meanwhile cannot interfere); with that port taken, the demo still starts, elsewhere,
    and says so."""
    port = free_port()
    monkeypatch.setenv(cli.DEMO_PORT_ENV, str(port))
    assert demo_server(demo_point) == f"http://127.0.0.1:{port}"
    assert run_gcfs("umount", str(demo_point)).returncode == 0
    assert demo_server(demo_point) == f"http://127.0.0.1:{port}"
    assert run_gcfs("umount", str(demo_point)).returncode == 0

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = run_gcfs("demo", str(demo_point))
        assert result.returncode == 0, result.stderr
        server = json.loads(gcfs_ok("status", "--json", str(demo_point)))["server"]
        assert server.startswith("http://127.0.0.1:") and server != f"http://127.0.0.1:{port}"
        assert f"not on this user's port {port} (busy)" in result.stderr
        assert server in result.stderr
        assert sorted(os.listdir(demo_point / "archives"))
        assert run_gcfs("umount", str(demo_point)).returncode == 0


def test_the_demo_port_is_derived_from_the_uid_below_the_ephemeral_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(cli.DEMO_PORT_ENV, raising=False)
    assert cli.demo_port(1000) == 25000
    assert cli.demo_port(1001) == 25001
    assert cli.demo_port(0) == cli.demo_port(4000) == 24000
    assert cli.demo_port() == 24000 + os.getuid() % 4000
    assert all(24000 <= cli.demo_port(uid) < 32768 for uid in range(0, 70000, 7))


def test_a_fresh_demo_lists_job_inputs_with_no_failing_endpoint(
    demo_point: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo serves the job image filters as fixed: no "failing:" after a job's inputs."""
    monkeypatch.setenv(cli.DEMO_PORT_ENV, str(free_port()))
    demo_server(demo_point)
    try:
        jobs = demo_point / "algorithms" / "corads-ai" / "jobs"
        job = sorted(jobs.iterdir())[0]
        assert os.listdir(job / "inputs")
        status = json.loads(gcfs_ok("status", "--json", str(demo_point)))
        assert status["failing_endpoints"] == {}
        assert status["fallbacks"] == 0 and status["routed_around"] == {}
        assert status["requests"]["cases/images/"] == {"200": 1}
        text = gcfs_ok("status", str(demo_point))
        assert "failing:" not in text and "HTTP 500" not in text
    finally:
        assert run_gcfs("umount", str(demo_point)).returncode == 0
