"""Issue 14: commands touch only what gcfs made. `gcfs umount` only gcfs mounts (#3, #20),
`gcfs cache` only block caches (#5), `gcfs snapshot --to` only new, empty or snapshot
directories, through descriptors, durably (#1, #6, #8)."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gcfs import marker, snapshot
from gcfs.errors import UserError
from tests.conftest import Mount, run_gcfs

gcfs = run_gcfs


def one_line(result: subprocess.CompletedProcess[str], *needles: str, status: int = 1) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def mounted(path: Path) -> bool:
    return os.path.ismount(path)


def tree_state(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path below `root` (and root): its mode and, for files, bytes."""
    state: dict[str, tuple[int, bytes | None]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        state[str(path.relative_to(root))] = (info.st_mode, data)
    return state


# -- umount ------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_umount_refuses_what_is_not_a_gcfs_mount(tmpfs: Path) -> None:
    """#3: as root, `gcfs umount` of a tmpfs unmounted it and exited 0."""
    (tmpfs / "kept").write_text("x")
    line = one_line(gcfs("umount", str(tmpfs)), "is not a gcfs mount", "tmpfs")
    assert str(tmpfs) in line
    assert mounted(tmpfs) and (tmpfs / "kept").read_text() == "x"
    one_line(gcfs("umount", "--lazy", str(tmpfs)), "is not a gcfs mount")
    assert mounted(tmpfs)


def test_a_busy_umount_names_the_next_step_and_lazy_detaches(
    mount_gcfs: Callable[..., Mount],
) -> None:
    """#20: busy is one line naming `gcfs umount --lazy` and `fuser -vm`; --lazy then
    detaches the mount while the open file keeps reading, and the daemon stops once it is
    closed."""
    mount = mount_gcfs()
    with open(mount.path / "README.md", "rb") as held:
        busy = gcfs("umount", str(mount.path))
        line = one_line(busy, "busy", f"gcfs umount --lazy {mount.path}", "fuser -vm")
        assert f"fuser -vm {mount.path}" in line
        assert mounted(mount.path)
        lazy = gcfs("umount", "--lazy", str(mount.path))
        assert (lazy.returncode, lazy.stderr) == (0, ""), lazy.stderr
        assert not mounted(mount.path)
        assert held.read(10)  # still served
    assert mount.process is not None
    mount.process.wait(timeout=30)  # the session ends with the last open file
    assert mount.process.returncode == 0


# -- gcfs cache --------------------------------------------------------------------------------


def test_cache_commands_refuse_what_is_not_a_block_cache(tmp_path: Path) -> None:
    """#5: a directory without the cache marker is refused by every action, a snapshot by
    name, and nothing in it changes (cache clear used to remove a snapshot's files)."""
    foreign = tmp_path / "data"
    foreign.mkdir(mode=0o755)
    (foreign / "store").mkdir()
    (foreign / "store" / "thesis.tex").write_text("chapter 1")
    (foreign / "notes.txt").write_text("mine")
    shot = tmp_path / "shot"
    shot.mkdir(mode=0o750)
    fd = os.open(shot, os.O_RDONLY | os.O_DIRECTORY)
    try:
        marker.write(fd, marker.SNAPSHOT, 0o600)
    finally:
        os.close(fd)
    (shot / "tree.json").write_text('{"format": "gcfs-snapshot/1"}')
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    before = {p: tree_state(p) for p in (foreign, shot, empty)}
    for action in (["status"], ["verify"], ["clear"], ["prune", "0"]):
        for directory, needle in (
            (foreign, "is not a gcfs block cache"),
            (shot, "is a gcfs snapshot, not a block cache"),
            (empty, "is an empty directory, not a gcfs block cache"),
            (a_file, "is not a directory"),
            (tmp_path / "missing", "does not exist"),
        ):
            if directory is empty and action == ["status"]:
                continue  # status shows an empty directory (below)
            result = gcfs("cache", *action, "--cache-dir", str(directory))
            line = one_line(result, "the directory given with --cache-dir", needle)
            assert str(directory) not in line
    # An administrator checks the directory made for a group cache before anyone used it.
    shown = gcfs("cache", "status", "--cache-dir", str(empty))
    assert shown.returncode == 0 and "0 remote files" in shown.stdout, shown.stderr
    assert {p: tree_state(p) for p in (foreign, shot, empty)} == before


def test_cache_status_and_verify_change_nothing(tmp_path: Path) -> None:
    """#5: `cache status` chmodded an existing cache directory to 0700 and created store/ in
    it; status and verify now only read: no mode, file or marker changes."""
    old = tmp_path / "old-cache"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    (old / "store").mkdir(mode=0o755)
    os.chmod(old / "store", 0o755)
    before = tree_state(old)
    assert gcfs("cache", "status", "--cache-dir", str(old)).returncode == 0
    assert gcfs("cache", "status", "--cache-dir", str(old), "--json").returncode == 0
    verified = gcfs("cache", "verify", "--cache-dir", str(old))
    assert verified.returncode == 0, verified.stderr
    assert tree_state(old) == before


def test_the_default_cache_not_made_yet_is_no_error(tmp_path: Path) -> None:
    """The default directory ($XDG_CACHE_HOME/gcfs, per test in conftest) that no mount has
    created: status says so, exit 0, and does not create it."""
    default = tmp_path / "xdg-cache" / "gcfs"
    shown = gcfs("cache", "status")
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert "none yet" in shown.stdout
    cleared = gcfs("cache", "clear")
    assert cleared.returncode == 0 and "nothing to do" in cleared.stdout
    assert not default.exists()


# -- gcfs snapshot --to ------------------------------------------------------------------------


def lidc(mount: Mount) -> str:
    return str(mount.path / "archives" / "lidc-lung-ct")


def test_snapshot_into_directories_it_may_not_take(
    mount_gcfs: Callable[..., Mount], tmp_path: Path
) -> None:
    """#6: a non-empty directory that is not a snapshot, a block cache (marked, old, or the
    default one before any marker) are refused and unchanged; `mount --offline` takes only
    a snapshot."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    foreign = tmp_path / "thesis"
    foreign.mkdir(mode=0o755)
    for name in ("blocks", "sizes"):
        (foreign / name).mkdir()
        (foreign / name / "chapter").write_text(name)
    marked = tmp_path / "marked-cache"
    marked.mkdir()
    fd = os.open(marked, os.O_RDONLY | os.O_DIRECTORY)
    try:
        marker.write(fd, marker.BLOCK_CACHE, 0o600)
    finally:
        os.close(fd)
    default = tmp_path / "xdg-cache" / "gcfs"
    default.mkdir(parents=True)  # exists, empty, unmarked: still the live cache by path
    cases = [
        (foreign, "is not empty and holds no gcfs snapshot"),
        (marked, "is a gcfs block cache"),
        (tmp_path / "cache", "is a gcfs block cache"),  # the mount's, made before markers
        (default, "is the default block cache"),
    ]
    for directory, needle in cases:
        before = tree_state(directory)
        line = one_line(gcfs("snapshot", lidc(online), "--to", str(directory)), needle)
        assert "the snapshot directory given with --to" in line and str(directory) not in line
        assert tree_state(directory) == before, directory
    (tmp_path / "m").mkdir()
    for directory in (foreign, marked, default):
        refused = gcfs("mount", str(tmp_path / "m"), "--offline", str(directory))
        one_line(refused, "the directory given with --offline", "holds no gcfs snapshot")


@pytest.mark.parametrize("mode", [0o755, 0o2775])
def test_snapshot_keeps_the_mode_of_a_directory_it_did_not_create(
    mount_gcfs: Callable[..., Mount], tmp_path: Path, mode: int
) -> None:
    """#6: an empty directory was chmodded (755 -> 700, 2775 -> 2770). Now it keeps its mode
    and gets the snapshot marker (0660 in a group directory, else 0600)."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, mode)
    taken = gcfs("snapshot", lidc(online), "--to", str(target))
    assert taken.returncode == 0, taken.stderr
    assert target.stat().st_mode & 0o7777 == mode
    assert marker.classify(target) is marker.Kind.SNAPSHOT
    group = mode & 0o2070 == 0o2070
    assert (target / marker.MARKER).stat().st_mode & 0o777 == (0o660 if group else 0o600)


def test_snapshot_creates_a_missing_directory_private_and_adopts_an_old_one(
    mount_gcfs: Callable[..., Mount], tmp_path: Path
) -> None:
    """A missing DIR is created 0700 and marked; a snapshot made before markers is adopted
    and refreshed, and what it held beside the snapshot (an old cache's blocks/, sizes/)
    stays (#6: they were deleted)."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    new = tmp_path / "new"
    assert gcfs("snapshot", lidc(online), "--to", str(new)).returncode == 0
    assert new.stat().st_mode & 0o7777 == 0o700
    assert marker.classify(new) is marker.Kind.SNAPSHOT
    (new / marker.MARKER).unlink()  # as a snapshot taken before markers
    for name in ("blocks", "sizes"):
        (new / name).mkdir()
        (new / name / "x").write_text(name)
    assert marker.classify(new) is marker.Kind.OLD_SNAPSHOT
    again = gcfs("snapshot", lidc(online), "--to", str(new))
    assert again.returncode == 0, again.stderr
    assert marker.classify(new) is marker.Kind.SNAPSHOT
    assert (new / "blocks" / "x").read_text() == "blocks"
    assert (new / "sizes" / "x").read_text() == "sizes"


def test_snapshot_follows_no_planted_link(
    mount_gcfs: Callable[..., Mount], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#1: a symlink planted at the lock file or at the temporary name of tree.json is never
    followed: the lock is refused with one line, a taken temporary name is skipped for
    another, and when every name tried is taken the snapshot ends with one line; the
    links' target never changes."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o644)
    target = tmp_path / "shot"
    assert gcfs("snapshot", lidc(online), "--to", str(target)).returncode == 0

    (target / snapshot.LOCK).unlink()
    (target / snapshot.LOCK).symlink_to(victim)
    with pytest.raises(UserError, match=r"lock file .* symbolic link"):
        snapshot.snapshot_command([Path(lidc(online))], target, out=io.StringIO())
    (target / snapshot.LOCK).unlink()

    names = iter(f"{n:016x}" for n in range(100))
    monkeypatch.setattr(snapshot.secrets, "token_hex", lambda _: next(names))
    for n in range(3):  # the first three names tried for tree.json are taken
        planted = target / f"{snapshot.TEMPORARY_PREFIX}{n:016x}-{snapshot.TREE}"
        planted.symlink_to(victim)
    assert snapshot.snapshot_command([Path(lidc(online))], target, out=io.StringIO()) == 0
    names = iter(["0" * 16] * 100)  # every name tried is one of the planted links
    (target / f"{snapshot.TEMPORARY_PREFIX}{'0' * 16}-{snapshot.TREE}").unlink()
    (target / f"{snapshot.TEMPORARY_PREFIX}{'0' * 16}-{snapshot.TREE}").symlink_to(victim)
    with pytest.raises(UserError, match=r"temporary file for tree\.json"):
        snapshot.snapshot_command([Path(lidc(online))], target, out=io.StringIO())
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o644


def test_snapshot_store_is_synced_before_the_tree_names_it(
    mount_gcfs: Callable[..., Mount], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#8 (read in the code, confirmed: nothing was synced but the JSON files): every data
    and index file in the store, its directories and store/ are fsynced before tree.json
    is renamed into place, and the snapshot directory after. Recorded in-process: each
    os.fsync's descriptor is resolved through /proc/self/fd, and the rename is logged."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    target = tmp_path / "shot"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: Any) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{int(fd)}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(snapshot.os, "fsync", fsync)
    monkeypatch.setattr(snapshot.os, "replace", replace)
    assert snapshot.snapshot_command([Path(lidc(online))], target, out=io.StringIO()) == 0
    tree_at = events.index(("replace", snapshot.TREE))
    synced_before = {path for kind, path in events[:tree_at] if kind == "fsync"}
    store_files = {str(p) for p in (target / "store").rglob("*") if p.is_file()}
    assert len([p for p in store_files if p.endswith(".data")]) > 3
    assert store_files <= synced_before, store_files - synced_before
    store_dirs = {str(p) for p in (target / "store").rglob("*") if p.is_dir()}
    assert store_dirs | {str(target / "store")} <= synced_before
    assert ("fsync", str(target)) in events[tree_at:]
