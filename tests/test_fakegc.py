"""Tests for the fake Grand Challenge server (gcfs.fakegc).

The first group holds the fake to the real responses in /work/shared/gc-samples: a world with the
same objects (and the same pks) as the server the samples were captured from answers the same
request with the same status, error body, headers and key order. The rest checks behaviour the
samples cannot show: pagination, the existence oracles, permissions, the website pages, the
counters and knobs, and large worlds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gcfs.fakegc import (
    DEMO_B_TOKEN,
    DEMO_TOKEN,
    ENDPOINTS,
    FakeGC,
    World,
    demo_world,
)

SAMPLES = Path("/work/shared/gc-samples")
SAMPLE_BASE = "http://127.0.0.1:18000"
# The samples captured later (job-owner, the job filters) came from a rebuilt server.
SAMPLE_BASE_LATER = "http://127.0.0.1:8000"
ABSENT = "00000000-0000-4000-8000-000000000000"
TOKENS = {
    "user-a": "a" * 64,
    "user-b": "b" * 64,
    "reader-study-editor": "e" * 64,
    "job-owner": "c" * 64,
}

# pks of the objects the samples talk about, reused so that sample paths work unchanged
ARCHIVE = "519c79bf-183a-47df-bd09-da9947e15ff9"
ARCHIVE_B = "ed93ffe0-e934-495d-82c4-da44374b853d"
ITEMS = [
    "2a53c683-6d6e-45f6-abb3-2e7c5e0bd5fb",
    "73c8def8-52b3-4a2d-b6c8-5835e479efc0",
    "8f5bde03-7d6e-49b7-8293-1dc66c9f50fd",
    "f11ae91b-9701-4062-bf78-6853766ebb71",
]
IMAGE = "7009552f-b8b0-406e-a078-e87f70defa62"
ALGORITHM = "8213bfb5-adc6-494b-a059-de0165002936"
ALGORITHM_IMAGE = "7ffb4df0-f41b-4dbf-9d71-23f721b3137e"
READER_STUDY = "4dc70c1f-7147-420a-84bf-2ed275544acd"
READER_STUDY_B = "16134cbd-d890-40e0-a9d4-85a06d02ac85"
DISPLAY_SET = "893abe3b-491c-4cbd-8a32-10ada29b85cc"
TEXT_QUESTION = "789f2e75-194b-4301-a912-2c11b2724894"
ANSWER = "22d2229b-33bc-4890-a5bc-29cde879fc64"
JOB_ALGORITHM = "9fcbde1f-a8a7-47b5-bcee-1a671b4b4751"
JOB_ALGORITHM_IMAGE = "7fc0965a-ed11-49c6-a2ba-5b3e929e96f6"
JOB_IMAGE = "321e7a42-727c-4bd1-8854-d106ba27eef3"
JOBS = ["8b1d56da-27e4-483d-ad62-720b8ad6de14", "7dd7912b-c2dc-4449-a4c6-67b536bb1ca6"]


def sample_world() -> World:
    """Objects comparable to the development fixtures the samples were captured from."""
    w = World()
    w.add_user("user-a", TOKENS["user-a"])
    w.add_user("user-b", TOKENS["user-b"])
    w.add_user("readerstudy", TOKENS["reader-study-editor"])
    w.add_user("staff", "f" * 64, is_staff=True)
    w.add_socket(
        "generic-medical-image", title="Generic Medical Image", kind="Image", relative_path=""
    )
    w.add_socket(
        "generic-overlay", title="Generic Overlay", kind="Heat Map", relative_path="images"
    )
    w.add_socket("results-json-file", title="Results JSON File", relative_path="results.json")
    for n in range(4, 9):
        w.add_socket(f"socket-{n}", kind="Float")
    w.add_socket(
        "metadata-json-file",
        title="Metadata JSON File",
        relative_path="metadata.json",
        store_in_database=False,
    )

    archive = w.add_archive(
        "archive", "Archive", description="Test archive", viewers={"user-a"}, pk=ARCHIVE
    )
    w.add_archive(
        "archive-b",
        "Archive B",
        description="Archive visible to demop and demo",
        viewers={"user-a", "user-b"},
        pk=ARCHIVE_B,
    )
    for n, pk in enumerate(ITEMS):
        # The fixture's images: three with an unset colour space (no `shape`), one RGB.
        name, size, colour = (
            ("test_image2.mha", 128, "RGB") if n == 3 else (f"archive_image_{n + 1}.mha", 10, "")
        )
        image = w.add_image(
            name,
            [f"test_image_{n + 3}.mha"],
            pk=IMAGE if n == 1 else None,
            width=size,
            height=size,
            modality="MR",
            color_space=colour,
        )
        values = [
            w.add_value("results-json-file", {"item": n, "score": n / 10}),
            w.add_value("generic-medical-image", image=image),
        ]
        if n == 1:
            values.append(w.add_value("metadata-json-file", file="metadata.json"))
        w.add_archive_item(archive, values, pk=pk)

    algorithm = w.add_algorithm(
        "test-algorithm",
        "Test Algorithm",
        description=None,
        editors={"user-a"},
        pk=ALGORITHM,
        inputs=["generic-medical-image"],
        outputs=["results-json-file"],
    )
    w.add_algorithm_image(
        algorithm, import_status="Queued", file_name="algorithm_io.tar", pk=ALGORITHM_IMAGE
    )

    rs = w.add_reader_study(
        "reader-study",
        "Reader Study",
        description="Test reader study",
        viewers={"user-a"},
        editors={"readerstudy"},
        pk=READER_STUDY,
        allow_answer_modification=False,
        allow_case_navigation=False,
        view_content={"main": ["generic-medical-image"]},
    )
    w.add_question(rs, "Is there a lesion?", "Bool")
    w.add_question(rs, "Lesion size (mm)", "Number")
    text = w.add_question(rs, "foo", "Text", pk=TEXT_QUESTION)
    display_sets = []
    for n in range(4):
        image = w.add_image(f"rs_image_{n}.mha", [f"rs_image_{n}.mha"], width=10, height=10)
        display_sets.append(
            w.add_display_set(
                rs,
                [w.add_value("generic-medical-image", image=image)],
                pk=DISPLAY_SET if n == 0 else None,
            )
        )
    w.add_answer(text, display_sets[0], "readerstudy", "foo", pk=ANSWER)
    rs_b = w.add_reader_study(
        "reader-study-b", "Reader Study B", pk=READER_STUDY_B, viewers={"user-a", "user-b"}
    )
    w.add_question(rs_b, "Quality ok?", "Bool")

    # The rebuilt server's job owner: four jobs of another algorithm (slugs differ from the
    # capture's, which only shows in values the shape comparison does not look at).
    w.add_user("job-owner", TOKENS["job-owner"])
    job_algorithm = w.add_algorithm(
        "job-algorithm",
        "Job Algorithm",
        pk=JOB_ALGORITHM,
        viewers={"job-owner"},
        inputs=["generic-medical-image"],
        outputs=["results-json-file"],
    )
    w.add_algorithm_image(job_algorithm, pk=JOB_ALGORITHM_IMAGE)
    job_image = w.add_image("job_input.mha", ["job_input.mha"], pk=JOB_IMAGE, width=10, height=10)
    for n in range(4):
        w.add_job(
            job_algorithm,
            creator="job-owner",
            inputs=[w.add_value("generic-medical-image", image=job_image)],
            outputs=[w.add_value("results-json-file", {"score": 0.5 + n / 10})],
            pk=JOBS[n] if n < len(JOBS) else None,
        )
    return w


@pytest.fixture
def fake() -> Iterator[FakeGC]:
    with FakeGC(sample_world()) as server:
        yield server


def auth_headers(who: str | None) -> dict[str, str]:
    """`who` is a sample's auth name, a raw token, or None for no Authorization header."""
    if who is None:
        return {}
    if who == "bad-token":
        return {"Authorization": "Bearer " + "0" * 64}
    return {"Authorization": f"Bearer {TOKENS.get(who, who)}"}


