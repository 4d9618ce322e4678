"""MetadataCache: TTL cache of API answers with single-flight fetching.

Concurrent callers asking for the same key share one fetch: `ls -l` of a fresh directory makes
the kernel send a readdir and many lookups at once, and all of them need the same listing.
The first caller (the leader) fetches; the others wait on its `trio.Event` and get the same
value or the same exception. Failures are not cached, so the next caller after a failure tries
again. There are no detached tasks: the leader fetches in its own task.

When a fetch fails with `Unavailable` (retries exhausted), the last good value of the key is
served instead, however old: an outage should not empty directories the user has seen.

A failure is remembered for `ERROR_TTL` seconds (the same error is raised again without a
request): a shell loop or a file manager stat-ing a directory that cannot be listed must not
send the failing request again on every call. Cancellation is not a failure and is not kept.

The cache is touched only from the trio thread, and `get_nowait`/`put` have no checkpoint, so
each of them is atomic with respect to other tasks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import trio
from cachetools import LRUCache, TTLCache

from .errors import GcfsError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Entries are whole listings or single objects. 20,000 of them covers a user walking through
# thousands of items; a listing of 10,000 items is one entry of a few MiB.
DEFAULT_MAXSIZE = 20_000
# How long a failed fetch is remembered. A few seconds: long enough that a loop over a broken
# directory (`while ! ls d; do ...`, a file manager polling) costs one request per 5 s instead of
# one per call, short enough that a blip is forgotten before a user retries by hand.
ERROR_TTL = 5.0


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    hits: int
    misses: int
    shared: int  # callers that waited for another caller's fetch instead of fetching
    stale: int  # answers served from the last good value because the server failed
    size: int
    remembered_errors: int = 0  # answers that raised a recent failure again, without a request


class Backing(Protocol):
    """Where answers outlive the daemon (fs._StoredAnswers over metastore.py)."""

    def load(self, key: Hashable) -> tuple[Any, float] | None:
        """The stored value of `key` and when it was fetched (wall clock), or None."""

    def save(self, key: Hashable, value: Any, fetched_at: float) -> None: ...

    def forget(self, key: Hashable) -> None:
        """No longer fresh (`gcfs refresh`); may stay as the last good value."""


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


class MetadataCache:
    """Values by key for `ttl` seconds, fetched once even when asked for concurrently."""

    def __init__(
        self,
        ttl: float,
        *,
        maxsize: int = DEFAULT_MAXSIZE,
        timer: Callable[[], float] = time.time,
        error_ttl: float = ERROR_TTL,
        backing: Backing | None = None,
    ) -> None:
        """`timer` is the wall clock by default: fetch times are compared with those kept in
        `backing` by an earlier daemon."""
        self._entries: TTLCache[Hashable, Any] = TTLCache(maxsize=maxsize, ttl=ttl, timer=timer)
        self._errors: TTLCache[Hashable, GcfsError] = TTLCache(
            maxsize=maxsize, ttl=min(error_ttl, ttl), timer=timer
        )
        # The last good value of each key, expired or not: served when the server fails
        # (stale-if-error), so a mount keeps showing what it has seen during an outage.
        # It holds references to the same objects, so it costs little beyond the TTL cache.
        self._last_good: LRUCache[Hashable, Any] = LRUCache(maxsize=maxsize)
        # When each key's value was fetched (the timer's clock): how old the answers are that
        # a node was built from (GcFilesystem.is_vouched_for).
        self._fetched_at: LRUCache[Hashable, float] = LRUCache(maxsize=maxsize)
        self._timer = timer
        self._ttl = ttl
        self._backing = backing
        self.loaded = 0  # answers served from the backing store without a request
        self._flights: dict[Hashable, _Flight[Any]] = {}
        self._hits = self._misses = self._shared = self._stale = self._remembered = 0

    def get_nowait(self, key: Hashable) -> Any | None:
        """The cached value, or None. Sync on purpose: no checkpoint, so atomic."""
        return self._entries.get(key)

    def fetched_at(self, key: Hashable) -> float | None:
        """When the value of `key` was last fetched (the timer's clock), or None."""
        return self._fetched_at.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        self._entries[key] = value

    def expire(self, key: Hashable) -> None:
        """No longer fresh (a listing that failed half way); the last good value stays."""
        self._entries.pop(key, None)

    def forget(self, key: Hashable) -> None:
        if self._backing is not None:
            self._backing.forget(key)
        self._entries.pop(key, None)
        self._last_good.pop(key, None)
        self._errors.pop(key, None)
        self._fetched_at.pop(key, None)

    def forget_matching(self, predicate: Callable[[Hashable], bool]) -> int:
        """Forget every key for which `predicate` is true; how many there were."""
        everything = (*self._entries.keys(), *self._last_good.keys(), *self._errors.keys())
        keys = {k for k in everything if predicate(k)}
        for key in keys:
            self.forget(key)
        return len(keys)

    def clear(self) -> None:
        self._entries.clear()
        self._last_good.clear()
        self._errors.clear()
        self._fetched_at.clear()

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        """The value for `key`, from the cache or from one shared call of `fetch()`."""
        cached = self._entries.get(key)
        if cached is not None:
            fetched = self._fetched_at.get(key)
            # A value loaded from the store expires by its fetch time, not by when it was
            # loaded (TTLCache counts from insertion).
            if fetched is None or self._timer() - fetched < self._ttl:
                self._hits += 1
                return cached  # type: ignore[no-any-return]
            self._entries.pop(key, None)
        stored = self._load_fresh(key)
        if stored is not None:
            self._hits += 1
            return stored  # type: ignore[no-any-return]
        error = self._errors.get(key)
        if error is not None:
            stale = self._last_good_of(key) if isinstance(error, Unavailable) else None
            if stale is not None:
                self._stale += 1
                return stale  # type: ignore[no-any-return]
            self._remembered += 1
            raise error.with_traceback(None)
        flight = self._flights.get(key)
        if flight is not None:
            self._shared += 1
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value  # type: ignore[return-value]
        self._misses += 1
        flight = _Flight()
        self._flights[key] = flight
        stale_value: Any = None
        try:
            try:
                value = await fetch()
            except Unavailable as exc:
                stale_value = self._last_good_of(key)
                if stale_value is None:
                    raise
                self._stale += 1
                log.debug("%r: serving the last good value (%s)", key, exc)
                value = stale_value
        except BaseException as exc:
            # Followers see the leader's error; Cancelled (the leader's own deadline) becomes
            # a plain error for them rather than a cancellation they did not ask for.
            flight.error = exc if isinstance(exc, Exception) else _LeaderCancelled(key)
            if isinstance(exc, GcfsError):
                self._errors[key] = exc
            raise
        else:
            flight.value = value
            if value is not None and value is not stale_value:
                self._entries[key] = value
                self._last_good[key] = value
                self._fetched_at[key] = fetched_at = self._timer()
                if self._backing is not None:
                    self._backing.save(key, value, fetched_at)
            elif value is not None:
                self._entries[key] = value
            return value
        finally:
            del self._flights[key]
            flight.done.set()

    def _load_fresh(self, key: Hashable) -> Any:
        """A value the backing store holds that is younger than the TTL (an earlier daemon
        fetched it): served with no request, and kept in memory for the rest of its TTL."""
        if self._backing is None:
            return None
        found = self._backing.load(key)
        if found is None:
            return None
        value, fetched_at = found
        self._last_good[key] = value
        self._fetched_at[key] = fetched_at
        if self._timer() - fetched_at >= self._ttl:
            return None  # the last good value, not an answer
        self._entries[key] = value
        self.loaded += 1
        return value

    def _last_good_of(self, key: Hashable) -> Any:
        """The last good value of `key`, however old: memory, else the backing store."""
        value = self._last_good.get(key)
        if value is None and self._backing is not None:
            found = self._backing.load(key)
            if found is not None:
                value = found[0]
        return value

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            self._hits,
            self._misses,
            self._shared,
            self._stale,
            len(self._entries),
            self._remembered,
        )


class _LeaderCancelled(Unavailable):
    def __init__(self, key: Hashable) -> None:
        super().__init__(f"the shared fetch of {key!r} was cancelled")
