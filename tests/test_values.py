"""Everything inside: items, display sets, jobs, questions, answers and image files.

Expected bytes are downloaded from the fake the way a client would (the /media/ redirect, then
storage without the token), and expected layouts are computed from the JSON the fake serves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gcfs import layout
from gcfs.fakegc import DEMO_TOKEN, FakeGC
from tests.conftest import Mount, poll

AUTH = {"Authorization": f"Bearer {DEMO_TOKEN}"}
BIG_TIFF = "biopsy-10005-wsi.tif"
MiB = 2**20


def api(fake: FakeGC, path: str, **params: Any) -> Any:
    response = httpx.get(
        f"{fake.base_url}/api/v1/{path}", params={"limit": 1000, **params}, headers=AUTH
    )
    response.raise_for_status()
    return response.json()


def download_sha256(fake: FakeGC, url: str) -> tuple[str, int]:
    """sha256 and size of a /media/ file, fetched as a client would, streamed."""
    redirect = httpx.get(url, headers=AUTH, follow_redirects=False)
    assert redirect.status_code == 302, url
    digest, size = hashlib.sha256(), 0
    with httpx.stream("GET", redirect.headers["location"], timeout=60) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes(MiB):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def archive_pk(fake: FakeGC, slug: str) -> str:
    return str(api(fake, "archives/", slug=slug)["results"][0]["pk"])


def expected_files(fake: FakeGC, values: list[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    """(relative path, expectation) for every value: bytes for Value sockets, a /media/ URL
    for files, ("dir", image) for images."""
    for value in values:
        socket = layout.socket_of(value)
        segments = layout.path_segments(socket.get("relative_path") or "")
        path = "/".join(segments)
        if value.get("image"):
            image = httpx.get(value["image"], headers=AUTH).json()
            for image_file in image["files"]:
                if image_file["image_type"] == "DZI":
                    continue
                name = layout.file_name_of(image_file["file"])
                yield (f"{path}/{name}" if path else name), image_file["file"]
        elif value.get("file"):
            yield path, value["file"]
        else:
            yield path, json.dumps(value["value"]).encode()


@pytest.fixture
def mount(mount_gcfs: Callable[..., Mount], tmp_path: Path) -> Mount:
    return mount_gcfs("--cache-dir", str(tmp_path / "cache"))


@pytest.mark.parametrize("slug", ["lidc-lung-ct", "prostate-mri-picai"])
def test_items_are_listed_by_pk(mount: Mount, fake: FakeGC, slug: str) -> None:
    items = api(fake, "archives/items/", archive=archive_pk(fake, slug))["results"]
    assert items
    assert sorted(os.listdir(mount.path / "archives" / slug / "items")) == sorted(
        item["pk"] for item in items
    )


@pytest.mark.parametrize("slug", ["lidc-lung-ct", "prostate-mri-picai"])
def test_every_item_file_is_the_servers_bytes(mount: Mount, fake: FakeGC, slug: str) -> None:
    """item.json as served; each value at its socket path with the server's bytes (sha256)
    and its true size reported by stat before any read."""
    items = api(fake, "archives/items/", archive=archive_pk(fake, slug))["results"]
    checked = 0
    for item in items:
        directory = mount.path / "archives" / slug / "items" / item["pk"]
        assert json.loads((directory / "item.json").read_bytes()) == item
        for relative, expected in expected_files(fake, item["values"]):
            path = directory / relative
            if isinstance(expected, bytes):
                assert path.read_bytes() == expected, relative
                continue
            if relative.endswith(BIG_TIFF):
                continue  # read in test_big_tiff_* below
            sha, size = download_sha256(fake, expected)
            assert path.stat().st_size == size, relative
            assert file_sha256(path) == sha, relative
            checked += 1
    assert checked > 0


def test_sizes_are_true_before_reading(mount: Mount, fake: FakeGC) -> None:
    """`ls -l` of an image directory probes each file once (a 1-byte ranged GET), concurrently,
    and the sizes equal the files' lengths; nothing else is downloaded."""
    slug = "lidc-lung-ct"
    items = api(fake, "archives/items/", archive=archive_pk(fake, slug))["results"]
    fake.reset_counts()
    listing = subprocess.run(
        ["ls", "-lR", str(mount.path / "archives" / slug / "items")],
        capture_output=True,
        text=True,
        check=True,
    )
    storage = [r for r in fake.requests if r.endpoint.startswith("storage")]
    assert storage, "sizes must come from storage"
    assert all(r.range == "bytes=0-0" for r in storage)
    probed = [r.path for r in storage]
    assert len(probed) == len(set(probed))
    assert fake.storage_bytes_sent <= len(probed)
    for item in items[:3]:
        for relative, expected in expected_files(fake, item["values"]):
            if isinstance(expected, str):
                size = mount.path / "archives" / slug / "items" / item["pk"] / relative
                assert size.stat().st_size == download_sha256(fake, expected)[1]
    assert listing.stdout