def client(fake: FakeGC, who: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=fake.base_url, headers=auth_headers(who))


_shared: list[httpx.Client] = []


@pytest.fixture(autouse=True, scope="module")
def shared_client() -> Iterator[None]:
    """One client for all of `get()`: building an httpx.Client per request is slow."""
    _shared.append(httpx.Client())
    yield
    _shared.pop().close()


def get(fake: FakeGC, path: str, who: str | None = "user-a") -> httpx.Response:
    return _shared[0].get(fake.base_url + path, headers=auth_headers(who))


# -- shape comparison ---------------------------------------------------------------------------

# Fields holding arbitrary JSON: their type legitimately differs from object to object.
FREE_JSON = {"value", "answer", "default_value", "look_up_table", "segments"}


def kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def assert_same_shape(ours: Any, real: Any, where: str = "$") -> None:
    """Same keys in the same order, recursively, and the same JSON types (null matches all)."""
    if ours is None or real is None:
        return
    assert kind(ours) == kind(real), f"{where}: {kind(ours)} != {kind(real)}"
    if isinstance(real, dict):
        assert list(ours) == list(real), f"{where}: keys {list(ours)} != {list(real)}"
        for key in real:
            if key not in FREE_JSON:
                assert_same_shape(ours[key], real[key], f"{where}.{key}")
    elif isinstance(real, list) and real:
        for i, item in enumerate(ours):
            assert_same_shape(item, real[min(i, len(real) - 1)], f"{where}[{i}]")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data


def rebase(value: Any, base: str) -> Any:
    text = json.dumps(value).replace(SAMPLE_BASE, base).replace(SAMPLE_BASE_LATER, base)
    return json.loads(text)


API_SAMPLES = sorted(
    p.name
    for p in SAMPLES.glob("*.json")
    if not p.name.startswith(("media-", "website-")) and p.name != "no-trailing-slash-301.json"
)


def test_samples_are_there() -> None:
    assert len(API_SAMPLES) >= 30


