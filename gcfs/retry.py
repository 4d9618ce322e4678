"""When and how long to retry a GET, and logging an outage once rather than per request.

Policy (gcapi's, gc-api.md §5): connection errors, timeouts, 429, 502, 503 and 504 are
transient and retried with exponential backoff and full jitter; `Retry-After` (seconds or an
HTTP-date) is honoured; 500 and every 4xx are answers, not accidents, and are not retried. All
retrying of one request ends within `budget` seconds, which the daemon sets below the FUSE
operation's deadline, so a caller always gets an errno (or cached data) in time.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from .errors import Unavailable

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


# After a request gave up on an origin, others do not wait on it for this long: they fail at
# once (and are served what is cached). Then one request may try again, for at most
# OUTAGE_PROBE_BUDGET. Without it, each step of a path lookup would wait a whole retry budget
# and `ls ~/gc/archives/x/items` would take several deadlines while the server is silent.
OUTAGE_HOLD_OFF = 2.0
OUTAGE_PROBE_BUDGET = 1.0


class OutageLog:
    """An origin's health: says once that it stopped answering, and once that it is back.

    A failed attempt that a retry then fixes is a blip, not an outage; an outage starts when a
    request gives up, and ends at the next success.
    """

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.down_since: float | None = None
        self.gave_up_at = 0.0
        self.failures = 0

    def failed(self, error: Exception) -> None:
        self.failures += 1

    def gave_up(self, error: Exception) -> None:
        self.gave_up_at = trio.current_time()
        if self.down_since is None:
            self.down_since = self.gave_up_at
            log.warning("%s is failing (%s); serving what is cached", self.origin, error)

    def hold_off(self) -> bool:
        """True while requests should not even try (an outage, recently confirmed)."""
        return (
            self.down_since is not None and trio.current_time() - self.gave_up_at < OUTAGE_HOLD_OFF
        )

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.warning(
                "%s answers again after %.1f s",
                self.origin,
                trio.current_time() - self.down_since,
            )
            self.down_since = None
        self.failures = 0


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
    attempt that hangs (a black-holed server). During an outage, requests fail at once for
    OUTAGE_HOLD_OFF seconds, then probe with a short budget."""
    rng = rng or random.Random()
    budget = policy.budget
    if outage is not None and outage.down_since is not None:
        if outage.hold_off():
            raise Unavailable(f"{what}: {outage.origin} is failing; not asking again yet")
        budget = min(budget, OUTAGE_PROBE_BUDGET)
    last: Unavailable | None = None
    with trio.move_on_after(budget) as scope:
        for number in range(1_000):
            try:
                result = await attempt()
            except Unavailable as exc:
                if outage is not None:
                    outage.failed(exc)
                if not exc.transient:
                    raise
                last = exc
                delay = policy.delay(number, exc.retry_after, rng)
                log.debug("%s: %s; retry %d in %.2f s", what, exc, number + 1, delay)
                if on_retry is not None:
                    on_retry()
                await trio.sleep(delay)
            else:
                if outage is not None:
                    outage.succeeded()
                return result
    reason = f"{last}" if last is not None else "no answer"
    status = last.status if last is not None else None
    error = Unavailable(f"{what}: gave up after {budget:g} s ({reason})", status=status)
    if outage is not None:
        outage.gave_up(error)
    if scope.cancelled_caught:
        raise error from last
    raise Unavailable(f"{what}: too many retries", status=status) from last
