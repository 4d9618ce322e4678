"""Living with gcfs: refresh, SIGHUP, status, extended attributes, prefetch."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gcfs.fakegc import FakeGC
from tests.conftest import Mount, gcfs_command, poll

MiB = 2**20


def gcfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gcfs_command(*args), capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def mount(mount_gcfs: Callable[..., Mount], tmp_path: Path) -> Mount:
    # A long TTL: anything new shows only because of refresh or SIGHUP.
    return mount_gcfs("--ttl", "3600", "--cache-dir", str(tmp_path / "cache"))


def test_refresh_shows_a_new_item_at_once(mount: Mount, fake: FakeGC, world: Any) -> None:
    """`gcfs refresh DIR` makes a new item show without waiting for the cache lifetime."""
    items = mount.path / "archives" / "lidc-lung-ct" / "items"
    before = set(os.listdir(items))
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    new = world.add_archive_item(archive, [], title="new-case")
    assert set(os.listdir(items)) == before  # still cached
    result = gcfs("refresh", str(items))
    assert result.returncode == 0, result.stderr
    assert set(os.listdir(items)) == before | {new.pk}


def refresh_line(readme: Path) -> list[str]:
    """The `gcfs refresh ...` command a stub README tells the user to run, as argv."""
    lines = [line.strip() for line in readme.read_text().splitlines()]
    commands = [line for line in lines if line.startswith("gcfs refresh ")]
    assert len(commands) == 1, lines
    return shlex.split(commands[0])


def test_refresh_after_access_is_granted(mount: Mount, fake: FakeGC, world: Any) -> None:
    """A stub becomes the real directory after the `gcfs refresh` its README prints, which
    names the real mount point (no `<mount point>` placeholder), also when reached by pk."""
    hidden = next(a for a in world.algorithms.values() if not a.visible_to("demo"))
    stub = mount.path / "algorithms" / hidden.slug
    assert os.listdir(stub) == ["README.md"]
    command = refresh_line(stub / "README.md")
    assert command == ["gcfs", "refresh", f"{mount.path}/algorithms"]
    by_pk = (mount.path / "algorithms" / hidden.pk / "README.md").read_text()
    assert refresh_line(mount.path / "algorithms" / hidden.pk / "README.md") == command
    assert f"`{hidden.pk}` is the algorithm's primary key" in by_pk
    via_api = mount.path / "api" / "v1" / "algorithms" / hidden.pk / "README.md"
    assert via_api.read_text() == by_pk
    hidden.viewers.add("demo")  # the owner approved the request
    assert os.listdir(stub) == ["README.md"]
    result = gcfs(*command[1:])
    assert result.returncode == 0, result.stderr
    assert "algorithm.json" in os.listdir(stub)
    assert hidden.slug in os.listdir(mount.path / "algorithms")


def test_image_by_pk_stub_is_true(mount: Mount, fake: FakeGC, world: Any) -> None:
    """`images/<pk>` of an image the token may not read: its README claims no object that
    refers to it (none does: the pk was typed in), says the image exists, and its refresh
    command, run after access is granted, shows the image."""
    private = world.find_by_slug(world.archives.values(), "brain-mri-private")
    image = next(i for i in world.images.values() if i.name == "brain-0001.mha")
    assert not image.visible_to("demo")
    stub = mount.path / "images" / image.pk
    assert os.listdir(stub) == ["README.md"]
    text = (stub / "README.md").read_text()
    assert "refers to" not in text
    assert f"The image {image.pk} exists, but your account (demo) may not read it" in text
    assert f"{fake.base_url}/api/v1/cases/images/{image.pk}/" in text
    command = refresh_line(stub / "README.md")
    assert command == ["gcfs", "refresh", f"{mount.path}/images"]
    via_api = mount.path / "api" / "v1" / "cases" / "images" / image.pk / "README.md"
    assert via_api.read_text() == text
    private.viewers.add("demo")  # access granted through the image's archive
    result = gcfs(*command[1:])
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(stub)) == ["brain-0001.mha", "image.json"]


def test_recursive_refresh_and_sighup(mount: Mount, fake: FakeGC, world: Any) -> None:
    """`--recursive` forgets everything below PATH; SIGHUP forgets everything."""
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    path = mount.path / "archives" / "lidc-lung-ct" / "archive.json"
    items = mount.path / "archives" / "lidc-lung-ct" / "items"
    os.listdir(items)
    archive.description = "changed once"
    world.add_archive_item(archive, [], title="another-case")
    count = len(os.listdir(items))
    assert gcfs("refresh", "--recursive", str(mount.path / "archives")).returncode == 0
    assert json.loads(path.read_bytes())["description"] == "changed once"
    assert len(os.listdir(items)) == count + 1
    archive.description = "changed twice"
    assert mount.process is not None
    fake.reset_counts()
    mount.process.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        return bool(json.loads(path.read_bytes())["description"] == "changed twice")

    poll(reloaded, 10, "SIGHUP to forget the cached archive")
    assert fake.count("archives-list") >= 1


def test_status_command_and_file(mount: Mount, fake: FakeGC) -> None:
    """`gcfs status` and .gcfs/status.json: server, user, requests, caches, bytes, errors."""
    data = mount.path / "archives" / "lidc-lung-ct" / "items"
    first = sorted(os.listdir(data))[0]
    for name in os.listdir(data / first):
        if (data / first / name).is_file():
            (data / first / name).read_bytes()
    status = json.loads((mount.path / ".gcfs" / "status.json").read_bytes())
    assert status["server"] == fake.base_url
    assert status["user"] == "demo"
    assert status["requests"]["archives/items/"]["200"] >= 1
    assert status["requests_total"] >= fake.count("archives-items-list")
    assert status["bytes_read"] > 0
    assert status["block_cache"]["max_bytes"] > 0
    assert status["errors_last_hour"] == 0
    result = gcfs("status", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert "user:         demo" in result.stdout
    assert f"stored in:    {status['metadata_store']['path']}" in result.stdout
    assert status["metadata_store"]["path"].endswith(".sqlite")
    as_json = gcfs("status", "--json", str(mount.path))
    assert json.loads(as_json.stdout)["user"] == "demo"


def test_extended_attributes(mount: Mount, fake: FakeGC, world: Any) -> None:
    """user.gc.pk/.api_url/.url/.kind on objects; getfattr shows them; writes are refused."""
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    directory = mount.path / "archives" / "lidc-lung-ct"
    assert os.getxattr(directory, "user.gc.pk").decode() == archive.pk
    assert os.getxattr(directory, "user.gc.kind") == b"archive"
    assert os.getxattr(directory, "user.gc.url").decode().endswith("/archives/lidc-lung-ct/")
    api_url = os.getxattr(directory / "archive.json", "user.gc.api_url").decode()
    assert api_url == f"{fake.base_url}/api/v1/archives/{archive.pk}/"
    item = sorted(os.listdir(directory / "items"))[0]
    assert os.getxattr(directory / "items" / item, "user.gc.kind") == b"archive-item"
    assert set(os.listxattr(directory)) == {
        "user.gc.kind",
        "user.gc.pk",
        "user.gc.api_url",
        "user.gc.url",
    }
    shown = subprocess.run(
        ["getfattr", "-d", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    assert f'user.gc.pk="{archive.pk}"' in shown
    with pytest.raises(OSError):
        os.setxattr(directory, "user.gc.pk", b"x")
    hidden = next(a for a in world.algorithms.values() if not a.visible_to("demo"))
    stub = mount.path / "algorithms" / hidden.slug
    assert os.getxattr(stub, "user.gc.kind") == b"no-access"


def test_prefetch_fills_the_cache_resumably(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    """prefetch reads a subtree into the block cache with progress; a second run has
    nothing to do; a later mount on the same cache reads it without storage requests."""
    cache = tmp_path / "cache"
    first = mount_gcfs("--cache-dir", str(cache))
    subtree = first.path / "archives" / "lidc-lung-ct" / "items"
    result = gcfs("prefetch", str(subtree))
    assert result.returncode == 0, result.stderr
    assert "files" in result.stderr and "ETA" in result.stderr
    assert fake.count("storage-get") > 0
    fake.reset_counts()
    again = gcfs("prefetch", str(subtree))
    assert again.returncode == 0, again.stderr
    assert "already cached" in again.stderr
    assert fake.count("storage-get") == 0
    first.unmount()

    second = mount_gcfs("--cache-dir", str(cache))
    fake.reset_counts()
    for directory, _, files in os.walk(second.path / "archives" / "lidc-lung-ct" / "items"):
        for name in files:
            (Path(directory) / name).read_bytes()
    assert fake.count("storage-get") == 0, [(r.path, r.range) for r in fake.requests]


def test_prefetch_reads_several_files_at_once(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, tmp_path: Path
) -> None:
    """A subtree of many small files is fetched several files at a time, not one round trip
    after another: with 200 ms of storage latency, several storage requests are in flight
    at once (one after another they never overlap), and each file costs one ranged GET."""
    socket = world.add_socket("many-small-ct", kind="Image", relative_path="images/ct")
    archive = world.add_archive("many-small", "24 small images", viewers={"demo"})
    for n in range(24):
        name = f"small-{n:02d}.mha"
        image = world.add_image(name, [(name, bytes([n]) * 50_000)])
        world.add_archive_item(archive, [world.add_value(socket, image=image)], title=name)
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    subtree = mount.path / "archives" / "many-small" / "items"
    sizes = [p.stat().st_size for p in subtree.rglob("*.mha")]  # the walk: sizes are known
    assert sizes == [50_000] * 24
    fake.storage_latency = 0.2
    fake.reset_counts()
    result = gcfs("prefetch", str(subtree))
    assert result.returncode == 0, result.stderr
    gets = [r for r in fake.requests if r.endpoint == "storage-get" and r.range != "bytes=0-0"]
    assert len(gets) == 24
    assert fake.storage_peak_concurrency >= 4
    fake.reset_counts()
    for n, path in enumerate(sorted(subtree.rglob("*.mha"), key=lambda p: p.name)):
        assert path.read_bytes() == bytes([n]) * 50_000
    assert fake.count("storage-get") == 0  # all of it in the block store


def test_prefetch_refuses_what_does_not_fit(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"), "--cache-size", "1M")
    result = gcfs("prefetch", str(mount.path / "archives" / "prostate-mri-picai"))
    assert result.returncode != 0
    assert "--cache-size" in result.stderr
    # Walking the subtree learned the sizes (1-byte probes); no content was fetched.
    storage = [r for r in fake.requests if r.endpoint == "storage-get"]
    assert all(r.range == "bytes=0-0" for r in storage), storage


def test_memory_follows_what_the_kernel_holds(mount: Mount, fake: FakeGC) -> None:
    """Nodes the kernel forgets (here: its caches dropped) leave the daemon's inode table;
    walking again rebuilds them with the same inode numbers and contents."""
    status = mount.path / ".gcfs" / "status.json"
    before = {}
    for directory, _, files in os.walk(mount.path / "archives"):
        for name in files:
            path = Path(directory) / name
            before[path] = (path.stat().st_ino, path.stat().st_size)
    walked = json.loads(status.read_bytes())["inodes"]
    assert walked > len(before)
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # reclaim dentries and inodes

    poll(
        lambda: json.loads(status.read_bytes())["inodes"] < walked // 2,
        10,
        "the kernel's FORGETs to shrink the inode table",
    )
    for path, (inode, size) in before.items():
        assert (path.stat().st_ino, path.stat().st_size) == (inode, size)


def test_refresh_command_is_quoted_for_a_shell() -> None:
    """A mount point with a space or a quote still gives a command that runs as printed."""
    from gcfs.render import refresh_command

    line = refresh_command("/home/ann/my gc's/", "algorithms")
    assert shlex.split(line) == ["gcfs", "refresh", "/home/ann/my gc's/algorithms"]


def test_imageless_socket_is_no_warning(mount: Mount, fake: FakeGC, world: Any) -> None:
    """An image socket whose value holds no image (a valid state on the real server) is shown
    as nothing and logged once at DEBUG, not as a WARNING at every relisting."""
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    image = next(i for i in world.images.values() if i.name == "LIDC-IDRI-0001.mha")
    socket = world.add_socket("broken-image-ci", kind="Image", relative_path="images/broken")
    value = world.add_value(socket, image=image)
    value.image = None  # what the real server serves: `"image": null`
    item = world.add_archive_item(archive, [value], title="image-less")
    directory = mount.path / "archives" / "lidc-lung-ct" / "items" / item.pk
    for _ in range(3):  # listed again after each refresh
        assert sorted(os.listdir(directory)) == ["item.json"]
        assert gcfs("refresh", "--recursive", str(mount.path / "archives")).returncode == 0
    said = [line for line in mount.log_text().splitlines() if "holds no image" in line]
    assert len(said) == 1 and " DEBUG " in said[0], said
    assert f"value pk {value.pk}" in said[0]
    assert not [line for line in mount.log_text().splitlines() if " WARNING " in line]