def test_images_come_in_pages_not_one_request_per_image(mount: Mount, fake: FakeGC) -> None:
    """Listing every item of an archive fetches its images with one paged listing."""
    slug = "lidc-lung-ct"
    fake.reset_counts()
    for item in os.listdir(mount.path / "archives" / slug / "items"):
        os.listdir(mount.path / "archives" / slug / "items" / item)
    assert fake.count("cases-images-list") == 1
    assert fake.count("cases-images-detail") == 0


def big_tiff(mount: Mount) -> Path:
    items = mount.path / "archives" / "prostate-mri-picai" / "items"
    found = list(items.glob(f"*/**/{BIG_TIFF}"))
    assert len(found) == 1
    return found[0]


def big_tiff_url(fake: FakeGC) -> str:
    items = api(fake, "archives/items/", archive=archive_pk(fake, "prostate-mri-picai"))
    urls = [
        image_file["file"]
        for item in items["results"]
        for value in item["values"]
        if value.get("image")
        for image_file in httpx.get(value["image"], headers=AUTH).json()["files"]
        if image_file["file"].endswith(BIG_TIFF)
    ]
    assert len(urls) == 1
    return str(urls[0])


def ranged(fake: FakeGC, url: str, start: int, length: int) -> bytes:
    signed = httpx.get(url, headers=AUTH, follow_redirects=False).headers["location"]
    response = httpx.get(signed, headers={"Range": f"bytes={start}-{start + length - 1}"})
    assert response.status_code == 206
    return response.content


def test_read_at_a_large_offset_fetches_little(mount: Mount, fake: FakeGC) -> None:
    """64 KiB at offset 250 MiB of a 300 MiB slide fetches about that, not the file."""
    path = big_tiff(mount)
    assert path.stat().st_size == 300 * MiB
    fake.reset_counts()
    with open(path, "rb", buffering=0) as handle:
        handle.seek(250 * MiB)
        data = handle.read(64 * 1024)
    # The 64 KiB-aligned range around the read, plus what kernel read-ahead asks; never a
    # whole block, let alone the file.
    assert fake.storage_bytes_sent <= 512 * 1024, fake.storage_bytes_sent
    assert data == ranged(fake, big_tiff_url(fake), 250 * MiB, 64 * 1024)


def test_big_tiff_sha256_and_block_cache(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, tmp_path: Path
) -> None:
    """The whole 300 MiB slide reads back with the server's sha256; a second mount on the same
    cache directory reads it again without a single storage request."""
    cache = tmp_path / "cache"
    first = mount_gcfs("--cache-dir", str(cache))
    sha, size = download_sha256(fake, big_tiff_url(fake))
    path = big_tiff(first)
    assert path.stat().st_size == size
    fake.reset_counts()
    assert file_sha256(path) == sha
    # Sequential reads use growing windows and multi-block ranges: far fewer requests than
    # 1 MiB blocks.
    assert 0 < fake.count("storage-get") < size // MiB // 2
    storage = [r for r in fake.requests if r.endpoint.startswith("storage")]
    assert not any(r.had_authorization for r in storage)
    assert fake.count("media-image-file") <= 1  # resolved once for the open file
    assert cache.stat().st_mode & 0o777 == 0o700
    first.unmount()

    second = mount_gcfs("--cache-dir", str(cache))
    fake.reset_counts()
    assert file_sha256(big_tiff(second)) == sha
    assert fake.count("storage-get") == 0
    assert fake.storage_bytes_sent == 0


