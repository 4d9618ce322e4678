"""ContentStore and RemoteFile: resolving, sizing and reading the bytes of remote files.

How Grand Challenge serves bytes (gc-api.md §3.12, §5): `GET /media/...` with the token answers
302 to a short-lived signed URL on a storage host (S3 presigned: 3600 s, CloudFront: 300 s).
The storage host honours `Range`, refuses HEAD (the method is part of the signature) and must
never see the token. Every /media/ hit writes an audit row, so a file is resolved once per
open, and again only when storage says the signature expired (403).

Moving parts:

- `ContentStore` (one per mount) owns the sizes (forever: files are immutable by pk), the
  recently resolved signed URLs (reused for `REUSE_RESOLUTION` s, so the `size()` that a
  lookup makes and the `open()` that follows cost one /media/ hit), the single-flight table of
  block fetches shared by all open files, the global read-ahead memory budget and, once entered
  with `async with store:`, the nursery in which read-ahead runs.
- `RemoteFile` (one per open) holds the signed URL, the read-ahead state and the blocks of its
  current window. Reads are served in `block_size` blocks: from the window in memory, else from
  a fetch already in flight for the same block (any file), else from the `BlockCache` on disk,
  else by a ranged GET that is verified (206, exact Content-Range, exact length) before a byte
  of it is used, then stored in the BlockCache.
- Read-ahead: a read that starts between one block before and 256 KiB after where the
  previous one ended is sequential. The window starts at 1 block and doubles with every
  sequential read up to `max_window_bytes` (32 blocks); when at most half a window is left
  ahead of the reader, the next stretch is claimed (so readers reaching it wait for it rather
  than fetch it again) and queued as ranged GETs of at least 4 blocks, nearest first, of which
  `max_parallel` (4) per file run at once: one connection's bandwidth cap is beaten and a
  48 MiB file costs 15 requests instead of 49 (measured). Blocks stream out of a response as
  they complete, so a long request does not delay the reader's next block. A read elsewhere
  resets the window to 0, cancels the file's read-ahead and drops its blocks: a 64 KiB read
  at 3 GiB fetches the one block it needs.

Invariants:
- The token goes only to the /media/ URL; storage requests carry Range and Accept-Encoding
  only, and the client must not carry an Authorization header of its own (checked at init).
- A block reaches a reader only after its response passed `check_partial` (status, exact
  Content-Range, Content-Length) and all of the block's bytes arrived; it reaches the disk
  only after the whole response was exactly as long as asked, so a bad response caches
  nothing. BlockCache writes are atomic and
  run in a worker thread that trio does not abandon, so cancellation never leaves half a block.
- Read-ahead memory (blocks held by files plus bytes being read ahead) stays below
  `max_inflight_bytes` (64 MiB) across all files; blocks a reader needs right now are never
  held back by that budget, so it cannot deadlock. Read-ahead is never fire-and-forget: it
  runs in the store's nursery, and `close()` cancels a file's outstanding read-ahead.
- Everything here runs on the trio thread; the sections between checkpoints are atomic, which
  is what makes the flight table and the budget counters safe without locks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import httpx
import trio

from .blockcache import DEFAULT_BLOCK_SIZE, BlockCache
from .errors import (
    BadResponse,
    GcfsError,
    NotFound,
    PermissionDenied,
    Unavailable,
    first_error,
)
from .retry import (
    OUTAGE_PROBE_BUDGET,
    OutageLog,
    RetryPolicy,
    is_transient_status,
    parse_retry_after,
    retrying,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Read-ahead memory of all open files together. 64 MiB is two full 32 MiB windows: enough for
# two sequential readers at full speed; a third reads ahead less until one of them moves on.
DEFAULT_MAX_INFLIGHT_BYTES = 64 << 20
# The largest read-ahead window of one file. At 100 MB/s a 32 MiB window is ~0.3 s of data,
# which hides S3's 20-100 ms first-byte latency several times over.
DEFAULT_MAX_WINDOW_BYTES = 32 << 20
# Concurrent ranged GETs of one file's read-ahead. Object stores and CDNs cap a single
# connection (often 20-100 MB/s); 4 streams multiply that without flooding the connection pool
# (`api.MAX_CONNECTIONS` = 16 shared by everyone).
DEFAULT_MAX_PARALLEL = 4
# Read-ahead requests are at least this many blocks (4 MiB) unless the window is smaller: S3's
# first byte takes 20-100 ms, about what 1 MiB takes to transfer at 10-50 MB/s, so a 1 MiB
# request spends half its time waiting; at 4 MiB the transfer dominates.
MIN_READ_AHEAD_BLOCKS = 4
# Per-request timeout on the storage and /media/ requests (connect, read gap, pool wait).
DEFAULT_HTTP_TIMEOUT = 30.0
# How long a signed URL resolved by size() may be reused by open(), and one resolved by open()
# by the next open of the same file. Far below CloudFront's 300 s expiry; a 403 re-resolves.
REUSE_RESOLUTION = 60.0

# How far past the previous read's end a read may start and still count as sequential: two of
# the kernel's 128 KiB FUSE reads.
SEQUENTIAL_SLACK = 256 << 10
# A random read (not where the last one ended) of at most this much, of blocks we do not
# have, fetches just the 16 KiB-aligned range it needs instead of whole 1 MiB blocks: a viewer
# jumping around a 5 GiB slide pays ~20 ms of storage latency per read, not 20 ms + 1 MiB, and
# fetches about what it reads (a 64 KiB read at an odd offset: 80 KiB; 64 KiB alignment made
# that 128 KiB). Such ranges are not cached on disk (they are not whole blocks); the kernel's
# page cache keeps them for this mount.
RANDOM_READ_MAX = 256 << 10
RANDOM_READ_ALIGN = 16 << 10

_REDIRECTS = (301, 302, 303, 307, 308)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


@dataclass(frozen=True, slots=True)
class ContentStatistics:
    resolutions: int  # /media/ hits
    probes: int  # size probes sent to storage
    requests: int  # ranged block GETs sent to storage
    bytes_fetched: int  # body bytes of those GETs
    cache_hits: int  # blocks read from the BlockCache
    shared: int  # blocks a reader got from a fetch another reader had started
    expired: int  # 403s from storage answered by resolving again


@dataclass(slots=True)
class _Resolution:
    url: str
    at: float


class _Flight:
    """One block being fetched; followers wait for `done`, then find `data` or `error`."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: GcfsError | None = None  # None with no data: the leader was cancelled


