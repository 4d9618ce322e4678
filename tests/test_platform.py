"""The platform as it really is: a failing batch request is routed around, failures are
visible and cheap, every object is reachable by pk, slug or API URL, and every node says what
it is.

The fake server answers `cases/images/?job_input=<pk>` and `?job_output=<pk>` with 500 by
default, as the real server does (gc-api.md §3.11); `fake.job_filters_fixed` is a fixed server.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gcfs.fakegc import DEMO_TOKEN, FakeGC
from tests.conftest import Mount, gcfs_command, poll

AUTH = {"Authorization": f"Bearer {DEMO_TOKEN}"}


def api(fake: FakeGC, path: str, **params: Any) -> Any:
    response = httpx.get(
        f"{fake.base_url}/api/v1/{path}", params={"limit": 1000, **params}, headers=AUTH
    )
    response.raise_for_status()
    return response.json()


def media_sha256(url: str) -> str:
    """sha256 of a /media/ file, fetched as a client would (the redirect, then storage)."""
    redirect = httpx.get(url, headers=AUTH, follow_redirects=False)
    assert redirect.status_code == 302, url
    return hashlib.sha256(httpx.get(redirect.headers["location"]).content).hexdigest()


def gcfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(gcfs_command(*args), capture_output=True, text=True, timeout=60)


def corads_jobs(fake: FakeGC) -> list[dict[str, Any]]:
    algorithm = api(fake, "algorithms/", slug="corads-ai")["results"][0]
    jobs: list[dict[str, Any]] = api(
        fake, "algorithms/jobs/", algorithm_image__algorithm=algorithm["pk"]
    )["results"]
    assert len(jobs) >= 2
    return jobs


def image_pks(values: list[dict[str, Any]]) -> set[str]:
    return {v["image"].rstrip("/").rsplit("/", 1)[-1] for v in values if v.get("image")}


def read_tree(directory: Path) -> dict[str, bytes]:
    """Every file below `directory`, by relative path, read completely."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            found[str(path.relative_to(directory))] = path.read_bytes()
    return found


@pytest.mark.parametrize("fixed", [False, True], ids=["real-server", "fixed-server"])
def test_job_inputs_and_outputs_list_and_read_completely(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, fixed: bool
) -> None:
    """A job's inputs/ and outputs/ list and read completely whether or not the server's job
    image filters work; the fallback costs at most one request per image, and a second
    listing within the TTL costs none."""
    fake.job_filters_fixed = fixed
    jobs = corads_jobs(fake)
    mount = mount_gcfs()
    directory = mount.path / "algorithms" / "corads-ai" / "jobs"
    fake.reset_counts()
    shown: dict[str, dict[str, bytes]] = {}
    for job in jobs:
        for key in ("inputs", "outputs"):
            shown[f"{job['pk']}/{key}"] = read_tree(directory / job["pk"] / key)
    wanted = set().union(*(image_pks(j["inputs"]) | image_pks(j["outputs"]) for j in jobs))
    if fixed:
        assert fake.count("cases-images-detail") == 0
        assert fake.count("cases-images-list") == 2 * len(jobs)  # one per inputs/ and outputs/
    else:
        # One failing request per filter (job_input, job_output), remembered for the TTL;
        # then each image once, by its own API URL, however many jobs share it.
        statuses = [r.status for r in fake.requests if r.endpoint == "cases-images-list"]
        assert statuses == [500, 500]
        assert fake.count("cases-images-detail") == len(wanted)
    for job in jobs:
        for key in ("inputs", "outputs"):
            files = shown[f"{job['pk']}/{key}"]
            for value in job[key]:
                if value.get("image"):
                    image = api(fake, f"cases/images/{image_pks([value]).pop()}/")
                    for image_file in image["files"]:
                        name = image_file["file"].rsplit("/", 1)[-1]
                        relative = value["interface"]["relative_path"]
                        path = f"{relative}/{name}" if relative else name
                        digest = hashlib.sha256(files[path]).hexdigest()
                        assert digest == media_sha256(image_file["file"]), path
                else:
                    relative = value["interface"]["relative_path"]
                    assert files[relative] == json.dumps(value["value"]).encode()

    fake.reset_counts()
    for job in jobs:
        for key in ("inputs", "outputs"):
            os.listdir(directory / job["pk"] / key)
    assert [r.endpoint for r in fake.requests] == []


