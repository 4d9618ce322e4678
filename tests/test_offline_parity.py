"""Issue 16, offline parity: an offline mount answers every identifier its snapshot holds as
the online mount did (pks, `images/<pk>`, `api/v1/`, `gcfs path`), says which snapshot lacks
anything else, and `gcfs snapshot` records all of it at no request of its own."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gcfs.fakegc import FakeGC
from gcfs.locate import Snapshot, locate
from tests.conftest import Mount, gcfs_command
from tests.test_cluster import SUBTREES, only_unix_sockets, record

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# Kinds of nodes (user.gc.kind) that show an object gcfs finds by pk.
OBJECT_KINDS = {
    "archive",
    "algorithm",
    "reader-study",
    "archive-item",
    "job",
    "display-set",
    "algorithm-image",
    "image",
}


def gcfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gcfs_command(*args), capture_output=True, text=True, timeout=300, check=False
    )


def sed(url: str, base_url: str, root: Path) -> str:
    """The README's rule: the site swapped for the mount point, the trailing slash dropped;
    the path relative to `root`."""
    path = re.sub(f"^{re.escape(base_url)}/", f"{root}/", url)
    path = re.sub("/$", "", path)
    return str(Path(path).relative_to(root))


def identifiers(root: Path, base_url: str) -> tuple[set[str], set[str]]:
    """Every API URL and website URL of the server in the bytes of every *.json file under
    the subtrees, and in the user.gc.api_url of every object node (archive items have no
    api_url field: only their xattr names it); and every pk of an object node (user.gc.pk)
    or in an API URL."""
    site = re.escape(base_url)
    pattern = re.compile(
        rf"{site}/(?:api/v1/[a-z/-]+/{UUID}|(?:archives|algorithms|reader-studies)/[^\"\s]*)/".encode()
    )
    urls: set[str] = set()
    pks: set[str] = set()
    for subtree in SUBTREES:
        for path in [root / subtree, *(root / subtree).rglob("*")]:
            if path.is_symlink():
                continue
            if path.is_file() and path.suffix == ".json":
                urls.update(m.decode() for m in pattern.findall(path.read_bytes()))
            names = os.listxattr(path)
            if "user.gc.kind" not in names:
                continue
            kind = os.getxattr(path, "user.gc.kind").decode()
            if kind in OBJECT_KINDS and "user.gc.pk" in names:
                pks.add(os.getxattr(path, "user.gc.pk").decode())
            if kind in OBJECT_KINDS and "user.gc.api_url" in names:
                api_url = os.getxattr(path, "user.gc.api_url").decode()
                if pattern.fullmatch(api_url.encode()):
                    urls.add(api_url)
    # The pks in API URLs too: questions and answers have no node of their own in the tree.
    pks.update(m for url in urls if "/api/v1/" in url for m in re.findall(UUID, url))
    return urls, pks


def shown(root: Path, relative: str) -> tuple[Any, ...]:
    """What the mount shows at `relative`: a link's target or a file's bytes, then what it
    resolves to (its path, xattrs, and for a directory its names and its files' bytes)."""
    path = root / relative
    if path.is_symlink():
        first: tuple[Any, ...] = ("symlink", os.readlink(path))
    elif path.is_dir():
        first = ("dir",)
    else:
        first = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    real = Path(os.path.realpath(path))
    xattrs = {n: os.getxattr(real, n).decode() for n in sorted(os.listxattr(real))}
    content: Any
    if real.is_dir():
        names = sorted(os.listdir(real))
        content = {
            name: hashlib.sha256((real / name).read_bytes()).hexdigest()
            for name in names
            if (real / name).is_file()
        }
        content["/"] = names
    else:
        content = hashlib.sha256(real.read_bytes()).hexdigest()
    return (*first, str(real.relative_to(root)), xattrs, content)


def api_requests(fake: FakeGC) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (r.path, tuple(sorted(r.query.items())))
        for r in fake.requests
        if r.path.startswith("/api/")
    }


