"""What the daemon counts for `gcfs status` and `.gcfs/status.json`.

Requests are counted by endpoint template (UUIDs and numbers in the path become `{pk}`, so
`cases/images/<uuid>/` and every other image count together) and status; failed filesystem
operations are kept with their time for an hour (bounded, 10,000 entries). Everything here is
touched from the trio thread only.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

_PK_SEGMENT = re.compile(r"^(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\d+)$")
HOUR = 3600.0
MAX_ERRORS_KEPT = 10_000


def endpoint_of(url: str, api_url: str) -> str:
    """`archives/items/` or `cases/images/{pk}/` for an API URL; `media`/`website` otherwise."""
    path = urlsplit(url).path
    api_path = urlsplit(api_url).path
    if not path.startswith(api_path):
        return "media" if "/media/" in path else "website"
    segments = path[len(api_path) :].split("/")
    return "/".join("{pk}" if _PK_SEGMENT.match(s) else s for s in segments)


class Statistics:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.retries = 0
        self.in_flight = 0
        self.bytes_read = 0  # handed to readers through the mount
        self.operations = 0
        self._errors: collections.deque[tuple[float, str, int]] = collections.deque(
            maxlen=MAX_ERRORS_KEPT
        )

    def record_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    @contextmanager
    def request(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def record_error(self, operation: str, errno: int) -> None:
        self._errors.append((time.time(), operation, errno))

    def errors_last_hour(self) -> list[tuple[float, str, int]]:
        cutoff = time.time() - HOUR
        while self._errors and self._errors[0][0] < cutoff:
            self._errors.popleft()
        return list(self._errors)

    def snapshot(self) -> dict[str, Any]:
        by_endpoint: dict[str, dict[str, int]] = {}
        for (endpoint, status), count in sorted(self.requests.items()):
            by_endpoint.setdefault(endpoint, {})[str(status)] = count
        errors = self.errors_last_hour()
        by_errno: collections.Counter[str] = collections.Counter(
            f"{operation.split()[0]} errno {number}" for _, operation, number in errors
        )
        return {
            "uptime_seconds": round(time.time() - self.started, 1),
            "requests": by_endpoint,
            "requests_total": sum(self.requests.values()),
            "retries": self.retries,
            "in_flight_requests": self.in_flight,
            "operations": self.operations,
            "bytes_read": self.bytes_read,
            "errors_last_hour": len(errors),
            "errors_last_hour_by_kind": dict(by_errno),
        }
