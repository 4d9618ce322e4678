"""Unit tests of the data path's small parts: cache keys, the resolver's recent
resolutions, buffer pins (issue 14: findings 12, 13, 14)."""

from __future__ import annotations

import gc

import httpx
import pytest
import trio
import trio.testing

from gcfs.buffers import Block, BufferPool, lend, span, unpin
from gcfs.health import EndpointHealth
from gcfs.resolver import MAX_RECENT, REUSE_RESOLUTION, Resolver, file_key
from gcfs.retry import OutageLog, RetryPolicy
from gcfs.storage_http import StorageClient

MiB = 1 << 20

# -- cache keys (14) ----------------------------------------------------------------------------

DICOM = "https://storage.test/datastore/d1/studies/s/series/r/instances/i"


def test_image_sets_are_distinct_objects() -> None:
    """The same study/series/SOP in two image sets: two objects, two keys."""
    assert file_key(f"{DICOM}?imageSetId=a") != file_key(f"{DICOM}?imageSetId=b")
    assert file_key(f"{DICOM}?imageSetId=a") == f"{DICOM}?imageSetId=a"


@pytest.mark.parametrize(
    "signing",
    [
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=c&X-Amz-Date=d"
        "&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature=s&x-amz-security-token=t",
        "Expires=1&Signature=s&Key-Pair-Id=k",
        "Policy=p&Signature=s&Key-Pair-Id=k",
        "AWSAccessKeyId=a&Expires=1&Signature=s",
    ],
)
def test_a_key_keeps_what_names_the_object_and_drops_what_signs_it(signing: str) -> None:
    base = "https://s3.test/bucket/images/1/x.mha"
    assert file_key(f"{base}?{signing}") == base
    assert file_key(f"{DICOM}?imageSetId=a&{signing}#frag") == f"{DICOM}?imageSetId=a"
    assert file_key(f"{DICOM}?{signing}&imageSetId=a") == f"{DICOM}?imageSetId=a"


def test_a_key_is_its_own_key() -> None:
    """Snapshots record keys and the offline mount keys them again: idempotent."""
    for url in (f"{DICOM}?imageSetId=a", "https://gc.test/media/images/1/x.mha"):
        assert file_key(file_key(url)) == file_key(url)
    assert file_key("gcfs-snapshot://sha256/abc") == "gcfs-snapshot://sha256/abc"


# -- recent resolutions (12) ----------------------------------------------------------------------


def resolver(clock: list[float]) -> Resolver:
    return Resolver(
        httpx.AsyncClient(),
        {},
        StorageClient(),
        http_timeout=1.0,
        retry=RetryPolicy(),
        site_outage=OutageLog("site"),
        storage_outage=OutageLog("storage"),
        health=EndpointHealth(),
        clock=lambda: clock[0],
    )


def test_recent_resolutions_are_bounded_in_number_and_time() -> None:
    """Probed and never opened: kept at most REUSE_RESOLUTION seconds, at most MAX_RECENT."""
    now = [0.0]
    r = resolver(now)
    for n in range(MAX_RECENT + 100):
        r.keep_recent(f"https://gc.test/media/{n}", f"https://s3.test/{n}?sig")
    assert len(r._recent) == MAX_RECENT
    assert r.take_recent("https://gc.test/media/0") is None  # the oldest made room
    last = f"https://gc.test/media/{MAX_RECENT + 99}"
    now[0] = REUSE_RESOLUTION + 1
    assert r.take_recent(last) is None
    assert len(r._recent) == 0  # expired entries leave, not only the one asked for


def test_a_recent_resolution_is_used_once() -> None:
    now = [0.0]
    r = resolver(now)
    r.keep_recent("https://gc.test/media/1", "https://s3.test/1?sig")
    now[0] = REUSE_RESOLUTION - 1
    assert r.take_recent("https://gc.test/media/1") == "https://s3.test/1?sig"
    assert r.take_recent("https://gc.test/media/1") is None


# -- buffer pins (13) ------------------------------------------------------------------------------


def test_a_pinned_buffer_is_never_handed_out_again() -> None:
    """Whatever Python's reference counts say (CPython 3.14 borrows references): acquire's
    own pin, a Block's pin, each keeps the buffer out of the pool until given back."""
    pool = BufferPool(max_bytes=64 * MiB, min_size=MiB)
    first = pool.acquire(4 * MiB)
    assert pool.acquire(4 * MiB) is not first  # acquire's pin
    block = Block(first, 0, MiB)
    unpin(first)  # the caller made its Block and gave back acquire's pin
    assert all(pool.acquire(4 * MiB) is not first for _ in range(3))
    assert pool.allocated == 5 and pool.reused == 0
    del block
    gc.collect()
    again = pool.acquire(4 * MiB)
    assert again is first  # unpinned: reused
    assert pool.reused == 1


def test_an_unpinned_buffer_is_reused_even_while_referenced() -> None:
    """Reuse follows pins, not references: a reference without a pin (a bug) no longer
    keeps a buffer, and a pin without a reference (a thread) still does."""
    pool = BufferPool(max_bytes=64 * MiB, min_size=MiB)
    buffer = pool.acquire(MiB)
    unpin(buffer)
    assert pool.acquire(MiB) is buffer


async def test_a_lent_view_is_pinned_until_the_task_yields() -> None:
    """The view a read hands to pyfuse3 keeps its buffer until the reply was sent (pyfuse3
    sends it before the handler's task yields)."""
    pool = BufferPool(max_bytes=64 * MiB, min_size=MiB)
    buffer = pool.acquire(2 * MiB)
    blocks = [Block(buffer, 0, MiB), Block(buffer, MiB, MiB)]
    unpin(buffer)
    view = span(blocks, 5, MiB)
    lend(view)
    del blocks
    gc.collect()
    assert pool.acquire(2 * MiB) is not buffer  # the reply is not sent yet
    await trio.testing.wait_all_tasks_blocked()  # the unpin runs as the run loop's callback
    assert pool.acquire(2 * MiB) is buffer


def test_sizes_and_presigned_requests_are_bounded() -> None:
    """Per-file state of the data path is bounded (issue 14): the size table and the table of
    pre-signed requests push out the least recently used entries past their bound."""
    import httpx

    from gcfs import content, resolver

    store = content.ContentStore(httpx.AsyncClient(), {}, None, max_inflight_bytes=1 << 20)
    for n in range(content.MAX_SIZES + 10):
        store._sizes[f"https://gc.test/media/{n}"] = n
    assert len(store._sizes) == content.MAX_SIZES
    assert "https://gc.test/media/0" not in store._sizes
    res = store.resolver
    for n in range(resolver.MAX_PRESIGNED + 10):
        res.register_presigned(f"https://hi.test/{n}", {"Authorization": "x"})
    assert len(res._presigned) == resolver.MAX_PRESIGNED
    assert res.storage_headers(f"https://hi.test/{resolver.MAX_PRESIGNED + 9}", {}) == {
        "Authorization": "x"
    }
