"""MetadataCache: TTL cache of API answers with single-flight fetching.

Concurrent callers asking for the same key share one fetch: `ls -l` of a fresh directory makes
the kernel send a readdir and many lookups at once, and all of them need the same listing.
The first caller (the leader) fetches; the others wait on its `trio.Event` and get the same
value or the same exception. Failures are not cached, so the next caller after a failure tries
again. A key never fetched is fetched by the leader in its own task.

When a fetch fails with `Unavailable` (retries exhausted), the last good value of the key is
served instead, however old: an outage should not empty directories the user has seen.

With a nursery attached (`attach`, the daemon), an expired key that has a last good value is
refreshed by a task in that nursery: its callers wait at most STALE_GRACE, then get the stale
value while the refresh finishes in the background (and later callers share it). A slow
server thus costs a second once (for SLOW_MEMORY, stale values are served at once while they
refresh), not a deadline per directory; a silent one likewise, and while the
server is known to be down (`origin.is_down()`) nothing waits at all: the last good value, or
a fetch that fails at once (EIO) where it needs the server (retry.retrying asks nothing).

A failure is remembered for `ERROR_TTL` seconds (the same error is raised again without a
request): a shell loop or a file manager stat-ing a directory that cannot be listed must not
send the failing request again on every call. Cancellation is not a failure and is not kept.

The cache is touched only from the trio thread, and `get_nowait`/`put` have no checkpoint, so
each of them is atomic with respect to other tasks.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import trio
from cachetools import LRUCache, TTLCache

from .background import report_bug
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
    refused_while_down: int = 0  # fetches of never-fetched keys that failed while down


# How long a caller that has a stale value waits for its refresh before it is served the stale
# value (the refresh goes on in the background, when a nursery is attached). The bar
# is 2 s for a whole operation on a seen directory while the server is silent; a lookup walks
# several directories, but only the first waits (then the server is `stuck`, below), and the
# kernel round trips take milliseconds. A working server answers a listing in 0.1-0.5 s.
STALE_GRACE = 1.0
# After a refresh outlasted the grace, the server is slow (loaded, a slow link) or silent: for
# this long, callers with a stale value get it at once and the refresh runs in the background,
# so a path of several expired directories waits for the grace once, not once per level.
SLOW_MEMORY = 10.0
# Refreshes running in the background at once. A directory walk over expired entries refreshes
# this many at a time; beyond it, callers wait for their fetch as without a nursery (or, when
# the server seems stuck, get the stale value without a refresh). Each holds a flight (a few
# hundred bytes) and at most one request at a time per directory level.
MAX_BACKGROUND_REFRESHES = 64

# Set in a background refresh: its inner fetches wait for fresh values rather than use the
# grace, so a directory is not rebuilt from stale parts and then kept as fresh for the TTL.
_IN_REFRESH: contextvars.ContextVar[bool] = contextvars.ContextVar("gcfs_in_refresh", default=False)


class Origin(Protocol):
    """What the cache needs to know about the server (retry.OutageLog)."""

    recoveries: int

    def is_down(self) -> bool: ...


class Backing(Protocol):
    """Where answers outlive the daemon (fs._StoredAnswers over metastore.py)."""

    def load(self, key: Hashable) -> tuple[Any, float] | None:
        """The stored value of `key` and when it was fetched (wall clock), or None."""

    def save(self, key: Hashable, value: Any, fetched_at: float) -> None: ...

    def forget(self, key: Hashable) -> None:
        """No longer fresh (`gcfs refresh`); may stay as the last good value."""


class _Flight(Generic[T]):
    __slots__ = ("background", "done", "error", "started", "value")

    def __init__(self, *, background: bool = False) -> None:
        self.done = trio.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.started = trio.current_time()  # trio's clock: grace deadlines, not ages
        self.background = background


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
        self._refused = 0
        # attach(): where refreshes continue after STALE_GRACE, their deadline, the server.
        self._nursery: trio.Nursery | None = None
        self._deadline = 0.0
        self._origin: Origin | None = None
        self._recoveries = 0
        self._background = 0
        # Until when (trio's clock) the server counts as slow: a caller's grace ran out
        # before its refresh ended (SLOW_MEMORY).
        self._slow_until = -math.inf

    def attach(
        self, nursery: trio.Nursery, *, deadline: float, origin: Origin | None = None
    ) -> None:
        """Let refreshes of expired keys go on in `nursery` after STALE_GRACE (each within
        `deadline` seconds), and answer from the last good values at once while `origin` is
        down. Without it (unit tests, before mounting) a caller waits for its fetch."""
        self._nursery = nursery
        self._deadline = deadline
        self._origin = origin
        self._recoveries = origin.recoveries if origin is not None else 0

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

    def _last_good_of(self, key: Hashable) -> tuple[Any, float] | None:
        """The last good value of `key`, however old, and when it was fetched (the timer's
        clock); None if there is none. The one place that knows where last good values live."""
        value = self._last_good.get(key)
        if value is None:
            found = self._backing.load(key) if self._backing is not None else None
            return found  # from the store: an earlier daemon's, or pushed out of memory
        return value, self._fetched_at.get(key, 0.0)

    def _down(self) -> bool:
        """Whether the server is down now; after it came back, forget the failures that the
        outage caused (remembered for ERROR_TTL), so what was unseen is asked at once."""
        origin = self._origin
        if origin is None:
            return False
        if origin.recoveries != self._recoveries:
            self._recoveries = origin.recoveries
            self._slow_until = -math.inf
            for key, error in list(self._errors.items()):
                if isinstance(error, Unavailable):
                    self._errors.pop(key, None)
        return origin.is_down()

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        """The value for `key`, from the cache or from one shared call of `fetch()`.

        While the server is down (attach's `origin`): the last good value at once, however
        old; a key never fetched is fetched, which fails at once where it needs the server
        (retrying asks nothing while it is down) and works where it does not (a directory
        built from an object fetched before). An expired key with a last good value waits at most
        STALE_GRACE for its refresh, which goes on in the background (attach)."""
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
        last = self._last_good_of(key)
        down = self._down()
        if down and last is not None:
            self._stale += 1
            return last[0]  # type: ignore[no-any-return]
        error = self._errors.get(key)
        if error is not None:
            if isinstance(error, Unavailable) and last is not None:
                self._stale += 1
                return last[0]  # type: ignore[no-any-return]
            self._remembered += 1
            raise error.with_traceback(None)
        flight = self._flights.get(key)
        if flight is not None:
            if down:
                # A fetch that began before the outage may hang until its own timeout.
                self._refused += 1
                raise Unavailable(f"{key!r}: the server is down, and this was never fetched")
            self._shared += 1
            return await self._wait(flight, last)  # type: ignore[no-any-return]
        self._misses += 1
        if last is not None and self._nursery is not None and not _IN_REFRESH.get():
            if self._background < MAX_BACKGROUND_REFRESHES:
                flight = _Flight(background=True)
                self._flights[key] = flight
                self._background += 1
                self._nursery.start_soon(self._refresh, key, fetch, flight)
                return await self._wait(flight, last)  # type: ignore[no-any-return]
            if self._slow():
                self._stale += 1  # no refresh: it would queue behind the slow ones
                return last[0]  # type: ignore[no-any-return]
        return await self._lead(key, fetch)

    def _slow(self) -> bool:
        return trio.current_time() < self._slow_until

    async def _wait(self, flight: _Flight[Any], last: tuple[Any, float] | None) -> Any:
        """The flight's answer; with a stale value and a nursery (not in a refresh), at most
        until STALE_GRACE after the flight started, then the stale value."""
        if last is None or self._nursery is None or _IN_REFRESH.get():
            await flight.done.wait()
        elif not self._slow():
            with trio.move_on_at(flight.started + STALE_GRACE):
                await flight.done.wait()
            if not flight.done.is_set():
                self._slow_until = trio.current_time() + SLOW_MEMORY
                log.debug("no answer within %g s; serving the last good value", STALE_GRACE)
        if not flight.done.is_set():
            assert last is not None
            self._stale += 1
            return last[0]
        if flight.error is not None:
            raise flight.error
        return flight.value

    async def _lead(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        """Fetch in this task, sharing the flight; on Unavailable, the last good value."""
        flight: _Flight[T] = _Flight()
        self._flights[key] = flight
        stale_value: Any = None
        try:
            try:
                value = await fetch()
            except Unavailable as exc:
                last = self._last_good_of(key)
                if last is None:
                    raise
                stale_value = last[0]
                self._stale += 1
                log.debug("%r: serving the last good value (%s)", key, exc)
                value = stale_value
        except BaseException as exc:
            if isinstance(exc, Unavailable) and self._origin is not None:
                self._refused += self._origin.is_down()
            # Followers see the leader's error; Cancelled (the leader's own deadline) becomes
            # a plain error for them rather than a cancellation they did not ask for.
            flight.error = exc if isinstance(exc, Exception) else _LeaderCancelled(key)
            if isinstance(exc, GcfsError):
                self._errors[key] = exc
            raise
        else:
            flight.value = value
            self._keep(key, value, fresh=value is not stale_value)
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

    def _keep(self, key: Hashable, value: Any, *, fresh: bool) -> None:
        if value is None:
            return
        # A failed refresh keeps serving the stale value for the TTL: one request per TTL
        # while the server fails, not one per call.
        self._entries[key] = value
        if fresh:
            self._last_good[key] = value
            self._fetched_at[key] = fetched_at = self._timer()
            if self._backing is not None:
                self._backing.save(key, value, fetched_at)

    async def _refresh(
        self, key: Hashable, fetch: Callable[[], Awaitable[Any]], flight: _Flight[Any]
    ) -> None:
        """A refresh in the attached nursery: ends within the deadline, raises nothing but
        the nursery's own cancellation (unmount), and hands its waiters the value, the stale
        value (Unavailable) or the error."""
        _IN_REFRESH.set(True)  # this task's context only
        try:
            with trio.move_on_after(self._deadline) as scope:
                value = await fetch()
            if scope.cancelled_caught:
                raise Unavailable(f"refreshing {key!r} took longer than {self._deadline:g} s")
        except Unavailable as exc:
            last = self._last_good_of(key)
            log.debug("%r: refresh failed (%s); keeping the last good value", key, exc)
            if last is None:
                flight.error = exc
                self._errors[key] = exc
            else:
                flight.value = last[0]
                self._keep(key, last[0], fresh=False)
        except GcfsError as exc:
            log.debug("%r: refresh failed: %s", key, exc)
            flight.error = exc
            self._errors[key] = exc
        except Exception as exc:
            flight.error = report_bug("a background metadata refresh", exc)
        except BaseException:
            flight.error = _LeaderCancelled(key)
            raise  # the nursery's cancellation (unmount): not ours to swallow
        else:
            flight.value = value
            self._keep(key, value, fresh=True)
        finally:
            del self._flights[key]
            self._background -= 1
            flight.done.set()

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            self._hits,
            self._misses,
            self._shared,
            self._stale,
            len(self._entries),
            self._remembered,
            self._refused,
        )


class _LeaderCancelled(Unavailable):
    def __init__(self, key: Hashable) -> None:
        super().__init__(f"the shared fetch of {key!r} was cancelled")
