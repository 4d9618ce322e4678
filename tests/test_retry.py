"""The retry policy: what is retried, Retry-After, backoff bounds, budgets, outages."""

from __future__ import annotations

import email.utils
import random

import pytest
import trio
import trio.testing

from gcfs.errors import Unavailable
from gcfs.retry import (
    OUTAGE_HOLD_OFF,
    OutageLog,
    RetryPolicy,
    is_transient_status,
    parse_retry_after,
    retrying,
)


@pytest.mark.parametrize(
    ("status", "transient"),
    [(429, True), (502, True), (503, True), (504, True), (500, False), (404, False), (401, False)],
)
def test_which_statuses_are_retried(status: int, transient: bool) -> None:
    """gcapi's policy: 429/502/503/504 are retried; 500 and 4xx are answers."""
    assert is_transient_status(status) is transient


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    when = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(when, now=1_000_000) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(10, usegmt=True), now=1_000) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_backoff_is_jittered_and_bounded() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=8.0)
    rng = random.Random(1)
    for attempt in range(12):
        delay = policy.delay(attempt, None, rng)
        assert 0 <= delay <= min(8.0, 0.1 * 2**attempt)
    assert policy.delay(0, 5.0, rng) >= 5.0  # Retry-After wins over a shorter backoff


async def test_retries_until_success(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise Unavailable("503")
        return "ok"

    assert await retrying(flaky, policy=RetryPolicy(), what="t") == "ok"
    assert calls == 4


async def test_non_transient_failures_are_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def broken() -> str:
        nonlocal calls
        calls += 1
        raise Unavailable("500", transient=False)

    with pytest.raises(Unavailable):
        await retrying(broken, policy=RetryPolicy(), what="t")
    assert calls == 1


async def test_budget_bounds_a_hanging_server(autojump_clock: trio.testing.MockClock) -> None:
    """A black hole: the attempt never returns; the budget ends it with Unavailable."""

    async def hang() -> str:
        await trio.sleep_forever()
        raise AssertionError

    start = trio.current_time()
    with pytest.raises(Unavailable, match="gave up after 3 s"):
        await retrying(hang, policy=RetryPolicy(budget=3), what="t")
    assert trio.current_time() - start == pytest.approx(3)


async def test_outage_holds_off_then_probes(autojump_clock: trio.testing.MockClock) -> None:
    """After a request gave up, others fail at once for a while, then one probes."""
    outage = OutageLog("site")
    policy = RetryPolicy(budget=3)

    async def hang() -> str:
        await trio.sleep_forever()
        raise AssertionError

    with pytest.raises(Unavailable):
        await retrying(hang, policy=policy, what="t", outage=outage)
    start = trio.current_time()
    with pytest.raises(Unavailable, match="not asking again yet"):
        await retrying(hang, policy=policy, what="t", outage=outage)
    assert trio.current_time() == start  # no waiting at all
    await trio.sleep(OUTAGE_HOLD_OFF)

    async def fine() -> str:
        return "back"

    assert await retrying(fine, policy=policy, what="t", outage=outage) == "back"
    assert outage.down_since is None
