"""The mount as a user meets it: ls, cat, stat, symlinks, stubs, EROFS, request counts.

Every expectation is computed from what the fake serves (through its HTTP API with the demo
token) or from the fake's world, never written down by hand.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gcfs.fakegc import DEMO_TOKEN, FakeGC
from gcfs.names import slug_from_url
from tests.conftest import Mount, poll

COLLECTIONS = [
    ("archives", "archive.json"),
    ("algorithms", "algorithm.json"),
    ("reader-studies", "reader-study.json"),
]


def served(fake: FakeGC, path: str, **params: Any) -> Any:
    """What the fake serves the demo user at an API path (all pages)."""
    headers = {"Authorization": f"Bearer {DEMO_TOKEN}"}
    response = httpx.get(
        f"{fake.base_url}/api/v1/{path}", params={"limit": 1000, **params}, headers=headers
    )
    response.raise_for_status()
    return response.json()


def slug_of(obj: dict[str, Any], collection: str) -> str:
    return obj.get("slug") or slug_from_url(obj["url"], collection) or obj["pk"]


def test_root(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """The root holds README.md and the three collections; README names user and server."""
    mount = mount_gcfs()
    expected = [".gcfs", "README.md", "algorithms", "archives", "images", "reader-studies"]
    assert sorted(os.listdir(mount.path)) == expected
    readme = (mount.path / "README.md").read_text()
    assert "Signed in as: demo" in readme
    assert fake.base_url in readme


@pytest.mark.parametrize(("collection", "metadata"), COLLECTIONS)
def test_collections_list_what_the_token_sees(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, collection: str, metadata: str
) -> None:
    """Each collection lists exactly the served objects by slug, each with its JSON as served."""
    mount = mount_gcfs()
    objects = served(fake, f"{collection}/")["results"]
    assert objects, f"the demo world should have visible {collection}"
    slugs = sorted(slug_of(obj, collection) for obj in objects)
    assert sorted(os.listdir(mount.path / collection)) == slugs
    for obj in objects:
        directory = mount.path / collection / slug_of(obj, collection)
        assert os.listdir(directory) == [metadata] or metadata in os.listdir(directory)
        data = (directory / metadata).read_bytes()
        # Exactly as served: same keys in the same order, 2-space indent, trailing newline.
        assert data == (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
        assert list(json.loads(data)) == list(obj)
        # The size is true before anything is read, and equals the content's.
        assert (directory / metadata).stat().st_size == len(data)


def test_metadata_equals_detail_endpoint(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """The JSON file equals the object's own detail endpoint, not only the list entry."""
    mount = mount_gcfs()
    for collection, metadata in COLLECTIONS:
        for obj in served(fake, f"{collection}/")["results"]:
            detail = served(fake, f"{collection}/{obj['pk']}/")
            shown = json.loads(
                (mount.path / collection / slug_of(obj, collection) / metadata).read_bytes()
            )
            assert shown == detail


