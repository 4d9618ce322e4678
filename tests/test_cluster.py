"""Issue 11 on real mounts: a block cache shared by daemons (two mount points stand in for two
nodes), offline mounts of snapshots in a network namespace, and `gcfs snapshot` refreshes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gcfs.blockindex import KIND_BLOCK, RECORD_SIZE, parse
from gcfs.blockstore import BlockStore
from gcfs.fakegc import DEMO_TOKEN, FakeGC
from gcfs.snapshot import walk_files
from tests.conftest import Mount, gcfs_command, poll

MiB = 1 << 20
WRITE_DEADLINE = 30.0  # seconds for a daemon's queued block writes to reach the disk


def gcfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gcfs_command(*args), capture_output=True, text=True, timeout=300, check=False
    )


def add_archive(world: Any, slug: str, sizes: list[int]) -> dict[str, bytes]:
    """An archive of image files of the given sizes (random bytes); {file name: bytes}."""
    socket = world.add_socket(f"{slug}-ct", kind="Image", relative_path="images/ct")
    archive = world.add_archive(slug, slug, viewers={"demo"})
    files = {}
    for n, size in enumerate(sizes):
        name = f"{slug}-{n:02d}.mha"
        data = random.Random(f"{slug}{n}").randbytes(size)
        image = world.add_image(name, [(name, data)])
        world.add_archive_item(archive, [world.add_value(socket, image=image)], title=name)
        files[name] = data
    return files


def files_of(mount: Mount, slug: str) -> dict[str, Path]:
    return {p.name: p for p in (mount.path / "archives" / slug).rglob("*.mha")}


def status(mount: Mount) -> dict[str, Any]:
    return dict(json.loads((mount.path / ".gcfs" / "status.json").read_bytes()))


def writes_done(mount: Mount) -> None:
    """Wait until the daemon's verified blocks are all on disk (they are written behind)."""
    poll(
        lambda: status(mount)["content"]["pending_writes"] == 0,
        WRITE_DEADLINE,
        f"the block writes of {mount.path}",
    )


def storage_gets(fake: FakeGC) -> list[Any]:
    """Storage requests for bytes (size probes, `bytes=0-0`, left out)."""
    return [r for r in fake.requests if r.endpoint == "storage-get" and r.range != "bytes=0-0"]


# -- a shared block cache -------------------------------------------------------------------


SHARED_SIZES = [50_000, 120_000, 3 * MiB + 4321, 1]


def test_a_second_daemon_reads_what_the_first_fetched_with_no_storage_request(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, tmp_path: Path
) -> None:
    """Two daemons (two nodes) on one cache directory: after the first has read a set of
    files, the second, mounted later, reads them byte for byte without asking storage for
    anything, not even their sizes."""
    files = add_archive(world, "shared-a", SHARED_SIZES)
    cache = tmp_path / "shared-cache"
    first = mount_gcfs("--cache-dir", str(cache))
    for name, path in files_of(first, "shared-a").items():
        assert path.read_bytes() == files[name]
    writes_done(first)
    fake.reset_counts()
    second = mount_gcfs("--cache-dir", str(cache))
    found = files_of(second, "shared-a")
    assert sorted(found) == sorted(files)
    for name, path in found.items():
        assert path.read_bytes() == files[name]
    assert fake.count("storage-get") == 0, [(r.path, r.range) for r in fake.requests]
    assert status(second)["block_cache"]["hits"] > 0


def test_a_daemon_finds_blocks_another_stored_after_it_started(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, tmp_path: Path
) -> None:
    """Both daemons are mounted first; the second lists the files (learning their sizes and
    loading its view of their indexes) and reads the start of the large one; then the first
    reads everything; then the second reads everything without a storage request: on a miss
    it looks at the index files again, where the first appended."""
    files = add_archive(world, "shared-b", SHARED_SIZES)
    cache = tmp_path / "shared-cache"
    first = mount_gcfs("--cache-dir", str(cache))
    second = mount_gcfs("--cache-dir", str(cache))
    on_second = files_of(second, "shared-b")
    assert {name: p.stat().st_size for name, p in on_second.items()} == {
        name: len(data) for name, data in files.items()
    }
    large = next(name for name, data in files.items() if len(data) > MiB)
    with open(on_second[large], "rb") as handle:
        assert handle.read(100_000) == files[large][:100_000]
    writes_done(second)
    for name, path in files_of(first, "shared-b").items():
        assert path.read_bytes() == files[name]
    writes_done(first)
    fake.reset_counts()
    for name, path in on_second.items():
        with open(path, "rb") as handle:
            # The pages the kernel kept from the first read would hide the daemon.
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert handle.read() == files[name]
    assert fake.count("storage-get") == 0, [(r.path, r.range) for r in fake.requests]
    assert status(second)["block_cache"]["found_later"] > 0


