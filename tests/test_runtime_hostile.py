"""The runtime directory in a directory everybody may write: `/tmp/gcfs-<uid>` when
XDG_RUNTIME_DIR is unset. Another user can make that name first: as a link to a directory
of the victim's (for a daemon run as root, /etc), as a directory of their own, or the user's
own directory may be open to others. gcfs refuses each, in one line, before it mounts: it
never chmods, writes into or follows what it did not make, and `gcfs umount` never believes a
pid file found there.

Here the shared /tmp is a sticky 1777 directory of the test's own, named by XDG_RUNTIME_DIR
(the check is the same for both names); the planting is done as another uid (setpriv)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gcfs.fakegc import FakeGC
from tests.conftest import run_gcfs
from tests.users import Lab, as_member, ensure_lab, scratch

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants files as another uid: root")


@pytest.fixture(scope="module")
def lab() -> Lab:
    return ensure_lab()


@pytest.fixture
def shared(lab: Lab) -> Iterator[Path]:
    """A /tmp of our own: sticky and writable by every user."""
    base = scratch()
    tmp = base / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    victim = base / "victim"  # what a planted link points at: root's, 0755, one file
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    (victim / "precious").write_text("keep me\n")
    yield tmp
    shutil.rmtree(base)


def state(path: Path) -> tuple[int, int, int, list[str]]:
    info = path.lstat()
    names = sorted(os.listdir(path)) if stat.S_ISDIR(info.st_mode) else []
    return info.st_mode, info.st_uid, info.st_gid, names


def plant(kind: str, shared: Path, lab: Lab) -> Path:
    """`shared/gcfs` as another user (or a careless one) made it."""
    target = shared / "gcfs"
    uid = lab.b  # member B of the test lab: any other uid
    if kind == "link to a directory of root's":
        assert as_member(lab, uid, [["symlink", str(shared.parent / "victim"), str(target)]]) == [
            "ok"
        ]
    elif kind == "another user's directory":
        assert as_member(lab, uid, [["mkdir", str(target)]]) == ["ok"]
    elif kind == "a directory of ours open to others":
        target.mkdir()
        target.chmod(0o777)
    else:
        raise AssertionError(kind)
    return target


def runtime_env(shared: Path) -> dict[str, str]:
    """The environment of a user whose runtime directory is to be made in `shared`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["XDG_RUNTIME_DIR"] = str(shared)
    return env


def mount(
    fake: FakeGC, token_file: Path, mountpoint: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`gcfs mount` in the background, as a user types it."""
    command = ["mount", str(mountpoint), "--base-url", fake.base_url]
    return run_gcfs(*command, "--token-file", str(token_file), env=env, timeout=60)


KINDS = [
    "link to a directory of root's",
    "another user's directory",
    "a directory of ours open to others",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_runtime_directory_is_refused_and_left_alone(
    kind: str, shared: Path, lab: Lab, fake: FakeGC, token_file: Path, tmp_path: Path
) -> None:
    planted = plant(kind, shared, lab)
    victim = shared.parent / "victim"
    before = {path: state(path) for path in (planted, victim)}
    mountpoint = tmp_path / "gc"
    mountpoint.mkdir()
    env = runtime_env(shared)
    mounting = mount(fake, token_file, mountpoint, env)
    if os.path.ismount(mountpoint):  # it should not have mounted: leave no mount behind
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, timeout=30)
    assert mounting.returncode == 1, mounting.stderr
    lines = mounting.stderr.strip().splitlines()
    assert len(lines) == 1 and "remove it, or set XDG_RUNTIME_DIR" in lines[0], lines
    assert str(planted) in lines[0]
    assert not os.path.ismount(mountpoint)
    assert fake.count() == 0  # refused before it asked the server anything

    # The other commands that look there: none fails with a traceback, none believes it.
    listing = run_gcfs("mounts", env=env)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr
    unmounting = run_gcfs("umount", str(mountpoint), env=env)
    assert unmounting.returncode == 1 and "is not mounted" in unmounting.stderr

    # Nothing was chmod-ed, created or removed, in the planted directory or through the link.
    assert {path: state(path) for path in (planted, victim)} == before
    assert (victim / "precious").read_text() == "keep me\n"


def test_a_missing_runtime_directory_is_made_private(
    shared: Path, fake: FakeGC, token_file: Path, tmp_path: Path
) -> None:
    """The same shared directory, nothing planted: gcfs makes its own, 0700, and mounts."""
    mountpoint = tmp_path / "gc"
    mountpoint.mkdir()
    env = runtime_env(shared)
    mounting = mount(fake, token_file, mountpoint, env)
    try:
        assert mounting.returncode == 0, mounting.stderr
        made = (shared / "gcfs").lstat()
        assert stat.S_ISDIR(made.st_mode) and stat.S_IMODE(made.st_mode) == 0o700
        assert made.st_uid == os.getuid()
        assert any(name.endswith(".pid") for name in os.listdir(shared / "gcfs"))
    finally:
        assert run_gcfs("umount", str(mountpoint), env=env).returncode == 0


def test_a_runtime_directory_named_where_nothing_is_is_one_line(
    fake: FakeGC, token_file: Path, tmp_path: Path
) -> None:
    """XDG_RUNTIME_DIR kept from another login (`su`), naming a directory that is not there:
    one line that says so, and nothing is made in its place."""
    missing = tmp_path / "run-of-a-login-gone"
    mountpoint = tmp_path / "gc"
    mountpoint.mkdir()
    mounting = mount(fake, token_file, mountpoint, runtime_env(missing))
    assert mounting.returncode == 1, mounting.stderr
    assert mounting.stderr.strip().splitlines() == [
        f"gcfs: XDG_RUNTIME_DIR names {missing}, which does not exist: make it, or unset it"
    ]
    assert not missing.exists() and not os.path.ismount(mountpoint)