def test_modes_and_owner(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """Directories 0555, files 0444, owned by the mounting user."""
    mount = mount_gcfs()
    obj = served(fake, "archives/")["results"][0]
    directory = mount.path / "archives" / slug_of(obj, "archives")
    assert directory.stat().st_mode & 0o777 == 0o555
    assert (directory / "archive.json").stat().st_mode & 0o777 == 0o444
    assert (directory / "archive.json").stat().st_uid == os.getuid()


@pytest.mark.parametrize(("collection", "metadata"), COLLECTIONS)
def test_pk_is_a_symlink_to_the_slug(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, collection: str, metadata: str
) -> None:
    """Looking up a visible object's pk gives a symlink to its slug directory (not listed)."""
    mount = mount_gcfs()
    obj = served(fake, f"{collection}/")["results"][0]
    link = mount.path / collection / obj["pk"]
    assert link.is_symlink()
    assert os.readlink(link) == slug_of(obj, collection)
    assert json.loads((link / metadata).read_bytes())["pk"] == obj["pk"]
    assert obj["pk"] not in os.listdir(mount.path / collection)


@pytest.mark.parametrize(
    ("collection", "table"), [("algorithms", "algorithms"), ("reader-studies", "reader_studies")]
)
def test_hidden_slug_becomes_a_stub(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, collection: str, table: str
) -> None:
    """An algorithm or reader study that exists but is hidden shows as README.md only,
    with its request-access page; the website oracle said it exists."""
    mount = mount_gcfs()
    hidden = [o for o in getattr(world, table).values() if not o.visible_to("demo")]
    assert hidden, f"the demo world should hide one of the {collection}"
    slug = hidden[0].slug
    assert slug not in os.listdir(mount.path / collection)
    stub = mount.path / collection / slug
    assert os.listdir(stub) == ["README.md"]
    text = (stub / "README.md").read_text()
    assert f"{fake.base_url}/{collection}/{slug}/permission-requests/create/" in text
    assert "exists, but your account (demo) lacks access" in text
    assert "couple of hours" in text
    assert fake.count("website-algorithm") + fake.count("website-reader-study") == 1


def test_hidden_archive_slug_stub_says_it_cannot_tell(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """Archive slugs cannot be told apart: the stub says so and still links the request page."""
    mount = mount_gcfs()
    hidden = [a for a in world.archives.values() if not a.visible_to("demo")]
    assert hidden
    for slug in (hidden[0].slug, "no-such-archive"):
        text = (mount.path / "archives" / slug / "README.md").read_text()
        assert "it does not exist, or your account (demo) lacks access" in text
        assert f"{fake.base_url}/archives/{slug}/permission-requests/create/" in text


@pytest.mark.parametrize(
    ("collection", "table"),
    [
        ("archives", "archives"),
        ("algorithms", "algorithms"),
        ("reader-studies", "reader_studies"),
    ],
)
def test_hidden_pk_stub_and_absent_pk(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, collection: str, table: str
) -> None:
    """A hidden pk is a stub (the filter oracle answered 200); an absent pk is ENOENT (400)."""
    mount = mount_gcfs()
    hidden = next(o for o in getattr(world, table).values() if not o.visible_to("demo"))
    text = (mount.path / collection / hidden.pk / "README.md").read_text()
    assert "exists, but your account (demo) lacks access" in text
    absent = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path / collection / absent)


@pytest.mark.parametrize("collection", ["algorithms", "reader-studies"])
def test_absent_slug_is_enoent(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, collection: str
) -> None:
    """The website answers 404 for a slug that does not exist: ENOENT, remembered."""
    mount = mount_gcfs()
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            os.stat(mount.path / collection / "no-such-thing")
    assert fake.count("website-algorithm") + fake.count("website-reader-study") == 1


JUNK = [".git", ".hidden", "desktop.ini", "Foo", "Thumbs.db", "has space", "autorun.inf", "a.b"]


def test_junk_names_fail_without_a_request(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """Names that cannot be identifiers are ENOENT at once, with no request at all."""
    mount = mount_gcfs()
    fake.reset_counts()
    for collection, _ in COLLECTIONS:
        for name in JUNK:
            with pytest.raises(FileNotFoundError):
                os.stat(mount.path / collection / name)
    for name in JUNK:
        with pytest.raises(FileNotFoundError):
            os.stat(mount.path / name)
    assert fake.count() == 0


def test_second_ls_within_ttl_makes_no_request(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """`ls -l` of the collections twice: one request per collection, then none at all."""
    mount = mount_gcfs()
    fake.reset_counts()
    command = ["ls", "-l", *(str(mount.path / c) for c, _ in COLLECTIONS)]
    first = subprocess.run(command, capture_output=True, check=True)
    # One request per collection listing, nothing per object.
    assert sorted(r.endpoint for r in fake.requests) == [
        "algorithms-list",
        "archives-list",
        "reader-studies-list",
    ]
    fake.reset_counts()
    second = subprocess.run(command, capture_output=True, check=True)
    assert fake.count() == 0
    assert first.stdout == second.stdout


def test_second_ls_lr_of_everything_makes_no_request(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """`ls -lR` of the whole mount twice: the second run makes no request at all."""
    mount = mount_gcfs()
    first = subprocess.run(["ls", "-lR", str(mount.path)], capture_output=True, check=True)
    assert fake.count() > 0
    fake.reset_counts()
    second = subprocess.run(["ls", "-lR", str(mount.path)], capture_output=True, check=True)
    assert fake.count() == 0, fake.requests
    assert first.stdout == second.stdout


def test_ls_after_ttl_fetches_again(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """With a short TTL, a listing is fetched again once it expired (one request)."""
    mount = mount_gcfs("--ttl", "0.2")
    os.listdir(mount.path / "archives")
    fake.reset_counts()

    def refetched() -> bool:
        os.listdir(mount.path / "archives")
        return fake.count("archives-list") >= 1

    poll(refetched, 10, "the archives listing to be fetched again")


def test_mount_makes_one_request(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """Nothing is fetched at mount time beyond checking the token."""
    fake.reset_counts()
    mount_gcfs()
    assert [r.endpoint for r in fake.requests] == ["profiles-self"]


def test_large_collection_is_paged_concurrently(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """2,500 archives: listed completely with a 100-object first page (to learn the count),
    then ceil(2400/1000) = 3 pages of 1000 fetched concurrently."""
    for index in range(2500 - len(world.archives)):
        world.add_archive(f"bulk-{index:05d}", viewers={"demo"})
    visible = sum(1 for a in world.archives.values() if a.visible_to("demo"))
    mount = mount_gcfs()
    fake.reset_counts()
    names = os.listdir(mount.path / "archives")
    assert len(names) == len(set(names)) == visible
    assert fake.count("archives-list") == 1 + -(-(visible - 100) // 1000)
    limits = sorted(int(r.query["limit"]) for r in fake.requests)
    assert limits == [100] + [1000] * (len(limits) - 1)


def test_writes_fail_with_erofs(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """Every call that would change something fails with EROFS."""
    mount = mount_gcfs()
    slug = slug_of(served(fake, "archives/")["results"][0], "archives")
    directory = mount.path / "archives" / slug
    attempts: list[Callable[[], object]] = [
        lambda: os.open(directory / "new.txt", os.O_WRONLY | os.O_CREAT),
        lambda: os.open(directory / "archive.json", os.O_WRONLY | os.O_APPEND),
        lambda: os.open(directory / "archive.json", os.O_RDWR),
        lambda: os.mkdir(directory / "sub"),
        lambda: os.unlink(directory / "archive.json"),
        lambda: os.rename(directory / "archive.json", directory / "x.json"),
        lambda: os.chmod(directory / "archive.json", 0o644),
        lambda: os.symlink("archive.json", directory / "link"),
        lambda: os.rmdir(directory),
        lambda: os.truncate(directory / "archive.json", 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, attempt


def test_sigterm_unmounts_cleanly(mount_gcfs: Callable[..., Mount]) -> None:
    """SIGTERM to the daemon unmounts and exits with status 0."""
    mount = mount_gcfs()
    assert mount.process is not None
    mount.process.terminate()
    assert mount.process.wait(timeout=10) == 0
    assert not os.path.ismount(mount.path)
    os.listdir(mount.path)  # an ordinary empty directory again, not a stale mount


def test_fusermount_unmount_stops_the_daemon(mount_gcfs: Callable[..., Mount]) -> None:
    """Unmounting from outside ends the daemon cleanly."""
    mount = mount_gcfs()
    assert mount.process is not None
    subprocess.run(["fusermount3", "-u", str(mount.path)], check=True)
    assert mount.process.wait(timeout=10) == 0


def test_find_walks_the_whole_tree(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """`find` sees every object directory and its metadata file; no request is made twice."""
    mount = mount_gcfs()
    fake.reset_counts()
    found = subprocess.run(["find", str(mount.path)], capture_output=True, text=True, check=True)
    made = [(r.path, tuple(sorted(r.query.items()))) for r in fake.requests]
    assert len(made) == len(set(made)) > 3
    paths = found.stdout.split()
    for collection, metadata in COLLECTIONS:
        for obj in served(fake, f"{collection}/")["results"]:
            assert str(mount.path / collection / slug_of(obj, collection) / metadata) in paths


def test_concurrent_listings_share_one_request(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """Eight processes listing a cold directory at once cause one request, not eight."""
    fake.per_item_latency = 0.05  # keeps the first request in flight while the others arrive
    mount = mount_gcfs()
    fake.reset_counts()
    listers = [
        subprocess.Popen(["ls", "-l", str(mount.path / "archives")], stdout=subprocess.PIPE)
        for _ in range(8)
    ]
    outputs = {lister.communicate(timeout=30)[0] for lister in listers}
    assert len(outputs) == 1
    assert fake.count("archives-list") == 1


def test_inodes_are_stable_across_mounts(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """An object keeps its inode number in a second mount (derived from its identity)."""
    first, second = mount_gcfs(), mount_gcfs()
    slug = slug_of(served(fake, "archives/")["results"][0], "archives")
    for relative in (f"archives/{slug}", f"archives/{slug}/archive.json", "reader-studies"):
        assert (first.path / relative).stat().st_ino == (second.path / relative).stat().st_ino


def test_changed_metadata_shows_after_the_ttl(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """When an object changes on the server, its JSON file shows the new version once the
    cache lifetime has passed, whole: never old pages mixed with new ones."""
    mount = mount_gcfs("--ttl", "0.3")
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    path = mount.path / "archives" / "lidc-lung-ct" / "archive.json"
    assert json.loads(path.read_bytes())["description"] == archive.description
    archive.description = "Updated: " + "x" * 5000  # longer than a page

    def updated() -> bool:
        return bool(json.loads(path.read_bytes())["description"].startswith("Updated: "))

    poll(updated, 10, "the new description")
    assert (
        path.read_bytes()
        == (
            json.dumps(served(fake, f"archives/{archive.pk}/"), indent=2, ensure_ascii=False) + "\n"
        ).encode()
    )
