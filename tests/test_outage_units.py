"""Issue 15 in the small: when the site counts as down, its probe, and the metadata cache
answering at once (last good value or EIO) and not waiting past STALE_GRACE for a refresh."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from gcfs.background import InternalError
from gcfs.cache import SLOW_MEMORY, STALE_GRACE, MetadataCache
from gcfs.errors import NotFound, Unavailable
from gcfs.retry import (
    CONFIRM_DOWN,
    LIVENESS_TIMEOUT,
    PROBE_FIRST_DELAY,
    PROBE_MAX_DELAY,
    STALL_AFTER,
    OutageLog,
    RetryPolicy,
    Unreachable,
    retrying,
)

POLICY = RetryPolicy(budget=45)


async def refused() -> str:
    raise Unreachable("GET x: ConnectError")


async def test_refused_connections_mark_the_site_down_within_confirm_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Not the 45 s budget: CONFIRM_DOWN s of refusals, then down, then failing at once."""
    outage = OutageLog("site", fail_fast=True)
    start = trio.current_time()
    with pytest.raises(Unavailable, match="gave up"):
        await retrying(refused, policy=POLICY, what="t", outage=outage)
    took = trio.current_time() - start
    assert CONFIRM_DOWN <= took < CONFIRM_DOWN + POLICY.max_delay
    assert outage.is_down() and outage.outages == 1
    start = trio.current_time()
    with pytest.raises(Unavailable, match="is down"):
        await retrying(refused, policy=POLICY, what="t", outage=outage)
    assert trio.current_time() == start
    outage.succeeded()
    assert not outage.is_down() and outage.recoveries == 1
    assert outage.last_outage is not None and outage.last_outage >= 0


async def test_a_plain_origin_still_spends_its_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Storage (not fail-fast) keeps the old policy: refusals are retried for the budget."""
    start = trio.current_time()
    with pytest.raises(Unavailable, match="gave up"):
        await retrying(refused, policy=RetryPolicy(budget=5), what="t", outage=OutageLog("s"))
    assert trio.current_time() - start == pytest.approx(5)


async def test_a_timeout_marks_down_unless_the_server_answered_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outage = OutageLog("site", fail_fast=True)
    calls = 0

    async def slow_then_timeout() -> str:
        nonlocal calls
        calls += 1
        await trio.sleep(3)
        if calls == 1:
            outage.succeeded()  # another request got its answer during this one
        raise Unreachable("GET x: timed out", timed_out=True)

    with pytest.raises(Unavailable):
        await retrying(slow_then_timeout, policy=RetryPolicy(budget=10), what="t", outage=outage)
    assert calls >= 2  # the first timeout was retried: the server was answering others
    assert outage.is_down()


@pytest.mark.parametrize(("status", "down"), [(429, False), (503, True)])
async def test_what_gives_up_marks_down(
    autojump_clock: trio.testing.MockClock, status: int, down: bool
) -> None:
    outage = OutageLog("site", fail_fast=True)

    async def answer() -> str:
        raise Unavailable(f"HTTP {status}", status=status)

    with pytest.raises(Unavailable):
        await retrying(answer, policy=RetryPolicy(budget=5), what="t", outage=outage)
    assert outage.is_down() is down


async def test_one_probe_with_backoff_until_the_site_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While down only the probe asks, at 1, 2, 4, ... s up to 30 s apart; an answer ends it."""
    outage = OutageLog("site", fail_fast=True)
    times: list[float] = []
    back_at = 100.0

    async def probe() -> None:
        times.append(trio.current_time())

        async def once() -> str:
            if trio.current_time() < back_at:
                raise Unreachable("GET x: timed out", timed_out=True)
            return "ok"

        await retrying(once, policy=POLICY, what="probe", outage=outage)

    async def bug() -> None:
        raise RuntimeError("a probe bug is reported, never raised")

    async with trio.open_nursery() as nursery:
        outage.watch(nursery, bug)
        with pytest.raises(Unavailable):
            await retrying(refused, policy=POLICY, what="t", outage=outage)
        await trio.sleep(PROBE_FIRST_DELAY + 0.5)  # the buggy probe ran once, and survived
        outage.watch(nursery, probe)
        with pytest.raises(Unavailable, match="is down"):
            await retrying(refused, policy=POLICY, what="t", outage=outage)
        back_at = trio.current_time() + 60
        await trio.sleep(60 + PROBE_MAX_DELAY + 1)
        assert not outage.is_down()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps and all(gap <= PROBE_MAX_DELAY + 0.01 for gap in gaps)
    assert gaps[0] < gaps[-1]  # backing off
    assert len(times) < 12  # a minute of outage, not a request per second
    assert outage.recoveries == 1


