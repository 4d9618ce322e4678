"""Resolver: from a file's /media/ URL to a signed storage URL, and a file's size.

How Grand Challenge serves bytes (gc-api.md §3.12, §5): `GET /media/...` with the token
answers 302 to a short-lived signed URL on a storage host (S3 presigned: 3600 s, CloudFront:
300 s). The storage host honours `Range`, refuses HEAD (the method is part of the signature)
and must never see the token. Every /media/ hit writes an audit row, so a file is resolved once
per open (or not at all when its bytes are all cached and the caller vouches for access, see
`ContentStore.open`), and again only when storage says the signature expired (403).

Moving parts:
- `resolve(url)`: the /media/ GET with the token through httpx, not following the redirect;
  retried on transient failures within the retry budget (`retry.retrying`).
- Recent resolutions are kept for `REUSE_RESOLUTION` seconds, so the `size()` that a lookup
  makes and the `open()` that follows cost one /media/ hit: a TTL cache of at most
  `MAX_RECENT` entries (a file probed and never opened must not keep its URL forever).
- Pre-signed requests (DICOM instances, gc-api.md §3.11) need no resolution: their URL is
  signed already and their signature travels in headers (`register_presigned`).
- `probe(url, signed)`: the size, from `Range: bytes=0-0` on storage (through StorageClient):
  Grand Challenge exposes no size anywhere.

Invariant: the token goes to the /media/ URL only (httpx, with the API's live auth headers);
storage requests go through StorageClient, which has no token to send.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from urllib.parse import unquote_plus, urljoin, urlsplit

import httpx
import trio
from cachetools import LRUCache, TTLCache

from .errors import BadResponse, NotFound, PermissionDenied, Unavailable
from .health import EndpointHealth
from .retry import OutageLog, RetryPolicy, Unreachable, retrying
from .storage_http import (
    REDIRECTS,
    Expired,
    StorageClient,
    parse_size,
    raise_for_status,
    raise_unavailable,
    redact,
)

log = logging.getLogger(__name__)

# How long a signed URL resolved by size() may be reused by open(), and one resolved by open()
# by the next open of the same file. Far below CloudFront's 300 s expiry; a 403 re-resolves.
REUSE_RESOLUTION = 60.0
# Resolutions kept at once. A lookup probes the size of every file of a directory and the
# open that usually follows takes its URL; a signed URL is ~0.5-1.5 KiB, so 4,096 of them
# are at most ~6 MiB. In a directory of more files, the earliest probed lose their URL and
# their open costs one more /media/ hit.
MAX_RECENT = 4096
MAX_PRESIGNED = 16384
_REDIRECTS = (301, 302, 303, 307, 308)
# Query parameters that sign a URL, never name the object: S3 SigV4 (X-Amz-*) and SigV2
# (AWSAccessKeyId, Signature, Expires), CloudFront (Expires, Signature, Key-Pair-Id, Policy).
_SIGNING = frozenset({"signature", "expires", "key-pair-id", "policy", "awsaccesskeyid"})
_SIGNING_PREFIXES = ("x-amz-",)


def _signs(parameter: str) -> bool:
    lower = unquote_plus(parameter.partition("=")[0]).lower()
    return lower in _SIGNING or lower.startswith(_SIGNING_PREFIXES)


def file_key(url: str) -> str:
    """A file's identity, for the block store and the flight table: everything in its URL
    that names the object (scheme, host, path, and the query parameters other than those
    that sign it, in their order), nothing that only signs it (which changes with every
    resolution) and no fragment. A /media/ URL has no query; a pre-signed DICOM request's
    `?imageSetId=` names the image set, so the same study/series/SOP in two image sets are
    two objects. Idempotent: a key is its own key (snapshots record keys)."""
    parts = urlsplit(url)
    key = f"{parts.scheme}://{parts.netloc}{parts.path}"
    # The kept parameters as they were written: re-encoding could change their text.
    kept = [p for p in parts.query.split("&") if p and not _signs(p)]
    return f"{key}?{'&'.join(kept)}" if kept else key


class Resolver:
    """Resolutions, pre-signed requests and size probes of one mount (module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        auth_headers: Mapping[str, str],
        storage: StorageClient,
        *,
        http_timeout: float,
        retry: RetryPolicy,
        site_outage: OutageLog,
        storage_outage: OutageLog,
        health: EndpointHealth,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if "authorization" in http.headers or http.auth is not None:
            raise ValueError("the /media/ client must not authenticate by itself")
        self._http = http
        self._auth_headers = auth_headers  # live: follows token reloads
        self._storage = storage
        self._timeout = httpx.Timeout(http_timeout)
        self._retry = retry
        self._site_outage = site_outage
        self._storage_outage = storage_outage
        self._health = health  # the API client's: a failing /media/ is logged like an endpoint
        self._clock = clock
        # /media/ URL -> signed URL, for REUSE_RESOLUTION seconds (read through our clock).
        self._recent: TTLCache[str, str] = TTLCache(
            MAX_RECENT, REUSE_RESOLUTION, timer=lambda: self._clock()
        )
        # Bounded: a DICOM series rarely has more than ~1,000 instances (a CT), and each entry
        # is ~0.5-1.5 KiB of headers, so 16,384 are at most ~24 MiB. One pushed out is
        # registered again when its listing is built again (at the latest after the TTL).
        self._presigned: LRUCache[str, dict[str, str]] = LRUCache(MAX_PRESIGNED)
        self.resolutions = 0  # /media/ hits
        self.probes = 0  # size probes sent to storage
        self.expired = 0  # 403s from storage answered by resolving again

    # -- pre-signed requests ----------------------------------------------------------------

    def register_presigned(self, url: str, headers: Mapping[str, str]) -> None:
        """Declare a URL that is signed already, with the headers that carry its signature."""
        self._presigned[url] = dict(headers)

    def storage_headers(self, signed: str, extra: Mapping[str, str]) -> dict[str, str]:
        """Headers for a storage request: a pre-signed request's own, then ours (Range)."""
        return {**self._presigned.get(signed, {}), **extra}

    # -- resolving --------------------------------------------------------------------------

    def keep_recent(self, url: str, signed: str) -> None:
        """Keep a fresh resolution for the open() that usually follows a size probe."""
        self._recent[url] = signed

    def take_recent(self, url: str) -> str | None:
        """A signed URL resolved moments ago (by a size probe), used at most once."""
        self._recent.expire()
        return self._recent.pop(url, None)

    async def resolve(self, url: str) -> str:
        """GET the /media/ URL with the token, not following the redirect: the signed URL.
        Retried on transient failures within the retry budget."""
        if url in self._presigned:
            return url
        try:
            signed = await retrying(
                lambda: self._resolve_once(url),
                policy=self._retry,
                what=f"resolve {url}",
                outage=self._site_outage,
            )
        except (Unavailable, BadResponse) as exc:
            if exc.status is not None:
                self._health.failed("media", exc.status)
            raise
        self._health.succeeded("media")
        return signed

    async def _resolve_once(self, url: str) -> str:
        self.resolutions += 1
        where = f"GET {url}"
        headers = dict(self._auth_headers)
        try:
            async with self._http.stream(
                "GET", url, headers=headers, follow_redirects=False, timeout=self._timeout
            ) as response:
                # A 200 would be the whole file: never read the body.
                status = response.status_code
                location = response.headers.get("location")
                response_headers = response.headers
        except httpx.TimeoutException as exc:
            # Unreachable: the site gave no answer at all, which marks it down (retry.py)
            # as the API's requests do; the /media/ URL is on the same origin.
            raise Unreachable(f"{where}: timed out", timed_out=True) from exc
        except httpx.TransportError as exc:
            # The type only: httpx's text can carry a URL.
            raise Unreachable(f"{where}: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise Unavailable(f"{where}: {type(exc).__name__}") from exc
        log.debug("resolve %s -> %d", url, status)
        if status in _REDIRECTS and location:
            return str(httpx.URL(url).join(location))
        if status == 404:
            raise NotFound(f"{where}: not found")
        if status in (401, 403):
            raise PermissionDenied(f"{where}: HTTP {status}")
        raise_unavailable(status, where, response_headers)
        raise BadResponse(
            f"{where}: expected a redirect to storage, got HTTP {status}", status=status
        )

    # -- sizes ------------------------------------------------------------------------------

    async def probe(self, url: str, signed: str | None) -> int:
        """The size of the file behind `url`, probed with `signed` or with a fresh resolution
        that is then kept for the open() that usually follows a lookup's size()."""
        if signed is None:
            signed = await self.resolve(url)
            self.keep_recent(url, signed)
        for attempt in range(2):
            try:
                return await retrying(
                    functools.partial(self._probe_signed, signed),
                    policy=self._retry,
                    what=f"size of {url}",
                    outage=self._storage_outage,
                )
            except Expired:
                if attempt:
                    raise PermissionDenied(f"storage refused {url} twice") from None
                self.expired += 1
                signed = await self.resolve(url)
        raise AssertionError("unreachable")

    async def _probe_signed(self, signed: str) -> int:
        headers = self.storage_headers(signed, {"Range": "bytes=0-0"})
        target = signed
        for hop in range(2):  # a redirect is followed once, as a ranged read follows it
            self.probes += 1
            where = f"GET {redact(target)}"
            async with self._storage.request(target, headers, where=where) as response:
                # Left unread: after a 200 (Range ignored) the body is the whole file, and
                # the connection is closed rather than drained.
                status, answer = response.status, response.headers
            log.debug("probe %s -> %d", where, status)
            location = answer.get("location")
            if status in REDIRECTS and location and hop == 0:
                target = urljoin(target, location)
                continue
            break
        if status not in (200, 206, 416):
            raise_for_status(status, where, answer)
        try:
            return parse_size(status, answer)
        except BadResponse as exc:
            # A garbled answer to an idempotent GET: worth another try, like a reset.
            raise Unavailable(str(exc)) from exc


__all__ = ["MAX_RECENT", "REUSE_RESOLUTION", "Resolver", "file_key"]
