"""Tests for the fake's file bytes: /media/ redirects, the storage origin, DICOM instances.

A small world with one object of each kind, visible to "owner" and hidden from "other", is
served by a FakeGC; requests go through plain sync httpx, never following redirects, so each
hop is checked on its own.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gcfs.fakegc import FakeGC, GeneratedContent, World, demo_world
from gcfs.fakegc.world import WSI_SIZE, content_read, content_sha256

SAMPLES = Path("/work/shared/gc-samples")
ABSENT = "00000000-0000-4000-8000-000000000000"
OWNER, OTHER = "o" * 64, "x" * 64
SMALL = b"".join(bytes([n % 251]) for n in range(10_000))
BIG = GeneratedContent(3 * 1024 * 1024 + 12345, "big-test-file")


def media_world() -> World:
    w = World()
    w.add_user("owner", OWNER)
    w.add_user("other", OTHER)
    w.add_socket("generic-medical-image", kind="Image", relative_path="")
    w.add_socket("report", kind="PDF file")
    w.add_socket("dicom", kind="DICOM Image Set")
    archive = w.add_archive("archive", viewers={"owner"})
    image = w.add_image("small.mha", [("small.mha", SMALL)], width=1, height=1)
    big = w.add_image("big.tif", [("big.tif", BIG)], width=1, height=1)
    dicom = w.add_image("set", dicom_image_set_id="f" * 32, dicom_instances=2)
    report = w.add_value("report", file="report.pdf", content=b"%PDF-1.4 fake\n")
    w.add_archive_item(
        archive,
        [
            w.add_value("generic-medical-image", image=image),
            w.add_value("generic-medical-image", image=big),
            w.add_value("dicom", image=dicom),
            report,
        ],
    )
    algorithm = w.add_algorithm("algo", editors={"owner"}, viewers={"other"})
    w.add_algorithm_image(algorithm, file_name="algo.tar.gz", content=b"container bytes")
    return w


@pytest.fixture
def fake() -> Iterator[FakeGC]:
    with FakeGC(media_world()) as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False) as c:
        yield c


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def image_url(fake: FakeGC, http: httpx.Client, name: str, token: str = OWNER) -> str:
    image = next(im for im in fake.world.images.values() if im.name == name)
    body = http.get(f"{fake.base_url}/api/v1/cases/images/{image.pk}/", headers=auth(token)).json()
    url: str = body["files"][0]["file"]
    return url


def signed(fake: FakeGC, http: httpx.Client, url: str, token: str = OWNER) -> str:
    r = http.get(url, headers=auth(token))
    assert r.status_code == 302, r.text
    location: str = r.headers["location"]
    return location


def assert_signed_shape(fake: FakeGC, location: str, key: str) -> None:
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}" == fake.storage_url != fake.base_url
    assert parts.path == f"/grand-challenge-protected/{key}"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert list(query) == [
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
    ]
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Credential"].endswith("/eu-central-1/s3/aws4_request")
    assert time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    assert query["X-Amz-Expires"] == str(fake.signature_lifetime)
    assert query["X-Amz-SignedHeaders"] == "host"
    assert len(query["X-Amz-Signature"]) == 64


# -- /media/ on the site ------------------------------------------------------------------------


def test_image_file_redirect_like_the_sample(fake: FakeGC, http: httpx.Client) -> None:
    sample = json.loads((SAMPLES / "media-image-file-302.json").read_text())
    url = image_url(fake, http, "small.mha")
    r = http.get(url, headers=auth(OWNER))
    assert r.status_code == sample["status"] == 302
    assert r.headers["content-type"] == sample["headers"]["content-type"]
    assert r.headers["content-length"] == "0" and r.content == b""
    key = url.removeprefix(f"{fake.base_url}/media/")
    assert_signed_shape(fake, r.headers["location"], key)
    real = urlsplit(sample["headers"]["location"])
    assert urlsplit(r.headers["location"]).path.split("/")[:3] == real.path.split("/")[:3]
    assert list(parse_qs(urlsplit(r.headers["location"]).query)) == list(parse_qs(real.query))


def test_image_file_permissions(fake: FakeGC, http: httpx.Client) -> None:
    url = image_url(fake, http, "small.mha")
    forbidden = http.get(url, headers=auth(OTHER))
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"] == "text/html; charset=utf-8"
    assert "location" not in forbidden.headers
    assert http.get(url).status_code == 403  # anonymous
    assert http.get(url, headers=auth("0" * 64)).status_code == 403  # a bad token: anonymous
    absent = url.replace(url.split("/")[-3], ABSENT)
    r = http.get(absent, headers=auth(OWNER))
    assert (r.status_code, "Image not found." in r.text) == (404, True)
    wrong_file = url.rsplit("/", 1)[0] + "/other-name.mha"
    assert http.get(wrong_file, headers=auth(OWNER)).status_code == 404  # File not found.
    assert fake.count("media-image-file") == 5
    users = [r.user for r in fake.requests if r.endpoint == "media-image-file"]
    assert users == ["other", None, None, "owner", "owner"]


def test_civ_file_redirect_and_404s(fake: FakeGC, http: httpx.Client) -> None:
    item = next(iter(fake.world.archive_items.values()))
    body = http.get(f"{fake.base_url}/api/v1/archives/items/{item.pk}/", headers=auth(OWNER)).json()
    url = next(v["file"] for v in body["values"] if v["file"])
    location = signed(fake, http, url)
    assert_signed_shape(fake, location, url.removeprefix(f"{fake.base_url}/media/"))
    assert http.get(location).content == b"%PDF-1.4 fake\n"
    assert http.get(url, headers=auth(OTHER)).status_code == 404  # hidden: 404, not 403
    assert http.get(url).status_code == 404
    pk = int(url.split("/")[-2])
    absent = url.replace(f"/{pk}/", f"/{pk + 1000}/")
    assert http.get(absent, headers=auth(OWNER)).status_code == 404
    assert fake.count("media-civ-file") == 4


def test_civ_visible_through_a_public_job(fake: FakeGC, http: httpx.Client) -> None:
    w = fake.world
    civ = w.add_value("report", file="job.pdf", content=b"job output")
    w.add_job(next(iter(w.algorithms.values())), outputs=[civ], public=True)
    tail = f"{civ.pk:04x}"
    url = f"{fake.base_url}/media/components/componentinterfacevalue/{tail[:2]}/{tail[2:]}/"
    location = signed(fake, http, f"{url}{civ.pk}/job.pdf", token="")
    assert http.get(location).content == b"job output"


def test_algorithm_image_redirect(fake: FakeGC, http: httpx.Client) -> None:
    ai = next(iter(fake.world.algorithm_images.values()))
    body = http.get(
        f"{fake.base_url}/api/v1/algorithms/images/{ai.pk}/", headers=auth(OWNER)
    ).json()
    url = body["image"]
    location = signed(fake, http, url)
    assert_signed_shape(fake, location, url.removeprefix(f"{fake.base_url}/media/"))
    assert http.get(location).content == b"container bytes"
    assert http.get(url, headers=auth(OTHER)).status_code == 403  # a user, not an editor
    assert http.get(url).status_code == 403
    absent = url.replace(ai.pk, ABSENT)
    assert http.get(absent, headers=auth(OWNER)).status_code == 404
    assert fake.count("media-algorithm-image") == 4


def test_unknown_media_paths_are_404(fake: FakeGC, http: httpx.Client) -> None:
    assert http.get(f"{fake.base_url}/media/nothing/here").status_code == 404
    assert http.get(f"{fake.base_url}/media/images/70/09/not-a-uuid/x/y.mha").status_code == 404
    assert fake.count("not-found") == 2


# -- the storage origin -------------------------------------------------------------------------


@pytest.fixture
def small_url(fake: FakeGC, http: httpx.Client) -> str:
    return signed(fake, http, image_url(fake, http, "small.mha"))


def test_storage_whole_body(fake: FakeGC, http: httpx.Client, small_url: str) -> None:
    r = http.get(small_url)
    assert r.status_code == 200
    assert r.content == SMALL
    assert r.headers["content-length"] == str(len(SMALL))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "application/octet-stream"
    assert "content-range" not in r.headers
    assert r.http_version == "HTTP/1.1"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=100-199", 100, 200),
        ("bytes=9990-20000", 9990, 10_000),  # the end is clipped
        ("bytes=9000-", 9000, 10_000),
        ("bytes=-10", 9990, 10_000),
        ("bytes=-20000", 0, 10_000),  # a suffix longer than the object: all of it
    ],
)
def test_storage_ranges(
    fake: FakeGC, http: httpx.Client, small_url: str, header: str, start: int, end: int
) -> None:
    r = http.get(small_url, headers={"Range": header})
    assert r.status_code == 206
    assert r.content == SMALL[start:end]
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(SMALL)}"
    assert r.headers["content-length"] == str(end - start)
    assert r.headers["accept-ranges"] == "bytes"
    assert fake.requests[-1].range == header
    assert fake.storage_bytes_sent == end - start


@pytest.mark.parametrize("header", ["bytes=10000-", "bytes=20000-20001", "bytes=-0"])
def test_storage_unsatisfiable_range(
    fake: FakeGC, http: httpx.Client, small_url: str, header: str
) -> None:
    r = http.get(small_url, headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(SMALL)}"
    assert b"<Code>InvalidRange</Code>" in r.content
    assert fake.requests[-1].endpoint == "storage-rejected"


@pytest.mark.parametrize("header", ["bytes=5-2", "bytes=0-1,5-6", "items=0-1"])
def test_storage_ignores_ranges_it_cannot_parse(
    http: httpx.Client, small_url: str, header: str
) -> None:
    r = http.get(small_url, headers={"Range": header})
    assert (r.status_code, r.content) == (200, SMALL)


def test_storage_refuses_the_api_token(fake: FakeGC, http: httpx.Client, small_url: str) -> None:
    r = http.get(small_url, headers=auth(OWNER))
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/xml"
    assert b"<Error><Code>InvalidArgument</Code>" in r.content
    assert b"<Message>Only one auth mechanism allowed" in r.content
    record = fake.requests[-1]
    assert (record.endpoint, record.status, record.had_authorization) == (
        "storage-rejected",
        400,
        True,
    )
    assert fake.storage_bytes_sent == 0


def test_storage_head_is_403(http: httpx.Client, small_url: str) -> None:
    r = http.head(small_url)
    assert r.status_code == 403
    assert r.content == b""


def test_storage_expired(fake: FakeGC, http: httpx.Client) -> None:
    url = image_url(fake, http, "small.mha")
    key = url.removeprefix(f"{fake.base_url}/media/")
    fresh = fake.presign(key)
    assert http.get(fresh).status_code == 200
    old = fake.presign(key, signed_at=time.time() - 7200)  # 3600 s lifetime, 2 h ago
    r = http.get(old)
    assert r.status_code == 403
    assert b"<Code>AccessDenied</Code><Message>Request has expired</Message>" in r.content
    # The lifetime knob and an injected clock: a URL 11 s old with a 10 s lifetime expired.
    fake.signature_lifetime = 10
    location = signed(fake, http, url)
    assert "X-Amz-Expires=10&" in location
    assert http.get(location).status_code == 200
    now = time.time()
    fake.clock = lambda: now + 11
    assert http.get(location).status_code == 403


@pytest.mark.parametrize("what", ["signature", "path", "expires", "missing"])
def test_storage_tampered(fake: FakeGC, http: httpx.Client, small_url: str, what: str) -> None:
    if what == "signature":
        url = small_url[:-1] + ("0" if small_url[-1] != "0" else "1")
    elif what == "path":
        url = small_url.replace("small.mha", "small.mhd")
    elif what == "expires":
        url = small_url.replace("X-Amz-Expires=3600", "X-Amz-Expires=360000")
    else:
        url = small_url.split("?")[0]
    r = http.get(url)
    assert r.status_code == 403
    code = b"AccessDenied" if what == "missing" else b"SignatureDoesNotMatch"
    assert b"<Code>" + code + b"</Code>" in r.content


def test_storage_unknown_key(fake: FakeGC, http: httpx.Client) -> None:
    r = http.get(fake.presign("images/00/00/nothing/here.mha"))
    assert r.status_code == 404
    assert b"<Code>NoSuchKey</Code>" in r.content
    assert http.get(f"{fake.storage_url}/other-bucket/x").status_code == 404


def test_sha256_of_downloads(fake: FakeGC, http: httpx.Client) -> None:
    for name, content in (("small.mha", SMALL), ("big.tif", BIG)):
        location = signed(fake, http, image_url(fake, http, name))
        digest = hashlib.sha256()
        with http.stream("GET", location) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                digest.update(chunk)
        assert digest.hexdigest() == content_sha256(content)
    assert fake.storage_bytes_sent == len(SMALL) + len(BIG)
    fake.reset_counts()
    assert fake.storage_bytes_sent == 0


def test_counters(fake: FakeGC, http: httpx.Client) -> None:
    url = image_url(fake, http, "small.mha")
    location = signed(fake, http, url)
    http.get(location, headers={"Range": "bytes=0-99"})
    http.get(location)
    assert fake.count("media-image-file") == 1
    assert fake.count("storage-get") == 2
    media, first, second = fake.requests[-3:]
    assert (media.had_authorization, media.range) == (True, None)
    assert (first.status, first.range, first.had_authorization) == (206, "bytes=0-99", False)
    assert (second.status, second.range) == (200, None)
    assert first.path.startswith("/grand-challenge-protected/images/")
    assert "X-Amz-Signature" in first.query
    assert fake.storage_bytes_sent == 100 + len(SMALL)


def test_storage_latency_and_bandwidth(fake: FakeGC, http: httpx.Client) -> None:
    location = signed(fake, http, image_url(fake, http, "big.tif"))
    fake.storage_latency = 0.2
    started = time.monotonic()
    assert http.get(location, headers={"Range": "bytes=0-0"}).status_code == 206
    assert time.monotonic() - started >= 0.2
    fake.storage_latency = 0.0
    fake.storage_bandwidth = 4 * 1024 * 1024
    started = time.monotonic()
    r = http.get(location, headers={"Range": "bytes=0-1048575"})
    assert len(r.content) == 1024 * 1024
    # 1 MiB at 4 MiB/s: the last 64 KiB chunk is due after 15/16 of 0.25 s.
    assert time.monotonic() - started >= 0.2


def test_media_latency(fake: FakeGC, http: httpx.Client) -> None:
    url = image_url(fake, http, "small.mha")
    fake.media_latency = 0.2
    started = time.monotonic()
    assert http.get(url, headers=auth(OWNER)).status_code == 302
    assert time.monotonic() - started >= 0.2
    fake.media_latency = 0.0


# -- the plain view (benchmarks only) -----------------------------------------------------------


def hrefs(page: str) -> list[str]:
    return re.findall(r'<a href="([^"]*)">', page)


def image_pk(fake: FakeGC, name: str) -> str:
    return next(im.pk for im in fake.world.images.values() if im.name == name)


def test_plain_view_is_off_by_default(fake: FakeGC, http: httpx.Client) -> None:
    pk = image_pk(fake, "small.mha")
    assert fake.plain_storage_view is False
    for path in ("/plain/", f"/plain/{pk}/", f"/plain/{pk}/small.mha"):
        for method in ("GET", "HEAD"):
            r = http.request(method, fake.storage_url + path)
            assert r.status_code == 404, (method, path)
        assert b"<Code>NoSuchKey</Code>" in http.get(fake.storage_url + path).content
    assert fake.storage_bytes_sent == 0
    assert fake.count("storage-plain") == 0


def test_plain_view_is_never_on_the_site(fake: FakeGC, http: httpx.Client) -> None:
    fake.plain_storage_view = True
    pk = image_pk(fake, "small.mha")
    for path in ("/plain/", f"/plain/{pk}/small.mha", f"/media/plain/{pk}/small.mha"):
        assert http.get(fake.base_url + path, follow_redirects=True).status_code == 404, path
    assert fake.count("storage-plain") == 0


def test_plain_view_indexes(fake: FakeGC, http: httpx.Client) -> None:
    fake.plain_storage_view = True
    root = http.get(fake.storage_url + "/plain/")
    assert root.status_code == 200
    assert root.headers["content-type"] == "text/html; charset=utf-8"
    with_files = {im.pk for im in fake.world.images.values() if im.files}
    assert set(hrefs(root.text)) == {f"{pk}/" for pk in with_files}
    pk = image_pk(fake, "big.tif")
    page = http.get(f"{fake.storage_url}/plain/{pk}/")
    assert page.status_code == 200 and hrefs(page.text) == ["big.tif"]
    assert '<a href="big.tif">big.tif</a>' in page.text  # the shape rclone's http remote reads
    assert http.get(f"{fake.storage_url}/plain/{ABSENT}/").status_code == 404
    assert http.get(f"{fake.storage_url}/plain/{pk}/nothing.tif").status_code == 404
    assert fake.count("storage-plain") == 2


def test_plain_view_bytes_head_and_ranges(fake: FakeGC, http: httpx.Client) -> None:
    fake.plain_storage_view = True
    small = f"{fake.storage_url}/plain/{image_pk(fake, 'small.mha')}/small.mha"
    big = f"{fake.storage_url}/plain/{image_pk(fake, 'big.tif')}/big.tif"
    r = http.get(small)
    assert (r.status_code, r.content) == (200, SMALL)
    head = http.head(big)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(BIG))
    assert head.headers["accept-ranges"] == "bytes"
    start, end = 1024 * 1024 - 100, 2 * 1024 * 1024 + 100  # across a generated block edge
    r = http.get(big, headers={"Range": f"bytes={start}-{end - 1}"})
    assert r.status_code == 206
    assert r.content == content_read(BIG, start, end - start)
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(BIG)}"
    assert r.headers["content-length"] == str(end - start)
    assert http.get(big, headers={"Range": f"bytes={len(BIG)}-"}).status_code == 416
    assert fake.requests[0].endpoint == "storage-plain"
    assert fake.storage_bytes_sent == len(SMALL) + end - start


def test_plain_view_quotes_names() -> None:
    w = World()
    image = w.add_image("odd", [("scan 1#<b>.mha", b"odd bytes")])
    with FakeGC(w) as fake, httpx.Client() as http:
        fake.plain_storage_view = True
        page = http.get(f"{fake.storage_url}/plain/{image.pk}/").text
        assert hrefs(page) == ["scan%201%23%3Cb%3E.mha"]
        assert "scan 1#&lt;b&gt;.mha</a>" in page
        r = http.get(f"{fake.storage_url}/plain/{image.pk}/{hrefs(page)[0]}")
        assert (r.status_code, r.content) == (200, b"odd bytes")


# -- generated content --------------------------------------------------------------------------


def test_generated_content_reads_are_slices_of_the_whole() -> None:
    rng = random.Random(7)
    for size in (0, 1, 1000, (1 << 20) - 1, (1 << 20) + 1, 2 * (1 << 20) + 77):
        content = GeneratedContent(size, f"seed-{size}", header=b"HDR" if size >= 3 else b"")
        whole = content.read(0, size)
        assert len(whole) == size
        assert whole[:3] == (b"HDR" if size >= 3 else whole[:3])
        assert b"".join(content.chunks()) == whole
        assert content.sha256() == hashlib.sha256(whole).hexdigest()
        for _ in range(20):
            offset = rng.randrange(0, size + 2)
            length = rng.randrange(0, 3 * (1 << 20) // 2)
            assert content.read(offset, length) == whole[offset : offset + length]
    assert GeneratedContent(10, "a").read(0, 10) == GeneratedContent(10, "a").read(0, 10)
    assert GeneratedContent(10, "a").read(0, 10) != GeneratedContent(10, "b").read(0, 10)


def test_builders_accept_generated_content() -> None:
    w = World()
    w.add_socket("zip", kind="ZIP file")
    content = GeneratedContent(5000, "zip")
    civ = w.add_value("zip", file="data.zip", content=content)
    assert civ.content is content
    image = w.add_image("x.tif", [("x.tif", content)])
    assert image.files[0].content is content


# -- DICOM --------------------------------------------------------------------------------------


def test_dicom_instances(fake: FakeGC, http: httpx.Client) -> None:
    image = next(im for im in fake.world.images.values() if im.dicom_image_set)
    url = f"{fake.base_url}/api/v1/cases/images/{image.pk}/dicom/instances/"
    r = http.get(url, headers=auth(OWNER))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content.startswith(b'{"image_set_id": "')  # Django's JsonResponse separators
    body = r.json()
    assert list(body) == ["image_set_id", "instances"]
    assert body["image_set_id"] == "f" * 32
    assert len(body["instances"]) == 2
    fake.reset_counts()
    for instance, expected in zip(body["instances"], image.dicom_instances, strict=True):
        assert list(instance) == ["sop_instance_uid", "get_instance"]
        assert instance["sop_instance_uid"] == expected.sop_instance_uid
        request = instance["get_instance"]
        assert list(request) == ["url", "method", "data", "headers"]
        assert request["url"].startswith(fake.storage_url + "/datastore/")
        assert (request["method"], request["data"]) == ("GET", None)
        assert list(request["headers"]) == ["Accept", "X-Amz-Date", "Authorization"]
        assert request["headers"]["Accept"].startswith("application/dicom; transfer-syntax=")
        # gcapi's _download_dicom_instance: httpx.stream(**get_instance)
        with httpx.stream(**request) as response:
            data = response.read()
        assert response.status_code == 200
        assert data == expected.content
        assert data[128:132] == b"DICM"
        assert expected.sop_instance_uid.encode() in data
        # Without its signed headers (or with the API token instead) the store refuses.
        assert http.get(request["url"]).status_code == 403
        assert http.get(request["url"], headers=auth(OWNER)).status_code == 403
    assert fake.count("storage-get") == 2
    assert fake.count("storage-rejected") == 4


def test_dicom_instances_errors(fake: FakeGC, http: httpx.Client) -> None:
    def get(pk: str, token: str | None = OWNER) -> httpx.Response:
        return http.get(
            f"{fake.base_url}/api/v1/cases/images/{pk}/dicom/instances/", headers=auth(token)
        )

    plain = next(im for im in fake.world.images.values() if im.name == "small.mha")
    dicom = next(im for im in fake.world.images.values() if im.dicom_image_set)
    r = get(plain.pk)
    assert (r.status_code, r.json()) == (
        404,
        {"detail": "This image does not have a DICOM Image Set."},
    )
    hidden = get(dicom.pk, OTHER)
    absent = get(ABSENT)
    assert hidden.status_code == absent.status_code == 404
    assert hidden.json() == absent.json() == {"detail": "No Image matches the given query."}
    assert get("nope").json() == {"detail": "Not found."}
    assert fake.count("cases-images-dicom-instances") == 4


# -- the demo world -----------------------------------------------------------------------------


def test_demo_world_serves_every_file() -> None:
    started = time.monotonic()
    world = demo_world()
    assert time.monotonic() - started < 1.0
    wsi = [f for im in world.images.values() for f in im.files if f.name == "biopsy-10005-wsi.tif"]
    assert len(wsi) == 1 and len(wsi[0].content) == WSI_SIZE == 300 * 1024 * 1024
    mhd = next(f for im in world.images.values() for f in im.files if f.name.endswith(".mhd"))
    assert b"ElementDataFile = LIDC-IDRI-0005.zraw" in content_read(mhd.content, 0, 1000)
    with FakeGC(world) as fake, httpx.Client() as http:
        for image in world.images.values():
            for f in image.files:
                key = f"images/{image.pk[:2]}/{image.pk[2:4]}/{image.pk}/{f.pk}/{f.name}"
                r = http.get(fake.presign(key), headers={"Range": "bytes=0-15"})
                assert r.status_code == 206, f.name
                assert r.content == content_read(f.content, 0, 16), f.name
        dicom = next(im for im in world.images.values() if im.dicom_image_set)
        assert len(dicom.dicom_instances) == 3
        for instance in dicom.dicom_instances:
            assert content_read(instance.content, 128, 4) == b"DICM"


def test_demo_world_big_tiff_range(fake_demo: FakeGC) -> None:
    from gcfs.fakegc import DEMO_TOKEN

    fake = fake_demo
    with httpx.Client() as http:
        image = next(im for im in fake.world.images.values() if im.name == "biopsy-10005-wsi.tif")
        body = http.get(
            f"{fake.base_url}/api/v1/cases/images/{image.pk}/", headers=auth(DEMO_TOKEN)
        ).json()
        location = signed(fake, http, body["files"][0]["file"], DEMO_TOKEN)
        fake.reset_counts()
        offset = 250 * 1024 * 1024
        r = http.get(location, headers={"Range": f"bytes={offset}-{offset + 65535}"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes {offset}-{offset + 65535}/{WSI_SIZE}"
        assert r.content == content_read(image.files[0].content, offset, 65536)
        assert 65536 <= fake.storage_bytes_sent < 2 * 65536
        head = http.get(location, headers={"Range": "bytes=0-3"})
        assert head.content == b"II*\x00"


@pytest.fixture
def fake_demo() -> Iterator[FakeGC]:
    with FakeGC(demo_world()) as server:
        yield server