def test_two_daemons_read_and_evict_in_one_small_cache_at_once(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, tmp_path: Path
) -> None:
    """Stress: two daemons share an 8 MiB cache and read 32 MiB of files (one larger than the
    cache) at once, whole and at random offsets, evicting each other's files all along.
    Every byte read is the server's, neither daemon logs an error (conftest), and the
    directory verifies clean afterwards."""
    sizes = [5 * MiB, 5 * MiB + 17, 3 * MiB, 7 * MiB - 5, 12 * MiB]
    files = add_archive(world, "stress", sizes)
    cache = tmp_path / "small-cache"
    mounts = [mount_gcfs("--cache-dir", str(cache), "--cache-size", "8M") for _ in range(2)]
    paths = [files_of(mount, "stress") for mount in mounts]
    wrong: list[str] = []

    def work(which: int, seed: int) -> None:
        rng = random.Random(seed)
        names = sorted(files)
        for _ in range(3):
            rng.shuffle(names)
            for name in names:
                with open(paths[which][name], "rb") as handle:
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    if rng.random() < 0.5:
                        got = handle.read()
                        if got != files[name]:
                            wrong.append(f"daemon {which}: {name} whole")
                        continue
                    for _ in range(8):
                        offset = rng.randrange(len(files[name]))
                        length = rng.choice([4096, 65536, MiB + 3])
                        got = os.pread(handle.fileno(), length, offset)
                        if got != files[name][offset : offset + length]:
                            wrong.append(f"daemon {which}: {name} at {offset}+{length}")

    threads = [threading.Thread(target=work, args=(n % 2, n)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    for mount in mounts:
        writes_done(mount)
    evictions = sum(status(mount)["block_cache"]["evictions"] for mount in mounts)
    assert evictions > 0
    for mount in mounts:
        mount.unmount()
    verified = gcfs("cache", "verify", "--cache-dir", str(cache))
    assert verified.returncode == 0, verified.stderr
    assert " 0 damaged (" in verified.stdout and " 0 damaged index" in verified.stdout


# -- offline mounts -------------------------------------------------------------------------

SUBTREES = [
    "archives/lidc-lung-ct",  # items with an image, a legacy .mhd/.zraw pair, a file, a value
    "reader-studies/lung-nodule-reader-study",  # display sets, questions, answers.json/.csv
    "algorithms/corads-ai",  # container images and jobs with inputs and outputs
]


def record(root: Path, subtrees: list[str]) -> dict[str, Any]:
    """Everything a user can see under the subtrees: per path its kind, size, sha256 of its
    bytes, symlink target and extended attributes."""
    seen: dict[str, Any] = {}

    def xattrs(path: Path) -> dict[str, str]:
        names = os.listxattr(path, follow_symlinks=False)
        return {n: os.getxattr(path, n, follow_symlinks=False).decode() for n in sorted(names)}

    def visit(path: Path) -> None:
        relative = str(path.relative_to(root))
        if path.is_symlink():
            seen[relative] = ("symlink", os.readlink(path))
        elif path.is_dir():
            seen[relative] = ("dir", sorted(os.listdir(path)), xattrs(path))
            for name in sorted(os.listdir(path)):
                visit(path / name)
        else:
            data = path.read_bytes()
            assert len(data) == path.stat().st_size, relative
            seen[relative] = ("file", len(data), hashlib.sha256(data).hexdigest(), xattrs(path))

    for subtree in subtrees:
        visit(root / subtree)
    return seen


ANCESTORS = ["archives", "reader-studies", "algorithms"]


def xattrs_of(path: Path) -> dict[str, str]:
    return {n: os.getxattr(path, n).decode() for n in sorted(os.listxattr(path))}


def pk_of(path: Path) -> str:
    return os.getxattr(path, "user.gc.pk").decode()


def only_unix_sockets(pid: int) -> list[str]:
    """The daemon's network state: its namespace's TCP/UDP tables (header lines only when
    empty), and any socket it holds that is not a Unix socket (the control socket is)."""
    problems = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()
        problems += [f"{table}: {line}" for line in lines[1:]]
    unix = {line.split()[6] for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] not in unix:
            problems.append(f"fd {fd}: {target} is not a Unix socket")
    return problems


def test_an_offline_mount_serves_the_snapshot_with_no_network(
    mount_gcfs: Callable[..., Mount],
    mount_offline: Callable[..., Mount],
    fake: FakeGC,
    tmp_path: Path,
) -> None:
    """Snapshot an archive, a reader study and an algorithm with jobs; stop the server; two
    offline mounts of the snapshot, each in a network namespace without interfaces, show the
    same names, sizes, bytes, symlink targets and extended attributes as the online mount,
    a root README saying what it is, ENOENT elsewhere; the daemons hold no socket but their
    control socket, and the snapshot does not contain the token."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    expected = record(online.path, SUBTREES)
    above = {name: xattrs_of(online.path / name) for name in ("", *ANCESTORS)}
    lidc = online.path / "archives" / "lidc-lung-ct"
    archive_pk = pk_of(lidc)
    snapshot = tmp_path / "snapshot"
    taken = gcfs("snapshot", *(str(online.path / s) for s in SUBTREES), "--to", str(snapshot))
    assert taken.returncode == 0, taken.stderr
    online.unmount()
    fake.stop()

    mounts = [mount_offline(snapshot), mount_offline(snapshot)]
    for offline in mounts:
        assert record(offline.path, SUBTREES) == expected
    offline = mounts[0]
    assert sorted(os.listdir(offline.path)) == [
        ".gcfs",
        "README.md",
        "algorithms",
        "archives",
        "images",  # as online (lookup only: test_offline_parity)
        "reader-studies",
    ]
    assert os.listdir(offline.path / "archives") == ["lidc-lung-ct"]
    assert os.readlink(offline.path / "archives" / archive_pk) == "lidc-lung-ct"
    assert {name: xattrs_of(offline.path / name) for name in ("", *ANCESTORS)} == above
    manifest = json.loads((snapshot / "manifest.json").read_text())
    readme = (offline.path / "README.md").read_text()
    assert "snapshot" in readme and fake.base_url in readme and "demo" in readme
    assert manifest["taken"] in readme
    assert all(subtree in readme for subtree in SUBTREES)
    for absent in ["archives/prostate-mri-picai", "reader-studies/x", "api/v2"]:
        with pytest.raises(FileNotFoundError):
            os.stat(offline.path / absent)
    assert offline.process is not None
    assert only_unix_sockets(offline.process.pid) == []
    shown = gcfs("status", str(offline.path))
    assert shown.returncode == 0 and "offline" in shown.stdout, shown.stdout + shown.stderr
    assert status(offline)["requests_total"] == 0
    for path in snapshot.rglob("*"):
        if path.is_file():
            assert DEMO_TOKEN.encode() not in path.read_bytes(), path
    assert (manifest["server"], manifest["user"]) == (fake.base_url, "demo")
    assert sorted(manifest["subtrees"]) == sorted(SUBTREES)
    assert manifest["files"] == sum(1 for v in expected.values() if v[0] == "file")


def test_a_missing_block_is_eio_and_never_a_request(
    mount_gcfs: Callable[..., Mount],
    mount_offline: Callable[..., Mount],
    fake: FakeGC,
    world: Any,
    tmp_path: Path,
) -> None:
    """A snapshot whose store lost a file's blocks: the offline mount (not isolated here, so
    that a request would reach the still running server) answers EIO and sends nothing."""
    files = add_archive(world, "lossy", [200_000])
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    snapshot = tmp_path / "snapshot"
    assert (
        gcfs("snapshot", str(online.path / "archives" / "lossy"), "--to", str(snapshot)).returncode
        == 0
    )
    online.unmount()
    for data in snapshot.rglob("*.data"):
        if data.stat().st_size == len(files["lossy-00.mha"]):
            data.unlink()
    fake.reset_counts()
    offline = mount_offline(snapshot, isolated=False)
    offline.allowed_errors.append("not in the snapshot")
    [path] = (offline.path / "archives" / "lossy").rglob("*.mha")
    assert path.stat().st_size == 200_000
    with pytest.raises(OSError) as failed:
        path.read_bytes()
    assert failed.value.errno == 5  # EIO
    assert fake.requests == []
    # Refused by the content store before any request was built (not by the transport that
    # refuses all requests, the second line of defence, after retries).
    assert "not in the snapshot (an offline mount fetches nothing)" in offline.log_text()


def test_a_snapshot_refreshed_in_place_fetches_only_what_is_new(
    mount_gcfs: Callable[..., Mount],
    mount_offline: Callable[..., Mount],
    fake: FakeGC,
    world: Any,
    tmp_path: Path,
) -> None:
    """A new item on the server shows in the snapshot after `gcfs snapshot` again, and that
    second run fetches the new item's bytes and nothing else (the daemon's TTL is long: the
    snapshot refreshes the listings itself)."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"), "--ttl", "3600")
    lidc = online.path / "archives" / "lidc-lung-ct"
    snapshot = tmp_path / "snapshot"
    assert gcfs("snapshot", str(lidc), "--to", str(snapshot)).returncode == 0
    before = record(online.path, ["archives/lidc-lung-ct"])
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    new_bytes = random.Random(11).randbytes(300_000)
    image = world.add_image("new-ct.mha", [("new-ct.mha", new_bytes)])
    item = world.add_archive_item(archive, [world.add_value("ct-image", image=image)])
    fake.reset_counts()
    again = gcfs("snapshot", str(lidc), "--to", str(snapshot))
    assert again.returncode == 0, again.stderr
    gets = storage_gets(fake)
    assert gets and all("new-ct.mha" in r.path for r in gets), [(r.path, r.range) for r in gets]
    assert fake.storage_bytes_sent - sum(1 for r in fake.requests if r.range == "bytes=0-0") == (
        len(new_bytes)
    )
    after = record(online.path, ["archives/lidc-lung-ct"])
    assert set(after) - set(before) and all(
        item.pk in p for p in set(after) - set(before) if "items/" in p
    )
    online.unmount()
    offline = mount_offline(snapshot)
    assert record(offline.path, ["archives/lidc-lung-ct"]) == after
    [new] = (offline.path / "archives" / "lidc-lung-ct" / "items" / item.pk).rglob("new-ct.mha")
    assert new.read_bytes() == new_bytes


