"""The progress line and the parallel fetch loop that `gcfs prefetch` and `gcfs snapshot`
share: files read through the mount JOBS at a time in threads, with one line on stderr saying
how far they are (files, bytes, speed; prefetch adds an ETA), redrawn in place on a terminal
and printed every PLAIN_PROGRESS_EVERY seconds otherwise (a log file or a Slurm output gets a
line per 5 s, not one per chunk)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

from .errors import UserError
from .units import format_size

PLAIN_PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
# Seconds between looks at the workers by the loop that waits for them: the terminal's line
# is redrawn 5 times a second, and a failure ends a prefetch within 0.2 s.
TICK = 0.2

T = TypeVar("T")


@dataclass
class ProgressLine:
    """`LABEL: 3/10 files, 1.0 MiB/4.0 MiB[ fetched], 2.0 MiB/s[, ETA 2 s]` on `out`.
    Workers count with `add` (thread-safe); the fetch loop redraws with `show`."""

    out: TextIO
    label: str  # the command: "prefetch", "snapshot"
    files_total: int = 0
    bytes_total: int = 0
    suffix: str = ""  # after the bytes (" fetched")
    eta: bool = False  # say when it will be done, from the speed so far
    files_done: int = 0
    bytes_done: int = 0
    start: float = field(default_factory=time.monotonic)
    last: float = 0.0  # time.monotonic() of the last line written
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, size: int, *, done: int = 0) -> None:
        """`size` more bytes read, `done` more files complete."""
        with self.lock:
            self.bytes_done += size
            self.files_done += done

    def line(self, now: float) -> str:
        speed = self.bytes_done / max(now - self.start, 1e-6)
        text = (
            f"{self.label}: {self.files_done}/{self.files_total} files, "
            f"{format_size(self.bytes_done)}/{format_size(self.bytes_total)}{self.suffix}, "
            f"{format_size(speed)}/s"
        )
        if self.eta:
            left = self.bytes_total - self.bytes_done
            text += f", ETA {left / speed:.0f} s" if speed > 0 and left > 0 else ", ETA -"
        return text

    def show(self, *, force: bool = False) -> None:
        """Redraw (a terminal) or print a line (otherwise, at most every 5 s unless forced)."""
        with self.lock:
            now = time.monotonic()
            tty = self.out.isatty()
            if not force and not tty and now - self.last < PLAIN_PROGRESS_EVERY:
                return
            self.last = now
            line = self.line(now)
        self.out.write(("\r" + line + "\033[K") if tty else line + "\n")
        self.out.flush()

    def finish(self) -> None:
        """The last line, and a newline after a redrawn one."""
        self.show(force=True)
        if self.out.isatty():
            self.out.write("\n")


def fetch_parallel(
    work: Callable[[T], None],
    items: Iterable[T],
    jobs: int,
    progress: ProgressLine,
    *,
    keep_going: bool,
) -> list[UserError]:
    """Call `work(item)` for every item, `jobs` at a time in threads, redrawing `progress`
    every TICK seconds. A UserError of one item: with `keep_going` (snapshot) the others
    finish and the errors are returned (a rerun carries on); without it (prefetch) the first
    ends the run, raised once the running items are done and the others cancelled. Any other
    exception ends the run the same way."""
    failures: list[UserError] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        pending: set[Future[None]] = {pool.submit(work, item) for item in items}
        try:
            while pending:
                done, pending = wait(pending, timeout=TICK, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        future.result()
                    except UserError as exc:
                        if not keep_going:
                            raise
                        failures.append(exc)
                progress.show()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return failures


__all__ = ["PLAIN_PROGRESS_EVERY", "TICK", "ProgressLine", "fetch_parallel"]