def test_a_failing_endpoint_is_logged_once_and_shown_in_status(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """One WARNING when the job filter starts failing however often it is asked (also after
    the TTL), `gcfs status` names it, and one line when the server answers it again."""
    mount = mount_gcfs("--ttl", "0.3")
    jobs = corads_jobs(fake)
    directory = mount.path / "algorithms" / "corads-ai" / "jobs"
    family = "cases/images/?job_input"

    def batches_failed() -> int:
        return sum(
            r.status == 500 and "job_input" in r.query
            for r in fake.requests
            if r.endpoint == "cases-images-list"
        )

    def asked_again() -> bool:
        for job in jobs:
            assert os.listdir(directory / job["pk"] / "inputs")
        return batches_failed() >= 3  # the TTL expired twice: tried again, failed again

    poll(asked_again, 20, "the failing listing to be tried again after the TTL")
    warnings = [line for line in mount.log_text().splitlines() if " WARNING " in line]
    assert sum(family in line and "HTTP 500" in line for line in warnings) == 1, warnings
    status = gcfs("status", str(mount.path))
    assert status.returncode == 0, status.stderr
    assert f"{family}: HTTP 500" in status.stdout
    as_json = json.loads(gcfs("status", "--json", str(mount.path)).stdout)
    assert as_json["failing_endpoints"][family]["status"] == 500
    assert as_json["fallbacks"] >= 1

    fake.job_filters_fixed = True

    def fixed() -> bool:
        for job in jobs:
            os.listdir(directory / job["pk"] / "inputs")
        return (
            family
            not in json.loads((mount.path / ".gcfs" / "status.json").read_bytes())[
                "failing_endpoints"
            ]
        )

    poll(fixed, 20, "the listing to be used again once the server answers it")
    warnings = [line for line in mount.log_text().splitlines() if " WARNING " in line]
    assert sum(f"answers {family} again" in line for line in warnings) == 1, warnings
    assert f"{family}:" not in gcfs("status", str(mount.path)).stdout


def test_a_directory_that_cannot_be_listed_remembers_its_failure(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """A loop over a directory the server fails (HTTP 500) sends one request, not one per
    call: the failure is remembered for a few seconds; then the directory lists again."""
    mount = mount_gcfs()
    items = mount.path / "archives" / "lidc-lung-ct" / "items"
    fake.faults.configure(error_rates={500: 1.0}, only={"archives-items-list"})
    for _ in range(20):
        with pytest.raises(OSError) as failed:
            os.listdir(items)
        assert failed.value.errno == errno.EIO
        with pytest.raises(OSError):
            os.stat(items / "00000000-0000-4000-8000-000000000000")
    assert fake.count("archives-items-list") == 1
    fake.faults.clear()
    poll(lambda: _lists(items), 15, "the directory to list once the failure is forgotten")


def _lists(directory: Path) -> bool:
    try:
        return bool(os.listdir(directory))
    except OSError as exc:
        assert exc.errno == errno.EIO
        return False


# -- every node says what it is ------------------------------------------------------------


def walk_all(root: Path) -> list[Path]:
    """Every file and directory the mount lists (symlinks are not followed), and the root."""
    found = [root]
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            if not path.is_symlink():
                found.append(path)
    return found


def test_every_node_has_a_kind(mount_gcfs: Callable[..., Mount], world: Any) -> None:
    """A walk of the whole mount, plus what is only looked up (api/, stubs, images/<pk>):
    every file and directory carries user.gc.kind; value files name their socket, stubs
    their request-access page. (Symlinks cannot carry user.* attributes on Linux.)"""
    mount = mount_gcfs()
    hidden = next(a for a in world.algorithms.values() if not a.visible_to("demo"))
    image = next(iter(world.images.values()))
    looked_up = [
        mount.path / "api",
        mount.path / "api" / "v1" / "cases" / "images",
        mount.path / "algorithms" / hidden.slug,
        mount.path / "algorithms" / hidden.slug / "README.md",
        mount.path / "images" / image.pk,
        mount.path / "images" / image.pk / "image.json",
    ]
    nodes = walk_all(mount.path) + looked_up
    assert len(nodes) > 100
    kinds: dict[str, int] = {}
    for path in nodes:
        assert "user.gc.kind" in os.listxattr(path), path
        kind = os.getxattr(path, "user.gc.kind").decode()
        kinds[kind] = kinds.get(kind, 0) + 1
        attributes = set(os.listxattr(path))
        if kind == "value":
            assert "user.gc.socket" in attributes, path
        if kind in ("job-inputs", "job-outputs", "archive-item", "display-set", "job"):
            assert {"user.gc.pk", "user.gc.api_url"} <= attributes, path
    for expected in (
        "root",
        "readme",
        "collection",
        "archive",
        "archive-items",
        "archive-item",
        "value",
        "file",
        "image",
        "algorithm",
        "algorithm-images",
        "algorithm-image",
        "jobs",
        "job",
        "job-inputs",
        "job-outputs",
        "reader-study",
        "questions",
        "display-sets",
        "display-set",
        "answers",
        "answers-csv",
        "no-access",
        "api",
        "status",
    ):
        assert expected in kinds, (expected, kinds)
    stub = mount.path / "algorithms" / hidden.slug
    assert (
        os.getxattr(stub, "user.gc.url")
        .decode()
        .endswith(f"/algorithms/{hidden.slug}/permission-requests/create/")
    )
    assert os.getxattr(stub / "README.md", "user.gc.exists") == b"yes"
    results = mount.path / "algorithms" / "nodule-detector" / "jobs"
    job = next(p for p in results.iterdir() if (p / "outputs" / "results.json").exists())
    assert os.getxattr(job / "outputs" / "results.json", "user.gc.socket") == b"results-json-file"


# -- pk, slug and API URL ------------------------------------------------------------------


def api_urls(value: Any) -> set[str]:
    """Every API URL a metadata file holds in `api_url` fields, in values' `image` fields and
    in answers' `display_set` and `question` fields."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in ("api_url", "image", "display_set", "question") and isinstance(inner, str):
                found.add(inner)
            else:
                found |= api_urls(inner)
    elif isinstance(value, list):
        for inner in value:
            found |= api_urls(inner)
    return found


def test_every_api_url_is_a_path(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """Every API URL in the demo tree's metadata files (and every archive item's, which the API
    does not serve) opens under the mount after swapping the site for the mount point (a
    trailing slash dropped, as for any file), and shows the object of that URL."""
    mount = mount_gcfs()
    urls: set[str] = set()
    for path in walk_all(mount.path):
        if path.suffix == ".json" and path.is_file() and ".gcfs" not in path.parts:
            urls |= api_urls(json.loads(path.read_bytes()))
        elif os.getxattr(path, "user.gc.kind") == b"archive-item":
            # Archive items carry no api_url field (gc-api.md §3.2): gcfs builds theirs.
            urls.add(os.getxattr(path, "user.gc.api_url").decode())
    prefix = f"{fake.base_url}/"
    urls = {url for url in urls if url.startswith(f"{prefix}api/v1/")}
    kinds = {url[len(prefix) :].rstrip("/").rsplit("/", 1)[0] for url in urls}
    assert kinds >= {
        "api/v1/archives",
        "api/v1/archives/items",
        "api/v1/algorithms",
        "api/v1/algorithms/images",
        "api/v1/algorithms/jobs",
        "api/v1/reader-studies",
        "api/v1/reader-studies/display-sets",
        "api/v1/reader-studies/questions",
        "api/v1/reader-studies/answers",
        "api/v1/cases/images",
    }, kinds
    for url in sorted(urls):
        path = mount.path / url[len(prefix) :].rstrip("/")
        assert path.exists(), url
        assert os.getxattr(path, "user.gc.kind") != b"no-access", url
        assert os.getxattr(path, "user.gc.api_url").decode() == url
    assert "api" not in os.listdir(mount.path)
    assert sorted(os.listdir(mount.path / "api" / "v1")) == [
        "algorithms",
        "archives",
        "cases",
        "reader-studies",
    ]
    # A display set by its API URL, as the example reads it.
    display_set = next(u for u in urls if "/display-sets/" in u)
    shown = mount.path / display_set[len(prefix) :] / "display-set.json"
    assert json.loads(shown.read_bytes())["api_url"] == display_set


def test_hidden_and_absent_objects_by_api_url(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """By API URL, an object the token may not see is a README stub where the platform can
    tell that it exists, and ENOENT where it does not exist."""
    hidden_algorithm = next(a for a in world.algorithms.values() if not a.visible_to("demo"))
    hidden_study = next(r for r in world.reader_studies.values() if not r.visible_to("demo"))
    hidden_job = world.add_job(hidden_algorithm, creator="study-editor")
    public_job = world.add_job(
        hidden_algorithm,
        creator="study-editor",
        public=True,
        outputs=[world.add_value("patient-age", 7)],
    )
    hidden_display_set = world.add_display_set(hidden_study, [world.add_value("patient-age", 60)])
    mount = mount_gcfs()
    api_dir = mount.path / "api" / "v1"
    absent = "00000000-0000-4000-8000-000000000000"
    for path in (
        api_dir / "algorithms" / hidden_algorithm.pk,
        api_dir / "algorithms" / "jobs" / hidden_job.pk,
        api_dir / "reader-studies" / hidden_study.pk,
        api_dir / "reader-studies" / "display-sets" / hidden_display_set.pk,
    ):
        assert os.listdir(path) == ["README.md"], path
        assert os.getxattr(path, "user.gc.exists") == b"yes"
    # A public job of an algorithm the token may not see: no link could reach it, so the
    # job is shown where it is looked up.
    shown = api_dir / "algorithms" / "jobs" / public_job.pk
    assert not shown.is_symlink()
    assert sorted(os.listdir(shown)) == ["inputs", "job.json", "outputs"]
    assert (shown / "outputs" / "patient-age.json").read_bytes() == b"7"
    for kind in ("archives", "algorithms/jobs", "reader-studies/display-sets", "cases/images"):
        assert not (api_dir / kind / absent).exists(), kind
    assert not (api_dir / "archives" / "not-a-pk").exists()


def path_of(identifier: str, mount: Mount) -> subprocess.CompletedProcess[str]:
    return gcfs("path", identifier, str(mount.path))


def test_gcfs_path(mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any) -> None:
    """`gcfs path` answers for a pk, a slug, an API URL and a web URL; exit 1 with one line
    for what is not visible, absent or ambiguous."""
    clash = world.add_algorithm("prostate-mri-picai", viewers={"demo"})  # also an archive
    mount = mount_gcfs()
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    item = next(i for i in world.archive_items.values() if i.archive is archive)
    job = next(j for j in world.jobs.values() if j.visible_to("demo"))
    corads = world.find_by_slug(world.algorithms.values(), "corads-ai")
    container = corads.images[-1]  # demo edits corads-ai: sees its container images
    root = mount.path.resolve()
    expected = {
        archive.pk: root / "archives" / "lidc-lung-ct",
        "lidc-lung-ct": root / "archives" / "lidc-lung-ct",
        "algorithms/corads-ai": root / "algorithms" / "corads-ai",
        item.pk: root / "archives" / "lidc-lung-ct" / "items" / item.pk,
        job.pk: root / "algorithms" / job.algorithm.slug / "jobs" / job.pk,
        f"{fake.base_url}/api/v1/archives/items/{item.pk}/": (
            root / "archives" / "lidc-lung-ct" / "items" / item.pk
        ),
        f"{fake.base_url}/archives/lidc-lung-ct/items/{item.pk}/": (
            root / "archives" / "lidc-lung-ct" / "items" / item.pk
        ),
        f"{fake.base_url}/algorithms/corads-ai/": root / "algorithms" / "corads-ai",
        f"{fake.base_url}/algorithms/corads-ai/images/{container.pk}/": (
            root / "algorithms" / "corads-ai" / "images" / f"{container.pk}.json"
        ),
    }
    for identifier, path in expected.items():
        result = path_of(identifier, mount)
        assert (result.returncode, result.stdout.strip()) == (0, str(path)), (identifier, result)
    hidden = next(a for a in world.algorithms.values() if not a.visible_to("demo"))
    for identifier, message in (
        (hidden.slug, "exists but is not visible"),
        (hidden.pk, "exists but is not visible"),
        ("00000000-0000-4000-8000-000000000000", "not found"),
        ("no-such-thing", "not found"),
        (clash.slug, "ambiguous"),
        ("https://example.org/api/v1/archives/", "is not on"),
        ("Not An Identifier!", "is not a pk"),
    ):
        result = path_of(identifier, mount)
        assert result.returncode == 1, (identifier, result)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_failing_media_endpoint_is_logged_once(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    """/media/ resolutions that fail with 500 (here: those that learn the sizes of an item's
    files) make the directories EIO, are said once in the log (not once per directory), and
    are shown by `gcfs status`."""
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    items = mount.path / "archives" / "lidc-lung-ct" / "items"
    names = sorted(os.listdir(items))
    fake.faults.configure(error_rates={500: 1.0}, only={"media-image-file", "media-civ-file"})
    for name in names:
        with pytest.raises(OSError) as failed:
            os.listdir(items / name)
        assert failed.value.errno == errno.EIO
    assert fake.count("media-image-file") + fake.count("media-civ-file") >= len(names)
    warnings = [line for line in mount.log_text().splitlines() if " WARNING " in line]
    assert sum("fails media with HTTP 500" in line for line in warnings) == 1, warnings
    assert "media: HTTP 500" in gcfs("status", str(mount.path)).stdout
