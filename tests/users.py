"""Other users for the hostile-member tests (tests/test_hostile.py): a group and two members,
processes run as them, daemons mounted as them, canary files outside the cache.

Tests run as root. The lab is the group `gcfslab` with members `gcfs-a` (whose daemon fills
a cache) and `gcfs-b` (who plants links, FIFOs and records in it); both are created once if
missing (no home directory, no login shell) and left in place: harmless, and the next run
reuses them.

A daemon as a member, on this machine: /dev/fuse is 0600 root and the host's /etc/fuse.conf
lacks `user_allow_other`, so a member's daemon runs in a private mount namespace (`unshare -m
--propagation private`) where a 0666 copy of the fuse device node is bound over /dev/fuse and a
fuse.conf with `user_allow_other` over /etc/fuse.conf (as on a cluster node where members mount
FUSE themselves); nothing leaks to the host. The daemon then drops to the member's uid and gid
(`setpriv --reuid --regid --clear-groups`) and mounts with fusermount3 like any user, with
`--allow-other` so that the tests (root) may read the mount, through
`/proc/<daemon pid>/root/<mountpoint>` (the mount exists only in its namespace).

Members cannot be assumed to read the checkout or its venv (a clone under /root or in a 0700
`mktemp -d`), so they run the system's python3.11 on a copy of gcfs and of the packages it
imports, made once per test run in a directory every user can read (`member_code`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import grp
import hashlib
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUP = "gcfslab"
MEMBER_A = "gcfs-a"
MEMBER_B = "gcfs-b"
WORKTREE = Path(__file__).resolve().parents[1]
MEMBER_PYTHON = "/usr/bin/python3.11"  # the venv's own interpreter may be unreadable to members
SITE_PACKAGES = sysconfig.get_path("purelib")
MOUNT_DEADLINE = 20.0
UNMOUNT_DEADLINE = 10.0
FUSE_DEVICE = os.stat("/dev/fuse").st_rdev if os.path.exists("/dev/fuse") else 0


def _requirements_closure(names: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` and, recursively, what they require (extras
    left out; a requirement that is not installed is one its marker excludes here)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = distribution.metadata["Name"].lower()
        if key in found:
            continue
        found[key] = distribution
        for requirement in distribution.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    return list(found.values())


@functools.cache
def member_code() -> Path:
    """gcfs (and these tests) and every package of site-packages they import, copied into a
    directory any user can read (0755/0644), removed when the test run ends: what members
    run."""
    import gcfs.cli
    import gcfs.daemon
    import gcfs.fuse_ops
    import gcfs.snapshot

    del gcfs
    target = Path(tempfile.mkdtemp(prefix="gcfs-member-code-", dir="/tmp"))
    atexit.register(shutil.rmtree, target, True)
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("gcfs", "tests"):  # tests: helpers that member scripts import
        shutil.copytree(WORKTREE / package, target / package, ignore=ignore)
    site = Path(SITE_PACKAGES)
    # What the test process imported (pytest for the helpers), and every distribution gcfs
    # needs at run time with its requirements: some are imported lazily (httpx's httpcore).
    tops = set()
    for module in list(sys.modules.values()):
        where = getattr(module, "__file__", None)
        if where and Path(where).is_relative_to(site):
            tops.add(Path(where).relative_to(site).parts[0])
    for distribution in _requirements_closure(["pyfuse3", "trio", "httpx", "cachetools"]):
        for name in distribution.files or []:
            top = Path(name).parts[0]
            if top not in ("..", "__pycache__") and not top.endswith(".dist-info"):
                tops.add(top)
    for top in sorted(tops):
        source = site / top
        if source.is_dir():
            shutil.copytree(source, target / top, ignore=ignore)
        else:
            shutil.copy2(source, target / top)
    for directory, _, names in os.walk(target):
        os.chmod(directory, 0o755)
        for name in names:
            os.chmod(os.path.join(directory, name), 0o644)
    return target


@dataclass(frozen=True)
class Lab:
    gid: int
    a: int  # uid of member A
    b: int  # uid of member B

    def as_user(self, uid: int, argv: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={uid}", f"--regid={self.gid}", "--clear-groups", *argv]

    def member_env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "PYTEST"))}
        env.update(
            PYTHONPATH=str(member_code()),
            HOME=str(home),
            XDG_RUNTIME_DIR=str(home / "run"),
            XDG_CACHE_HOME=str(home / "cache"),
            XDG_CONFIG_HOME=str(home / "config"),
        )
        return env


def ensure_lab() -> Lab:
    """The group and its two members, created if missing (idempotent)."""
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True, timeout=30)
        gid = grp.getgrnam(GROUP).gr_gid
    uids = []
    for name in (MEMBER_A, MEMBER_B):
        try:
            uids.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "-M",
                    "-N",
                    "-g",
                    GROUP,
                    "-d",
                    "/nonexistent",
                    "-s",
                    "/usr/sbin/nologin",
                    name,
                ],
                check=True,
                timeout=30,
            )
            uids.append(pwd.getpwnam(name).pw_uid)
    return Lab(gid, uids[0], uids[1])


def group_directory(path: Path, mode: int, gid: int) -> Path:
    """`install -d -m MODE -g gcfslab PATH`, as an administrator makes a group cache."""
    subprocess.run(["install", "-d", "-m", f"{mode:o}", "-g", str(gid), str(path)], check=True)
    return path


def scratch() -> Path:
    """A directory every member can traverse (pytest's tmp_path is under a 0700 directory)."""
    base = Path(tempfile.mkdtemp(prefix="gcfs-hostile-", dir="/tmp"))
    base.chmod(0o755)
    return base


# -- what a member does in the cache ------------------------------------------------------------

_PLANTER = r"""
import errno, json, os, sys
def replace(make, target):
    # made under another name, then renamed over the target: what an attacker does
    tmp = target + ".planted"
    make(tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        os.unlink(tmp)
        raise
def one(op, args):
    if op == "symlink":
        os.symlink(args[0], args[1])
    elif op == "replace_symlink":
        replace(lambda tmp: os.symlink(args[0], tmp), args[1])
    elif op == "link":
        os.link(args[0], args[1])
    elif op == "replace_link":
        replace(lambda tmp: os.link(args[0], tmp), args[1])
    elif op == "fifo":
        os.mkfifo(args[0], 0o660)
    elif op == "replace_fifo":
        replace(lambda tmp: os.mkfifo(tmp, 0o660), args[0])
    elif op == "create":
        fd = os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o660)
        os.write(fd, bytes.fromhex(args[1]))
        os.close(fd)
    elif op == "append":
        fd = os.open(args[0], os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        os.write(fd, bytes.fromhex(args[1]))
        os.close(fd)
    elif op == "mkdir":
        os.mkdir(args[0], 0o2770)
        os.chmod(args[0], 0o2770)  # whatever the umask: the group must be able to write
    elif op == "unlink":
        os.unlink(args[0])
    elif op == "rename":
        os.rename(args[0], args[1])
    elif op == "read":
        with open(args[0], "rb") as f:
            return f.read().hex()
    return "ok"
out = []
for op, *args in json.loads(sys.stdin.read()):
    try:
        out.append(one(op, args))
    except OSError as exc:
        out.append(errno.errorcode.get(exc.errno, str(exc.errno)))
print(json.dumps(out))
"""


def as_member(lab: Lab, uid: int, ops: list[list[str]]) -> list[str]:
    """Run file operations as `uid` (in group gcfslab, no other groups); per operation "ok",
    the errno's name ("EPERM", ...) or, for "read", the bytes in hex."""
    done = subprocess.run(
        lab.as_user(uid, [MEMBER_PYTHON, "-I", "-c", _PLANTER]),
        input=json.dumps(ops),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


# -- canaries: files outside the cache that nothing may change ---------------------------------


@dataclass
class Canaries:
    """Files and directories outside the cache, owned by root or by member A, that planted
    links point at. `check()` lists every change of content, mode, owner or directory
    listing since they were made."""

    base: Path
    lab: Lab
    made: dict[Path, str] = field(default_factory=dict)  # path -> what points at it
    before: dict[Path, Any] = field(default_factory=dict)

    def file(self, owner: str, why: str, *, shared: bool = False) -> Path:
        """A file of root or of A; `shared`: group gcfslab and 0660, the only files B may hard
        link to where fs.protected_hardlinks is 1 (B must be able to read and write them)."""
        path = self.base / f"canary-{len(self.made):02d}-{owner}"
        path.write_bytes(f"canary {path.name}: must never change\n".encode() * 3)
        uid = self.lab.a if owner == "a" else 0
        os.chown(path, uid, self.lab.gid if owner == "a" or shared else 0)
        path.chmod(0o660 if shared else 0o640 if owner == "a" else 0o644)
        return self._remember(path, why)

    def directory(self, owner: str, why: str) -> Path:
        path = self.base / f"canary-{len(self.made):02d}-{owner}-dir"
        path.mkdir()
        (path / "inside").write_bytes(b"canary inside a directory\n")
        uid = self.lab.a if owner == "a" else 0
        os.chown(path, uid, self.lab.gid if owner == "a" else 0)
        os.chown(path / "inside", uid, 0)
        path.chmod(0o755)
        return self._remember(path, why)

    def missing(self, owner: str, why: str) -> Path:
        """A name that does not exist, in a canary directory: a create through a link to it
        makes it appear."""
        return self.directory(owner, why) / "created-through-a-link"

    def _remember(self, path: Path, why: str) -> Path:
        self.made[path] = why
        self.before[path] = self._state(path)
        return path

    def _state(self, path: Path) -> Any:
        info = os.lstat(path)
        kind = stat.S_IFMT(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            inside = {n: self._state(path / n) for n in sorted(os.listdir(path))}
            return (kind, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, inside)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
        return (kind, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, info.st_size, digest)

    def check(self) -> list[str]:
        changes = []
        for path, why in self.made.items():
            try:
                now = self._state(path)
            except OSError as exc:
                now = f"gone ({exc.strerror})"
            if now != self.before[path]:
                changes.append(f"{path} ({why}): {self.before[path]} -> {now}")
        return changes

    def assert_unchanged(self) -> None:
        changes = self.check()
        assert not changes, "files outside the cache changed:\n" + "\n".join(changes)


# -- daemons as root or as a member ------------------------------------------------------------


@dataclass
class Daemon:
    """One `gcfs mount --foreground`; `path` is where the tests reach its mount."""

    mountpoint: Path  # as the daemon sees it
    path: Path  # as the tests reach it
    process: subprocess.Popen[bytes]
    log_path: Path
    member: bool
    connection: int = -1  # /sys/fs/fuse/connections/<N>
    allowed_errors: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def abort(self) -> None:
        """Abort the FUSE connection: every request waiting on the daemon ends (ENOTCONN)."""
        if self.connection >= 0:
            with contextlib.suppress(OSError):
                Path(f"/sys/fs/fuse/connections/{self.connection}/abort").write_text("1")

    def unmount(self) -> None:
        if self.process.poll() is None:
            command = ["nsenter", "-t", str(self.process.pid), "-m"] if self.member else []
            command += ["fusermount3", "-u", "-z", str(self.mountpoint)]
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(command, capture_output=True, timeout=UNMOUNT_DEADLINE, check=False)
            try:
                self.process.wait(timeout=UNMOUNT_DEADLINE)
            except subprocess.TimeoutExpired:
                self.abort()
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(timeout=UNMOUNT_DEADLINE)
        elif not self.member:
            # A dead daemon may leave its mount behind.
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False
            )
        self.abort()

    def problems(self, token: str) -> list[str]:
        text = self.log_text()
        found = [f"{self.log_path}: the token appears in the daemon log"] if token in text else []
        for line in text.splitlines():
            bad = " ERROR " in line or "Traceback" in line or "CRITICAL" in line
            if bad and not any(allowed in line for allowed in self.allowed_errors):
                found.append(f"{self.log_path}: {line}")
        return found


def member_command(base: Path, lab: Lab, uid: int, argv: list[str]) -> list[str]:
    """`argv` as `uid`, in a private mount namespace where /dev/fuse is usable by members and
    fuse.conf has user_allow_other (module docstring)."""
    dev = Path(tempfile.mkdtemp(prefix="dev-", dir=base))
    script = (
        'mount -t tmpfs -o mode=0755,size=64k tmpfs "$0"'
        f' && mknod -m 0666 "$0/fuse" c {os.major(FUSE_DEVICE)} {os.minor(FUSE_DEVICE)}'
        ' && mount --bind "$0/fuse" /dev/fuse'
        ' && echo user_allow_other > "$0/fuse.conf"'
        ' && mount --bind "$0/fuse.conf" /etc/fuse.conf'
        ' && exec "$@"'
    )
    return [
        "unshare", "-m", "--propagation", "private", "sh", "-c", script, str(dev),
        *lab.as_user(uid, argv),
    ]  # fmt: skip


def member_home(base: Path, lab: Lab, uid: int, name: str) -> Path:
    home = base / f"home-{name}"
    for path in (home, home / "run", home / "cache", home / "config"):
        path.mkdir(mode=0o700, exist_ok=True)
        os.chown(path, uid, lab.gid)
    return home


def start_daemon(
    base: Path,
    lab: Lab,
    args: list[str],
    *,
    uid: int | None,
    name: str,
    token: str,
    daemons: list[Daemon],
) -> Daemon:
    """`gcfs mount MOUNTPOINT --foreground ARGS` as root (`uid` None) or as a member, with a
    token file only its user can read; waits for the mount."""
    mountpoint = base / f"mnt-{name}"
    mountpoint.mkdir()
    home = member_home(base, lab, uid if uid is not None else 0, name)
    token_file = home / "token"
    token_file.write_text(f"Bearer {token}\n", encoding="utf-8")
    token_file.chmod(0o600)
    owner = uid if uid is not None else 0
    os.chown(token_file, owner, lab.gid)
    os.chown(mountpoint, owner, lab.gid)
    gcfs = ["mount", str(mountpoint), "--foreground", "--token-file", str(token_file), *args]
    log_path = base / f"daemon-{name}.log"
    if uid is None:
        command = [sys.executable, "-m", "gcfs", *gcfs]
        env = dict(os.environ, XDG_RUNTIME_DIR=str(home / "run"))
    else:
        command = member_command(
            base, lab, uid, [MEMBER_PYTHON, "-m", "gcfs", *gcfs, "--allow-other"]
        )
        env = lab.member_env(home)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=member_code() if uid is not None else WORKTREE,
        )
    path = Path(f"/proc/{process.pid}/root{mountpoint}") if uid is not None else mountpoint
    daemon = Daemon(mountpoint, path, process, log_path, uid is not None)
    daemons.append(daemon)
    end = time.monotonic() + MOUNT_DEADLINE
    while not os.path.ismount(path):
        if process.poll() is not None:
            raise AssertionError(f"gcfs exited with {process.returncode}:\n{daemon.log_text()}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for the mount {name}:\n{daemon.log_text()}")
        time.sleep(0.02)
    daemon.connection = os.minor(os.stat(path).st_dev)
    return daemon


def in_namespace_of(daemon: Daemon, argv: list[str]) -> list[str]:
    """`argv` in the mount namespace of a member's daemon (where its mount is), as root."""
    return ["nsenter", "-t", str(daemon.process.pid), "-m", *argv] if daemon.member else argv


# -- reads that cannot hang a test ---------------------------------------------------------------


def within(deadline: float, what: str, call: Callable[[], Any]) -> Any:
    """`call()` in a thread; its result, or its OSError as the value; an AssertionError if it
    has not ended after `deadline` s (a FUSE request the daemon never answers: the teardown
    aborts the connection, which ends the thread)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(call())
        except OSError as exc:
            box.append(exc)
        except BaseException as exc:
            box.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True, name=f"bounded: {what}")
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        raise AssertionError(f"{what} did not end within {deadline} s (the daemon does not answer)")
    result = box[0]
    if isinstance(result, BaseException) and not isinstance(result, OSError):
        raise result
    if time.monotonic() - started > deadline:  # pragma: no cover - join returned late
        raise AssertionError(f"{what} took longer than {deadline} s")
    return result


def stuck_tasks(pids: list[int]) -> list[str]:
    """Threads of `pids` in uninterruptible sleep (state D)."""
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{pid}/task/{task}/stat").read_text()
                    state = text.rsplit(")", 1)[1].split()[0]
                    if state == "D":
                        found.append(f"{pid}/{task}: {text[:80]}")
    return found