def bdi_read_ahead(mountpoint: Path) -> Path:
    device = subprocess.run(
        ["mountpoint", "-d", str(mountpoint)], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(f"/sys/class/bdi/{device}/read_ahead_kb")


@pytest.mark.parametrize("read_ahead_kb", [1024, 4096])
def test_sequential_read_with_large_kernel_read_ahead_fetches_every_byte_once(
    mount: Mount, fake: FakeGC, read_ahead_kb: int
) -> None:
    """The daemon raises the mount's read_ahead_kb to 1024 where it may (as root), and at
    1024 or more the kernel's 1 MiB reads arrive several at once and out of order; they are
    still one sequential stream: every byte is fetched exactly once, in multi-block ranges."""
    setting = bdi_read_ahead(mount.path)
    if os.geteuid() == 0:
        poll(lambda: setting.read_text().strip() == "1024", 5.0, "read_ahead_kb 1024")
        setting.write_text(f"{read_ahead_kb}\n")
    else:  # a user mount: the log says how to do it by hand
        assert "cannot set read_ahead_kb" in mount.log_text()
    path = big_tiff(mount)
    sha, size = download_sha256(fake, big_tiff_url(fake))
    fake.reset_counts()
    summed = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    assert summed.stdout.split()[0] == sha
    assert fake.storage_bytes_sent == size  # nothing fetched twice
    assert fake.count("storage-get") <= size // MiB // 3  # ranges of several blocks


def test_the_system_units_read_ahead_command(mount: Mount) -> None:
    """The system unit's ExecStartPost (as root) sets read_ahead_kb of the mount it names;
    it is the command README gives for doing it by hand."""
    unit = (Path(__file__).parents[1] / "systemd" / "gcfs-system@.service").read_text()
    line = next(line for line in unit.splitlines() if line.startswith("ExecStartPost="))
    command = line.split("'", 1)[1].rsplit("'", 1)[0].replace("$$", "$")
    command = command.replace("%f", str(mount.path))
    setting = bdi_read_ahead(mount.path)
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
    if os.geteuid() == 0:
        setting.write_text("128\n")
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert setting.read_text().strip() == "1024"
    else:
        assert done.returncode != 0  # only root may: hence the unit's `+`


def test_signed_url_expiring_mid_read(mount: Mount, fake: FakeGC) -> None:
    """When storage starts answering 403 (expired signature), gcfs resolves the URL again and
    the reader gets the right bytes without noticing."""
    path = big_tiff(mount)
    real_clock = fake.clock
    with open(path, "rb", buffering=0) as handle:
        head = handle.read(MiB)
        fake.clock = lambda: real_clock() + 7200  # every URL signed so far has expired
        try:
            handle.seek(100 * MiB)
            middle = handle.read(MiB)
        finally:
            fake.clock = real_clock
    assert fake.count("storage-rejected") >= 1  # an expired URL was really presented
    url = big_tiff_url(fake)
    assert head == ranged(fake, url, 0, MiB)
    assert middle == ranged(fake, url, 100 * MiB, MiB)


def test_mhd_header_finds_its_zraw(mount: Mount) -> None:
    """A legacy .mhd + .zraw pair: the header names its data file, which sits beside it."""
    headers = list((mount.path / "archives").glob("*/items/*/**/*.mhd"))
    headers += list((mount.path / "archives").glob("*/items/*/*.mhd"))
    assert headers
    for header in headers:
        text = header.read_text()
        data_file = next(
            line.split("=", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("ElementDataFile")
        )
        assert (header.parent / data_file).stat().st_size > 0


INPUT_SCRIPT = r"""
import json, os, sys
root = sys.argv[1]
item = json.load(open(os.path.join(root, "item.json")))
for value in item["values"]:
    socket = value.get("socket") or value["interface"]
    path = os.path.join(root, socket["relative_path"])
    if socket["super_kind"] == "Value":
        assert json.load(open(path)) == value["value"], path
    elif socket["super_kind"] == "Image":
        names = os.listdir(path)
        assert any(n.endswith((".mha", ".mhd", ".tif", ".tiff", ".dcm")) for n in names), names
    else:
        assert os.path.getsize(path) > 0, path
print("ok", len(item["values"]))
"""


def test_item_directory_works_as_algorithm_input(mount: Mount) -> None:
    """A script written for an algorithm's /input finds every value at its socket path."""
    items = mount.path / "archives" / "lidc-lung-ct" / "items"
    for item in sorted(os.listdir(items))[:4]:
        result = subprocess.run(
            [sys.executable, "-c", INPUT_SCRIPT, str(items / item)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok")


def test_unreadable_image_becomes_a_stub(
    mount_gcfs: Callable[..., Mount], world: Any, tmp_path: Path
) -> None:
    """An item the token sees that references an image it may not read: README stub there."""
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    image = world.add_image("secret.mha", [("secret.mha", b"secret bytes")])
    socket = world.add_socket("secret-image", kind="Image", relative_path="images/secret")
    item = world.add_archive_item(archive, [world.add_value(socket, image=image)], title="s")
    image.archives.clear()  # the image belongs to no archive the demo user may see
    mount = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    stub = mount.path / "archives" / "lidc-lung-ct" / "items" / item.pk / "images" / "secret"
    assert os.listdir(stub) == ["README.md"]
    assert image.pk in (stub / "README.md").read_text()


def test_images_by_pk(mount: Mount, fake: FakeGC, world: Any) -> None:
    """images/<pk>/ gives image.json and the files of any image the token may see; an
    absent pk is ENOENT; the images/ directory itself lists nothing."""
    visible = next(i for i in world.images.values() if i.visible_to("demo") and i.files)
    directory = mount.path / "images" / visible.pk
    served = api(fake, f"cases/images/{visible.pk}/")
    assert json.loads((directory / "image.json").read_bytes()) == served
    expected = [layout.file_name_of(f["file"]) for f in served["files"] if f["image_type"] != "DZI"]
    assert sorted(os.listdir(directory)) == sorted([*expected, "image.json"])
    assert os.listdir(mount.path / "images") == []
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path / "images" / "00000000-0000-4000-8000-000000000000")
    hidden = next(i for i in world.images.values() if not i.visible_to("demo"))
    assert os.listdir(mount.path / "images" / hidden.pk) == ["README.md"]


def test_dicom_image_set_shows_instances(mount: Mount, world: Any) -> None:
    """A DICOM image set shows as <SOPInstanceUID>.dcm files with the instances' bytes."""
    image = next(i for i in world.images.values() if i.dicom_instances and i.visible_to("demo"))
    directory = mount.path / "images" / image.pk
    expected = sorted(f"{d.sop_instance_uid}.dcm" for d in image.dicom_instances)
    assert sorted(n for n in os.listdir(directory) if n.endswith(".dcm")) == expected
    for instance in image.dicom_instances:
        data = (directory / f"{instance.sop_instance_uid}.dcm").read_bytes()
        assert data == bytes(instance.content)
        assert data[128:132] == b"DICM"


def test_reader_study_files(mount: Mount, fake: FakeGC) -> None:
    """questions.json, display sets with their values, answers.json as served, answers.csv
    one row per answer, every answer cell JSON, with choice titles."""
    study = api(fake, "reader-studies/", slug="lung-nodule-reader-study")["results"][0]
    directory = mount.path / "reader-studies" / "lung-nodule-reader-study"
    assert json.loads((directory / "questions.json").read_bytes()) == study["questions"]
    display_sets = api(fake, "reader-studies/display-sets/", reader_study=study["pk"])["results"]
    assert sorted(os.listdir(directory / "display-sets")) == sorted(d["pk"] for d in display_sets)
    for display_set in display_sets:
        shown = directory / "display-sets" / display_set["pk"]
        assert json.loads((shown / "display-set.json").read_bytes()) == display_set
        for relative, expected in expected_files(fake, display_set["values"]):
            assert (shown / relative).exists(), relative
            if isinstance(expected, bytes):
                assert (shown / relative).read_bytes() == expected
    answers = api(fake, "reader-studies/answers/", question__reader_study=study["pk"])["results"]
    assert answers
    assert json.loads((directory / "answers.json").read_bytes()) == answers
    with open(directory / "answers.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["answer_pk"] for r in rows] == [a["pk"] for a in answers]
    questions = {q["pk"]: q for q in study["questions"]}
    choice_rows = 0
    for row, answer in zip(rows, answers, strict=True):
        question = questions[row["question_pk"]]
        cell = json.loads(row["answer"])  # every cell, whatever the type
        if question["answer_type"] in ("Choice", "Multiple choice"):
            titles = {o["id"]: o["title"] for o in question["options"]}
            if isinstance(answer["answer"], list):
                assert cell == [titles[i] for i in answer["answer"]]
            else:
                assert cell == titles[answer["answer"]]
            choice_rows += 1
        else:
            assert cell == answer["answer"]  # a Text answer stays a string, a Bool a bool
        assert row["creator"] == answer["creator"]
    assert choice_rows > 0


def test_jobs_and_algorithm_images(mount: Mount, fake: FakeGC) -> None:
    """jobs/<pk>/ holds job.json, inputs/ and outputs/; images/<pk>.json for editors only."""
    algorithm = api(fake, "algorithms/", slug="corads-ai")["results"][0]
    directory = mount.path / "algorithms" / "corads-ai"
    jobs = api(fake, "algorithms/jobs/", algorithm_image__algorithm=algorithm["pk"])["results"]
    assert jobs
    assert sorted(os.listdir(directory / "jobs")) == sorted(j["pk"] for j in jobs)
    for job in jobs:
        shown = directory / "jobs" / job["pk"]
        assert sorted(os.listdir(shown)) == ["inputs", "job.json", "outputs"]
        assert json.loads((shown / "job.json").read_bytes()) == job
        for key in ("inputs", "outputs"):
            for relative, expected in expected_files(fake, job[key]):
                assert (shown / key / relative).exists(), relative
                if isinstance(expected, bytes):
                    assert (shown / key / relative).read_bytes() == expected
    images = api(fake, "algorithms/images/", algorithm=algorithm["pk"])["results"]
    assert images  # demo edits corads-ai
    assert sorted(os.listdir(directory / "images")) == sorted(f"{i['pk']}.json" for i in images)
    assert os.listdir(mount.path / "algorithms" / "nodule-detector" / "images") == []