def _cache(ttl: float = 10) -> MetadataCache:
    return MetadataCache(ttl, timer=trio.current_time)


async def test_down_answers_from_the_last_good_value_or_eio_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = _cache()
    outage = OutageLog("site", fail_fast=True)
    fetches = 0

    async def fetch() -> str:
        async def attempt() -> str:
            nonlocal fetches
            fetches += 1
            return "v1"

        return await retrying(attempt, policy=POLICY, what="t", outage=outage)

    async def local() -> str:
        return "built from what was fetched before"

    async def probe() -> None:
        await retrying(refused, policy=POLICY, what="probe", outage=outage)

    async with trio.open_nursery() as nursery:
        cache.attach(nursery, deadline=60, origin=outage)
        outage.watch(nursery, probe)
        assert await cache.get("seen", fetch) == "v1"
        with pytest.raises(Unavailable):
            await retrying(refused, policy=POLICY, what="t", outage=outage)
        await trio.sleep(3600)  # far past the TTL
        start = trio.current_time()
        assert await cache.get("seen", fetch) == "v1"
        with pytest.raises(Unavailable, match="is down"):
            await cache.get("unseen", fetch)
        assert await cache.get("local", local) == "built from what was fetched before"
        assert trio.current_time() == start and fetches == 1
        assert cache.statistics().refused_while_down == 1
        with pytest.raises(Unavailable, match="is down"):
            await cache.get("unseen", fetch)  # remembered, still no request
        assert fetches == 1
        outage.succeeded()
        assert await cache.get("unseen", fetch) == "v1"  # asked at once when back
        nursery.cancel_scope.cancel()


async def test_a_slow_refresh_serves_the_stale_value_after_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = _cache()
    fetches = 0
    version = "v1"

    async def fetch() -> str:
        nonlocal fetches
        fetches += 1
        await trio.sleep(5)
        return version

    async with trio.open_nursery() as nursery:
        cache.attach(nursery, deadline=60, origin=OutageLog("site", fail_fast=True))
        assert await cache.get("k", fetch) == "v1"  # never fetched: waits the 5 s
        await trio.sleep(10)
        version = "v2"
        start = trio.current_time()
        assert await cache.get("k", fetch) == "v1"
        assert trio.current_time() - start == pytest.approx(STALE_GRACE)
        # Within SLOW_MEMORY, another caller gets the stale value at once, and shares the
        # refresh that is still running.
        assert await cache.get("k", fetch) == "v1"
        assert trio.current_time() - start == pytest.approx(STALE_GRACE)
        assert fetches == 2
        await trio.sleep(5)  # the refresh ended in the background
        assert await cache.get("k", fetch) == "v2"
        assert fetches == 2
        assert SLOW_MEMORY > STALE_GRACE
        nursery.cancel_scope.cancel()


