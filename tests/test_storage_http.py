"""Tests for gcfs.storage_http against a scripted server on 127.0.0.1, plain and TLS."""

from __future__ import annotations

import base64
import threading
import time

import pytest
import trio

from gcfs.errors import BadResponse, Unavailable
from gcfs.storage_http import (
    StorageClient,
    environment_proxies,
    proxy_for,
    proxy_setting,
    redact,
    split_url,
)
from tests.proxy import TestProxy
from tests.rawhttp import RawServer, Request, Script, client_ssl_context, response

BODY = bytes(range(256)) * 4096  # 1 MiB


def ranged(request: Request) -> bytes:
    first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
    return response(
        206, BODY[first : last + 1], {"Content-Range": f"bytes {first}-{last}/{len(BODY)}"}
    )


def client(server: RawServer, **options: float) -> StorageClient:
    context = client_ssl_context() if server.tls else None
    return StorageClient(ssl_context=context, **options)  # type: ignore[arg-type]


async def get(storage: StorageClient, url: str, first: int, last: int) -> tuple[int, bytes]:
    buffer = bytearray(last - first + 1)
    async with storage.request(url, {"Range": f"bytes={first}-{last}"}, where="GET x") as r:
        n = await r.readinto(memoryview(buffer))
        return r.status, bytes(buffer[:n])


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_ranged_gets_on_one_kept_alive_connection(tls: bool) -> None:
    with RawServer(ranged, tls=tls) as server:
        async with client(server) as storage:
            for first, last in [(0, 99), (100, 65535 + 100), (5, len(BODY) - 1)]:
                status, data = await get(storage, f"{server.url}/obj?sig=1", first, last)
                assert status == 206
                assert data == BODY[first : last + 1]
        assert server.connections == 1
        assert [r.target for r in server.requests] == ["/obj?sig=1"] * 3


async def test_only_the_given_headers_are_sent() -> None:
    """No token, no cookies: Host, User-Agent, Accept-Encoding and what the caller gives."""
    with RawServer(ranged) as server:
        async with StorageClient() as storage:
            headers = {"Range": "bytes=0-9", "X-Amz-Date": "20260101T000000Z"}
            async with storage.request(f"{server.url}/o", headers, where="GET o") as r:
                await r.read()
    assert server.requests[0].headers == {
        "host": f"127.0.0.1:{server.port}",
        "user-agent": "gcfs",
        "accept-encoding": "identity",
        "range": "bytes=0-9",
        "x-amz-date": "20260101T000000Z",
    }


async def test_marks_fire_as_the_body_passes_them() -> None:
    """A block is handed on as soon as its last byte arrived, while the body still flows: when
    the first half is handed on, no byte of the second half is in the buffer yet."""
    half = len(BODY) // 2

    def slow(request: Request) -> Script:
        head = response(206, b"", {"Content-Range": f"bytes 0-{len(BODY) - 1}/{len(BODY)}"})
        head = head.replace(b"Content-Length: 0", f"Content-Length: {len(BODY)}".encode())
        return Script([head + BODY[:half], 0.3, BODY[half:]])

    with RawServer(slow) as server:
        async with StorageClient() as storage:
            buffer = bytearray(len(BODY))
            seen: list[tuple[int, bytes, bool]] = []

            def on_mark(i: int) -> None:
                rest_empty = not any(buffer[(i + 1) * half :])
                seen.append((i, bytes(buffer[i * half : (i + 1) * half]), rest_empty))

            async with storage.request(server.url + "/o", {}, where="GET o") as r:
                await r.readinto(memoryview(buffer), [half, len(BODY)], on_mark)
    assert seen == [(0, BODY[:half], True), (1, BODY[half:], True)]


async def test_a_closed_idle_connection_is_replaced_without_an_error() -> None:
    with RawServer(ranged) as server:
        async with StorageClient() as storage:
            assert (await get(storage, server.url + "/o", 0, 9))[1] == BODY[:10]
            server.close_idle()
            # Whether its FIN arrived before the next request (found dead in the pool) or
            # after (the request is sent again once): a new connection, no error.
            assert (await get(storage, server.url + "/o", 10, 19))[1] == BODY[10:20]
        assert server.connections == 2


