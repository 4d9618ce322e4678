"""EndpointHealth: which API endpoints fail right now, said once when it starts and once when
it ends.

A real server can fail one endpoint while the rest works: the platform's own image listing
answers 500 to `cases/images/?job_input=<pk>` (gc-api.md §3.11), whatever the pk. The origin
as a whole is healthy then, so `retry.OutageLog` (one origin, "is down" / "is back") says
nothing; this says which endpoint family fails and with which status.

An endpoint family is the endpoint's path template plus the names of its filters
(`cases/images/?job_input`, `algorithms/jobs/{pk}/`): every job's image listing fails the same
way, so they are one family. A family fails when the server answered it with a status that
retrying cannot fix (5xx after retries, a 4xx other than 401/403/404) and recovers at its next
success. Log lines name the family and the status, never a URL (a signed URL's query is a
credential) and never the token.

Touched from the trio thread only; every method is sync and has no checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .stats import endpoint_of

log = logging.getLogger(__name__)

# Query parameters that page a listing; they do not change what is asked for.
_PAGING = frozenset({"limit", "offset"})


def endpoint_family(url: str, params: Iterable[str], api_url: str) -> str:
    """`cases/images/?job_input` for `.../api/v1/cases/images/` asked with `job_input=` (and
    paging); `media` and `website` for URLs outside the API (stats.endpoint_of)."""
    names = sorted({name for name in params if name not in _PAGING})
    family = endpoint_of(url, api_url)
    return f"{family}?{'&'.join(names)}" if names else family


@dataclass(slots=True)
class _Failing:
    status: int
    since: float  # wall-clock time, for `gcfs status`
    failures: int


class EndpointHealth:
    """The endpoint families that fail now (see the module docstring)."""

    def __init__(self) -> None:
        self._failing: dict[str, _Failing] = {}

    def failed(self, family: str, status: int) -> None:
        """The server answered `family` with `status`, which retrying does not fix."""
        current = self._failing.get(family)
        if current is not None:
            current.failures += 1
            current.status = status
            return
        self._failing[family] = _Failing(status, time.time(), 1)
        log.warning("the server fails %s with HTTP %d (gcfs status lists it)", family, status)

    def succeeded(self, family: str) -> None:
        if self._failing.pop(family, None) is not None:
            log.warning("the server answers %s again", family)

    def is_failing(self, family: str) -> bool:
        return family in self._failing

    def snapshot(self) -> dict[str, Any]:
        """For `gcfs status`: family -> status, since (epoch seconds), failures."""
        return {
            family: {"status": f.status, "since": round(f.since, 1), "failures": f.failures}
            for family, f in sorted(self._failing.items())
        }