@pytest.mark.parametrize("name", API_SAMPLES)
def test_api_matches_sample(fake: FakeGC, name: str) -> None:
    sample = load(name)
    request = sample["request"]
    r = get(fake, request["path"], None if request["auth"] == "none" else request["auth"])
    assert r.status_code == sample["status"]
    for header in ("content-type", "www-authenticate", "allow"):
        if header in sample["headers"]:
            assert r.headers.get(header) == sample["headers"][header], header
    if sample["headers"].get("content-type", "").startswith("text/html"):
        # An HTML error page (the job filters' 500), abbreviated in the capture.
        assert r.text.lstrip().lower().startswith("<!doctype html>")
        return
    body, real = r.json(), sample["body"]
    if r.status_code != 200:
        # Error bodies are fixed texts: equal, byte for byte (so the Content-Length too).
        assert body == real
        if "content-length" in sample["headers"]:  # the later captures kept fewer headers
            assert r.headers["content-length"] == sample["headers"]["content-length"]
        return
    assert_same_shape(body, real)
    if "count" in real:
        assert body["count"] == real["count"]
        assert len(body["results"]) == len(real["results"])
        assert body["next"] == rebase(real["next"], fake.base_url)
        assert body["previous"] == rebase(real["previous"], fake.base_url)


def test_archive_values_sorted_like_the_server(fake: FakeGC) -> None:
    real = load("archives-items-list.json")["body"]["results"]
    ours = get(fake, f"/api/v1/archives/items/?archive={ARCHIVE}").json()["results"]
    slugs = [[v["interface"]["slug"] for v in item["values"]] for item in ours]
    real_slugs = [[v["interface"]["slug"] for v in item["values"]] for item in real]
    assert sorted(slugs) == sorted(real_slugs)


def test_sample_detail_bodies_keep_real_values(fake: FakeGC) -> None:
    """Where the world copies the fixture's data, the bodies are equal, URLs and all."""
    for name in ("archives-detail.json", "algorithms-images-detail.json"):
        sample = load(name)
        body = get(fake, sample["request"]["path"]).json()
        real = rebase(sample["body"], fake.base_url)
        for key in (
            "pk",
            "title",
            "description",
            "api_url",
            "url",
            "algorithm",
            "import_status",
            "image",
        ):
            if key in real:
                assert body[key] == real[key], key


def test_no_trailing_slash_redirects(fake: FakeGC) -> None:
    sample = load("no-trailing-slash-301.json")
    r = get(fake, sample["request"]["path"])
    assert r.status_code == 301
    assert r.headers["location"] == sample["headers"]["location"]
    assert r.headers["content-type"] == sample["headers"]["content-type"]
    assert r.content == b""
    r = get(fake, "/api/v1/archives/items?archive=x&limit=2")
    assert (r.status_code, r.headers["location"]) == (
        301,
        "/api/v1/archives/items/?archive=x&limit=2",
    )
    location = get(fake, "/algorithms/test-algorithm").headers["location"]
    assert location == "/algorithms/test-algorithm/"
    assert fake.count("redirect-slash") == 3


@pytest.mark.parametrize(
    "name",
    [
        "website-algorithm-hidden-302.json",
        "website-reader-study-hidden-302.json",
        "website-archive-login-302.json",
        "website-algorithm-absent-404.json",
    ],
)
def test_website_matches_sample(fake: FakeGC, name: str) -> None:
    sample = load(name)
    # A valid token changes nothing: website views never authenticate API tokens.
    r = get(fake, sample["request"]["path"], "user-a")
    assert r.status_code == sample["status"]
    assert r.headers["content-type"] == sample["headers"]["content-type"]
    if "location" in sample["headers"]:
        assert r.headers["location"] == rebase(sample["headers"]["location"], fake.base_url)
        assert r.content == b""


def test_website_pages(fake: FakeGC) -> None:
    fake.world.algorithms[ALGORITHM].public = True
    assert get(fake, "/algorithms/test-algorithm/").status_code == 200
    assert get(fake, "/reader-studies/no-such-study/").status_code == 404
    r = get(fake, "/archives/no-such-archive/")
    assert (r.status_code, r.headers["location"]) == (
        302,
        "/accounts/login/?next=/archives/no-such-archive/",
    )
    assert get(fake, "/some/other/page/").status_code == 404
    assert fake.count("website-algorithm") == 1
    assert fake.count("website-reader-study") == 1
    assert fake.count("website-archive") == 1
    assert fake.count("not-found") == 1


# -- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        ("Bearer " + "0" * 64, "Invalid token."),
        ("Bearer not-hex", "Invalid token."),
        ("Bearer", "Invalid token header. No credentials provided."),
        ("Bearer a b", "Invalid token header. Token string should not contain spaces."),
    ],
)
def test_token_errors(fake: FakeGC, header: str, detail: str) -> None:
    r = httpx.get(f"{fake.base_url}/api/v1/archives/", headers={"Authorization": header})
    assert r.status_code == 401
    assert r.json() == {"detail": detail}
    assert r.headers["www-authenticate"] == "Bearer"
    assert fake.requests[-1].user is None


def test_keyword_is_case_insensitive(fake: FakeGC) -> None:
    r = httpx.get(
        f"{fake.base_url}/api/v1/archives/", headers={"Authorization": f"BEARER {TOKENS['user-b']}"}
    )
    assert r.json()["count"] == 1
    assert fake.requests[-1].user == "user-b"


