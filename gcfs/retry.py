"""When and how long to retry a GET, and logging an outage once rather than per request.

Policy (gcapi's, gc-api.md §5): connection errors, timeouts, 429, 502, 503 and 504 are
transient and retried with exponential backoff and full jitter; `Retry-After` (seconds or an
HTTP-date) is honoured; 500 and every 4xx are answers, not accidents, and are not retried. All
retrying of one request ends within `budget` seconds, which the daemon sets below the FUSE
operation's deadline, so a caller always gets an errno (or cached data) in time.

An origin that stops answering is down (`OutageLog`): said once in the log, requests to it
fail at once instead of each spending the budget, and (with a watcher) one background probe
notices when it is back. On the site, "down" means no answer at all (connections refused or
reset, timeouts) or 502/503/504 after the retries; a 500 or a 429 is an answer.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from .background import report_bug
from .errors import GcfsError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 502, 503, 504})


def is_transient_status(status: int) -> bool:
    return status in RETRY_STATUSES


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    # gcapi's backoff factor; the first retry comes after up to 0.1 s, the fifth up to 1.6 s.
    base_delay: float = 0.1
    # No single wait longer than this, unless the server asks for it with Retry-After.
    max_delay: float = 8.0
    # All attempts of one request end within this many seconds (daemon: 3/4 of the deadline).
    budget: float = 45.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full jitter (uniform in [0, base * 2**attempt]): concurrent readers that failed
        together do not come back together."""
        backoff = rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
        return max(backoff, retry_after or 0.0)