class _Body:
    """The blocks of one response, and whether all of it arrived exactly as asked."""

    __slots__ = ("blocks", "verified")

    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {}
        self.verified = False


class _Expired(Exception):
    """Storage answered 403: the signature expired (or was never valid)."""


def check_partial(
    status: int, headers: Mapping[str, str], first: int, last: int, total: int
) -> int:
    """Check a ranged GET's answer to `bytes=first-last` of a `total`-byte file before its body
    is read; return the body length to expect. Raise BadResponse for anything but exactly that.
    """
    if status != 206:
        raise BadResponse(f"storage answered HTTP {status} to a range request")
    content_range = headers.get("content-range", "")
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    if match is None:
        raise BadResponse(f"storage sent a bad Content-Range {content_range!r}")
    got = tuple(int(group) for group in match.groups())
    if got != (first, last, total):
        raise BadResponse(
            f"storage sent bytes {got[0]}-{got[1]}/{got[2]} for bytes {first}-{last}/{total}"
        )
    expected = last - first + 1
    length = headers.get("content-length")
    if length is not None and length.strip() != str(expected):
        raise BadResponse(f"storage sent Content-Length {length} for a {expected}-byte range")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadResponse(f"storage sent a range with Content-Encoding {encoding}")
    return expected


def parse_size(status: int, headers: Mapping[str, str]) -> int:
    """The total size from the answer to `Range: bytes=0-0`."""
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(headers.get("content-range", "").strip())
        if match is None or int(match.group(1)) != 0:
            raise BadResponse(f"storage sent a bad Content-Range {headers.get('content-range')!r}")
        return int(match.group(3))
    if status == 200:  # Range ignored: the whole file is coming; its length is the size
        length = headers.get("content-length", "").strip()
        if not length.isdigit():
            raise BadResponse("storage ignored Range and sent no Content-Length")
        return int(length)
    if status == 416:  # only an empty file cannot satisfy bytes=0-0
        match = _UNSATISFIED_RANGE.fullmatch(headers.get("content-range", "").strip())
        if match is None or match.group(1) != "0":
            raise BadResponse("storage could not satisfy bytes=0-0 of a non-empty file")
        return 0
    raise BadResponse(f"storage answered HTTP {status} to a size probe")


def _raise_for_storage(status: int, where: str, headers: Mapping[str, str] | None = None) -> None:
    """Errors of a storage request that are not the ones the caller handles."""
    if status == 403:
        raise _Expired(where)
    if status == 404:
        raise NotFound(f"{where}: the file is missing in storage")
    _raise_unavailable(status, where, headers)


