"""Bugs in background tasks: logged once per kind, turned into EIO for whoever waited.

A background task (read-ahead, block store writes) runs in a nursery that wraps the whole
FUSE loop (content.ContentStore): an exception that left it would end the mount. So each such
task catches everything that is not a GcfsError or a cancellation, reports it here, and hands
the readers that waited on it `InternalError` (EIO) instead. The traceback is logged at ERROR
the first time a kind fails (the tests fail on it; users see one), later ones at DEBUG: a bug
hit on every block must not flood the log.
"""

from __future__ import annotations

import errno
import logging

from .errors import GcfsError

log = logging.getLogger(__name__)

_reported: set[str] = set()


class InternalError(GcfsError):
    """A bug in a background task, as the readers that waited on it see it."""

    errno = errno.EIO
    log_level = logging.WARNING


def report_bug(kind: str, exc: BaseException) -> InternalError:
    """Log `exc` (with its traceback, once per `kind`) and return the error for waiters."""
    if kind not in _reported:
        _reported.add(kind)
        log.error("bug in %s (answering EIO)", kind, exc_info=exc)
    else:
        log.debug("bug in %s again: %r", kind, exc)
    return InternalError(f"{kind} failed: an internal error (logged once)")


__all__ = ["InternalError", "report_bug"]
