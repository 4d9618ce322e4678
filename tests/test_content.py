"""Tests for gcfs.content against the fake Grand Challenge and its storage origin.

The fake's `/media/` routes answer 302 to presigned URLs on a second origin that serves Range
requests, refuses an Authorization header beside a signature (400), HEAD and expired
signatures (403). Its counters tell how many requests and body bytes a read cost.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from gcfs.blockstore import BlockStore
from gcfs.content import ContentStore, RemoteFile
from gcfs.errors import BadResponse, NotFound, PermissionDenied, Unavailable
from gcfs.fakegc import DEMO_TOKEN, FakeGC, World, demo_world
from gcfs.fakegc.serializers import image_file_path
from gcfs.fakegc.world import GeneratedContent, Image
from gcfs.resolver import file_key
from gcfs.retry import RetryPolicy
from gcfs.storage_http import StorageClient, check_partial, parse_size
from tests.rawhttp import RawServer, Request, Script, client_ssl_context, response

MiB = 1 << 20
BS = MiB
TOKEN = "t" * 64
OTHER_TOKEN = "o" * 64
SMALL = 5 * MiB + 123  # a few MiB, not block aligned
LARGE = 48 * MiB + 7
FOUR = 4 * MiB  # a training sample: read ahead whole at the first read


def generated(size: int, seed: str) -> tuple[bytes, GeneratedContent]:
    content = GeneratedContent(size, seed)
    return content.read(0, size), content


SMALL_BYTES, SMALL_CONTENT = generated(SMALL, "small.mha")
LARGE_BYTES, LARGE_CONTENT = generated(LARGE, "large.tif")
FOUR_BYTES, FOUR_CONTENT = generated(FOUR, "four.mha")


def make_world() -> World:
    w = World()
    w.add_user("alice", TOKEN)
    w.add_user("mallory", OTHER_TOKEN)
    w.add_image("small", [("small.mha", SMALL_CONTENT)], viewers={"alice"})
    w.add_image("large", [("large.tif", LARGE_CONTENT)], viewers={"alice"})
    w.add_image("four", [("four.mha", FOUR_CONTENT)], viewers={"alice"})
    w.add_image("empty", [("empty.mha", b"")], viewers={"alice"})
    w.add_image("tiny", [("tiny.json", b"{}")], viewers={"alice"})
    return w


@pytest.fixture
def gc() -> Iterator[FakeGC]:
    with FakeGC(make_world()) as server:
        yield server


def file_url(fake: FakeGC, image_name: str) -> str:
    image: Image = next(i for i in fake.world.images.values() if i.name == image_name)
    return f"{fake.base_url}/media/images/{image_file_path(image.files[0])}"


@asynccontextmanager
async def content_store(
    fake: FakeGC, cache_dir: Path | None, *, token: str = TOKEN, **options: int
) -> AsyncIterator[ContentStore]:
    cache = BlockStore(cache_dir, max_bytes=1 << 30, block_size=BS) if cache_dir else None
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(30.0), limits=httpx.Limits(max_connections=16)
    ) as http:
        store = ContentStore(http, {"Authorization": f"Bearer {token}"}, cache, **options)
        async with store:
            yield store


async def read_all(f: RemoteFile, chunk: int = 128 * 1024) -> bytes:
    parts = []
    offset = 0
    while True:
        data = await f.read(offset, chunk)
        if not data:
            return b"".join(parts)
        parts.append(bytes(data))  # a view is valid until the next checkpoint (buffers.lend)
        offset += len(data)


def storage_gets(fake: FakeGC) -> list[int]:
    """The lengths asked for by the block GETs (the Range of each storage-get, probes aside)."""
    lengths = []
    for r in fake.requests:
        if r.endpoint == "storage-get" and r.range and r.range != "bytes=0-0":
            first, last = r.range.removeprefix("bytes=").split("-")
            lengths.append(int(last) - int(first) + 1)
    return lengths


def assert_token_never_reached_storage(fake: FakeGC) -> None:
    storage = [r for r in fake.requests if r.endpoint.startswith("storage-")]
    assert storage, "no storage request at all"
    assert not any(r.had_authorization for r in storage)
    assert not any(r.status == 400 for r in storage)  # 400: a token beside the signature
    assert all(r.method == "GET" for r in storage)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached_block(cache_dir: Path, url: str, index: int) -> bytes | None:
    """Block `index` of `url` as a fresh BlockStore on `cache_dir` finds it (checked)."""
    store = BlockStore(cache_dir, max_bytes=1 << 30, block_size=BS)
    buffer = bytearray(BS)
    got = store.read_into(file_key(url), index, 1, memoryview(buffer))
    store.close()
    return bytes(buffer[: got[index]]) if index in got else None


# -- the verification functions --------------------------------------------------------------


def test_check_partial_accepts_only_the_exact_range() -> None:
    good = {"content-range": "bytes 100-199/1000", "content-length": "100"}
    assert check_partial(206, good, 100, 199, 1000) == 100
    assert check_partial(206, {"content-range": "bytes 100-199/1000"}, 100, 199, 1000) == 100
    bad_answers = [
        (200, good),
        (416, good),
        (206, {}),
        (206, {"content-range": "bytes 100-198/1000"}),
        (206, {"content-range": "bytes 0-199/1000"}),
        (206, {"content-range": "bytes 100-199/1001"}),
        (206, {"content-range": "bytes 100-199/*"}),
        (206, {"content-range": "items 100-199/1000"}),
        (206, {**good, "content-length": "99"}),
        (206, {**good, "content-encoding": "gzip"}),
    ]
    for status, headers in bad_answers:
        with pytest.raises(BadResponse):
            check_partial(status, headers, 100, 199, 1000)


def test_parse_size() -> None:
    assert parse_size(206, {"content-range": "bytes 0-0/12345"}) == 12345
    assert parse_size(200, {"content-length": "77"}) == 77
    assert parse_size(416, {"content-range": "bytes */0"}) == 0
    for status, headers in [
        (206, {"content-range": "bytes 1-1/12345"}),
        (206, {}),
        (200, {}),
        (416, {"content-range": "bytes */10"}),
        (204, {}),
    ]:
        with pytest.raises(BadResponse):
            parse_size(status, headers)


# -- against the fake ------------------------------------------------------------------------


async def test_full_read_equals_the_bytes(gc: FakeGC, tmp_path: Path) -> None:
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        assert await store.size(url) == SMALL
        f = await store.open(url)
        data = await read_all(f)
        f.close()
    assert sha(data) == sha(SMALL_BYTES)
    # size() resolved, open() reused that resolution: one /media/ hit, one probe
    assert gc.count("media-image-file") == 1
    assert sum(1 for r in gc.requests if r.range == "bytes=0-0") == 1
    assert sum(storage_gets(gc)) == SMALL  # every byte fetched exactly once
    assert_token_never_reached_storage(gc)


async def test_reads_are_exact_at_every_edge(gc: FakeGC) -> None:
    url = file_url(gc, "small")
    async with content_store(gc, None) as store:
        f = await store.open(url)
        for offset, size in [
            (0, 1),
            (BS - 1, 2),  # across a block boundary
            (BS, BS),  # exactly one block
            (3 * BS - 10, 2 * BS + 20),  # three blocks
            (SMALL - 5, 100),  # clipped at the end
            (SMALL, 10),  # at the end
            (SMALL + 10, 10),  # past the end
            (17, 0),
        ]:
            assert await f.read(offset, size) == SMALL_BYTES[offset : offset + size]
        f.close()
        empty = await store.open(file_url(gc, "empty"))
        assert empty.size == 0
        assert await empty.read(0, 100) == b""
        tiny = await store.open(file_url(gc, "tiny"))
        assert await tiny.read(0, 100) == b"{}"
    assert_token_never_reached_storage(gc)


async def test_media_hit_once_per_open_and_sizes_are_kept(gc: FakeGC, tmp_path: Path) -> None:
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        for _ in range(3):
            assert await store.size(url) == SMALL
        assert gc.count("media-image-file") == 1
        for _ in range(3):
            f = await store.open(url)
            await f.read(0, 10)
            f.close()
        # the first open reused size()'s resolution; every later open resolved again
        assert gc.count("media-image-file") == 3
        assert sum(1 for r in gc.requests if r.range == "bytes=0-0") == 1
    gc.reset_counts()
    async with content_store(gc, tmp_path / "cache") as store:  # a remount: size from disk
        assert await store.size(url) == SMALL
    assert gc.count() == 0


async def test_read_at_a_large_offset_fetches_about_one_block(tmp_path: Path) -> None:
    with FakeGC(demo_world()) as demo:
        image = next(i for i in demo.world.images.values() if i.name.endswith("wsi.tif"))
        content = image.files[0].content
        url = f"{demo.base_url}/media/images/{image_file_path(image.files[0])}"
        async with content_store(demo, tmp_path / "cache", token=DEMO_TOKEN) as store:
            f = await store.open(url)
            assert f.size == len(content) == 300 * MiB
            demo.reset_counts()
            offset = 200 * MiB + 12345
            data = await f.read(offset, 64 * 1024)
            assert data == content.read(offset, 64 * 1024)
            # A random read fetches the 16 KiB-aligned range around it, not a whole block:
            # [200 MiB, 200 MiB + 80 KiB) for 64 KiB at 200 MiB + 12345.
            assert demo.storage_bytes_sent == 80 * 1024
            assert storage_gets(demo) == [80 * 1024]
            # a few random reads elsewhere: 16 KiB each, no read-ahead
            for offset in (7 * MiB, 150 * MiB + 5, 299 * MiB + 99):
                assert await f.read(offset, 4096) == content.read(offset, 4096)
            assert storage_gets(demo) == [80 * 1024] + [16 * 1024] * 3
            assert await f.read(0, 8) == b"II*\x00\x08\x00\x00\x00"
            f.close()
        assert_token_never_reached_storage(demo)


async def test_sequential_read_uses_growing_windows(gc: FakeGC, tmp_path: Path) -> None:
    url = file_url(gc, "large")
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url)
        gc.reset_counts()
        start = time.monotonic()
        data = await read_all(f)
        elapsed = time.monotonic() - start
        f.close()
        stats = store.statistics()
    assert sha(data) == sha(LARGE_BYTES)
    lengths = storage_gets(gc)
    blocks = -(-LARGE // BS)
    print(f"{blocks} blocks in {len(lengths)} requests, {elapsed:.2f} s; {stats}")
    print([n // BS for n in lengths])
    assert sum(lengths) == LARGE  # no block fetched twice, none left out
    assert len(lengths) <= 18  # requests << blocks: measured 15 for 49 blocks
    assert max(lengths) >= 4 * BS  # windows grew into multi-block requests
    assert lengths[0] == BS  # ...from a single block
    assert_token_never_reached_storage(gc)


async def test_parallel_read_ahead_beats_a_per_connection_cap(gc: FakeGC) -> None:
    """16 MiB at 8 MiB/s per connection: 2 s on one connection, much less on four."""
    gc.storage_bandwidth = 8 * MiB
    url = file_url(gc, "large")
    async with content_store(gc, None) as store:
        f = await store.open(url)
        start = time.monotonic()
        offset = 0
        while offset < 16 * MiB:
            offset += len(await f.read(offset, 128 * 1024))
        elapsed = time.monotonic() - start
        f.close()
    print(f"16 MiB at 8 MiB/s per connection in {elapsed:.2f} s")
    assert elapsed < 1.5


async def test_second_read_comes_from_the_block_cache(gc: FakeGC, tmp_path: Path) -> None:
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url)
        assert await read_all(f) == SMALL_BYTES
        f.close()
        # Blocks still queued for the disk would be served from memory (store.pending), not
        # from the disk this test is about: wait for the writer first.
        with trio.fail_after(10):
            await store.wait_written()
        gc.reset_counts()
        again = await store.open(url)
        assert await read_all(again) == SMALL_BYTES
        again.close()
        stats = store.statistics()
        assert stats.cache_hits >= 1
        assert stats.cache_hits + stats.shared >= 6  # a read-ahead's disk hit reaches readers
    assert [r.range for r in gc.requests if r.endpoint == "storage-get"] == []
    assert gc.count("media-image-file") == 1  # open still resolves: permission and audit
    gc.reset_counts()
    async with content_store(gc, tmp_path / "cache") as store:  # a remount on the same dir
        f = await store.open(url)
        assert await read_all(f, chunk=300_000) == SMALL_BYTES
        assert await f.read(SMALL - 10, 10) == SMALL_BYTES[-10:]
        f.close()
    assert gc.count("storage-get") == 0
    assert gc.storage_bytes_sent == 0


async def test_expired_signature_mid_read_is_resolved_again(gc: FakeGC, tmp_path: Path) -> None:
    url = file_url(gc, "small")
    now = time.time()
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url)
        first = bytes(await f.read(0, 2 * BS))
        # An hour and a bit later: the URL open() got has expired, a fresh one is valid.
        gc.clock = lambda: now + 3700
        rest = await read_all_from(f, 2 * BS)
        f.close()
        assert store.statistics().expired >= 1
    assert first + rest == SMALL_BYTES
    assert gc.count("media-image-file") == 2  # the open, and one resolution after the 403
    assert any(r.endpoint == "storage-rejected" and r.status == 403 for r in gc.requests)
    assert_token_never_reached_storage(gc)


async def test_reopen_after_expiry(gc: FakeGC) -> None:
    url = file_url(gc, "small")
    now = time.time()
    async with content_store(gc, None) as store:
        assert await store.size(url) == SMALL
        gc.clock = lambda: now + 3700  # size()'s URL, kept for open(), has expired
        f = await store.open(url)
        assert await f.read(3 * BS, 1000) == SMALL_BYTES[3 * BS : 3 * BS + 1000]
        f.close()
    assert gc.count("media-image-file") == 2
    assert_token_never_reached_storage(gc)


async def test_signatures_dead_on_arrival_give_permission_denied(gc: FakeGC) -> None:
    gc.signature_lifetime = 0
    gc.clock = lambda: time.time() + 5  # every URL has expired before it is used
    url = file_url(gc, "small")
    async with content_store(gc, None) as store:
        with pytest.raises(PermissionDenied):
            await store.open(url)
    assert gc.count("media-image-file") == 2  # one retry, no loop


async def read_all_from(f: RemoteFile, offset: int) -> bytes:
    parts = []
    while data := await f.read(offset, 128 * 1024):
        parts.append(bytes(data))  # valid until the next checkpoint (buffers.lend)
        offset += len(data)
    return b"".join(parts)


async def test_errors_of_resolution(gc: FakeGC) -> None:
    url = file_url(gc, "small")
    absent = url.replace(url.split("/")[-3], "00000000-0000-4000-8000-000000000000")
    async with content_store(gc, None) as store:
        with pytest.raises(NotFound):
            await store.open(url.rsplit("/", 1)[0] + "/other-name.mha")
        with pytest.raises(NotFound):
            await store.size(absent)
    async with content_store(gc, None, token=OTHER_TOKEN) as store:
        with pytest.raises(PermissionDenied):
            await store.open(url)
    assert gc.count("storage-get") == 0


async def test_concurrent_readers_share_one_fetch(gc: FakeGC, tmp_path: Path) -> None:
    gc.storage_latency = 0.2
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        files = [await store.open(url) for _ in range(3)]
        results: dict[str, bytes] = {}

        # Random reads larger than RANDOM_READ_MAX take the block path: no read-ahead, and
        # readers of the same block share one fetch.
        size = 300 * 1024

        async def read(name: str, f: RemoteFile, offset: int) -> None:
            results[name] = await f.read(offset, size)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "a", files[0], 3 * BS + 10)
            nursery.start_soon(read, "b", files[1], 3 * BS + 500)
            nursery.start_soon(read, "c", files[2], 3 * BS + 900)
        assert results == {
            "a": SMALL_BYTES[3 * BS + 10 : 3 * BS + 10 + size],
            "b": SMALL_BYTES[3 * BS + 500 : 3 * BS + 500 + size],
            "c": SMALL_BYTES[3 * BS + 900 : 3 * BS + 900 + size],
        }
        assert storage_gets(gc) == [BS]
        assert store.statistics().shared == 2
        for f in files:
            f.close()


async def test_close_cancels_read_ahead_and_frees_memory(gc: FakeGC, tmp_path: Path) -> None:
    gc.storage_bandwidth = 4 * MiB
    url = file_url(gc, "large")
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url)
        offset = 0
        for _ in range(8):  # a sequential start: the window grows, read-ahead is in flight
            offset += len(await f.read(offset, 128 * 1024))
        assert store.reserved_bytes > 0
        f.close()
        # The cancelled read-ahead tasks finish at their next checkpoint.
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
        assert store.reserved_bytes == store.held_bytes == 0
        assert store.flights == {}
        with pytest.raises(ValueError):
            await f.read(0, 1)
    # whatever reached the disk is whole and right
    for index in range(-(-LARGE // BS)):
        block = cached_block(tmp_path / "cache", url, index)
        assert block is None or block == LARGE_BYTES[index * BS : (index + 1) * BS]


async def test_a_deadline_leaves_nothing_half_done(gc: FakeGC, tmp_path: Path) -> None:
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url)
        gc.storage_bandwidth = 256 * 1024  # one block takes 4 s
        size = 300 * 1024  # above RANDOM_READ_MAX: the block path, which caches
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.5):
                await f.read(2 * BS, size)
        assert store.flights == {}
        gc.storage_bandwidth = None
        assert await f.read(2 * BS, size) == SMALL_BYTES[2 * BS : 2 * BS + size]
        f.close()
    assert cached_block(tmp_path / "cache", url, 2) == SMALL_BYTES[2 * BS : 3 * BS]


async def test_global_budget_bounds_read_ahead(gc: FakeGC) -> None:
    url = file_url(gc, "large")
    budget = 6 * MiB
    async with content_store(gc, None, max_inflight_bytes=budget) as store:
        files = [await store.open(url) for _ in range(3)]
        peak = 0

        async def reader(f: RemoteFile) -> None:
            nonlocal peak
            offset = 0
            while offset < 20 * MiB:
                offset += len(await f.read(offset, 128 * 1024))
                # Blocks a read needs right now may exceed the budget by one or two each.
                peak = max(peak, store.held_bytes + store.reserved_bytes)

        async with trio.open_nursery() as nursery:
            for f in files:
                nursery.start_soon(reader, f)
        for f in files:
            f.close()
    assert peak <= budget + 3 * 2 * BS


# -- responses the fake cannot produce: a scripted stand-in (tests/rawhttp.py) -------------------


STAND_IN = bytes(range(256)) * 8192  # 2 MiB


def stand_in(kind: str) -> Callable[[Request], bytes | Script]:
    """/media/... answers 302 to /obj?sig=1; /obj serves STAND_IN, broken as `kind` says."""

    def handler(request: Request) -> bytes | Script:
        if request.target.startswith("/media/"):
            return response(302, headers={"Location": "/obj?sig=1"})
        assert "authorization" not in request.headers
        first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
        total = len(STAND_IN)
        body = STAND_IN[first : last + 1]
        headers = {"Content-Range": f"bytes {first}-{last}/{total}"}
        if first == last == 0 or kind == "none":
            return response(206, body, headers)
        if kind == "wrong-range":
            headers["Content-Range"] = f"bytes {first + 1}-{last + 1}/{total}"
        elif kind == "short":  # no Content-Length: the body just ends early
            return Script([response(206, body[:-1], headers, length=-1), "close"])
        elif kind == "long":
            return Script([response(206, body + b"x", headers, length=-1), "close"])
        elif kind == "cut":  # Content-Length right, then a reset in the middle
            return Script(
                [response(206, body[: len(body) // 2], headers, length=len(body)), "reset"]
            )
        elif kind == "gzip":
            headers["Content-Encoding"] = "gzip"
        elif kind == "ignored-range":
            return response(200, STAND_IN)
        return response(206, body, headers)

    return handler


@pytest.mark.parametrize(
    "kind", ["none", "wrong-range", "short", "long", "cut", "gzip", "ignored-range"]
)
async def test_bad_responses_raise_and_cache_nothing(tmp_path: Path, kind: str) -> None:
    """A storage that keeps answering wrongly: retried within the budget, then an error
    (EIO for the reader); no byte of it is returned or cached, and no message carries the
    signed URL's query. The reads take the block path (above RANDOM_READ_MAX), which caches:
    against the good stand-in ("none") the same reads return the bytes and cache both
    blocks, so "nothing cached" is a finding about the bad answers, not about the reads."""
    cache = BlockStore(tmp_path / "cache", max_bytes=1 << 30, block_size=BS)
    retry = RetryPolicy(base_delay=0.01, budget=0.3)
    size = 300 * 1024
    errors: list[BaseException] = []
    with RawServer(stand_in(kind)) as server:
        async with (
            httpx.AsyncClient() as http,
            ContentStore(http, {"Authorization": "Bearer x"}, cache, retry=retry) as store,
        ):
            f = await store.open(f"{server.url}/media/images/x")
            assert f.size == 2 * MiB
            for offset in (BS + 5, 0):  # a random read, then a sequential start (read-ahead)
                try:
                    assert await f.read(offset, size) == STAND_IN[offset : offset + size]
                except (BadResponse, Unavailable) as exc:
                    errors.append(exc)
            await store.wait_written()
            f.close()
            assert store.flights == {}
    cached = cache.cached_blocks(file_key(f"{server.url}/media/images/x"), 2)
    if kind == "none":
        assert (errors, cached) == ([], 2)
        return
    assert len(errors) == 2
    assert cache.total_bytes < BS  # the size record, no block
    assert cached == 0
    assert "sig=" not in "".join(map(str, errors))


async def test_good_stand_in_works(tmp_path: Path) -> None:
    cache = BlockStore(tmp_path / "cache", max_bytes=1 << 30, block_size=BS)
    with RawServer(stand_in("none")) as server:
        async with (
            httpx.AsyncClient() as http,
            ContentStore(http, {"Authorization": "Bearer x"}, cache) as store,
        ):
            f = await store.open(f"{server.url}/media/images/x")
            size = 300 * 1024  # the block path (a smaller random read is not cached)
            assert await f.read(BS + 5, size) == STAND_IN[BS + 5 : BS + 5 + size]
            f.close()
    assert cache.total_bytes > BS


async def test_storage_over_tls(tmp_path: Path) -> None:
    """Real storage is https (S3, CloudFront): the same reads over TLS, kept alive."""
    cache = BlockStore(tmp_path / "cache", max_bytes=1 << 30, block_size=BS)
    with RawServer(stand_in("none"), tls=True) as server:
        storage = StorageClient(ssl_context=client_ssl_context())
        async with (
            httpx.AsyncClient(verify=client_ssl_context()) as http,
            ContentStore(http, {"Authorization": "Bearer x"}, cache, storage=storage) as store,
        ):
            f = await store.open(f"{server.url}/media/images/x")
            assert await read_all(f) == STAND_IN
            f.close()
    storage_requests = [r for r in server.requests if r.target.startswith("/obj")]
    assert len(storage_requests) >= 2
    assert server.connections < 1 + len(storage_requests)  # connections were reused


def test_client_with_default_authorization_is_refused() -> None:
    http = httpx.AsyncClient(headers={"Authorization": "Bearer x"})
    with pytest.raises(ValueError):
        ContentStore(http, {}, None)


# -- opening cached files without a request (the hook for issue 10 item 1) --------------------


async def test_open_of_a_fully_cached_file_can_send_nothing(gc: FakeGC, tmp_path: Path) -> None:
    """With check_access=False, a file whose size and blocks are all on disk opens and reads
    with no request at all; by default, open still resolves (permission and audit)."""
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        assert not await store.fully_cached(url)
        f = await store.open(url)
        assert await read_all(f) == SMALL_BYTES
        f.close()
    gc.reset_counts()
    async with content_store(gc, tmp_path / "cache") as store:  # a remount
        assert await store.fully_cached(url)
        f = await store.open(url, check_access=False)
        assert await read_all(f) == SMALL_BYTES
        assert await f.read(SMALL - 10, 100) == SMALL_BYTES[-10:]
        f.close()
        assert gc.count() == 0
        f = await store.open(url)  # the default: resolved, as before
        f.close()
        assert gc.count() == gc.count("media-image-file") == 1
    # The default still refuses a token that lost access, cached bytes or not.
    async with content_store(gc, tmp_path / "cache", token=OTHER_TOKEN) as store:
        with pytest.raises(PermissionDenied):
            await store.open(url)


async def test_open_without_access_check_of_a_partly_cached_file_resolves(
    gc: FakeGC, tmp_path: Path
) -> None:
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url)
        await f.read(0, 300 * 1024)  # block 0 only (and what read-ahead fetched)
        f.close()
    gc.reset_counts()
    async with content_store(gc, tmp_path / "cache") as store:
        assert not await store.fully_cached(url)
        f = await store.open(url, check_access=False)
        assert gc.count("media-image-file") == 1  # not all there: resolved as usual
        assert await read_all(f) == SMALL_BYTES
        f.close()


async def test_a_damaged_block_of_a_file_opened_from_the_cache_is_fetched_lazily(
    gc: FakeGC, tmp_path: Path
) -> None:
    """The resolution waits for the first read that needs storage; that read gets the
    server's bytes (the damaged block is fetched again), the others come from disk."""
    url = file_url(gc, "small")
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url)
        assert await read_all(f) == SMALL_BYTES
        f.close()
    data = next((tmp_path / "cache").rglob("*.data"))
    damaged = bytearray(data.read_bytes())
    damaged[2 * BS + 7 : 2 * BS + 10] = b"\x00\xff\x00"
    data.write_bytes(bytes(damaged))
    gc.reset_counts()
    async with content_store(gc, tmp_path / "cache") as store:
        f = await store.open(url, check_access=False)
        assert gc.count() == 0
        assert await f.read(0, BS) == SMALL_BYTES[:BS]
        assert gc.count() == 0
        assert await read_all(f) == SMALL_BYTES
        f.close()
    assert gc.count("media-image-file") == 1
    assert sum(storage_gets(gc)) == BS  # block 2 alone