@pytest.mark.parametrize("header", ["Token " + "a" * 64, "Basic dXNlcjpwYXNz", ""])
def test_other_schemes_are_anonymous(fake: FakeGC, header: str) -> None:
    fake.world.archives[ARCHIVE].public = True
    r = httpx.get(f"{fake.base_url}/api/v1/archives/", headers={"Authorization": header})
    assert r.status_code == 200
    assert [a["pk"] for a in r.json()["results"]] == [ARCHIVE]


def test_interfaces_need_a_token(fake: FakeGC) -> None:
    r = get(fake, "/api/v1/components/interfaces/1/", None)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert get(fake, "/api/v1/components/interfaces/1/", "user-b").json()["slug"] == (
        "generic-medical-image"
    )
    assert get(fake, "/api/v1/components/interfaces/?slug=generic-overlay").json()["count"] == 1
    r = get(fake, "/api/v1/components/interfaces/99/")
    assert r.json() == {"detail": "No ComponentInterface matches the given query."}
    assert get(fake, "/api/v1/components/interfaces/x/").json() == {"detail": "Not found."}


def test_api_root(fake: FakeGC) -> None:
    r = get(fake, "/api/v1/", None)
    assert r.status_code == 401
    assert r.json()["detail"] == "Authentication credentials were not provided."
    assert get(fake, "/api/v1/", "user-a").status_code == 403
    r = get(fake, "/api/v1/", "f" * 64)
    assert r.status_code == 200
    assert r.json()["archives"] == f"{fake.base_url}/api/v1/archives/"


def test_profile(fake: FakeGC) -> None:
    body = get(fake, "/api/v1/profiles/users/self/", "user-b").json()
    assert body["user"] == {"username": "user-b"}
    assert get(fake, "/api/v1/profiles/users/self/", None).status_code == 401


# -- pagination ---------------------------------------------------------------------------------


@pytest.fixture
def paged() -> Iterator[FakeGC]:
    w = World()
    w.add_user("u", "1" * 64)
    for n in range(7):
        w.add_archive(f"archive-{n}", viewers={"u"})
    with FakeGC(w) as server:
        yield server


def page(fake: FakeGC, query: str) -> dict[str, Any]:
    r = get(fake, f"/api/v1/archives/{query}", "1" * 64)
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def titles(body: dict[str, Any]) -> list[str]:
    return [a["title"] for a in body["results"]]


def test_pagination_links(paged: FakeGC) -> None:
    base = f"{paged.base_url}/api/v1/archives/"
    first = page(paged, "?limit=3")
    assert first["count"] == 7
    assert titles(first) == ["archive-0", "archive-1", "archive-2"]
    assert first["next"] == f"{base}?limit=3&offset=3"
    assert first["previous"] is None
    second = page(paged, "?limit=3&offset=3")
    assert titles(second) == ["archive-3", "archive-4", "archive-5"]
    assert second["previous"] == f"{base}?limit=3"  # offset 0 is dropped
    assert second["next"] == f"{base}?limit=3&offset=6"
    last = page(paged, "?offset=5&limit=3")
    assert titles(last) == ["archive-5", "archive-6"]
    assert (last["next"], last["previous"]) == (None, f"{base}?limit=3&offset=2")


def test_pagination_keeps_other_params_sorted(paged: FakeGC) -> None:
    body = page(paged, "?zeta=1&limit=2&alpha=x%20y&slug=")
    assert body["count"] == 7  # unknown params and an empty filter are ignored
    assert body["next"] == (
        f"{paged.base_url}/api/v1/archives/?alpha=x+y&limit=2&offset=2&slug=&zeta=1"
    )


@pytest.mark.parametrize(
    ("query", "size"),
    [
        ("", 7),
        ("?limit=0", 7),
        ("?limit=-4", 7),
        ("?limit=abc", 7),
        ("?limit=2&limit=1", 1),
        ("?offset=-3&limit=2", 2),
        ("?offset=junk&limit=2", 2),
    ],
)
def test_pagination_garbage(paged: FakeGC, query: str, size: int) -> None:
    body = page(paged, query)
    assert len(body["results"]) == size
    if "offset" in query:
        assert titles(body)[0] == "archive-0"


def test_offset_beyond_count(paged: FakeGC) -> None:
    body = page(paged, "?offset=100&limit=3")
    assert (body["count"], body["results"], body["next"]) == (7, [], None)
    assert body["previous"] == f"{paged.base_url}/api/v1/archives/?limit=3&offset=97"
    assert page(paged, "?offset=7")["results"] == []


