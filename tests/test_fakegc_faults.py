"""Tests for the fake's fault injection (`fake.faults`, gcfs/fakegc/faults.py).

Each knob is switched on at rate 1.0 and checked on the wire with plain sync httpx (redirects
not followed); rates in between are checked statistically with generous bounds and a seed.
The fixture fails a test whose server printed a traceback: the intended resets are quiet.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from gcfs.fakegc import FakeGC, GeneratedContent, World
from gcfs.fakegc.faults import CUT_LIMIT, Faults, wrong_range
from gcfs.fakegc.storage import image_file_key

OWNER, OTHER = "o" * 64, "x" * 64
SMALL = b"".join(bytes([n % 251]) for n in range(10_000))
BIG = GeneratedContent(3 * 1024 * 1024, "big-fault-file")
HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
BROKEN = (httpx.RemoteProtocolError, httpx.ReadError)


def fault_world() -> World:
    w = World()
    w.add_user("owner", OWNER)
    w.add_user("other", OTHER)
    w.add_socket("generic-medical-image", kind="Image", relative_path="")
    archive = w.add_archive("archive", viewers={"owner", "other"})
    small = w.add_image("small.mha", [("small.mha", SMALL)], width=1, height=1)
    big = w.add_image("big.tif", [("big.tif", BIG)], width=1, height=1)
    hidden = w.add_image("hidden.mha", [("hidden.mha", b"secret")], width=1, height=1)
    w.add_archive_item(archive, [w.add_value("generic-medical-image", image=small)])
    w.add_archive_item(archive, [w.add_value("generic-medical-image", image=big)])
    private = w.add_archive("private", viewers={"owner"})
    w.add_archive_item(private, [w.add_value("generic-medical-image", image=hidden)])
    return w


@pytest.fixture
def fake(capsys: pytest.CaptureFixture[str]) -> Iterator[FakeGC]:
    with FakeGC(fault_world()) as server:
        yield server
    err = capsys.readouterr().err
    assert "Traceback" not in err, err


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False, timeout=10) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api(fake: FakeGC, path: str = "archives/") -> str:
    return f"{fake.base_url}/api/v1/{path}"


def file_url(fake: FakeGC, name: str) -> tuple[str, str]:
    """(the /media/ URL, a presigned storage URL) of the image named `name`."""
    image = next(im for im in fake.world.images.values() if im.name == name)
    key = image_file_key(image.pk, image.files[0].pk, image.files[0].name)
    return f"{fake.base_url}/media/{key}", fake.presign(key)


def small_url(fake: FakeGC) -> str:
    return file_url(fake, "small.mha")[1]


# -- error statuses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "detail"),
    [
        (500, "A server error occurred."),
        (502, "Bad Gateway"),
        (503, "Service Unavailable"),
        (504, "Gateway Timeout"),
    ],
)
def test_site_error_statuses(fake: FakeGC, http: httpx.Client, status: int, detail: str) -> None:
    fake.faults.error_rates = {status: 1.0}
    r = http.get(api(fake), headers=auth(OWNER))
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": detail}
    assert "retry-after" not in r.headers
    record = fake.requests[-1]
    assert (record.endpoint, record.status, record.fault, record.user) == (
        "archives-list",
        status,
        str(status),
        "owner",
    )
    assert fake.faults.injected == {str(status): 1}


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, "InternalError"), (502, "BadGateway"), (503, "SlowDown"), (504, "GatewayTimeout")],
)
def test_storage_error_statuses(fake: FakeGC, http: httpx.Client, status: int, code: str) -> None:
    fake.faults.error_rates = {status: 1.0}
    r = http.get(small_url(fake), headers={"Range": "bytes=0-99"})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/xml"
    assert r.content.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<Error>')
    assert f"<Code>{code}</Code>".encode() in r.content
    assert "content-range" not in r.headers
    record = fake.requests[-1]
    assert (record.endpoint, record.status, record.fault, record.range) == (
        "storage-get",
        status,
        str(status),
        "bytes=0-99",
    )
    assert fake.storage_bytes_sent == 0


@pytest.mark.parametrize("retry_after", ["1", "7", HTTP_DATE])
def test_429_carries_retry_after(fake: FakeGC, http: httpx.Client, retry_after: str) -> None:
    fake.faults.configure(error_rates={429: 1.0}, retry_after=retry_after)
    r = http.get(api(fake), headers=auth(OWNER))
    assert r.status_code == 429
    assert r.headers["retry-after"] == retry_after
    detail = r.json()["detail"]
    assert detail.startswith("Request was throttled.")
    if retry_after.isdigit():
        assert f"Expected available in {retry_after} second" in detail
    s = http.get(small_url(fake))
    assert s.status_code == 429
    assert s.headers["retry-after"] == retry_after
    assert b"<Code>TooManyRequests</Code>" in s.content
    assert fake.faults.injected == {"429": 2}


def test_errors_replace_media_redirects_and_keep_the_endpoint(
    fake: FakeGC, http: httpx.Client
) -> None:
    fake.faults.error_rates = {503: 1.0}
    media, _ = file_url(fake, "small.mha")
    r = http.get(media, headers=auth(OWNER))
    assert (r.status_code, r.json()) == (503, {"detail": "Service Unavailable"})
    assert "location" not in r.headers
    assert [(q.endpoint, q.status) for q in fake.requests] == [("media-image-file", 503)]


# -- resets and short bodies --------------------------------------------------------------------


def test_reset_mid_body_on_both_origins(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.reset_rate = 1.0
    with pytest.raises(BROKEN):
        http.get(api(fake), headers=auth(OWNER))
    with pytest.raises(BROKEN):
        http.get(file_url(fake, "big.tif")[1])
    with pytest.raises(BROKEN):  # a 302 has no body: only the status line leaves
        http.get(file_url(fake, "small.mha")[0], headers=auth(OWNER))
    records = fake.requests
    assert [(r.endpoint, r.status, r.fault) for r in records] == [
        ("archives-list", 0, "reset"),
        ("storage-get", 0, "reset"),
        ("media-image-file", 0, "reset"),
    ]
    assert 0 < fake.storage_bytes_sent <= CUT_LIMIT  # part of the body left, not all of it
    assert fake.faults.injected == {"reset": 3}
    fake.faults.reset_rate = 0.0
    r = http.get(file_url(fake, "big.tif")[1])
    assert (r.status_code, len(r.content)) == (200, BIG.size)


def test_reset_sends_an_rst(fake: FakeGC) -> None:
    """The connection is reset, not closed: a raw socket sees ECONNRESET, not an EOF."""
    fake.faults.reset_rate = 1.0
    url = httpx.URL(file_url(fake, "big.tif")[1])
    target = url.raw_path.decode()
    with socket.create_connection((fake.host, fake.storage_port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.2)  # let the RST arrive
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass


def test_truncated_body_is_short(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.truncate_rate = 1.0
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), http.stream("GET", small_url(fake)) as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(len(SMALL))  # the full length is announced
        for chunk in r.iter_bytes():
            received += chunk
    assert bytes(received) == SMALL[: len(SMALL) // 2]
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(api(fake), headers=auth(OWNER))
    with pytest.raises(httpx.RemoteProtocolError):
        http.head(small_url(fake))
    assert [(r.endpoint, r.status, r.fault) for r in fake.requests] == [
        ("storage-get", 0, "truncate"),
        ("archives-list", 0, "truncate"),
        ("storage-rejected", 0, "truncate"),  # HEAD of a presigned GET URL: 403
    ]
    assert fake.faults.injected == {"truncate": 3}
    assert fake.storage_bytes_sent == len(SMALL) // 2


# -- wrong ranges -------------------------------------------------------------------------------


def content_range(header: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", header)
    assert m is not None, header
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


@pytest.mark.parametrize("asked", [(0, 99), (100, 199), (9900, 9999), (0, 9999), (5000, 5000)])
def test_wrong_range(fake: FakeGC, http: httpx.Client, asked: tuple[int, int]) -> None:
    fake.faults.configure(wrong_range_rate=1.0, seed=3)
    url = small_url(fake)
    first, last = asked
    seen = set()
    for _ in range(12):
        r = http.get(url, headers={"Range": f"bytes={first}-{last}"})
        assert r.status_code == 206
        start, end, total = content_range(r.headers["content-range"])
        assert (start, end, total) != (first, last, len(SMALL))
        assert r.content == SMALL[start : end + 1]  # the body matches the range it names
        assert r.headers["content-length"] == str(end + 1 - start)
        seen.add("total" if total != len(SMALL) else "range")
    assert seen == {"range", "total"}  # both kinds come up
    assert fake.faults.injected == {"wrong-range": 12}
    assert {(q.status, q.fault) for q in fake.requests} == {(206, "wrong-range")}


def test_wrong_range_only_touches_range_requests(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.wrong_range_rate = 1.0
    r = http.get(small_url(fake))
    assert (r.status_code, r.content, r.headers.get("content-range")) == (200, SMALL, None)
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 200
    assert fake.faults.injected == {}
    assert all(q.fault is None for q in fake.requests)


def test_wrong_range_choices_differ_from_the_asked_range() -> None:
    for start, end, total in [(0, 1, 1), (0, 10, 10), (0, 5, 10), (5, 10, 10), (3, 4, 10)]:
        for how in (0.0, 0.3, 0.6, 0.99):
            got = wrong_range(start, end, total, how)
            assert got != (start, end, total)
            s, e, t = got
            assert 0 <= s < e <= min(t, total)  # a real range of the object, or a wrong total


# -- stalls, blackholes, outages ----------------------------------------------------------------


def test_stall(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(stall_rate=1.0, stall_seconds=0.3)
    for url, headers in ((api(fake), auth(OWNER)), (small_url(fake), {})):
        started = time.monotonic()
        r = http.get(url, headers=headers)
        assert time.monotonic() - started >= 0.3
        assert r.status_code == 200
    assert [(q.status, q.fault) for q in fake.requests] == [(200, "stall"), (200, "stall")]
    assert fake.faults.injected == {"stall": 2}


def test_stall_combines_with_an_error(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(stall_rate=1.0, stall_seconds=0.2, error_rates={502: 1.0})
    started = time.monotonic()
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 502
    assert time.monotonic() - started >= 0.2
    assert fake.requests[-1].fault == "stall+502"
    assert fake.faults.injected == {"stall": 1, "502": 1}


def test_blackhole_then_recovery(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.blackhole = True
    for url in (api(fake), small_url(fake)):
        with pytest.raises(httpx.ReadTimeout):
            http.get(url, headers=auth(OWNER), timeout=httpx.Timeout(5, read=0.5))
    assert [(q.endpoint, q.status, q.fault) for q in fake.requests] == [
        ("archives-list", 0, "blackhole"),
        ("storage-rejected", 0, "blackhole"),  # the token beside a presigned URL: a 400
    ]
    fake.faults.blackhole = False
    r = http.get(api(fake), headers=auth(OWNER))
    assert (r.status_code, r.json()["count"]) == (200, 2)
    assert fake.faults.injected == {"blackhole": 2}


def test_blackhole_storage_alone(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.blackhole_storage = True
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        http.get(small_url(fake), timeout=httpx.Timeout(5, read=0.5))
    fake.faults.blackhole_storage = False
    assert http.get(small_url(fake)).content == SMALL


def test_stop_is_prompt_with_a_blackhole() -> None:
    fake = FakeGC(fault_world()).start()
    fake.faults.blackhole = True
    errors: list[BaseException] = []

    def client() -> None:
        try:
            httpx.get(api(fake), headers=auth(OWNER), timeout=30)
        except BaseException as e:  # the held request ends when the fake stops
            errors.append(e)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while fake.count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.requests[0].fault == "blackhole"
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2.0
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], httpx.TransportError)


def test_down_fails_new_and_pooled_connections(fake: FakeGC, http: httpx.Client) -> None:
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 200  # a pooled connection
    fake.faults.down = True
    with pytest.raises(httpx.TransportError):
        http.get(api(fake), headers=auth(OWNER))  # on the pooled connection
    with pytest.raises(httpx.TransportError), httpx.Client() as fresh:
        fresh.get(api(fake), headers=auth(OWNER))
    with pytest.raises(httpx.TransportError), httpx.Client() as fresh:
        fresh.get(small_url(fake))
    assert fake.count() == 1  # dropped requests are not recorded
    assert fake.faults.injected == {"down": 3}
    fake.faults.down = False
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 200
    assert http.get(small_url(fake)).content == SMALL


def test_down_storage_alone(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.down_storage = True
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 200
    with pytest.raises(httpx.TransportError):
        http.get(small_url(fake))
    fake.faults.down_storage = False
    assert http.get(small_url(fake)).content == SMALL


# -- revoked tokens -----------------------------------------------------------------------------


def test_revoked_token(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.revoked_tokens = {OWNER}
    r = http.get(api(fake), headers=auth(OWNER))
    assert (r.status_code, r.json()) == (401, {"detail": "Invalid token."})
    assert r.headers["www-authenticate"] == "Bearer"
    assert http.get(api(fake, "profiles/users/self/"), headers=auth(OWNER)).status_code == 401
    other = http.get(api(fake), headers=auth(OTHER))  # other tokens still work
    assert (other.status_code, other.json()["count"]) == (200, 1)
    media, _ = file_url(fake, "hidden.mha")
    assert http.get(media, headers=auth(OWNER)).status_code == 403  # /media/: anonymous
    assert [(q.status, q.user, q.fault) for q in fake.requests] == [
        (401, None, None),
        (401, None, None),
        (200, "other", None),
        (403, None, None),
    ]
    assert fake.faults.injected == {"revoked": 3}
    fake.faults.revoked_tokens.discard(OWNER)
    assert http.get(media, headers=auth(OWNER)).status_code == 302
    assert http.get(api(fake), headers=auth(OWNER)).json()["count"] == 2


# -- scope, reproducibility, rates --------------------------------------------------------------


def test_only_restricts_random_faults(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(error_rates={503: 1.0}, only={"storage-get"})
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 200
    media, _ = file_url(fake, "small.mha")
    location = http.get(media, headers=auth(OWNER)).headers["location"]
    assert http.get(location).status_code == 503
    assert http.head(location).status_code == 403  # storage-rejected: not in only
    assert fake.faults.injected == {"503": 1}


def test_spare_exempts_endpoints(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(error_rates={500: 1.0}, spare={"profiles-self"})
    r = http.get(api(fake, "profiles/users/self/"), headers=auth(OWNER))
    assert (r.status_code, r.json()["user"]["username"]) == (200, "owner")
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 500
    fake.faults.only = {"profiles-self", "archives-list"}  # spare wins over only
    assert http.get(api(fake, "profiles/users/self/"), headers=auth(OWNER)).status_code == 200
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 500
    assert http.get(small_url(fake)).status_code == 200
    assert fake.faults.injected == {"500": 2}


def test_scope_and_knob_names_are_checked() -> None:
    faults = Faults()
    with pytest.raises(ValueError, match="storage-gett"):
        faults.only = {"storage-gett"}
    with pytest.raises(ValueError, match="profile-self"):
        faults.configure(spare={"profile-self"})
    with pytest.raises(TypeError, match="reset_rates"):
        faults.configure(reset_rates=1.0)
    assert faults.only is None and faults.spare == set()


def statuses(fake: FakeGC, http: httpx.Client, n: int) -> list[int]:
    return [http.get(api(fake), headers=auth(OWNER)).status_code for _ in range(n)]


def test_seed_reproduces_the_sequence(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(error_rates={500: 0.3, 503: 0.3}, seed=1234)
    first = statuses(fake, http, 40)
    assert {200, 500, 503} <= set(first)
    fake.faults.seed = 1234  # reseed: the same decisions again
    assert statuses(fake, http, 40) == first
    with FakeGC(fault_world()) as other, httpx.Client() as c:
        other.faults.configure(error_rates={500: 0.3, 503: 0.3}, seed=1234)
        assert statuses(other, c, 40) == first
        other.faults.seed = 99
        assert statuses(other, c, 40) != first


def test_rates_are_per_request(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(error_rates={503: 0.5}, seed=7)
    got = Counter(statuses(fake, http, 200))
    assert set(got) == {200, 503}
    assert 60 <= got[503] <= 140
    assert fake.faults.injected == {"503": got[503]}
    fake.reset_counts()
    assert fake.faults.injected == {}
    fake.faults.configure(error_rates={500: 0.25, 504: 0.25}, seed=8)
    got = Counter(statuses(fake, http, 200))
    assert 25 <= got[500] <= 75 and 25 <= got[504] <= 75
    assert 60 <= got[200] <= 140


def test_reset_rate_half(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(reset_rate=0.5, seed=11)
    url = small_url(fake)
    broken = 0
    for _ in range(200):
        try:
            assert http.get(url).content == SMALL
        except BROKEN:
            broken += 1
    assert 60 <= broken <= 140
    assert fake.faults.injected == {"reset": broken}
    assert sum(q.fault == "reset" for q in fake.requests) == broken


def test_injected_counters_add_up(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(
        error_rates={429: 0.15, 503: 0.15},
        reset_rate=0.15,
        truncate_rate=0.15,
        wrong_range_rate=0.15,
        seed=5,
    )
    url = small_url(fake)
    for n in range(150):
        target, headers = (url, {"Range": "bytes=10-5009"}) if n % 2 else (api(fake), auth(OWNER))
        with contextlib.suppress(*BROKEN):
            http.get(target, headers=headers)
    injected = fake.faults.injected
    assert set(injected) == {"429", "503", "reset", "truncate", "wrong-range"}
    markers = Counter(q.fault for q in fake.requests if q.fault is not None)
    assert markers == injected
    for q in fake.requests:
        if q.fault in ("reset", "truncate"):
            assert q.status == 0
        elif q.fault is not None and q.fault.isdigit():
            assert q.status == int(q.fault)
    assert fake.count() == 150
    assert sum(injected.values()) < 150  # the rates sum to 0.75: some requests went through


def test_clear_restores_normal_service(fake: FakeGC, http: httpx.Client) -> None:
    fake.faults.configure(
        error_rates={500: 1.0},
        reset_rate=1.0,
        stall_rate=1.0,
        stall_seconds=5.0,
        revoked_tokens={OWNER},
        blackhole_storage=True,
        down_storage=True,
        only={"storage-get"},
        spare={"profiles-self"},
        seed=1,
    )
    assert http.get(api(fake), headers=auth(OWNER)).status_code == 401
    with pytest.raises(httpx.TransportError):
        http.get(small_url(fake))
    fake.faults.clear()
    assert fake.faults == Faults(seed=1)  # every knob at its default; the seed is kept
    assert fake.faults.injected == {"revoked": 1, "down": 1}  # and so are the counters
    started = time.monotonic()
    r = http.get(api(fake), headers=auth(OWNER))
    assert (r.status_code, r.json()["count"]) == (200, 2)
    assert http.get(small_url(fake), headers={"Range": "bytes=0-9"}).content == SMALL[:10]
    assert time.monotonic() - started < 2.0
    assert fake.requests[-1].fault is None


def test_handlers_survive_concurrent_faults(fake: FakeGC) -> None:
    fake.faults.configure(
        error_rates={500: 0.2}, reset_rate=0.2, truncate_rate=0.2, wrong_range_rate=0.2
    )
    url = small_url(fake)

    def worker(n: int) -> None:
        with httpx.Client(timeout=10) as c:
            for i in range(25):
                ranged = (n + i) % 2 == 1
                with contextlib.suppress(*BROKEN):
                    if ranged:
                        c.get(url, headers={"Range": "bytes=0-999"})
                    else:
                        c.get(api(fake), headers=auth(OWNER))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert fake.count() == 200
    fake.faults.clear()
    with httpx.Client() as c:
        body = c.get(api(fake), headers=auth(OWNER)).json()
        assert body["count"] == 2 and json.dumps(body)
        assert c.get(url).content == SMALL
    assert len(fake.world.images) == 3  # the world is untouched