async def test_a_quick_refresh_is_waited_for_and_errors_reach_the_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = _cache(ttl=1)
    answers: list[object] = ["v1", "v2", NotFound("gone"), RuntimeError("bug")]

    async def fetch() -> str:
        await trio.sleep(0.2)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, str)
        return answer

    async with trio.open_nursery() as nursery:
        cache.attach(nursery, deadline=60)
        assert await cache.get("k", fetch) == "v1"
        await trio.sleep(2)
        assert await cache.get("k", fetch) == "v2"  # within the grace: the fresh value
        await trio.sleep(2)
        with pytest.raises(NotFound):
            await cache.get("k", fetch)
        await trio.sleep(10)  # past the remembered error
        with pytest.raises(InternalError):
            await cache.get("k", fetch)  # a bug in the refresh: EIO, and the nursery lives
        nursery.cancel_scope.cancel()


async def test_without_a_nursery_callers_wait_as_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = _cache(ttl=1)

    async def fetch() -> str:
        await trio.sleep(5)
        return "v"

    assert await cache.get("k", fetch) == "v"
    await trio.sleep(2)
    start = trio.current_time()
    assert await cache.get("k", fetch) == "v"
    assert trio.current_time() - start == pytest.approx(5)


async def hangs() -> str:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("check_answers_after", [None, LIVENESS_TIMEOUT - 1])
async def test_a_liveness_check_tells_a_silent_site_from_a_slow_one(
    autojump_clock: trio.testing.MockClock, check_answers_after: float | None
) -> None:
    """Two requests wait on a site that answers nothing (the 45 s budget would be theirs).
    After STALL_AFTER s of silence one check runs: if it gets no answer within
    LIVENESS_TIMEOUT, the site is down and both requests end at once with its error; if it
    answers, the site is slow and both keep waiting, and a check runs again only after
    another STALL_AFTER s of silence."""
    outage = OutageLog("site", fail_fast=True)
    checks: list[float] = []

    async def check() -> None:
        checks.append(trio.current_time())
        if check_answers_after is None:
            await trio.sleep_forever()
        await trio.sleep(check_answers_after)

    async def probe() -> None:
        await trio.sleep_forever()

    ended: list[tuple[float, str]] = []

    async def request(delay: float) -> None:
        await trio.sleep(delay)
        try:
            await retrying(hangs, policy=POLICY, what="t", outage=outage)
        except Unavailable as exc:
            ended.append((trio.current_time(), str(exc)))

    async with trio.open_nursery() as nursery:
        outage.watch(nursery, probe, check=check)
        start = trio.current_time()
        nursery.start_soon(request, 0)
        nursery.start_soon(request, 1)  # began later: ends with the first
        if check_answers_after is None:
            await trio.sleep(STALL_AFTER + LIVENESS_TIMEOUT + 1)
            assert checks == [start + STALL_AFTER]
            assert outage.is_down() and outage.liveness_checks == 1
            assert [when for when, _ in ended] == [start + STALL_AFTER + LIVENESS_TIMEOUT] * 2
            assert all("answers nothing" in text or "gave up" in text for _, text in ended)
        else:
            await trio.sleep(3 * (STALL_AFTER + check_answers_after))
            assert not outage.is_down() and ended == []
            first = start + STALL_AFTER
            second = first + check_answers_after + STALL_AFTER
            assert checks[:2] == [first, second], checks
        nursery.cancel_scope.cancel()


async def test_no_check_while_the_site_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request that waits long while others are answered is not silence: no check."""
    outage = OutageLog("site", fail_fast=True)
    checks = 0

    async def check() -> None:
        nonlocal checks
        checks += 1

    async def quick() -> str:
        await trio.sleep(0.5)
        return "ok"

    async def probe() -> None:
        pass

    async with trio.open_nursery() as nursery:
        outage.watch(nursery, probe, check=check)

        async def slow() -> None:
            with trio.move_on_after(20):
                await retrying(hangs, policy=POLICY, what="t", outage=outage)

        nursery.start_soon(slow)
        for _ in range(30):  # an answer every 0.5 s for 15 s
            assert await retrying(quick, policy=POLICY, what="t", outage=outage) == "ok"
        assert checks == 0 and not outage.is_down()
        nursery.cancel_scope.cancel()