def test_large_world_lists_across_pages() -> None:
    w = World()
    w.add_user("u", "1" * 64)
    w.add_user("v", "2" * 64)
    made = [
        w.add_archive(f"archive-{n:04d}", viewers={"u", "v"} if n % 2 else {"u"}).pk
        for n in range(2500)
    ]
    with FakeGC(w) as fake, client(fake, "1" * 64) as c:
        body = c.get("/api/v1/archives/?limit=5000").json()
        assert len(body["results"]) == 1000  # clamped to max_limit
        assert body["next"] == f"{fake.base_url}/api/v1/archives/?limit=1000&offset=1000"
        seen, url = [], "/api/v1/archives/?limit=0"
        assert len(c.get(url).json()["results"]) == 100  # limit=0 means the default
        url = "/api/v1/archives/?limit=1000"
        while url:
            body = c.get(url).json()
            seen += [a["pk"] for a in body["results"]]
            url = body["next"]
        assert seen == made
        assert fake.count("archives-list") == 5
        with client(fake, "2" * 64) as c2:
            assert c2.get("/api/v1/archives/?limit=1").json()["count"] == 1250


def test_ten_thousand_items() -> None:
    w = World()
    w.add_user("u", "1" * 64)
    archive = w.add_archive("big", viewers={"u"})
    socket = w.add_socket("score", kind="Float")
    items = [w.add_archive_item(archive, [w.add_value(socket, n / 7)]) for n in range(10_000)]
    assert len({i.pk for i in items}) == 10_000
    with FakeGC(w) as fake:
        body = get(fake, f"/api/v1/archives/items/?archive={archive.pk}&offset=9990", "1" * 64)
        data = body.json()
        assert data["count"] == 10_000
        assert [r["pk"] for r in data["results"]] == [i.pk for i in items[9990:]]


# -- filters and the existence oracle -----------------------------------------------------------

SINGLE = "Select a valid choice. That choice is not one of the available choices."
ORACLES = [
    ("/api/v1/archives/items/", "archive", ARCHIVE, SINGLE),
    ("/api/v1/reader-studies/display-sets/", "reader_study", READER_STUDY, SINGLE),
    ("/api/v1/reader-studies/questions/", "reader_study", READER_STUDY, SINGLE),
    ("/api/v1/algorithms/images/", "algorithm", ALGORITHM, SINGLE),
    ("/api/v1/algorithms/jobs/", "algorithm_image__algorithm", ALGORITHM, SINGLE),
    ("/api/v1/reader-studies/answers/", "question__reader_study", READER_STUDY, SINGLE),
    ("/api/v1/reader-studies/answers/", "display_set", DISPLAY_SET, SINGLE),
    (
        "/api/v1/cases/images/",
        "archive",
        ARCHIVE,
        f"Select a valid choice. {ABSENT} is not one of the available choices.",
    ),
    (
        "/api/v1/cases/images/",
        "reader_study",
        READER_STUDY,
        f"Select a valid choice. {ABSENT} is not one of the available choices.",
    ),
]


@pytest.mark.parametrize(("path", "param", "hidden", "message"), ORACLES)
def test_fk_filter_oracle(fake: FakeGC, path: str, param: str, hidden: str, message: str) -> None:
    absent = get(fake, f"{path}?{param}={ABSENT}", "user-b")
    assert (absent.status_code, absent.json()) == (400, {param: [message]})
    exists = get(fake, f"{path}?{param}={hidden}", "user-b")
    assert exists.status_code == 200
    assert exists.json() == {"count": 0, "next": None, "previous": None, "results": []}
    malformed = get(fake, f"{path}?{param}=foo", "user-b")
    assert (malformed.status_code, malformed.json()) == (
        400,
        {param: ["\u201cfoo\u201d is not a valid UUID."]},
    )
    everything = get(fake, path, "reader-study-editor").json()["count"]
    assert get(fake, f"{path}?{param}=", "reader-study-editor").json()["count"] == everything


@pytest.mark.parametrize(
    ("path", "param", "pk", "count"),
    [
        ("/api/v1/archives/items/", "archive", ARCHIVE, 4),
        ("/api/v1/reader-studies/display-sets/", "reader_study", READER_STUDY, 4),
        ("/api/v1/reader-studies/questions/", "reader_study", READER_STUDY, 3),
        ("/api/v1/algorithms/images/", "algorithm", ALGORITHM, 1),
        ("/api/v1/cases/images/", "archive", ARCHIVE, 4),
        ("/api/v1/cases/images/", "reader_study", READER_STUDY, 4),
    ],
)
def test_fk_filters_select(fake: FakeGC, path: str, param: str, pk: str, count: int) -> None:
    assert get(fake, f"{path}?{param}={pk}").json()["count"] == count
    # A non-canonical spelling of the pk still names the same object for single filters.
    if "cases" not in path:
        assert get(fake, f"{path}?{param}={pk.upper()}").json()["count"] == count


def test_multi_value_filter_is_an_or(fake: FakeGC) -> None:
    both = get(fake, f"/api/v1/cases/images/?archive={ARCHIVE}&reader_study={READER_STUDY}")
    assert both.json()["count"] == 0  # different filters AND together
    r = get(fake, f"/api/v1/cases/images/?archive={ARCHIVE}&archive={ARCHIVE_B}")
    assert r.json()["count"] == 4


def test_filter_errors_are_all_reported(fake: FakeGC) -> None:
    r = get(fake, f"/api/v1/cases/images/?archive=foo&reader_study={ABSENT}")
    assert list(r.json()) == ["archive", "reader_study"]