async def test_a_connection_closed_right_after_a_request_is_sent_again_once() -> None:
    """The server had just closed the idle connection when we reused it (the race the
    liveness check cannot see): sent again on a new connection, once."""
    answers = iter([ranged, lambda request: Script(["close"]), ranged])
    with RawServer(lambda request: next(answers)(request)) as server:
        async with StorageClient() as storage:
            await get(storage, server.url + "/o", 0, 9)
            assert (await get(storage, server.url + "/o", 10, 19))[1] == BODY[10:20]
    assert server.connections == 2
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        # Content-Length says 100, 50 arrive, then the server closes.
        (Script([response(206, b"x" * 50, length=100), "close"]), BadResponse),
        (Script([response(206, b"x" * 50, length=100), "reset"]), Unavailable),
        (Script([response(206, b"x" * 50, length=100), 2.0]), Unavailable),  # a stall
        (response(206, b"x" * 101), BadResponse),  # longer than the buffer
        (Script([response(206, b"x" * 101, length=-1), "close"]), BadResponse),  # no framing
        (Script([b"HTTP/1.1 206 X\r\nContent-Length: zz\r\n\r\n", "close"]), Unavailable),
        (Script([b"garbage\r\n\r\n", "close"]), Unavailable),
        (Script(["close"]), Unavailable),  # nothing at all, on a new connection
        (Script([1.5]), Unavailable),  # no answer within the timeout
    ],
    ids=[
        "short",
        "reset",
        "stall",
        "long",
        "long-unframed",
        "bad-length",
        "garbage",
        "empty",
        "silent",
    ],
)
async def test_broken_answers(answer: bytes | Script, error: type[Exception]) -> None:
    with RawServer(lambda request: answer) as server:
        async with StorageClient(timeout=0.5) as storage:
            with pytest.raises(error) as caught:
                await get(storage, f"{server.url}/o?X-Amz-Signature=secret", 0, 99)
    assert "secret" not in str(caught.value)


async def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 206 X\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    answers = iter([chunked, Script([response(206, b"hello world", length=-1), "close"])])
    with RawServer(lambda request: next(answers)) as server:
        async with StorageClient() as storage:
            assert (await get(storage, server.url + "/o", 0, 10))[1] == b"hello world"
            assert (await get(storage, server.url + "/o", 0, 10))[1] == b"hello world"
    assert server.connections == 1  # the chunked answer ended cleanly: kept alive


async def test_a_close_delimited_body_never_returns_its_connection_to_the_pool() -> None:
    """No Content-Length, not chunked: the body ends when the server closes, so the
    connection is dead; it must not be pooled. The next request opens a new one and
    succeeds."""
    unframed = Script([response(206, b"hello world", length=-1), "close"])
    answers = iter([lambda request: unframed, ranged])
    with RawServer(lambda request: next(answers)(request)) as server:
        async with StorageClient() as storage:
            assert (await get(storage, server.url + "/o", 0, 10))[1] == b"hello world"
            assert not any(storage._idle.values())
            assert (await get(storage, server.url + "/o", 0, 9))[1] == BODY[:10]
            assert storage.connections_opened == 2
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_error_answers_keep_the_connection() -> None:
    answers = iter([response(403, b"<Error>expired</Error>"), response(206, b"0123456789")])
    with RawServer(lambda request: next(answers)) as server:
        async with StorageClient() as storage:
            async with storage.request(server.url + "/o", {}, where="GET o") as r:
                assert r.status == 403
            assert (await get(storage, server.url + "/o", 0, 9))[1] == b"0123456789"
    assert server.connections == 1