async def test_the_kernels_out_of_order_reads_fetch_each_block_once(gc: FakeGC) -> None:
    """Reads in the order the kernel sent them at read_ahead_kb 4096 (traced): a read lands
    2 MiB ahead, the stream goes on, then the skipped reads come, the first of them starting
    in the middle of a block. All are one sequential stream: no block is fetched twice."""
    KiB = 1024
    order = [(0, 512), (512, 1024)] + [(1536 + n * 1024, 1024) for n in range(11)]
    order += [(15872 + n * 1024, 1024) for n in range(5)]  # 2 MiB ahead of the stream
    order += [(12800, 512), (13312, 1024), (14336, 1024), (15360, 512)]  # the skipped ones
    order += [(20992 + n * 1024, 1024) for n in range(8)]
    url = file_url(gc, "large")
    async with content_store(gc, None) as store:
        f = await store.open(url)
        gc.reset_counts()
        for offset, size in order:
            got = await f.read(offset * KiB, size * KiB)
            assert got == LARGE_BYTES[offset * KiB : (offset + size) * KiB]
        f.close()
    covered = sorted(
        (int(a), int(b))
        for r in gc.requests
        if r.endpoint == "storage-get"
        for a, b in [r.range.removeprefix("bytes=").split("-")]
    )
    for (_, previous_last), (first, _) in itertools.pairwise(covered):
        assert first > previous_last, covered  # no byte asked for twice


async def test_a_small_file_is_read_ahead_whole_in_parallel(gc: FakeGC) -> None:
    """A file of at most 4 blocks (a training sample) is fetched whole from its first read,
    its blocks side by side (one round trip), not in the doubling window's 1, 1, 2 blocks
    one after another."""
    gc.storage_latency = 0.05  # long enough that parallel requests overlap at the server
    url = file_url(gc, "four")
    async with content_store(gc, None) as store:
        f = await store.open(url)
        gc.reset_counts()
        assert await read_all(f, chunk=MiB) == FOUR_BYTES
        f.close()
    ranges = sorted(r.range or "" for r in gc.requests if r.endpoint == "storage-get")
    assert ranges == sorted(f"bytes={i * MiB}-{(i + 1) * MiB - 1}" for i in range(4))
    assert gc.storage_peak_concurrency >= 3
