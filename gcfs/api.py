"""GcApiClient: the only place that talks HTTP to Grand Challenge.

It knows the API's conventions (gc-api.md): `Authorization: Bearer`, trailing slashes,
limit/offset pages, 404 for hidden and absent objects alike, the 400-vs-empty-200 filter oracle
and the website pages that tell "hidden" from "absent" for algorithm and reader-study slugs.
It turns HTTP outcomes into `GcfsError`s and hands out parsed JSON; it caches nothing.

The token is sent only to the API origin, never to website pages (they ignore it and we do not
want it in their logs) and never logged: the request log line carries method, URL and status.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
import trio

from .config import TokenSource
from .errors import BadResponse, GcfsError, NotFound, PermissionDenied, Unavailable, one_error
from .health import EndpointHealth, endpoint_family
from .retry import (
    LIVENESS_TIMEOUT,
    PROBE_BUDGET,
    OutageLog,
    RetryPolicy,
    Unreachable,
    is_transient_status,
    parse_retry_after,
    retrying,
)
from .stats import Statistics, endpoint_of

log = logging.getLogger(__name__)

JSON = Any  # parsed JSON: what the server sent, checked by the caller before use
Params = Mapping[str, str | int]

# DRF's MaxLimit1000OffsetPagination clamps larger limits to 1000 (gc-api.md §2); asking for the
# maximum makes a 10,000-item listing 11 requests instead of gcapi's 101.
PAGE_SIZE = 1000
# The first page is small: its only job is to learn `count`, and the server's cost grows with
# the results it serializes (~1 ms each on the real site), so a 100-result first page answers
# in ~0.15 s instead of ~1 s. Most directories (under 100 objects) still take one request.
FIRST_PAGE_SIZE = 100
# Pages after the first are fetched concurrently once `count` is known: all of a 10,000-item
# listing at once, within the client's connection limit (MAX_CONNECTIONS).
PAGE_CONCURRENCY = 16
# Connections to the API origin. pyfuse3 runs up to 99 handlers at once; beyond ~16 parallel
# requests a Django server only queues them.
MAX_CONNECTIONS = 16


# The probe of a down site: a few quick tries within PROBE_BUDGET (retry.py).
PROBE_RETRY = RetryPolicy(budget=PROBE_BUDGET)


class Existence(enum.Enum):
    """What an existence oracle says about an object we cannot see."""

    HIDDEN = "hidden"  # exists, but this token may not see it
    ABSENT = "absent"  # does not exist
    UNKNOWN = "unknown"  # the API cannot tell (archive slugs), or the answer was unexpected
    VISIBLE = "visible"  # anyone may see it (a public page answered 200)


class GcApiClient:
    """Async, typed access to the Grand Challenge API of one site."""

    def __init__(
        self,
        base_url: str,
        token: TokenSource,
        *,
        http_timeout: float,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_url = f"{self.base_url}/api/v1/"
        self.token = token
        self.retry = retry or RetryPolicy()
        # Set while the server rejects our token (401); the root README says so.
        self.token_rejected = False
        self._accepted_once = False
        # Connections refused for a moment, or a timed-out attempt, mark the site down: what
        # was seen is served from the cache at once, the rest fails at once (retry.OutageLog).
        self.outage = OutageLog(self.base_url, fail_fast=True)
        self.health = EndpointHealth()
        self.stats = Statistics()
        self._limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(http_timeout),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
            follow_redirects=False,
            headers={"User-Agent": "gcfs", "Accept": "application/json"},
            transport=transport,
        )
        # The liveness check's own connection (retry.STALL_AFTER): the pool above may be full
        # of the very requests that wait, and the check must not queue behind them.
        self._check_http = httpx.AsyncClient(
            timeout=httpx.Timeout(min(http_timeout, LIVENESS_TIMEOUT)),
            limits=httpx.Limits(max_connections=1),
            follow_redirects=False,
            headers={"User-Agent": "gcfs", "Accept": "application/json"},
            transport=transport,
        )

    @property
    def auth_headers(self) -> Mapping[str, str]:
        """The Authorization header for the site origin (API and /media/), live: it follows
        token reloads. Never for storage."""
        return self.token.headers

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._check_http.aclose()

    async def __aenter__(self) -> GcApiClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- single requests -------------------------------------------------------------------

    async def _attempt(self, url: str, params: Params | None, *, auth: bool) -> httpx.Response:
        """One GET; transient failures raise `Unavailable` for `retrying` to try again."""
        headers = dict(self.token.headers) if auth else {}
        endpoint = endpoint_of(url, self.api_url)
        async with self._limiter:
            start = trio.current_time()
            try:
                with self.stats.request():
                    response = await self._http.get(url, params=params, headers=headers)
            except httpx.TimeoutException as exc:
                self.stats.record_request(endpoint, 0)
                raise Unreachable(f"GET {url}: timed out", timed_out=True) from exc
            except httpx.TransportError as exc:
                # Refused, reset, DNS, a connection closed without an answer.
                self.stats.record_request(endpoint, 0)
                raise Unreachable(f"GET {url}: {type(exc).__name__}") from exc
            except httpx.HTTPError as exc:
                self.stats.record_request(endpoint, 0)
                raise Unavailable(f"GET {url}: {type(exc).__name__}") from exc
        self.stats.record_request(endpoint, response.status_code)
        log.debug(
            "GET %s -> %d (%.0f ms)",
            response.request.url,
            response.status_code,
            (trio.current_time() - start) * 1000,
        )
        if is_transient_status(response.status_code):
            raise Unavailable(
                f"GET {url}: HTTP {response.status_code}",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
                status=response.status_code,
            )
        return response

    async def _send(
        self,
        url: str,
        params: Params | None,
        *,
        auth: bool,
        retry: RetryPolicy | None = None,
    ) -> httpx.Response:
        """GET with retries (`retry`, default the client's policy); a 401 makes us read the
        token file again and try once more."""

        async def attempt() -> httpx.Response:
            return await self._attempt(url, params, auth=auth)

        what = f"GET {url}"
        response = await self._retrying(attempt, what, retry)
        if auth and response.status_code == 401 and self.token.reload():
            response = await self._retrying(attempt, what, retry)
        if auth:
            rejected = response.status_code == 401
            # Before the token was ever accepted, a 401 is the mount's own error to report.
            if rejected and not self.token_rejected and self._accepted_once:
                log.error(
                    "%s rejected the API token (revoked?); answering EACCES. Put a new token in "
                    "the token file: it is picked up without remounting",
                    self.base_url,
                )
            elif not rejected and self.token_rejected:
                log.warning("%s accepts the API token again", self.base_url)
            self.token_rejected = rejected
            self._accepted_once |= not rejected
        return response

    async def _retrying(
        self,
        attempt: Callable[[], Awaitable[httpx.Response]],
        what: str,
        retry: RetryPolicy | None = None,
    ) -> httpx.Response:
        def count_retry() -> None:
            self.stats.retries += 1

        return await retrying(
            attempt,
            policy=retry or self.retry,
            what=what,
            outage=self.outage,
            on_retry=count_retry,
        )

    async def get_json(
        self, path: str, params: Params | None = None, *, retry: RetryPolicy | None = None
    ) -> JSON:
        """GET an API path (relative to /api/v1/, with trailing slash) and parse the JSON.

        An answer that retrying cannot fix (5xx after retries, a 4xx other than 401/403/404)
        marks the endpoint family as failing (`health`, logged once); a success clears it."""
        url = self.api_url + path
        family = endpoint_family(url, params or {}, self.api_url)
        try:
            response = await self._send(url, params, auth=True, retry=retry)
            _raise_for_status(response)
        except (Unavailable, BadResponse) as exc:
            if exc.status is not None:
                self.health.failed(family, exc.status)
            raise
        self.health.succeeded(family)
        return _parse_json(response)

    async def whoami(self, *, retry: RetryPolicy | None = None) -> str:
        """The username behind the token; the one request made at mount time."""
        body = await self.get_json("profiles/users/self/", retry=retry)
        try:
            username = body["user"]["username"]
        except (KeyError, TypeError):
            username = None
        if not isinstance(username, str):
            raise BadResponse("profiles/users/self/ answered without user.username")
        return username

    async def probe(self) -> None:
        """Whether the site answers, for the background probe of an outage (OutageLog.watch):
        one authenticated GET of `profiles/users/self/` (small, the one request every token
        may make). Any answer ends the outage, whatever its status (`retrying` notices)."""
        await self._send(self.api_url + "profiles/users/self/", None, auth=True, retry=PROBE_RETRY)

    async def check_alive(self) -> None:
        """Whether the site answers anything now, for the liveness check of a request that
        waits (OutageLog.watch): one GET of `profiles/users/self/` on a connection of its own,
        no retry, at most LIVENESS_TIMEOUT s. Any HTTP answer is an answer, whatever its
        status; none raises Unreachable. Not counted as a request of the mount's: it reads
        nothing for a user."""
        url = self.api_url + "profiles/users/self/"
        try:
            response = await self._check_http.get(url, headers=dict(self.token.headers))
        except httpx.TimeoutException as exc:
            raise Unreachable(f"GET {url}: timed out", timed_out=True) from exc
        except httpx.HTTPError as exc:
            raise Unreachable(f"GET {url}: {type(exc).__name__}") from exc
        log.debug("liveness check: GET %s -> %d", url, response.status_code)

    # -- listings --------------------------------------------------------------------------

    async def list_all(
        self, path: str, params: Params | None = None, *, retry: RetryPolicy | None = None
    ) -> list[dict[str, Any]]:
        """Every object of a list endpoint: the first page, then the rest concurrently.

        Uses `count` from the (small) first page to know how many pages follow, so a listing
        costs one short round trip plus ceil((count - 100) / 1000) requests in parallel. Objects are
        de-duplicated by pk: archive items have no ordering, so offset pages can overlap.
        """
        base = dict(params or {})
        first = await self._page(path, base, offset=0, limit=FIRST_PAGE_SIZE, retry=retry)
        total = first[0]
        pages: dict[int, list[dict[str, Any]]] = {0: first[1]}
        offsets = range(FIRST_PAGE_SIZE, total, PAGE_SIZE)
        if offsets:
            limiter = trio.CapacityLimiter(PAGE_CONCURRENCY)

            async def fetch(offset: int) -> None:
                async with limiter:
                    pages[offset] = (await self._page(path, base, offset=offset, retry=retry))[1]

            async with one_error(), trio.open_nursery() as nursery:
                for offset in offsets:
                    nursery.start_soon(fetch, offset)
        seen: set[object] = set()
        objects: list[dict[str, Any]] = []
        for offset in sorted(pages):
            for obj in pages[offset]:
                pk = obj.get("pk")
                key = pk if isinstance(pk, str) else id(obj)  # a broken pk may be a list
                if key not in seen:
                    seen.add(key)
                    objects.append(obj)
        log.debug(
            "listed %s %s: %d objects in %d pages",
            path,
            dict(base),
            len(objects),
            1 + len(offsets),
        )
        return objects

    async def first_page(
        self, path: str, params: Params | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """`count` and the first FIRST_PAGE_SIZE objects of a listing (listing.py streams the
        rest page by page into the metadata store)."""
        return await self._page(path, dict(params or {}), offset=0, limit=FIRST_PAGE_SIZE)

    async def page(
        self, path: str, params: Params | None, *, offset: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """`count` and the PAGE_SIZE objects of a listing from `offset`."""
        return await self._page(path, dict(params or {}), offset=offset)

    async def _page(
        self,
        path: str,
        params: dict[str, str | int],
        *,
        offset: int,
        limit: int = PAGE_SIZE,
        retry: RetryPolicy | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        query = {**params, "limit": limit, "offset": offset}
        body = await self.get_json(path, query, retry=retry)
        if not isinstance(body, dict):
            raise BadResponse(f"{path}: a list page is not a JSON object")
        count, results = body.get("count"), body.get("results")
        if not isinstance(count, int) or not isinstance(results, list):
            raise BadResponse(f"{path}: a list page lacks count or results")
        if not all(isinstance(obj, dict) for obj in results):
            raise BadResponse(f"{path}: a list page holds something other than objects")
        return count, results

    # -- existence oracles (gc-api.md §4) --------------------------------------------------

    async def filter_oracle(self, path: str, param: str, pk: str) -> Existence:
        """Tell a hidden pk from an absent one: the filter answers 400 for a pk that does not
        exist and 200 (with whatever we may see) for one that does."""
        response = await self._send(self.api_url + path, {param: pk, "limit": 1}, auth=True)
        if response.status_code == 400:
            return Existence.ABSENT
        _raise_for_status(response)
        return Existence.HIDDEN

    async def website_oracle(self, collection: str, slug: str) -> Existence:
        """Ask the public page `/<collection>/<slug>/` without a token, not following redirects.

        For algorithms and reader studies it answers 302 to the permission-request page when
        the object exists and we lack access, 404 when it does not exist, 200 when it is public.
        """
        url = f"{self.base_url}/{collection}/{slug}/"
        response = await self._send(url, None, auth=False)
        status = response.status_code
        if status == 404:
            return Existence.ABSENT
        if status in (301, 302, 303, 307, 308):
            location = response.headers.get("location", "")
            if "permission-requests" in location:
                return Existence.HIDDEN
            return Existence.UNKNOWN
        if status == 200:
            return Existence.VISIBLE
        if status >= 500:
            raise Unavailable(f"GET {url}: HTTP {status}", transient=False, status=status)
        return Existence.UNKNOWN


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 300:
        return
    where = f"GET {response.request.url.copy_with(query=None)}"
    if status == 404:
        raise NotFound(f"{where}: not found")
    if status == 401:
        raise PermissionDenied(f"{where}: the server rejected the API token ({_detail(response)})")
    if status == 403:
        raise PermissionDenied(f"{where}: forbidden ({_detail(response)})")
    if status >= 500:
        # 500 is the server's answer, not an accident: gcapi does not retry it either.
        raise Unavailable(f"{where}: HTTP {status}", transient=False, status=status)
    raise BadResponse(f"{where}: unexpected HTTP {status} ({_detail(response)})", status=status)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return "no JSON body"
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])[:200]
    return "no detail"


def _parse_json(response: httpx.Response) -> JSON:
    try:
        return response.json()
    except ValueError as exc:
        raise BadResponse(f"GET {response.request.url}: the body is not JSON") from exc


__all__ = ["Existence", "GcApiClient", "GcfsError"]