def _raise_unavailable(status: int, where: str, headers: Mapping[str, str] | None) -> None:
    """429/502/503/504 are worth retrying (with the server's Retry-After); other 5xx not."""
    if is_transient_status(status):
        retry_after = parse_retry_after((headers or {}).get("retry-after"))
        raise Unavailable(f"{where}: HTTP {status}", retry_after=retry_after)
    if status >= 500:
        raise Unavailable(f"{where}: HTTP {status}", transient=False)


@contextlib.asynccontextmanager
async def _get(
    http: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    http_timeout: httpx.Timeout,
    where: str,
) -> AsyncIterator[httpx.Response]:
    """A streamed GET that never follows a redirect; transport failures (resets, timeouts,
    refused connections) become `Unavailable`, which the retry loops try again. The message
    names the exception type only: httpx's text can carry a signed URL."""
    try:
        async with http.stream(
            "GET", url, headers=headers, follow_redirects=False, timeout=http_timeout
        ) as response:
            yield response
    except httpx.TimeoutException as exc:
        raise Unavailable(f"{where}: timed out") from exc
    except httpx.HTTPError as exc:
        raise Unavailable(f"{where}: {type(exc).__name__}") from exc


def _redact(url: str | httpx.URL) -> str:
    """A URL without its query: a signed URL's query is a credential for up to an hour."""
    return str(httpx.URL(url).copy_with(query=None))


def _runs(indices: Iterable[int], longest: int) -> list[range]:
    """Sorted block indices as ranges of consecutive blocks, none longer than `longest`."""
    runs: list[range] = []
    start = prev = -2
    for i in sorted(indices):
        if i == prev + 1 and i - start < longest:
            prev = i
            continue
        if start >= 0:
            runs.append(range(start, prev + 1))
        start = prev = i
    if start >= 0:
        runs.append(range(start, prev + 1))
    return runs


