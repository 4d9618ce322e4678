"""The pieces prefetch and snapshot share, without a mount: the size formatter, the progress
line, and the parallel fetch loop's handling of failures."""

from __future__ import annotations

import io
import threading

import pytest

from gcfs.errors import UserError
from gcfs.progress import ProgressLine, fetch_parallel
from gcfs.units import format_size


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 << 20, "5.0 MiB"),
        (int(1.2 * (1 << 30)), "1.2 GiB"),
        (3 << 40, "3.0 TiB"),
        (2048.0, "2.0 KiB"),  # a rate: bytes per second
    ],
)
def test_format_size(n: float, shown: str) -> None:
    assert format_size(n) == shown


def test_the_progress_line_of_each_command() -> None:
    """prefetch's line has an ETA; snapshot's says the bytes were fetched; without a
    terminal a line is printed at most every 5 s unless forced."""
    out = io.StringIO()
    line = ProgressLine(out, "prefetch", files_total=4, bytes_total=4 << 20, eta=True)
    line.add(1 << 20, done=1)
    line.show()
    line.add(1 << 20, done=1)
    line.show()  # within 5 s of the last: not printed
    line.finish()  # forced
    printed = out.getvalue().splitlines()
    assert len(printed) == 2, printed
    assert printed[0].startswith("prefetch: 1/4 files, 1.0 MiB/4.0 MiB, ")
    assert printed[1].startswith("prefetch: 2/4 files, 2.0 MiB/4.0 MiB, ")
    assert printed[1].endswith(" s") and ", ETA " in printed[1]
    out = io.StringIO()
    ProgressLine(out, "snapshot", files_total=1, bytes_total=512, suffix=" fetched").finish()
    assert out.getvalue().startswith("snapshot: 0/1 files, 0 B/512 B fetched, 0 B/s")
    assert "ETA" not in out.getvalue()


def test_fetch_parallel_keeps_going_or_stops_at_the_first_failure() -> None:
    """Snapshot (keep_going): every item runs and the failures come back. Prefetch: the
    first failure is raised and items not started yet are cancelled."""
    ran: list[int] = []
    lock = threading.Lock()

    def work(item: int) -> None:
        with lock:
            ran.append(item)
        if item % 10 == 3:
            raise UserError(f"item {item}")

    progress = ProgressLine(io.StringIO(), "test")
    failures = fetch_parallel(work, range(40), 4, progress, keep_going=True)
    assert sorted(ran) == list(range(40))
    assert sorted(str(f) for f in failures) == ["item 13", "item 23", "item 3", "item 33"]

    ran.clear()
    never = threading.Event()

    def first_fails(item: int) -> None:
        with lock:
            ran.append(item)
        if item == 0:
            raise UserError("item 0")
        never.wait(0.05)  # a file read of 50 ms: the loop sees the failure meanwhile

    with pytest.raises(UserError, match="item 0"):
        fetch_parallel(first_fails, range(100), 2, progress, keep_going=False)
    # Two workers: item 0 and the one or two started before the loop saw the failure (it
    # wakes on the first completion); reaching 10 would take the loop 200 ms to wake. The
    # other 90 and more were cancelled, never run.
    assert 0 in ran and len(ran) < 10, ran