def test_slug_filters(fake: FakeGC) -> None:
    assert get(fake, "/api/v1/archives/?slug=archive-b").json()["results"][0]["pk"] == ARCHIVE_B
    assert get(fake, "/api/v1/archives/?slug=archive", "user-b").json()["count"] == 0
    assert get(fake, "/api/v1/algorithms/?slug=test-algorithm").json()["count"] == 1
    assert get(fake, "/api/v1/reader-studies/?slug=nope").json()["count"] == 0


def test_answer_filters(fake: FakeGC) -> None:
    rs = fake.world.reader_studies[READER_STUDY]
    question = rs.questions[0]
    ds = rs.display_sets[1]
    fake.world.add_answer(question, ds, "user-a", True)
    fake.world.add_answer(question, ds, "readerstudy", False, is_ground_truth=True)
    editor = "reader-study-editor"
    assert get(fake, "/api/v1/reader-studies/answers/", editor).json()["count"] == 3
    assert get(fake, "/api/v1/reader-studies/answers/", "user-a").json()["count"] == 1
    assert get(fake, "/api/v1/reader-studies/answers/?creator=user-a", editor).json()["count"] == 1
    for value, count in (("true", 1), ("False", 2), ("0", 2), ("maybe", 3)):
        r = get(fake, f"/api/v1/reader-studies/answers/?is_ground_truth={value}", editor)
        assert r.json()["count"] == count, value
    r = get(fake, f"/api/v1/reader-studies/answers/?display_set={ds.pk}", editor)
    assert r.json()["count"] == 2
    mine = get(fake, "/api/v1/reader-studies/answers/mine/", editor).json()
    assert [a["pk"] for a in mine["results"]] == [ANSWER]
    assert fake.count("answers-mine") == 1


# -- permissions --------------------------------------------------------------------------------

DETAILS = [
    ("archives", ARCHIVE, "Archive"),
    ("archives/items", ITEMS[0], "ArchiveItem"),
    ("algorithms", ALGORITHM, "Algorithm"),
    ("algorithms/images", ALGORITHM_IMAGE, "AlgorithmImage"),
    ("reader-studies", READER_STUDY, "ReaderStudy"),
    ("reader-studies/display-sets", DISPLAY_SET, "DisplaySet"),
    ("reader-studies/questions", TEXT_QUESTION, "Question"),
    ("cases/images", IMAGE, "Image"),
]


def listed_pks(fake: FakeGC, prefix: str, who: str) -> list[str]:
    return [o["pk"] for o in get(fake, f"/api/v1/{prefix}/?limit=1000", who).json()["results"]]


@pytest.mark.parametrize(("prefix", "pk", "model"), DETAILS)
def test_list_omits_detail_404(fake: FakeGC, prefix: str, pk: str, model: str) -> None:
    assert get(fake, f"/api/v1/{prefix}/{pk}/", "user-a").json()["pk"] == pk
    assert pk in listed_pks(fake, prefix, "user-a")
    hidden = get(fake, f"/api/v1/{prefix}/{pk}/", "user-b")
    assert hidden.status_code == 404
    assert hidden.json() == {"detail": f"No {model} matches the given query."}
    assert pk not in listed_pks(fake, prefix, "user-b")
    absent = get(fake, f"/api/v1/{prefix}/{ABSENT}/", "user-a")
    assert absent.json() == {"detail": f"No {model} matches the given query."}
    malformed = get(fake, f"/api/v1/{prefix}/not-a-uuid/", "user-a")
    assert (malformed.status_code, malformed.json()) == (404, {"detail": "Not found."})


def test_answers_visible_to_creator_and_editors(fake: FakeGC) -> None:
    path = f"/api/v1/reader-studies/answers/{ANSWER}/"
    assert get(fake, path, "reader-study-editor").status_code == 200
    assert get(fake, path, "user-a").json() == {"detail": "No Answer matches the given query."}


def test_jobs_visibility(fake: FakeGC) -> None:
    w = fake.world
    algorithm = w.algorithms[ALGORITHM]
    image = w.images[IMAGE]
    mine = w.add_job(
        algorithm, creator="user-b", inputs=[w.add_value("generic-medical-image", image=image)]
    )
    shared = w.add_job(algorithm, creator="user-a", public=True)
    w.add_job(algorithm, creator="user-a")
    r = get(fake, f"/api/v1/algorithms/jobs/?algorithm_image__algorithm={ALGORITHM}", "user-b")
    assert [j["pk"] for j in r.json()["results"]] == [mine.pk, shared.pk]
    assert get(fake, f"/api/v1/algorithms/jobs/{mine.pk}/", "user-a").status_code == 404
    # The job's input image becomes visible to the job's viewers.
    assert get(fake, f"/api/v1/cases/images/{IMAGE}/", "user-b").status_code == 200
    assert get(fake, f"/api/v1/algorithms/jobs/{shared.pk}/", None).status_code == 200