def test_snapshot_and_offline_refusals(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path, token_file: Path
) -> None:
    """Mistakes end with one line: an offline mount of a directory without a snapshot, or
    with a flag that needs the network; a snapshot of paths outside a gcfs mount; a snapshot
    directory of another server or user."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "m").mkdir()
    refused = gcfs("mount", str(tmp_path / "m"), "--offline", str(empty))
    assert refused.returncode == 1 and "holds no gcfs snapshot" in refused.stderr
    both = gcfs(
        "mount", str(tmp_path / "m"), "--offline", str(empty), "--token-file", str(token_file)
    )
    assert both.returncode == 1 and "--token-file" in both.stderr
    outside = gcfs("snapshot", str(tmp_path), "--to", str(tmp_path / "s"))
    assert outside.returncode == 1 and "not inside a gcfs mount" in outside.stderr
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    other = tmp_path / "other"
    other.mkdir()
    manifest = {"format": "gcfs-snapshot/1", "server": "https://elsewhere", "user": "x"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / "tree.json").write_text(  # a snapshot from before markers, of another server
        json.dumps({"format": "gcfs-snapshot/1", "manifest": manifest, "root": {"type": "dir"}})
    )
    mixed = gcfs("snapshot", str(online.path / "archives" / "lidc-lung-ct"), "--to", str(other))
    assert mixed.returncode == 1 and "https://elsewhere by x" in mixed.stderr, mixed.stderr
    assert "use another directory" in mixed.stderr
    assert not (other / ".gcfs-directory.json").exists()  # refused: not adopted either


def test_a_snapshot_lives_in_a_group_directory(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    """A snapshot directory made for a group (2770) keeps its mode and gets group-readable
    files (0660), so the group's compute jobs can mount it; nothing is open to others."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    snapshot = tmp_path / "group-snapshot"
    snapshot.mkdir()
    os.chmod(snapshot, 0o2770)
    old = os.umask(0o077)
    try:
        taken = gcfs(
            "snapshot", str(online.path / "archives" / "lidc-lung-ct"), "--to", str(snapshot)
        )
    finally:
        os.umask(old)
    assert taken.returncode == 0, taken.stderr
    assert snapshot.stat().st_mode & 0o7777 == 0o2770  # not created by gcfs: kept
    for path in snapshot.rglob("*"):
        mode = path.stat().st_mode & 0o7777
        # What gcfs creates in a group directory is sticky: members keep their files.
        assert mode == (0o3770 if path.is_dir() else 0o660), (path, oct(mode))
    store = BlockStore(snapshot, 1 << 40, readonly=True)
    assert store.mode == "group" and store.usage()[0] > 0


