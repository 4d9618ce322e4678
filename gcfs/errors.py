"""The one error tree of gcfs: every failure knows the errno the kernel should see.

    GcfsError (EIO)
    ├── NotFound (ENOENT)          the object or name does not exist (or is not visible)
    ├── NotADirectory (ENOTDIR)    a directory operation on a file
    ├── PermissionDenied (EACCES)  the server rejected our token (401) or refused the object (403)
    ├── ReadOnly (EROFS)           any attempt to change something: gcfs never writes
    ├── Unavailable (EIO)          the server could not be reached or kept failing
    ├── BadResponse (EIO)          the server answered something we cannot understand
    ├── Timeout (EIO)              an operation ran past its deadline
    └── NotInSnapshot (EIO)        an offline mount's snapshot lacks the bytes asked for

    UserError                      a problem the user must fix before mounting: one line, no
                                   traceback, exit status 1 (s3ql's QuietError)

The FUSE adapter (`fuse_ops.py`) is the only place that turns these into `pyfuse3.FUSEError`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar


class GcfsError(Exception):
    """A request failed in a way the kernel should see as an errno."""

    errno: ClassVar[int] = errno.EIO
    log_level: ClassVar[int] = logging.WARNING


class NotFound(GcfsError):
    errno = errno.ENOENT
    # Every probe of a missing name ends here; that is not news.
    log_level = logging.DEBUG


class NotADirectory(GcfsError):
    errno = errno.ENOTDIR
    log_level = logging.DEBUG


class PermissionDenied(GcfsError):
    errno = errno.EACCES
    # A rejected token is logged once by the API client when it happens; each refused
    # operation is not news.
    log_level = logging.DEBUG


class ReadOnly(GcfsError):
    errno = errno.EROFS
    log_level = logging.DEBUG


class Unavailable(GcfsError):
    """The server could not be reached or failed. `transient` failures (timeouts, resets,
    429/502/503/504) are worth retrying; `retry_after` is the server's requested wait;
    `status` is the HTTP status when the server answered (None: no answer at all)."""

    errno = errno.EIO
    # An outage is logged once when it starts and once when it ends (retry.OutageLog), a
    # failing endpoint likewise (health.EndpointHealth); every operation that fails meanwhile
    # is not news.
    log_level = logging.DEBUG

    def __init__(
        self,
        message: str,
        *,
        transient: bool = True,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after
        self.status = status


class BadResponse(GcfsError):
    """An answer we cannot use: an unexpected status (`status`), a body that is not what the
    API serves."""

    errno = errno.EIO
    log_level = logging.WARNING

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Timeout(GcfsError):
    errno = errno.EIO


class NotInSnapshot(GcfsError):
    """An offline mount was asked for bytes its snapshot does not hold (missing or damaged
    in the store): EIO, and never a request. Worth a warning: the snapshot is incomplete."""

    errno = errno.EIO
    log_level = logging.WARNING


class UserError(Exception):
    """Something the user must fix; shown as one line without a traceback."""


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to raise for a failed nursery of requests: its first GcfsError when every
    member is an Exception (one failed request fails the operation, with that request's
    errno); otherwise (Cancelled, KeyboardInterrupt inside) the group itself."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if all(isinstance(leaf, Exception) for leaf in leaves):
        for leaf in leaves:
            if isinstance(leaf, GcfsError):
                return leaf
    return group


@asynccontextmanager
async def one_error() -> AsyncIterator[None]:
    """Around a nursery of requests: raise the first GcfsError, not an ExceptionGroup, so
    the FUSE adapter answers that errno (and does not log a bug)."""
    try:
        yield
    except BaseExceptionGroup as group:
        raise first_error(group) from None