def test_job_image_filters_fail_like_the_real_server(fake: FakeGC) -> None:
    """?job_input= and ?job_output= answer 500 with an HTML page for a valid job pk and the
    usual 400 for an unknown one (gc-api.md §3.11); `job_filters_fixed` behaves as a fixed
    server."""
    w = fake.world
    job = w.add_job(
        w.algorithms[ALGORITHM],
        creator="user-b",
        inputs=[w.add_value("generic-medical-image", image=w.images[IMAGE])],
    )
    for param in ("job_input", "job_output"):
        r = get(fake, f"/api/v1/cases/images/?{param}={job.pk}", "user-b")
        assert (r.status_code, r.headers["content-type"]) == (500, "text/html; charset=utf-8")
        assert b"Server Error (500)" in r.content
        absent = get(fake, f"/api/v1/cases/images/?{param}={ABSENT}", "user-b")
        assert absent.status_code == 400
        assert list(absent.json()) == [param]
    assert fake.count("cases-images-list") == 4
    fake.job_filters_fixed = True
    r = get(fake, f"/api/v1/cases/images/?job_input={job.pk}", "user-b")
    assert [image["pk"] for image in r.json()["results"]] == [IMAGE]
    assert get(fake, f"/api/v1/cases/images/?job_output={job.pk}", "user-b").json()["count"] == 0


def test_public_objects_expose_metadata_only(fake: FakeGC) -> None:
    w = fake.world
    w.archives[ARCHIVE].public = True
    w.reader_studies[READER_STUDY].public = True
    assert get(fake, f"/api/v1/archives/{ARCHIVE}/", None).status_code == 200
    assert get(fake, "/api/v1/archives/items/", None).json()["count"] == 0
    assert get(fake, f"/api/v1/archives/items/{ITEMS[0]}/", None).status_code == 404
    rs = get(fake, f"/api/v1/reader-studies/{READER_STUDY}/", "user-b").json()
    assert len(rs["questions"]) == 3  # nested questions are not filtered
    question = get(fake, f"/api/v1/reader-studies/questions/{TEXT_QUESTION}/", "user-b")
    assert question.status_code == 404
    assert get(fake, "/api/v1/reader-studies/display-sets/", "user-b").json()["count"] == 0


def test_algorithm_images_editors_only(fake: FakeGC) -> None:
    fake.world.algorithms[ALGORITHM].viewers.add("user-b")
    assert get(fake, f"/api/v1/algorithms/{ALGORITHM}/", "user-b").status_code == 200
    assert get(fake, f"/api/v1/algorithms/images/{ALGORITHM_IMAGE}/", "user-b").status_code == 404


# -- serialization details ----------------------------------------------------------------------


def test_urls_and_files(fake: FakeGC) -> None:
    item = get(fake, f"/api/v1/archives/items/{ITEMS[1]}/").json()
    by_slug = {v["interface"]["slug"]: v for v in item["values"]}
    assert [v["interface"]["slug"] for v in item["values"]] == [
        "metadata-json-file",
        "results-json-file",
        "generic-medical-image",
    ]
    civ = by_slug["metadata-json-file"]
    tail = f"{civ['pk']:04x}"[-4:]
    assert civ["file"] == (
        f"{fake.base_url}/media/components/componentinterfacevalue/"
        f"{tail[:2]}/{tail[2:]}/{civ['pk']}/metadata.json"
    )
    image_url = by_slug["generic-medical-image"]["image"]
    assert image_url == f"{fake.base_url}/api/v1/cases/images/{IMAGE}/"
    image = get(fake, f"/api/v1/cases/images/{IMAGE}/").json()
    f = image["files"][0]
    assert f["file"] == (
        f"{fake.base_url}/media/images/{IMAGE[:2]}/{IMAGE[2:4]}/{IMAGE}/{f['pk']}/test_image_4.mha"
    )
    assert (f["image"], f["image_type"]) == (IMAGE, "MHD")
    archive = get(fake, f"/api/v1/archives/{ARCHIVE}/").json()
    assert "slug" not in archive
    assert archive["url"] == f"{fake.base_url}/archives/archive/"


def test_display_set_order_and_index(fake: FakeGC) -> None:
    rs = fake.world.reader_studies[READER_STUDY]
    first = fake.world.add_display_set(rs, order=5)
    body = get(fake, f"/api/v1/reader-studies/display-sets/?reader_study={READER_STUDY}").json()
    assert [d["order"] for d in body["results"]] == [5, 10, 20, 30, 40]
    assert [d["index"] for d in body["results"]] == [0, 1, 2, 3, 4]
    assert body["results"][0]["pk"] == first.pk


def test_socket_field(fake: FakeGC) -> None:
    path = f"/api/v1/archives/items/{ITEMS[0]}/"
    assert "socket" not in get(fake, path).json()["values"][0]
    fake.socket_field = True
    value = get(fake, path).json()["values"][0]
    assert list(value)[:3] == ["interface", "socket", "value"]
    assert value["socket"] == value["interface"]
    algorithm_jobs = get(fake, "/api/v1/algorithms/jobs/").json()
    assert algorithm_jobs["count"] == 0


