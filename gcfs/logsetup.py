"""Logging for the daemon: one format, one handler, quiet third-party request loggers.

Three destinations:
- a file (`--log-file`, and the background daemon's default): timestamped lines;
- stderr in a terminal: the same lines;
- stderr connected to the systemd journal (a unit's default): systemd sets `JOURNAL_STREAM`
  to the device and inode of that stream, and when stderr is that stream each line starts
  with its sd-daemon(3) priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) and
  carries no timestamp: the journal records the time, and shows the priority in colour and
  filters on it (`journalctl --user -u gcfs@gc -p warning`).

A log file, the default one or a `--log-file`, is rotated by size (ROTATE_BYTES, BACKUP_COUNT):
`<file>` is renamed `<file>.1` (and `.1` to `.2`, ...) once it would pass the size, so one mount
keeps at most (1 + BACKUP_COUNT) x ROTATE_BYTES of log. Not stderr: the journal rotates its own
files, and a terminal keeps nothing. The tests make the size small with `GCFS_TEST_LOG_ROTATE_BYTES`
(read once, at import, and only when set: the daemon is a real process they cannot patch, as
with inject.py); unset, always outside the tests, ROTATE_BYTES holds.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import logging.handlers
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from .errors import UserError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"

# 10 MiB per file: at INFO a mount logs a few lines per event (mounted, an outage begins or
# ends, a refresh), so 10 MiB holds months of it; at DEBUG a request logs a line of 100 to 250
# bytes (and a listing one more), so 10 MiB holds the last ~40,000 requests: a listing of 40
# million objects at 1000 per page, or the whole session that led up to a failure. Three
# backups: ~40 MiB in all, kept to be read after a failure, and all a daemon left at DEBUG for
# weeks ever holds (the default log is in $XDG_RUNTIME_DIR, often memory) rather than gigabytes.
ROTATE_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 3
TEST_ROTATE_ENV = "GCFS_TEST_LOG_ROTATE_BYTES"


def _rotate_bytes(environ: Mapping[str, str]) -> int:
    """ROTATE_BYTES, or the tests' smaller size when they set TEST_ROTATE_ENV to a positive
    integer (anything else is ignored: a log that never rotates is what the test sees)."""
    value = environ.get(TEST_ROTATE_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else ROTATE_BYTES


_rotate_at = _rotate_bytes(os.environ)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose files are created 0600, like the first one (check_log_file):
    the stock handler opens each new file after a rollover with open(), which gives the umask's
    mode (0644 for most users), and a log names the mounting user's paths and objects. A file
    that is not a regular one (a FIFO, /dev/stderr) is never rotated (the stock handler's
    rule since bpo-45401)."""

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, 0o600)
        # Marked in use from now on: runtime.remove_stale removes a default log that nothing
        # has written for a week, and a mount that reopens an old one has written nothing yet.
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.utime(fd)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level, as sd-daemon(3) prefixes expect."""
    if levelno >= logging.CRITICAL:
        return 2  # LOG_CRIT
    if levelno >= logging.ERROR:
        return 3  # LOG_ERR
    if levelno >= logging.WARNING:
        return 4  # LOG_WARNING
    if levelno >= logging.INFO:
        return 6  # LOG_INFO
    return 7  # LOG_DEBUG


class JournalFormatter(logging.Formatter):
    """`<N>name: message`, and every further line of a traceback with the same `<N>`, so
    journald files the whole record under one priority."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """True when `stream` (stderr) is the journal stream systemd named in JOURNAL_STREAM."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def check_log_file(path: Path, shown: str) -> None:
    """Make sure the daemon can log to `path` (created 0600 when missing), before it forks:
    a log file that cannot be written is one line now, not "see PATH" after a failed mount
    naming the log that was never made. Its directory must exist: a typo in it is not
    silently created. `shown` names the file in messages (see cli.given_with)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOENT and not path.parent.is_dir():
            raise UserError(f"cannot create {shown}: its directory does not exist") from None
        reason = "it is a FIFO without a reader" if exc.errno == errno.ENXIO else exc.strerror
        raise UserError(f"cannot write {shown}: {reason}") from None
    os.close(fd)


def setup_logging(level: str, log_file: Path | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    new: logging.Handler
    formatter: logging.Formatter = logging.Formatter(FORMAT)
    if log_file is not None:
        check_log_file(log_file, str(log_file))
        new = PrivateRotatingFileHandler(
            log_file, maxBytes=_rotate_at, backupCount=BACKUP_COUNT, encoding="utf-8"
        )
    else:
        new = logging.StreamHandler(sys.stderr)
        if stderr_is_journal(sys.stderr):
            formatter = JournalFormatter()
    new.setFormatter(formatter)
    root.addHandler(new)
    root.setLevel(level.upper())
    # httpx logs every request at INFO; our own client logs one line per request at DEBUG.
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)