def snapshot_of(online: Mount, to: Path) -> None:
    taken = gcfs("snapshot", *(str(online.path / s) for s in SUBTREES), "--to", str(to))
    assert taken.returncode == 0, taken.stderr
    # The end line counts files as the manifest does: images/<pk> is not counted twice.
    manifest = json.loads((to / "manifest.json").read_text())
    last = taken.stderr.strip().splitlines()[-1]
    assert last.startswith(f"snapshot: {manifest['files']} files under "), (last, manifest)


def test_an_offline_mount_resolves_every_identifier_its_snapshot_holds(
    mount_gcfs: Callable[..., Mount],
    mount_offline: Callable[..., Mount],
    fake: FakeGC,
    tmp_path: Path,
) -> None:
    """Snapshot an archive, a reader study with answers and an algorithm with jobs; every
    API URL and website URL in the snapshot's JSON files (and in its objects' api_url
    xattrs) resolves offline, by the README's `sed` rule and by `gcfs path`, to the same
    thing as online (link target, file bytes, directory contents, xattrs), and so does every
    pk; with the server stopped and no socket but the control socket. The snapshot asked the
    API nothing that walking the subtrees did not."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    fake.reset_counts()
    record(online.path, SUBTREES)
    walked = api_requests(fake)
    fake.reset_counts()
    snapshot = tmp_path / "snapshot"
    snapshot_of(online, snapshot)
    asked = api_requests(fake)
    assert asked <= walked, sorted(asked - walked)

    urls, pks = identifiers(online.path, fake.base_url)
    kinds = {re.sub(UUID, "<pk>", url.removeprefix(fake.base_url)) for url in urls}
    # The test covers every kind of identifier (a regex that found nothing would pass).
    for kind in [
        "/api/v1/archives/<pk>/",
        "/api/v1/archives/items/<pk>/",
        "/api/v1/algorithms/<pk>/",
        "/api/v1/algorithms/images/<pk>/",
        "/api/v1/algorithms/jobs/<pk>/",
        "/api/v1/reader-studies/<pk>/",
        "/api/v1/reader-studies/display-sets/<pk>/",
        "/api/v1/reader-studies/questions/<pk>/",
        "/api/v1/reader-studies/answers/<pk>/",
        "/api/v1/cases/images/<pk>/",
        "/algorithms/corads-ai/images/<pk>/",
        "/archives/lidc-lung-ct/",
    ]:
        assert kind in kinds, sorted(kinds)
    assert len(pks) >= 60  # 3 collections, 12 items, 15 images, 22 questions+answers, ...
    expected_urls = {url: shown(online.path, sed(url, fake.base_url, online.path)) for url in urls}
    located = {
        identifier: str(locate(identifier, online.path, fake.base_url).relative_to(online.path))
        for identifier in urls | pks
    }
    expected_pks = {pk: shown(online.path, located[pk]) for pk in pks}
    online.unmount()
    fake.stop()

    offline = mount_offline(snapshot)
    manifest = json.loads((snapshot / "manifest.json").read_text())
    assert manifest["identifiers"] is True
    held = Snapshot(manifest["taken"], manifest["server"], identifiers=True)
    for url, expected in expected_urls.items():
        assert shown(offline.path, sed(url, fake.base_url, offline.path)) == expected, url
    for identifier, relative in located.items():
        found = locate(identifier, offline.path, fake.base_url, held)
        assert str(found.relative_to(offline.path)) == relative, identifier
    for pk, expected in expected_pks.items():
        assert shown(offline.path, located[pk]) == expected, pk
    # As online: pks and api/ are looked up, not listed; images/ is listed, and empty.
    assert sorted(os.listdir(offline.path)) == [
        ".gcfs",
        "README.md",
        "algorithms",
        "archives",
        "images",
        "reader-studies",
    ]
    assert os.listdir(offline.path / "images") == []
    assert sorted(os.listdir(offline.path / "api" / "v1")) == [
        "algorithms",
        "archives",
        "cases",
        "reader-studies",
    ]
    assert os.listdir(offline.path / "api" / "v1" / "cases" / "images") == []
    # The command itself, on a pk and a URL.
    some_pk, some_url = sorted(pks)[0], sorted(urls)[0]
    for identifier in (some_pk, some_url):
        answer = gcfs("path", identifier, str(offline.path))
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == str(offline.path / located[identifier])
    assert offline.process is not None
    assert only_unix_sockets(offline.process.pid) == []


def test_gcfs_path_says_what_a_snapshot_lacks(
    mount_gcfs: Callable[..., Mount],
    mount_offline: Callable[..., Mount],
    fake: FakeGC,
    world: Any,
    tmp_path: Path,
) -> None:
    """Objects the server has but the snapshot does not (another archive, its item, its
    items' image) are "not in this snapshot (taken <when> of <server>)", exit 1, by pk, URL
    or slug; a snapshot taken by an older gcfs (no identifiers recorded) still mounts and
    serves its subtrees, and `gcfs path` of an item there says to take it again; taken
    again, it has them (and says it has them only when all its subtrees were taken again)."""
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    snapshot = tmp_path / "snapshot"
    snapshot_of(online, snapshot)
    expected = record(online.path, SUBTREES)
    picai = online.path / "archives" / "prostate-mri-picai"
    item = next(p for p in (picai / "items").iterdir())
    image = next(p for p in item.rglob("*") if p.is_dir() and _kind(p) == "image")
    outside = {
        "archive": os.getxattr(picai, "user.gc.pk").decode(),
        "item": os.getxattr(item, "user.gc.api_url").decode(),
        "image": os.getxattr(image, "user.gc.api_url").decode(),
        "slug": "prostate-mri-picai",
    }
    for identifier in outside.values():  # online, each is there
        assert gcfs("path", identifier, str(online.path)).returncode == 0, identifier
    lidc_item = next(p for p in (online.path / "archives" / "lidc-lung-ct" / "items").iterdir())
    inside = os.getxattr(lidc_item, "user.gc.pk").decode()
    manifest = json.loads((snapshot / "manifest.json").read_text())
    older = make_older(snapshot, tmp_path / "older")
    # Taken again with one of its subtrees, an older snapshot still lacks the others'
    # images; with all of them, it is whole.
    for subtrees, whole in ((SUBTREES[:1], False), (SUBTREES, True)):
        again = make_older(snapshot, tmp_path / f"again-{len(subtrees)}")
        taken = gcfs("snapshot", *(str(online.path / s) for s in subtrees), "--to", str(again))
        assert taken.returncode == 0, taken.stderr
        assert json.loads((again / "manifest.json").read_text())["identifiers"] is whole
        assert {"api", "images"} <= set(
            json.loads((again / "tree.json").read_text())["root"]["entries"]
        )
    online.unmount()
    fake.stop()

    offline = mount_offline(snapshot)
    lacks = f"is not in this snapshot (taken {manifest['taken']} of {fake.base_url})"
    for what, identifier in outside.items():
        answer = gcfs("path", identifier, str(offline.path))
        assert answer.returncode == 1, (what, answer.stdout)
        assert answer.stderr.strip() == f"gcfs: {identifier} {lacks}", what
    assert gcfs("path", inside, str(offline.path)).returncode == 0

    old = mount_offline(older)
    assert record(old.path, SUBTREES) == expected
    answer = gcfs("path", inside, str(old.path))
    assert answer.returncode == 1 and lacks in answer.stderr, answer.stderr
    assert "run gcfs snapshot again" in answer.stderr


def make_older(snapshot: Path, to: Path) -> Path:
    """A copy of `snapshot` as an older gcfs took it: no images/, no api/, no
    "identifiers" in its manifest."""
    shutil.copytree(snapshot, to, symlinks=True)
    document = json.loads((to / "tree.json").read_text())
    for name in ("images", "api"):
        del document["root"]["entries"][name]
    del document["manifest"]["identifiers"]
    (to / "tree.json").write_text(json.dumps(document))
    (to / "manifest.json").write_text(json.dumps(document["manifest"]))
    return to


def _kind(path: Path) -> str:
    try:
        return os.getxattr(path, "user.gc.kind").decode()
    except OSError:
        return ""