async def test_cancelled_body_closes_the_connection() -> None:
    cancelled = threading.Event()

    def slow(request: Request) -> Script:
        return Script([response(206, b"x" * 10, length=100), cancelled, b"y" * 90])

    with RawServer(slow) as server:
        async with StorageClient() as storage:
            with trio.move_on_after(0.2) as scope:
                await get(storage, server.url + "/o", 0, 99)
            cancelled.set()
            assert scope.cancelled_caught
            assert not any(storage._idle.values())  # not returned half-read


async def test_connections_are_limited() -> None:
    """At most max_connections requests at once; the others wait for a free one."""
    lock = threading.Lock()
    now = peak = 0

    def counting(request: Request) -> bytes:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        time.sleep(0.1)
        with lock:
            now -= 1
        return ranged(request)

    with RawServer(counting) as server:
        async with StorageClient(max_connections=3) as storage, trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(get, storage, server.url + "/o", 0, 9)
    assert peak == 3
    assert server.connections == 3


def test_redact() -> None:
    assert (
        redact("https://s3.test:8443/b/k.mha?X-Amz-Signature=abc#f")
        == "https://s3.test:8443/b/k.mha"
    )


async def test_a_body_that_failed_part_way_closes_the_connection() -> None:
    """A small body that stalls is not read again when the request ends: reading it again
    would wait for another timeout and could put a connection that is mid-body back into the
    pool. The next request opens a new connection."""
    # The rest of the body comes only once the client has given up: no race with its timeout.
    gave_up = threading.Event()
    answers = iter(
        [Script([response(206, b"x" * 10, length=100), gave_up, b"y" * 90]), response(206, b"z")]
    )
    with RawServer(lambda request: next(answers)) as server:
        async with StorageClient(timeout=0.3) as storage:
            with pytest.raises(Unavailable):
                await get(storage, server.url + "/o", 0, 99)
            gave_up.set()
            assert (await get(storage, server.url + "/o", 0, 0))[1] == b"z"
    assert server.connections == 2


# -- proxies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["http-absolute-form", "https-connect"])
async def test_storage_through_a_proxy(tls: bool) -> None:
    """Through an http:// proxy: a CONNECT tunnel with TLS inside for https, the request in
    absolute form for http; the proxy's credentials go to the proxy only, never to storage."""
    with RawServer(ranged, tls=tls) as server, TestProxy() as proxy:
        proxies = {"http": proxy_setting(f"http://user:p%40ss@127.0.0.1:{proxy.port}")}
        proxies["https"] = proxies["http"]
        context = client_ssl_context() if tls else None
        async with StorageClient(ssl_context=context, proxies=proxies) as storage:
            status, data = await get(storage, f"{server.url}/obj?sig=1", 10, 2000)
        assert (status, data) == (206, BODY[10:2001])
        basic = "Basic " + base64.b64encode(b"user:p@ss").decode()
        if tls:
            assert proxy.requests == [("CONNECT", f"127.0.0.1:{server.port}", basic)]
        else:
            assert proxy.requests == [("GET", f"{server.url}/obj?sig=1", basic)]
        assert [r.target for r in server.requests] == ["/obj?sig=1"]
        assert "proxy-authorization" not in server.requests[0].headers


def test_proxies_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS_PROXY/HTTP_PROXY/ALL_PROXY as curl and httpx read them; NO_PROXY hosts go
    direct; an https:// proxy (TLS to the proxy) is not used."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert environment_proxies() == {}
    monkeypatch.setenv("ALL_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("HTTPS_PROXY", "https://tls-proxy.example:443")
    monkeypatch.setenv("NO_PROXY", "storage.internal,.example.org")
    found = environment_proxies()
    assert set(found) == {"http"}  # the https:// proxy is refused, ALL_PROXY covers http
    assert found["http"].origin.host == "proxy.example"
    assert proxy_for(split_url("http://s3.amazonaws.com/x")[0], found) is found["http"]
    assert proxy_for(split_url("http://storage.internal/x")[0], found) is None
    assert proxy_for(split_url("http://a.example.org/x")[0], found) is None