class Unreachable(Unavailable):
    """No answer at all from the origin: the connection failed (refused, reset, DNS) or,
    with `timed_out`, an attempt ran out of time. Retrying will not fix either soon, so an
    origin with `OutageLog(fail_fast=True)` is marked down by it (see `retrying`)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


# After a request gave up on an origin, others do not wait on it for this long: they fail at
# once (and are served what is cached). Then one request may try again, for at most
# OUTAGE_PROBE_BUDGET. Without it, each step of a path lookup would wait a whole retry budget
# and `ls ~/gc/archives/x/items` would take several deadlines while the server is silent.
# (An origin with a watcher, `OutageLog.watch`, is instead probed by one background task.)
OUTAGE_HOLD_OFF = 2.0
OUTAGE_PROBE_BUDGET = 1.0
# Connection refused or reset for this long within one request, on a fail-fast origin: the
# origin is down. Backoff (0.1 s doubling, full jitter) fits ~5 attempts in it, enough to ride
# out a load balancer swapping a backend; a refused port answers in under a millisecond, so
# spending the 45 s retry budget on it would only make every caller wait.
CONFIRM_DOWN = 1.5
# The background probe of a down origin: first after 1 s (a restart of the server takes
# seconds), then 2, 4, 8, 16, 30, 30 ... s, so a long outage costs one request per 30 s.
PROBE_FIRST_DELAY = 1.0
PROBE_MAX_DELAY = 30.0
# One probe may take this long (all its attempts): a server that answers in 10 s is slow but
# back, and the probe waits on nobody.
PROBE_BUDGET = 10.0

# Telling a silent origin from a slow one before a request's own timeout (30 s by default):
# once an attempt has waited STALL_AFTER seconds and the origin has answered nothing at all
# since it began, one liveness check (`watch(check=...)`: the smallest request, on a
# connection of its own) gets LIVENESS_TIMEOUT seconds. Any answer: the origin is slow on
# that request, which keeps its budget. None: the origin is down, and every attempt waiting on
# it ends at once (a black-holed server: a path never seen gets EIO after ~7 s, not 30; one
# seen is served from the cache after STALE_GRACE all along). 5 s is ~20x what the real
# site takes for `profiles/users/self/`; a server slower than that on its cheapest request,
# while answering nothing else, is not serving. A check repeats only after another
# STALL_AFTER of silence.
STALL_AFTER = 2.0
LIVENESS_TIMEOUT = 5.0

# Set in the probe task of an origin: the only task whose requests go out while it is down.
_PROBING: contextvars.ContextVar[OutageLog | None] = contextvars.ContextVar(
    "gcfs_probing", default=None
)


class OutageLog:
    """An origin's health: says once that it is down, and once that it is back (and after how
    long).

    A failed attempt that a retry then fixes is a blip, not an outage; an outage starts when a
    request gives up, and ends at the next answer (any status: a 500 is an answer).

    `fail_fast` (the site): an attempt that timed out, or connections refused for
    CONFIRM_DOWN seconds, end the request at once and mark the origin down, and a request that
    gave up after 429s does not (the server answers; it asks us to slow down). Without a
    watcher, requests during an outage fail at once for OUTAGE_HOLD_OFF seconds, then one
    probes with a short budget. With one (`watch`, the daemon's nursery), every request fails
    at once while the origin is down and one background task probes with backoff.
    """

    def __init__(self, origin: str, *, fail_fast: bool = False) -> None:
        self.origin = origin
        self.fail_fast = fail_fast
        # Wall-clock time (epoch seconds) the outage started, for `gcfs status` and the root
        # README; None while the origin answers.
        self.down_since: float | None = None
        self._down_at = 0.0  # the same moment on trio's clock, for the duration
        self.gave_up_at = 0.0
        self.failures = 0
        self.outages = 0  # how many times the origin went down
        self.recoveries = 0  # how many times it came back (caches forget their errors)
        self.last_outage: float | None = None  # seconds the previous outage lasted
        self.probes = 0
        self.last_answer_at = -math.inf  # trio's clock: the last answer of the origin
        self.liveness_checks = 0
        self._nursery: trio.Nursery | None = None
        self._probe: Callable[[], Awaitable[object]] | None = None
        self._probing = False
        # Attempts waiting on the origin (their cancel scopes, when each began), for the
        # liveness check; as many as run at once (the client's connection limit and those
        # queued for it), each removed when it ends.
        self._check: Callable[[], Awaitable[object]] | None = None
        self._waiting: dict[trio.CancelScope, float] = {}
        self._waiting_changed = trio.Event()

    def is_down(self) -> bool:
        return self.down_since is not None

    @property
    def watched(self) -> bool:
        """A background probe notices the end of an outage (`watch`)."""
        return self._probe is not None

    def watch(
        self,
        nursery: trio.Nursery,
        probe: Callable[[], Awaitable[object]],
        *,
        check: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """From now on, while the origin is down no request goes out but `probe()`, called by
        one task in `nursery` with backoff until the origin answers. `probe` must send its
        request through `retrying` with this OutageLog (that is how an answer is noticed).
        With `check` (one request, not through `retrying`, raising GcfsError if it gets no
        answer), a task in `nursery` tells a silent origin from a slow one (STALL_AFTER)."""
        self._nursery = nursery
        self._probe = probe
        if check is not None and self._check is None:
            self._check = check
            nursery.start_soon(self._watch_for_silence)
        if self.is_down():
            self._start_probe()

    @contextlib.contextmanager
    def attempt(self) -> Iterator[trio.CancelScope]:
        """Around one attempt: while it waits, the liveness check may find the origin silent
        and end it (the scope's `cancelled_caught`: the caller raises Unreachable)."""
        scope = trio.CancelScope()
        if self._check is None:
            with scope:
                yield scope
            return
        self._waiting[scope] = trio.current_time()
        self._wake()
        try:
            with scope:
                yield scope
        finally:
            del self._waiting[scope]

    def _wake(self) -> None:
        self._waiting_changed.set()
        self._waiting_changed = trio.Event()

    def _silence(self) -> float | None:
        """Seconds the oldest waiting attempt has waited with no answer from the origin since
        (None: nothing waits, or the origin is known down already)."""
        if self.is_down() or not self._waiting:
            return None
        since = max(min(self._waiting.values()), self.last_answer_at)
        return trio.current_time() - since

    async def _watch_for_silence(self) -> None:
        """The one task that runs liveness checks. Raises nothing: it runs in the daemon's
        nursery, where an exception would end the mount."""
        while True:
            try:
                silence = self._silence()
                if silence is None or silence < STALL_AFTER:
                    wait = math.inf if silence is None else STALL_AFTER - silence
                    with trio.move_on_after(wait):
                        await self._waiting_changed.wait()
                    continue
                await self._check_liveness(silence)
            except Exception as exc:
                report_bug("the liveness check of the server", exc)
                await trio.sleep(STALL_AFTER)

    async def _check_liveness(self, silence: float) -> None:
        assert self._check is not None
        self.liveness_checks += 1
        began = trio.current_time()
        try:
            with trio.fail_after(LIVENESS_TIMEOUT):
                await self._check()
        except (GcfsError, trio.TooSlowError) as exc:
            if self.last_answer_at >= began or self.is_down():
                return  # something else answered meanwhile, or another request found out
            reason = "no answer" if isinstance(exc, trio.TooSlowError) else str(exc)
            waited = trio.current_time() - began
            self.gave_up(
                Unreachable(
                    f"no answer for {silence + waited:.1f} s, nor to a check ({reason})",
                    timed_out=True,
                )
            )
            for scope in list(self._waiting):
                scope.cancel()
            return
        log.debug(
            "%s: slow, not silent: a check answered after %.0f s of silence", self.origin, silence
        )
        self.last_answer_at = max(self.last_answer_at, trio.current_time())

    def failed(self, error: Exception) -> None:
        self.failures += 1

    def gave_up(self, error: Exception) -> None:
        if self.fail_fast and isinstance(error, Unavailable) and error.status == 429:
            log.debug("%s: %s (rate limited, not down)", self.origin, error)
            return
        self.gave_up_at = trio.current_time()
        if self.down_since is None:
            self.down_since = time.time()
            self._down_at = self.gave_up_at
            self.outages += 1
            log.warning(
                "%s is down (%s); serving what was seen, EIO for the rest", self.origin, error
            )
            self._start_probe()

    def hold_off(self) -> bool:
        """True while requests should not even try: the origin is down and this is not its
        probe (with a watcher), or it gave up less than OUTAGE_HOLD_OFF s ago (without)."""
        if self.down_since is None:
            return False
        if self.watched:
            return _PROBING.get() is not self
        return trio.current_time() - self.gave_up_at < OUTAGE_HOLD_OFF

    def succeeded(self) -> None:
        self.last_answer_at = trio.current_time()
        if self.down_since is not None:
            self.last_outage = trio.current_time() - self._down_at
            log.warning(
                "%s is back after %.1f s (down since %s)",
                self.origin,
                self.last_outage,
                _utc(self.down_since),
            )
            self.down_since = None
            self.recoveries += 1
        self.failures = 0

    def snapshot(self) -> dict[str, Any]:
        """For `gcfs status`: down (bool), down_since (epoch seconds, None), outages,
        last_outage_seconds, probes, liveness_checks."""
        return {
            "down": self.is_down(),
            "down_since": None if self.down_since is None else round(self.down_since, 1),
            "outages": self.outages,
            "last_outage_seconds": None if self.last_outage is None else round(self.last_outage, 1),
            "probes": self.probes,
            "liveness_checks": self.liveness_checks,
        }

    def _start_probe(self) -> None:
        if self._nursery is None or self._probing:
            return
        self._probing = True
        self._nursery.start_soon(self._probe_until_back)

    async def _probe_until_back(self) -> None:
        """The one task that asks a down origin, with backoff, until it answers. Raises
        nothing: it runs in the daemon's nursery, where an exception would end the mount."""
        _PROBING.set(self)  # this task's context only: its requests go out
        delay = PROBE_FIRST_DELAY
        try:
            while self.down_since is not None and self._probe is not None:
                await trio.sleep(delay)
                delay = min(delay * 2, PROBE_MAX_DELAY)
                self.probes += 1
                try:
                    # retrying bounds it too; this covers a probe that is not one request.
                    with trio.move_on_after(PROBE_BUDGET * 2):
                        await self._probe()
                except GcfsError as exc:
                    log.debug("%s: probe %d: %s", self.origin, self.probes, exc)
                except Exception as exc:
                    report_bug("the probe of a down server", exc)
        finally:
            self._probing = False


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    what: str,
    outage: OutageLog | None = None,
    rng: random.Random | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """`await attempt()`, again after transient failures (`Unavailable` with `transient`),
    until it succeeds or the policy's budget is spent. The budget also bounds a single
    attempt that hangs (a black-holed server). During an outage, requests fail at once (see
    OutageLog); on a fail-fast origin a timed-out attempt or CONFIRM_DOWN s of refused
    connections end the request and mark the origin down."""
    rng = rng or random.Random()
    budget = policy.budget
    if outage is not None and outage.is_down():
        if outage.hold_off():
            raise Unavailable(f"{what}: {outage.origin} is down; not asking again yet")
        if not outage.watched:
            budget = min(budget, OUTAGE_PROBE_BUDGET)
    fail_fast = outage is not None and outage.fail_fast
    last: Unavailable | None = None
    refused_since: float | None = None
    down = False
    start = trio.current_time()
    with trio.move_on_after(budget) as scope:
        for number in range(1_000):
            began = trio.current_time()
            try:
                if outage is None:
                    result = await attempt()
                else:
                    with outage.attempt() as watched:
                        result = await attempt()
                    if watched.cancelled_caught:
                        raise Unreachable(
                            f"{what}: no answer, and {outage.origin} answers nothing",
                            timed_out=True,
                        )
            except Unavailable as exc:
                if outage is not None:
                    outage.failed(exc)
                if not exc.transient:
                    raise
                last = exc
                if fail_fast and outage is not None and isinstance(exc, Unreachable):
                    # Down only if nothing answered meanwhile: a server that answers other
                    # requests is slow or flaky on this one, and that is worth the budget.
                    if refused_since is None or outage.last_answer_at >= refused_since:
                        refused_since = began
                    silent = outage.last_answer_at < began
                    waited = trio.current_time() - refused_since
                    if silent and (exc.timed_out or waited >= CONFIRM_DOWN):
                        down = True
                        break
                else:
                    refused_since = None
                delay = policy.delay(number, exc.retry_after, rng)
                log.debug("%s: %s; retry %d in %.2f s", what, exc, number + 1, delay)
                if on_retry is not None:
                    on_retry()
                await trio.sleep(delay)
                if outage is not None and outage.hold_off():
                    # Another request found the origin down meanwhile.
                    raise Unavailable(f"{what}: {outage.origin} is down ({exc})") from exc
            else:
                if outage is not None:
                    outage.succeeded()
                return result
    reason = f"{last}" if last is not None else "no answer"
    status = last.status if last is not None else None
    took = trio.current_time() - start
    error = Unavailable(f"{what}: gave up after {took:.3g} s ({reason})", status=status)
    if outage is not None:
        outage.gave_up(error)
    if scope.cancelled_caught or down:
        raise error from last
    raise Unavailable(f"{what}: too many retries", status=status) from last