class ContentStore:
    """Sizes and contents of the remote files of one mount (see the module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        auth_headers: Mapping[str, str],
        cache: BlockCache | None,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        max_window_bytes: int = DEFAULT_MAX_WINDOW_BYTES,
        max_parallel: int = DEFAULT_MAX_PARALLEL,
        http_timeout: float = DEFAULT_HTTP_TIMEOUT,
        retry: RetryPolicy | None = None,
        site_outage: OutageLog | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if "authorization" in http.headers or http.auth is not None:
            raise ValueError("the shared client must not authenticate storage requests")
        if cache is not None and cache.block_size != block_size:
            raise ValueError("the BlockCache and the ContentStore must use the same block size")
        self._http = http
        self._auth_headers = auth_headers  # live: follows token reloads
        self.retry = retry or RetryPolicy()
        # /media/ lives on the site: share the API client's view of its health.
        self._site_outage = site_outage or OutageLog("the /media/ resolver")
        self._storage_outage = OutageLog("storage")
        self.cache = cache
        self.block_size = block_size
        self.max_inflight_bytes = max_inflight_bytes
        self.max_window_blocks = max(1, max_window_bytes // block_size)
        self.max_parallel = max(1, max_parallel)
        self._timeout = httpx.Timeout(http_timeout)
        self._clock = clock
        self._sizes: dict[str, int] = {}
        self._size_flights: dict[str, trio.Event] = {}
        self._resolutions: dict[str, _Resolution] = {}
        self._presigned: dict[str, dict[str, str]] = {}
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        # Read-ahead budget: bytes held in files' windows, and bytes reserved by read-ahead
        # tasks that have not finished. Plain counters: only the trio thread touches them.
        self._held_bytes = 0
        self._reserved_bytes = 0
        self._resolutions_count = self._probes = self._requests = self._bytes = 0
        self._cache_hits = self._shared = self._expired = 0

    # -- lifecycle: the nursery that read-ahead runs in ---------------------------------------

    async def __aenter__(self) -> ContentStore:
        stack = contextlib.AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, nursery = self._exit_stack, self._nursery
        self._nursery = self._exit_stack = None
        if stack is None or nursery is None:
            return None
        nursery.cancel_scope.cancel()  # outstanding read-ahead of files nobody closed
        return await stack.__aexit__(exc_type, exc, tb)

    # -- public API ---------------------------------------------------------------------------

    async def size(self, url: str) -> int:
        """The exact size of the file behind a /media/ URL; probed at most once per URL."""
        return await self._size(url, None)

    async def _size(self, url: str, signed: str | None) -> int:
        while True:
            known = self._sizes.get(url)
            if known is not None:
                return known
            leader = self._size_flights.get(url)
            if leader is None:
                break
            # When the leader failed, the next round makes this caller the leader.
            await leader.wait()
        event = trio.Event()
        self._size_flights[url] = event
        try:
            if self.cache is not None:
                stored = await trio.to_thread.run_sync(self.cache.get_size, url)
                if stored is not None:
                    self._sizes[url] = stored
                    return stored
            size = await self._probe(url, signed)
            self._sizes[url] = size
            if self.cache is not None:
                await trio.to_thread.run_sync(self.cache.put_size, url, size)
            return size
        finally:
            del self._size_flights[url]
            event.set()

    async def open(self, url: str) -> RemoteFile:
        """A RemoteFile for the /media/ URL, resolved once now (or moments ago by size()).

        Resolving at every open, even when every block is on disk, is deliberate: it checks
        that the token may still read the file (the disk cache must not outlive a revoked
        permission) and leaves the audit row Grand Challenge expects for each download.
        """
        recent = self._resolutions.pop(url, None)
        signed: str | None
        if recent is not None and self._clock() - recent.at < REUSE_RESOLUTION:
            signed = recent.url
        else:
            try:
                signed = await self._resolve(url)
            except Unavailable:
                # The site is down. If we know the size, the file opens anyway and serves
                # what the block cache holds; a read that needs storage resolves then.
                if await self._known_size(url) is None:
                    raise
                signed = None
        size = await self._size(url, signed)
        return RemoteFile(self, url, signed, size)

    async def _known_size(self, url: str) -> int | None:
        known = self._sizes.get(url)
        if known is None and self.cache is not None:
            known = await trio.to_thread.run_sync(self.cache.get_size, url)
        return known

    def register_presigned(self, url: str, headers: Mapping[str, str]) -> None:
        """Declare a URL that is signed already, with the headers that carry its signature.

        DICOM instances come as pre-signed AWS HealthImaging requests whose SigV4 signature
        travels in `Authorization`/`X-Amz-Date` headers (gc-api.md §3.11); they need no
        /media/ resolution, and when their signature expires only a new listing renews it.
        """
        self._presigned[url] = dict(headers)

    def storage_headers(self, signed: str, extra: Mapping[str, str]) -> dict[str, str]:
        """Headers for a storage request: a pre-signed request's own, then ours (Range)."""
        return {**self._presigned.get(signed, {}), **extra}

    def statistics(self) -> ContentStatistics:
        return ContentStatistics(
            self._resolutions_count,
            self._probes,
            self._requests,
            self._bytes,
            self._cache_hits,
            self._shared,
            self._expired,
        )

    # -- resolution and probing ---------------------------------------------------------------

    async def _resolve(self, url: str) -> str:
        """GET the /media/ URL with the token, not following the redirect: the signed URL.
        Retried on transient failures within the retry budget."""
        if url in self._presigned:
            return url
        return await retrying(
            lambda: self._resolve_once(url),
            policy=self.retry,
            what=f"resolve {url}",
            outage=self._site_outage,
        )

    async def _resolve_once(self, url: str) -> str:
        self._resolutions_count += 1
        where = f"GET {url}"
        headers = dict(self._auth_headers)
        async with _get(self._http, url, headers, self._timeout, where) as response:
            # A 200 would be the whole file: never read the body.
            status = response.status_code
            location = response.headers.get("location")
        log.debug("resolve %s -> %d", url, status)
        if status in _REDIRECTS and location:
            return str(httpx.URL(url).join(location))
        if status == 404:
            raise NotFound(f"{where}: not found")
        if status in (401, 403):
            raise PermissionDenied(f"{where}: HTTP {status}")
        _raise_unavailable(status, where, response.headers)
        raise BadResponse(f"{where}: expected a redirect to storage, got HTTP {status}")

    async def _probe(self, url: str, signed: str | None) -> int:
        """Probe with open()'s signed URL, or resolve one and keep it for the open() that
        usually follows a lookup's size(): one /media/ hit for both."""
        if signed is None:
            signed = await self._resolve(url)
            self._resolutions[url] = _Resolution(signed, self._clock())
        for attempt in range(2):
            try:
                return await retrying(
                    functools.partial(self._probe_signed, signed),
                    policy=self.retry,
                    what=f"size of {url}",
                    outage=self._storage_outage,
                )
            except _Expired:
                if attempt:
                    raise PermissionDenied(f"storage refused {url} twice") from None
                self._expired += 1
                signed = await self._resolve(url)
        raise AssertionError("unreachable")

    async def _probe_signed(self, signed: str) -> int:
        self._probes += 1
        where = f"GET {_redact(signed)}"
        asked = self.storage_headers(signed, {"Range": "bytes=0-0", "Accept-Encoding": "identity"})
        async with _get(self._http, signed, asked, self._timeout, where) as response:
            # Closed unread: after a 200 (Range ignored) the body is the whole file.
            status, headers = response.status_code, response.headers
        log.debug("probe %s -> %d", where, status)
        if status not in (200, 206, 416):
            _raise_for_storage(status, where, headers)
        try:
            return parse_size(status, headers)
        except BadResponse as exc:
            # A garbled answer to an idempotent GET: worth another try, like a reset.
            raise Unavailable(str(exc)) from exc

    # -- budget -------------------------------------------------------------------------------

    def _room(self) -> int:
        return self.max_inflight_bytes - self._held_bytes - self._reserved_bytes


