"""Issue 15, "the server is gone: answer at once", over real mounts.

The fake refuses connections (`faults.down`: reset on accept, what a client sees from a
crashed backend) or black-holes them (accepts, never answers). What was seen answers from the
last good listing within 2 s, what was not fails with EIO at once once the server is known to
be down, nothing but the probe asks the server meanwhile, the log, `gcfs status` and the root
README say so, and when the server is back a changed listing shows after the TTL.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gcfs.fakegc import FakeGC
from gcfs.retry import LIVENESS_TIMEOUT, STALL_AFTER
from tests.conftest import Mount, poll, run_gcfs
from tests.test_soak import timed

SEEN_BAR = 2.0  # the bar for a directory seen before, server silent or refusing
UNSEEN_BAR = 5.0  # and for EIO on a path never seen, once the server is known to be down
# --timeout: one HTTP attempt may take half of it (3 s), so a black hole is known down ~3 s
# after the first unanswered request; the bars above do not depend on it.
TIMEOUT = "6"


def status_of(mount: Mount) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((mount.path / ".gcfs" / "status.json").read_bytes())
    return result


def site_lines(mount: Mount, fake: FakeGC, words: str) -> list[str]:
    return [
        line
        for line in mount.log_text().splitlines()
        if " WARNING " in line and f"{fake.base_url} {words}" in line
    ]


@pytest.mark.parametrize("fault", ["down", "blackhole"])
def test_a_gone_server_answers_at_once(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, fault: str
) -> None:
    mount = mount_gcfs("--ttl", "1", "--timeout", TIMEOUT)
    archive = mount.path / "archives" / "lidc-lung-ct"
    items_dir = archive / "items"
    items = sorted(os.listdir(items_dir))
    assert len(items) >= 3
    seen_item = items_dir / items[0]
    seen_names = sorted(os.listdir(seen_item))
    stale_before = status_of(mount)["metadata_cache"]["stale"]

    fake.faults.configure(**{fault: True})

    def seen_answers_quickly() -> bool:
        for directory, expected in ((items_dir, items), (seen_item, seen_names)):
            took, names, error = timed(lambda d=directory: sorted(os.listdir(d)))
            assert error is None, error
            assert took < SEEN_BAR, f"{directory} took {took:.2f} s"
            assert names == expected
        return bool(status_of(mount)["outage"]["down"])

    # Every look at a seen directory answers within the bar, from the first one after the
    # TTL (1 s) on, until the daemon knows the server is down.
    poll(seen_answers_quickly, 30, "the server to be known down")
    assert status_of(mount)["metadata_cache"]["stale"] > stale_before

    requests_before = len(fake.requests)
    dropped_before = fake.faults.injected.get("down", 0)
    probes_before = status_of(mount)["outage"]["probes"]
    unseen = [
        lambda: os.listdir(mount.path / "reader-studies" / "lung-nodule-reader-study"),
        lambda: os.stat(items_dir / items[1] / "item.json"),
        lambda: (items_dir / items[2] / "item.json").read_bytes(),
    ]
    start = time.monotonic()
    for _ in range(10):
        for call in unseen:
            took, _, error = timed(call)
            assert error is not None and error.errno == errno.EIO, error
            assert took < UNSEEN_BAR, took
        took, names, error = timed(lambda: sorted(os.listdir(items_dir)))
        assert error is None and names == items and took < SEEN_BAR, (took, error)
    spent = time.monotonic() - start
    # 40 operations, none of which waited for the server.
    assert spent < UNSEEN_BAR, spent

    # Nothing but the probe asked the server meanwhile.
    probes = status_of(mount)["outage"]["probes"] - probes_before
    if fault == "blackhole":
        asked = fake.requests[requests_before:]
        assert all(r.endpoint == "profiles-self" for r in asked), asked
        assert len(asked) <= probes + 1, (asked, probes)
    else:
        # Dropped connections are not in the request log; each probe tries for 1.5 s
        # (a handful of connections), and 40 operations that asked would be 40 or more.
        dropped = fake.faults.injected.get("down", 0) - dropped_before
        assert dropped <= 12 * (probes + 1), (dropped, probes)

    assert len(site_lines(mount, fake, "is down")) == 1, mount.log_text()
    assert not site_lines(mount, fake, "is back")
    readme = (mount.path / "README.md").read_text()
    assert "offline since" in readme and " UTC" in readme
    down = status_of(mount)["outage"]
    assert down["down"] and down["down_since"] <= time.time() + 0.1  # rounded to 0.1 s
    text = run_gcfs("status", str(mount.path), timeout=30)
    assert text.returncode == 0, text.stderr
    assert "DOWN:" in text.stdout

    # The world changes while the server is away; it is back, and after the probe notices
    # (backoff 1, 2, 4, 8 s: the outage lasted seconds) and the TTL, the listing shows it.
    found = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    new = world.add_archive_item(found, [], title="added-during-the-outage")
    fake.faults.clear()

    def shows_the_new_item() -> bool:
        took, names, error = timed(lambda: os.listdir(items_dir))
        assert error is None, error
        assert took < SEEN_BAR, took
        return new.pk in names

    poll(shows_the_new_item, 45, "the new item after the server came back")
    assert sorted(os.listdir(items_dir)) == sorted([*items, new.pk])
    assert "lung-nodule-reader-study" in os.listdir(mount.path / "reader-studies")
    back = status_of(mount)["outage"]
    assert not back["down"] and back["down_since"] is None
    assert back["outages"] == 1 and back["last_outage_seconds"] > 0, site_lines(mount, fake, "is")
    assert "offline since" not in (mount.path / "README.md").read_text()
    assert len(site_lines(mount, fake, "is down")) == 1
    assert len(site_lines(mount, fake, "is back")) == 1
    assert "last outage:" in run_gcfs("status", str(mount.path), timeout=30).stdout


@pytest.mark.parametrize("seconds", [1.5, 3.0])
def test_a_slow_server_is_not_down(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any, tmp_path: Path, seconds: float
) -> None:
    """Every answer takes 1.5 s (longer than the grace, shorter than the HTTP timeout), or
    3 s (longer than STALL_AFTER too: the liveness check runs, and is answered in 3 s, within
    LIVENESS_TIMEOUT): a seen directory answers stale within the bar and its refresh
    finishes in the background, so the change shows on a later look; nothing is ever called
    down, and what was never seen is fetched (slowly) rather than refused."""
    timeout = TIMEOUT if seconds < 2 else "60"  # 3 s answers need more than a 3 s attempt
    mount = mount_gcfs("--ttl", "1", "--timeout", timeout)
    items_dir = mount.path / "archives" / "lidc-lung-ct" / "items"
    items = sorted(os.listdir(items_dir))
    found = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    new = world.add_archive_item(found, [], title="added-while-slow")
    fake.faults.configure(stall_rate=1.0, stall_seconds=seconds)

    def shows_the_new_item() -> bool:
        took, names, error = timed(lambda: sorted(os.listdir(items_dir)))
        assert error is None, error
        assert took < SEEN_BAR, took
        assert set(items) <= set(names)
        return new.pk in names

    poll(shows_the_new_item, 30, "the background refresh to bring the new item")
    took, names, error = timed(lambda: os.listdir(mount.path / "reader-studies"))
    assert error is None and "lung-nodule-reader-study" in names, error
    assert took > 1.0  # it waited for the (slow) server: a never-seen listing has no stale
    fake.faults.clear()
    assert not status_of(mount)["outage"]["down"]
    assert status_of(mount)["outage"]["outages"] == 0
    assert not site_lines(mount, fake, "is down")
    if seconds > STALL_AFTER:  # the check ran, was answered, and called nothing down
        assert status_of(mount)["outage"]["liveness_checks"] >= 1


def test_a_black_hole_is_known_down_long_before_the_request_timeout(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """The default timeouts (one HTTP attempt may wait 30 s): a server that accepts and never
    answers is known down after one liveness check (STALL_AFTER + LIVENESS_TIMEOUT s after the
    first unanswered request), not after 30 s; the look at a path never seen that found out
    gets EIO then, and so does one that began while it waited."""
    mount = mount_gcfs("--ttl", "1")
    assert "archives" in os.listdir(mount.path)
    fake.faults.configure(blackhole=True)
    known_down = STALL_AFTER + LIVENESS_TIMEOUT
    results: dict[str, tuple[float, Any, OSError | None]] = {}

    def look(name: str, path: Path) -> None:
        results[name] = timed(lambda: os.listdir(path))

    first = threading.Thread(
        target=look, args=("first", mount.path / "reader-studies" / "lung-nodule-reader-study")
    )
    second = threading.Thread(target=look, args=("second", mount.path / "algorithms"))
    first.start()
    poll(lambda: fake.faults.injected.get("blackhole", 0) > 0, 10, "the first held request")
    second.start()  # while the first waits
    first.join(60)
    second.join(60)
    for name in ("first", "second"):
        took, _, error = results[name]
        assert error is not None and error.errno == errno.EIO, (name, error)
        assert took < known_down + 2.0, (name, took)  # 30 s before the liveness check
    outage = status_of(mount)["outage"]
    assert outage["down"] and outage["liveness_checks"] == 1, outage
    assert len(site_lines(mount, fake, "is down")) == 1, mount.log_text()
    assert "nor to a check" in site_lines(mount, fake, "is down")[0]