def test_demo_world() -> None:
    w1, w2 = demo_world(), demo_world()
    assert list(w1.archive_items) == list(w2.archive_items)  # deterministic pks
    assert len(DEMO_TOKEN) == 64 and DEMO_TOKEN.lower() == DEMO_TOKEN
    images = list(w1.images.values())
    assert any(not im.files and im.dicom_image_set for im in images)
    assert any(f.image_type == "TIFF" for im in images for f in im.files)
    assert any({f.name[-4:] for f in im.files} == {".mhd", "zraw"} for im in images)
    with FakeGC(w1) as fake, client(fake, DEMO_TOKEN) as c, client(fake, DEMO_B_TOKEN) as b:

        def slugs(who: httpx.Client, kind: str) -> set[str]:
            return {
                o["url"].rstrip("/").rsplit("/", 1)[-1]
                for o in who.get(f"/api/v1/{kind}/").json()["results"]
            }

        assert slugs(c, "archives") == {"lidc-lung-ct", "prostate-mri-picai", "chest-xray-public"}
        assert slugs(c, "algorithms") == {
            "corads-ai",
            "nodule-detector",
            "pi-cai-baseline-nndetection",
        }
        assert slugs(c, "reader-studies") == {
            "lung-nodule-reader-study",
            "prostate-mri-reader-study",
        }
        assert slugs(b, "archives") < slugs(c, "archives")
        assert c.get("/algorithms/private-segmenter/").status_code == 302
        assert c.get("/reader-studies/mammography-screening-rs/").status_code == 302
        assert c.get("/reader-studies/prostate-mri-reader-study/").status_code == 200
        lidc = c.get("/api/v1/archives/?slug=lidc-lung-ct").json()["results"][0]["pk"]
        items = c.get(f"/api/v1/archives/items/?archive={lidc}").json()
        assert items["count"] == 12
        kinds = {v["interface"]["super_kind"] for i in items["results"] for v in i["values"]}
        assert kinds == {"Value", "File", "Image"}
        assert any(
            v["interface"]["relative_path"] == "" for i in items["results"] for v in i["values"]
        )


# -- the server itself --------------------------------------------------------------------------


def test_counters_and_records(fake: FakeGC) -> None:
    get(fake, "/api/v1/archives/?limit=1&limit=2")
    get(fake, f"/api/v1/archives/{ARCHIVE}/", "user-b")
    get(fake, "/api/v1/archives/")
    assert fake.count() == 3
    assert fake.count("archives-list") == 2
    assert fake.count("archives-detail") == 1
    first, second = fake.requests[:2]
    assert (first.method, first.path, first.query) == ("GET", "/api/v1/archives/", {"limit": "2"})
    assert (first.endpoint, first.status, first.user) == ("archives-list", 200, "user-a")
    assert (second.endpoint, second.status, second.user) == ("archives-detail", 404, "user-b")
    fake.reset_counts()
    assert fake.count() == 0 and fake.requests == []
    get(fake, "/api/v1/algorithms/")
    assert fake.count("algorithms-list") == 1


def test_endpoint_names_are_documented() -> None:
    from gcfs.fakegc import server

    for name in ENDPOINTS:
        stem = name.removesuffix("-list").removesuffix("-detail")
        assert stem in (server.__doc__ or ""), name


def test_keep_alive_and_head(fake: FakeGC) -> None:
    with client(fake) as c:
        responses = [c.get("/api/v1/archives/") for _ in range(3)]
        head = c.head("/api/v1/archives/")
    assert all(r.http_version == "HTTP/1.1" for r in responses)
    assert all(r.headers.get("connection") != "close" for r in responses)
    assert head.content == b""
    assert head.headers["content-length"] == responses[0].headers["content-length"]


def test_other_methods_are_refused(fake: FakeGC) -> None:
    with client(fake) as c:
        r = c.post("/api/v1/archives/", json={"title": "x"})
    assert (r.status_code, r.json()) == (405, {"detail": 'Method "POST" not allowed.'})


def test_server_survives_a_bug(fake: FakeGC, capfd: pytest.CaptureFixture[str]) -> None:
    archive = fake.world.archives[ARCHIVE]
    archive.title = object()  # type: ignore[assignment]  # not JSON: the handler raises
    r = get(fake, "/api/v1/archives/")
    assert (r.status_code, r.json()) == (500, {"detail": "fake server error"})
    assert r.headers["content-type"] == "application/json"
    assert "TypeError" in capfd.readouterr().err
    archive.title = "Archive"
    assert get(fake, "/api/v1/archives/").status_code == 200
    assert fake.count("server-error") == 1


def test_latency_knobs(fake: FakeGC) -> None:
    fake.latency = 0.2
    started = time.monotonic()
    get(fake, "/api/v1/archives/")
    assert time.monotonic() - started >= 0.2
    fake.latency = 0.0
    fake.per_item_latency = 0.1
    started = time.monotonic()
    get(fake, f"/api/v1/archives/items/?archive={ARCHIVE}")  # 4 results
    assert time.monotonic() - started >= 0.4


def test_stop_closes_idle_connections() -> None:
    fake = FakeGC(sample_world()).start()
    c = client(fake)
    assert c.get("/api/v1/archives/").status_code == 200
    fake.stop()  # returns although the client still holds a keep-alive connection
    with pytest.raises(httpx.TransportError):
        c.get("/api/v1/archives/")
    c.close()
