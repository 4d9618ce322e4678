"""Logging for the daemon: one format, one handler, quiet third-party request loggers.

Three destinations:
- a file (`--log-file`, and the background daemon's default): timestamped lines;
- stderr in a terminal: the same lines;
- stderr connected to the systemd journal (a unit's default): systemd sets `JOURNAL_STREAM`
  to the device and inode of that stream, and when stderr is that stream each line starts
  with its sd-daemon(3) priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) and
  carries no timestamp: the journal records the time, and shows the priority in colour and
  filters on it (`journalctl --user -u gcfs@gc -p warning`).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from .errors import UserError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


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
        new = logging.FileHandler(log_file, encoding="utf-8")
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