class RemoteFile:
    """One open remote file: random-access reads with read-ahead for sequential readers."""

    def __init__(self, store: ContentStore, url: str, signed: str | None, size: int) -> None:
        self.store = store
        self.url = url
        self.size = size
        self.block_size = store.block_size
        self.nblocks = math.ceil(size / self.block_size)
        self.bytes_fetched = 0
        self.requests = 0
        self._signed = signed  # None: not resolved yet (opened while the site was down)
        self._generation = 0  # bumped by each re-resolution
        self._resolve_lock = trio.Lock()
        self._blocks: dict[int, bytes] = {}  # the window in memory
        self._last_end = 0  # where the previous read ended; 0 makes a first read at 0 sequential
        self._window = 0  # read-ahead window, in blocks
        self._ahead_end = 0  # blocks before this one have been read ahead (or were read)
        self._floor = 0  # blocks before this one are consumed: do not hold them
        self._scopes: set[trio.CancelScope] = set()  # one per running read-ahead task
        self._queue: deque[tuple[range, list[_Flight], int]] = deque()  # waiting read-ahead
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        """Exactly the bytes [offset, min(offset + size, file size))."""
        if self._closed:
            raise ValueError("read from a closed RemoteFile")
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        sequential = self._advance(offset, end, first, last)
        if not sequential and end - offset <= RANDOM_READ_MAX:
            data = await self._read_small(offset, end, range(first, last + 1))
            if data is not None:
                return data
        blocks = await self._obtain(range(first, last + 1))
        data = b"".join(blocks[i] for i in range(first, last + 1))
        start = offset - first * bs
        return data[start : start + end - offset]

    def close(self) -> None:
        """Cancel outstanding read-ahead and drop the window; idempotent."""
        self._closed = True
        self._cancel_read_ahead()
        for index in list(self._blocks):
            self._drop(index)

    # -- read-ahead ---------------------------------------------------------------------------

    async def _read_small(self, offset: int, end: int, indices: range) -> bytes | None:
        """A random read: from blocks we hold (memory or disk), else one aligned ranged GET.
        None when the blocks are held or being fetched already: the block path serves it."""
        flights = self.store._flights
        if all(i in self._blocks or (self.url, i) in flights for i in indices):
            return None
        if self.store.cache is not None:
            found = await trio.to_thread.run_sync(self._cache_get, list(indices))
            if len(found) == len(indices):
                self.store._cache_hits += len(found)
                for index, data in found.items():
                    self._hold(index, data)
                return None
        align = RANDOM_READ_ALIGN
        first = offset - offset % align
        last = min(-(-end // align) * align, self.size) - 1
        data = await self._fetch_range(first, last)
        return data[offset - first : end - first]

    async def _fetch_range(self, first: int, last: int) -> bytes:
        """Bytes [first, last] in one verified ranged GET, retried like a block fetch;
        nothing of it is cached or shared."""
        attempt = functools.partial(self._stream_range, first, last)
        return await self._retry_storage(attempt, f"{self.url} bytes {first}-{last}")

    async def _stream_range(self, first: int, last: int) -> bytes:
        async with self._ranged(first, last) as (response, expected, where):
            data = await response.aread()
        store = self.store
        store._bytes += len(data)
        self.bytes_fetched += len(data)
        if len(data) != expected:
            raise BadResponse(f"{where}: {len(data)} of {expected} bytes arrived")
        return data

    @contextlib.asynccontextmanager
    async def _ranged(
        self, first: int, last: int
    ) -> AsyncIterator[tuple[httpx.Response, int, str]]:
        """One ranged GET of bytes [first, last] of the signed URL, its headers checked (206,
        the exact Content-Range): the open response, the body length to expect, and a
        description for errors. Transport failures become `Unavailable`."""
        store = self.store
        signed = self._signed
        if signed is None:
            raise Unavailable(f"{self.url}: not resolved")
        where = f"GET {_redact(signed)} bytes={first}-{last}"
        store._requests += 1
        self.requests += 1
        extra = {"Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"}
        headers = store.storage_headers(signed, extra)
        async with _get(store._http, signed, headers, store._timeout, where) as response:
            status = response.status_code
            if status != 206:
                _raise_for_storage(status, where, response.headers)
            expected = check_partial(status, response.headers, first, last, self.size)
            yield response, expected, where
        log.debug("%s -> %d", where, status)

    def _advance(self, offset: int, end: int, first: int, last: int) -> bool:
        """Update the window for a read of [offset, end) and start read-ahead; no checkpoint.
        True when the read continues the previous one (sequential)."""
        # Within one block behind or SEQUENTIAL_SLACK ahead: the kernel sends a sequential
        # reader's 128 KiB requests concurrently, so they can arrive a little out of order.
        sequential = -self.block_size <= offset - self._last_end <= SEQUENTIAL_SLACK
        if sequential:
            self._window = min(max(1, self._window * 2), self.store.max_window_blocks)
            self._last_end = max(self._last_end, end)
            for index in [i for i in self._blocks if i < first]:
                self._drop(index)
            self._floor = max(self._floor, first)
        else:
            self._window = 0
            self._last_end = end
            self._cancel_read_ahead()
            for index in [i for i in self._blocks if not first <= i <= last]:
                self._drop(index)
            self._floor = first
            self._ahead_end = last + 1
            return False
        self._ahead_end = max(self._ahead_end, last + 1)
        target = min(last + 1 + self._window, self.nblocks)
        if self._ahead_end - (last + 1) > self._window // 2 or self._ahead_end >= target:
            return True  # more than half a window still ahead: no new request yet
        if self.store._nursery is None:
            return True  # the store was not entered: no read-ahead
        start = self._ahead_end
        wanted = [
            i
            for i in range(start, target)
            if i not in self._blocks and (self.url, i) not in self.store._flights
        ]
        # Fit the budget; what does not fit is fetched on demand or by a later read-ahead.
        fit = max(0, self.store._room()) // self.block_size
        wanted = wanted[:fit]
        if not wanted:
            return True
        self._ahead_end = wanted[-1] + 1
        longest = max(MIN_READ_AHEAD_BLOCKS, math.ceil(len(wanted) / self.store.max_parallel))
        for run in _runs(wanted, longest):
            # Claimed now, not when a task starts: a reader that reaches these blocks while
            # they wait in the queue follows the read-ahead instead of fetching them again.
            reserved = len(run) * self.block_size
            self.store._reserved_bytes += reserved
            self._queue.append((run, self._claim(run), reserved))
        self._pump()
        return True

    def _pump(self) -> None:
        """Start queued read-ahead, nearest blocks first, up to max_parallel at a time (a FIFO:
        trio starts tasks in no particular order, so a semaphore would let far blocks jump
        ahead of the ones the reader needs next). No checkpoint."""
        nursery = self.store._nursery
        while self._queue and len(self._scopes) < self.store.max_parallel:
            run, flights, reserved = self._queue.popleft()
            if nursery is None:
                self._unqueue(run, flights, reserved)
                continue
            scope = trio.CancelScope()
            self._scopes.add(scope)
            nursery.start_soon(self._read_ahead, run, flights, scope, reserved)

    def _unqueue(self, run: range, flights: list[_Flight], reserved: int) -> None:
        self.store._reserved_bytes -= reserved
        self._settle(run, flights, None)

    def _cancel_read_ahead(self) -> None:
        """Cancel running read-ahead and drop queued read-ahead; no checkpoint."""
        for scope in self._scopes:
            scope.cancel()
        while self._queue:
            self._unqueue(*self._queue.popleft())

    async def _read_ahead(
        self, run: range, flights: list[_Flight], scope: trio.CancelScope, reserved: int
    ) -> None:
        store = self.store
        try:
            with scope:
                found: dict[int, bytes] = {}
                if store.cache is not None:
                    found = await trio.to_thread.run_sync(self._cache_get, list(run))
                    store._cache_hits += len(found)
                    for index, data in found.items():
                        self._hold(index, data)
                        flights[index - run.start].data = data
                        flights[index - run.start].done.set()
                for sub in _runs([i for i in run if i not in found], len(run)):
                    part = flights[sub.start - run.start : sub.stop - run.start]
                    await self._fetch(sub, part, self._hold)
        except GcfsError as exc:
            # Readers waiting for these blocks got the error through the flights.
            log.debug("read-ahead of %s blocks %s failed: %s", self.url, run, exc)
        finally:
            self._scopes.discard(scope)
            store._reserved_bytes -= reserved
            self._settle(run, flights, None)  # cancelled: followers fetch for themselves
            if not self._closed:
                self._pump()

    def _hold(self, index: int, data: bytes) -> None:
        if self._closed or index < self._floor or index in self._blocks:
            return
        self._blocks[index] = data
        self.store._held_bytes += len(data)

    def _drop(self, index: int) -> None:
        data = self._blocks.pop(index, None)
        if data is not None:
            self.store._held_bytes -= len(data)

    # -- obtaining blocks ---------------------------------------------------------------------

    async def _obtain(self, indices: range) -> dict[int, bytes]:
        """The blocks a read needs, from memory, a flight, the BlockCache or the network."""
        store = self.store
        out: dict[int, bytes] = {}
        looked_on_disk = False
        while True:
            for i in indices:
                if i not in out and i in self._blocks:
                    out[i] = self._blocks[i]
            missing = [i for i in indices if i not in out]
            if not missing:
                for index, data in out.items():
                    self._hold(index, data)  # the current block(s) stay for the next read
                return out
            waiting = {i: f for i in missing if (f := store._flights.get((self.url, i)))}
            free = [i for i in missing if i not in waiting]
            if free and not looked_on_disk and store.cache is not None:
                looked_on_disk = True
                found = await trio.to_thread.run_sync(self._cache_get, free)
                store._cache_hits += len(found)
                out.update(found)
                for index, data in found.items():
                    self._hold(index, data)
                continue  # the world moved during the checkpoint: look again
            runs = _runs(free, len(free))
            # The common cases, one fetch or one read-ahead to wait for, need no nursery.
            if not waiting and len(runs) == 1:
                await self._fetch(runs[0], self._claim(runs[0]), out.__setitem__)
                continue
            if not runs and len(waiting) == 1:
                await self._follow(*next(iter(waiting.items())), out)
                continue
            try:
                async with trio.open_nursery() as nursery:
                    for run in runs:
                        nursery.start_soon(self._fetch, run, self._claim(run), out.__setitem__)
                    for index, flight in waiting.items():
                        nursery.start_soon(self._follow, index, flight, out)
            except BaseExceptionGroup as group:
                raise first_error(group) from None

    async def _follow(self, index: int, flight: _Flight, out: dict[int, bytes]) -> None:
        await flight.done.wait()
        if flight.data is not None:
            self.store._shared += 1
            out[index] = flight.data
        elif flight.error is not None:
            raise flight.error
        # else: the leader was cancelled (its file closed); the next round fetches it

    def _cache_get(self, indices: list[int]) -> dict[int, bytes]:
        """In a worker thread: the blocks the BlockCache has."""
        cache = self.store.cache
        assert cache is not None
        found: dict[int, bytes] = {}
        for index in indices:
            data = cache.get(self.url, index)
            if data is not None:
                found[index] = data
        return found

    def _claim(self, run: range) -> list[_Flight]:
        """Register this task as the fetcher of `run`; no checkpoint."""
        flights = [_Flight() for _ in run]
        for index, flight in zip(run, flights, strict=True):
            self.store._flights[(self.url, index)] = flight
        return flights

    async def _fetch(
        self, run: range, flights: list[_Flight], sink: Callable[[int, bytes], None]
    ) -> None:
        """Fetch the claimed `run`, hand each block to `sink` and the followers, then store
        the blocks of every response that arrived whole. Always completes the flights.

        After a failure, only the blocks not yet delivered are asked for again.
        """
        store = self.store
        bodies: list[_Body] = []

        async def attempt() -> None:
            pending = next((n for n, f in enumerate(flights) if not f.done.is_set()), None)
            if pending is None:
                return
            body = _Body()
            bodies.append(body)
            await self._stream(range(run.start + pending, run.stop), flights[pending:], body, sink)

        try:
            await self._retry_storage(attempt, f"{self.url} blocks {run.start}-{run.stop - 1}")
        except GcfsError as exc:
            self._settle(run, flights, exc)
            raise
        finally:
            verified = {i: b for body in bodies if body.verified for i, b in body.blocks.items()}
            if verified and store.cache is not None:
                # Shielded: a reader that got the last block may close the file (cancelling
                # this read-ahead) at once; a few ms of disk write keeps what we verified.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._cache_put, verified)
            self._settle(run, flights, None)

    async def _retry_storage(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run one storage request until it succeeds: again after an expired signature (once,
        with the /media/ URL resolved again) and after a transient failure or a garbled
        answer (a wrong Content-Range, a short body: nothing of it reached a reader or the
        cache, and the GET is idempotent), with backoff, all within the retry budget. During
        a storage outage it fails at once, or probes briefly (retry.OutageLog)."""
        store = self.store
        outage = store._storage_outage
        budget = store.retry.budget
        if outage.down_since is not None:
            if outage.hold_off():
                raise Unavailable(f"{what}: storage is failing; not asking again yet")
            budget = min(budget, OUTAGE_PROBE_BUDGET)
        rng = random.Random()
        expired = False
        with trio.move_on_after(budget):
            for number in range(1_000):
                generation = self._generation
                try:
                    if self._signed is None:  # opened while the site was down
                        await self._reresolve(generation)
                        generation = self._generation
                    result = await attempt()
                    outage.succeeded()
                    return result
                except _Expired:
                    if expired:
                        raise PermissionDenied(
                            f"storage refused {self.url} after a fresh resolution"
                        ) from None
                    expired = True
                    store._expired += 1
                    await self._reresolve(generation)
                except (Unavailable, BadResponse) as exc:
                    if isinstance(exc, Unavailable) and not exc.transient:
                        raise
                    outage.failed(exc)
                    retry_after = exc.retry_after if isinstance(exc, Unavailable) else None
                    delay = store.retry.delay(number, retry_after, rng)
                    log.debug("%s: %s; retrying in %.2f s", what, exc, delay)
                    await trio.sleep(delay)
        error = Unavailable(f"{what}: no whole answer within {budget:g} s")
        outage.gave_up(error)
        raise error

    def _settle(self, run: range, flights: list[_Flight], error: GcfsError | None) -> None:
        """Finish the flights of `run`: unfinished ones fail with `error` (None: the leader
        was cancelled, followers retry); all leave the table. No checkpoint."""
        table = self.store._flights
        for index, flight in zip(run, flights, strict=True):
            if not flight.done.is_set():
                flight.error = error
                flight.done.set()
            if table.get((self.url, index)) is flight:
                del table[(self.url, index)]

    def _cache_put(self, blocks: dict[int, bytes]) -> None:
        cache = self.store.cache
        assert cache is not None
        for index, data in blocks.items():
            cache.put(self.url, index, data)

    async def _reresolve(self, generation: int) -> None:
        """Resolve the /media/ URL again, once for all the requests that saw the same 403."""
        async with self._resolve_lock:
            if self._generation == generation:
                self._signed = await self.store._resolve(self.url)
                self._generation += 1

    async def _stream(
        self,
        run: range,
        flights: list[_Flight],
        body: _Body,
        sink: Callable[[int, bytes], None],
    ) -> None:
        """One ranged GET for the blocks of `run`; each block is released as soon as all of
        its bytes arrived, after the headers were checked. `body.verified` says that the
        whole body arrived and was exactly as long as asked."""
        store, bs = self.store, self.block_size
        first = run.start * bs
        last = min(run.stop * bs, self.size) - 1
        async with self._ranged(first, last) as (response, expected, where):
            # With a matching Content-Length (checked) h11 delivers no byte more, so the last
            # byte ends the body: verified before the next checkpoint.
            framed = "content-length" in response.headers
            # Chunks (64 KiB from httpcore) are gathered per block and joined once: one copy
            # per block, where a growing bytearray cost two plus a memmove.
            pending: list[bytes] = []
            pending_size = 0
            index = run.start
            received = 0
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                store._bytes += len(chunk)
                self.bytes_fetched += len(chunk)
                if received > expected:
                    raise BadResponse(f"{where}: more than the {expected} bytes asked for")
                pending.append(chunk)
                pending_size += len(chunk)
                while index < run.stop:
                    want = min(bs, self.size - index * bs)
                    if pending_size < want:
                        break
                    joined = b"".join(pending)
                    block, rest = joined[:want], joined[want:]
                    pending, pending_size = ([rest], len(rest)) if rest else ([], 0)
                    self._complete(index, block, flights[index - run.start], body, sink)
                    index += 1
                body.verified = framed and received == expected
            if received != expected:
                raise BadResponse(f"{where}: {received} of {expected} bytes arrived")
            body.verified = True

    @staticmethod
    def _complete(
        index: int,
        block: bytes,
        flight: _Flight,
        body: _Body,
        sink: Callable[[int, bytes], None],
    ) -> None:
        body.blocks[index] = block
        sink(index, block)
        flight.data = block
        flight.done.set()


__all__ = [
    "ContentStatistics",
    "ContentStore",
    "RemoteFile",
    "check_partial",
    "parse_size",
]
