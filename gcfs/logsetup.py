"""Logging for the daemon: one format, one handler, quiet third-party request loggers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, log_file: Path | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    new: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_file.touch(mode=0o600, exist_ok=True)
        new = logging.FileHandler(log_file, encoding="utf-8")
    else:
        new = logging.StreamHandler(sys.stderr)
    new.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(new)
    root.setLevel(level.upper())
    # httpx logs every request at INFO; our own client logs one line per request at DEBUG.
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)