# -- gcfs snapshot --verify -----------------------------------------------------------------


VERIFIED_SIZES = [3 * MiB + 4321, 5 * MiB, 2 * MiB + 1, 200_000]  # 4, 5, 3 and 1 blocks


def take_snapshot(online: Mount, snapshot: Path, *subtrees: str) -> None:
    taken = gcfs("snapshot", *(str(online.path / s) for s in subtrees), "--to", str(snapshot))
    assert taken.returncode == 0, taken.stderr


def tree_files(snapshot: Path) -> dict[str, dict[str, Any]]:
    """{path in the tree: file spec} of a snapshot."""
    return dict(walk_files(json.loads((snapshot / "tree.json").read_text())["root"]))


def store_files(snapshot: Path, spec: dict[str, Any]) -> tuple[Path, Path]:
    """The data and index file of a file spec's key."""
    digest = hashlib.sha256(spec["key"].encode()).hexdigest()
    folder = snapshot / "store" / digest[:2]
    return folder / f"{digest}.data", folder / f"{digest}.index"


def verified_snapshot(
    mount_gcfs: Callable[..., Mount], world: Any, tmp_path: Path
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """A snapshot of the archive `verified` (VERIFIED_SIZES), taken and the mount gone; its
    directory and the files its tree records."""
    add_archive(world, "verified", VERIFIED_SIZES)
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    snapshot = tmp_path / "snapshot"
    take_snapshot(online, snapshot, "archives/verified")
    online.unmount()
    return snapshot, tree_files(snapshot)


def counted(files: dict[str, dict[str, Any]], *damaged: str) -> str:
    """The summary's count of `files` as `gcfs snapshot` and the manifest count them (the
    paths under images/ and api/ show files counted elsewhere), with the paths that show
    the `damaged` files' bytes counted the same way."""
    extra = [path for path in files if path.split("/", 1)[0] in ("images", "api")]
    keys = {files[path]["key"] for path in damaged}
    bad = [path for path, spec in files.items() if spec.get("key") in keys]
    bad_extra = [path for path in bad if path in extra]
    of_them = f", {len(bad_extra)} of them damaged" if bad_extra else ""
    also = f" (and {len(extra)} paths to them under images/ and api/{of_them})" if extra else ""
    if not damaged:
        return f"{len(files) - len(extra)} files{also}"
    return f"{len(bad) - len(bad_extra)} of {len(files) - len(extra)} files{also}"


def path_of(files: dict[str, dict[str, Any]], name: str) -> str:
    """The archive path of a file (the snapshot also shows it under `images/<pk>/`)."""
    [path] = [p for p in files if p.endswith("/" + name) and p.startswith("archives/")]
    return path


def test_snapshot_verify_passes_an_intact_snapshot_and_changes_nothing(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, tmp_path: Path
) -> None:
    """An intact snapshot: exit 0 and one line counting every file of the tree; no file in
    DIR changed, not even its access time (O_NOATIME: we own the files), and the server
    was not asked anything (stopped before the check)."""
    add_archive(world, "verified", VERIFIED_SIZES)
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    snapshot = tmp_path / "snapshot"
    take_snapshot(online, snapshot, "archives/lidc-lung-ct", "archives/verified")
    online.unmount()
    fake.stop()

    def state() -> dict[Path, tuple[int, int, int, int]]:
        return {
            p: (s.st_size, s.st_mtime_ns, s.st_atime_ns, s.st_ino)
            for p in snapshot.rglob("*")
            if (s := p.lstat()) and not p.is_dir()
        }

    # Access times are only updated (relatime) when older than the modification time:
    # put them 1 s before it, so that any read without O_NOATIME would move them.
    for path in snapshot.rglob("*"):
        if path.is_file():
            info = path.stat()
            os.utime(path, ns=(info.st_mtime_ns - 10**9, info.st_mtime_ns))
    before = state()
    checked = gcfs("snapshot", "--verify", str(snapshot))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert state() == before
    files = tree_files(snapshot)
    lines = checked.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"snapshot intact: {counted(files)}, ")
    assert "(and " in lines[0]  # the images/<pk> paths of the archive's images
    stored = sum(-(-spec["size"] // MiB) for spec in {s["key"]: s for s in files.values()}.values())
    assert f" {stored} blocks " in lines[0], (stored, lines[0])


def test_snapshot_verify_names_missing_and_damaged_files_by_their_path(
    mount_gcfs: Callable[..., Mount], world: Any, tmp_path: Path
) -> None:
    """A removed data file, a flipped byte in block 2 and an index cut in its second record:
    each reported by the file's path in the tree, the blocks named; the intact files are
    not named; exit 1."""
    snapshot, files = verified_snapshot(mount_gcfs, world, tmp_path)
    removed, flipped, cut = (path_of(files, f"verified-{n:02d}.mha") for n in range(3))
    store_files(snapshot, files[removed])[0].unlink()
    data = store_files(snapshot, files[flipped])[0]
    with open(data, "r+b") as handle:  # one bit of block 2 (of 5)
        handle.seek(2 * MiB + 12345)
        byte = handle.read(1)[0]
        handle.seek(2 * MiB + 12345)
        handle.write(bytes([byte ^ 0x01]))
    index = store_files(snapshot, files[cut])[1]
    records = index.read_bytes()
    kept = [parse(records[i : i + RECORD_SIZE]) for i in range(0, RECORD_SIZE, RECORD_SIZE)]
    os.truncate(index, RECORD_SIZE + 20)  # the first record and 20 bytes of the second
    [(kind, _, block, *_)] = kept
    assert kind == KIND_BLOCK  # the 3-block file's first record is a block: the others go
    lost = sorted({0, 1, 2} - {block})

    checked = gcfs("snapshot", "--verify", str(snapshot))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert f"{removed}: missing: its data file is not in the store (4 blocks)" in lines
    assert f"{flipped}: block 2 damaged" in lines
    assert f"{cut}: blocks {lost[0]}-{lost[1]} missing (2 of 3)" in lines or (
        f"{cut}: blocks {lost[0]}, {lost[1]} missing (2 of 3)" in lines
    ), lines
    intact = path_of(files, "verified-03.mha")
    assert not any(line.startswith(intact) for line in lines)
    # A damaged file is also shown under images/<pk>/ (offline parity): counted there apart.
    expected = f"snapshot damaged: {counted(files, removed, flipped, cut)} missing or damaged"
    assert lines[-1].startswith(expected), (lines[-1], expected)
    assert "3 of them damaged" in lines[-1]


def test_snapshot_verify_reports_planted_links_without_following_them(
    mount_gcfs: Callable[..., Mount], world: Any, tmp_path: Path
) -> None:
    """A shared snapshot directory is hostile: a data file replaced by a symlink to an intact
    copy of its bytes is reported, not followed (followed, the copy would pass), and an
    index replaced by a FIFO is reported at once, not waited on."""
    snapshot, files = verified_snapshot(mount_gcfs, world, tmp_path)
    linked, fifo = path_of(files, "verified-00.mha"), path_of(files, "verified-01.mha")
    data = store_files(snapshot, files[linked])[0]
    copy = tmp_path / "elsewhere.data"
    copy.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(copy)
    index = store_files(snapshot, files[fifo])[1]
    index.unlink()
    os.mkfifo(index)

    checked = gcfs("snapshot", "--verify", str(snapshot))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert f"{linked}: its data file is a symbolic link (not followed)" in lines
    assert f"{fifo}: its index file is not a regular file" in lines
    expected = f"snapshot damaged: {counted(files, linked, fifo)} missing or damaged"
    assert lines[-1].startswith(expected), (lines[-1], expected)
