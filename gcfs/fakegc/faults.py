"""Fault injection for the fake: `fake.faults`, a thread-safe plan switchable at run time.

    fake.faults.configure(error_rates={503: 0.2}, reset_rate=0.1, only={"storage-get"}, seed=1)
    ...                                   # gcfs under test sees 503s and resets
    fake.faults.injected                  # {"503": 41, "reset": 19}
    fake.faults.clear()                   # normal service again

Every fault is off by default. Knobs (plain attributes, settable at any time, also by several at
once under the lock with `configure(**knobs)`; `clear()` switches every fault off again and keeps
`seed` and the counters):

- `error_rates: dict[int, float]` -- per status, the probability that a request is answered with
  that status instead of its real answer: JSON `{"detail": ...}` on the site, an S3-style XML
  error on the storage origin. Any status works; 500, 502, 503, 504 and 429 have realistic
  bodies. 429 carries `Retry-After: <retry_after>` (`retry_after: str`, default "1"; seconds or
  an HTTP-date, sent as given).
- `reset_rate: float` -- the status line, headers and part of the body leave, then the
  connection is reset (SO_LINGER 0 + close: an RST). The client sees a read error or a
  protocol error, possibly before it read the bytes that were sent.
- `truncate_rate: float` -- headers with the full Content-Length but only part of the body,
  then a clean close (FIN): a short body.
  "Part of the body" is the first half, at most 1 MiB (`CUT_LIMIT`). When the answer has no
  body (a 302, a HEAD), only the status line leaves before the reset or close.
- `wrong_range_rate: float` -- storage only, and only for requests that would be answered 206:
  the 206 names another range in Content-Range (shifted, or one byte shorter) and carries that
  range's bytes, or names the asked range with a wrong total size (total + 1).
- `stall_rate: float`, `stall_seconds: float` (default 1.0) -- sleep `stall_seconds` before
  answering (on top of `latency`/`storage_latency`); combines with the other faults.
- `blackhole: bool` (both origins), `blackhole_storage: bool` (the storage origin alone) -- read
  each request, then never answer: the handler waits until the knob is switched off or the fake
  stops, then closes the connection without a response (the request is lost).
- `down: bool` (both origins), `down_storage: bool` (the storage origin alone) -- every new
  connection is reset as soon as it is accepted, and a request arriving on an already open
  keep-alive connection resets it without an answer. A real "connection refused" would need
  the port unbound (and could then be lost to another process); a reset on accept is what a
  client sees from a crashed or restarting backend behind a load balancer, close enough.
- `hold_pages_from: int | None` -- list requests of the site whose `offset` is at least this
  wait, unanswered, until the knob is set back to None (or higher), then get their real answer:
  a listing's later pages held while a test reads what the first page gave.
- `revoked_tokens: set[str]` -- API requests with these Bearer tokens answer 401
  `{"detail":"Invalid token."}` like an unknown token; `/media/` then serves them as anonymous,
  as the real server does for a bad token. Not restricted by `only`/`spare`.
- `only: set[str] | None` -- restrict the *random* faults (error_rates, reset, truncate,
  wrong range, stall) to these endpoint names (see server.py, e.g. {"storage-get"});
  None = every endpoint. `spare: set[str]` (default empty) exempts endpoints from them, e.g.
  {"profiles-self"} so that a mount still starts; spare wins over only. Names are checked
  against ENDPOINTS (ValueError). blackhole, down and revoked_tokens ignore both.
- `seed: int | None` -- seeds the `random.Random` behind the decisions (assigning it again,
  even the same value, reseeds); None = unpredictable. Each request eligible for random faults
  draws exactly three numbers, so one sequence of requests gives one sequence of faults.

The rates are per request and independent of earlier requests. The stall is decided on its own;
error_rates, reset, truncate and wrong range share one draw, in that order, so each knob's rate
is exactly its probability while they sum to at most 1 (beyond that, the later ones lose). A
wrong-range draw on a request that is not a satisfiable single-range GET injects nothing.

`injected` (a snapshot dict) counts the faults actually injected by name: the status as a string
("503", "429"), "reset", "truncate", "wrong-range", "stall", "blackhole" (per held request),
"down" (per dropped connection or request) and "revoked" (per request that presented a revoked
token). `reset_injected()` and FakeGC.reset_counts() zero it.

In `fake.requests`, a faulted request keeps its real endpoint name and `RequestRecord.fault`
names the fault(s) ("503", "reset", "stall+truncate", ...); `status` is the injected status for
an error, 206 for a wrong range, 0 for a reset, truncation or blackhole (no complete answer
left), and the real status for a mere stall. Requests dropped by `down` are not recorded
(they never reached a view); a revoked token's request is a plain 401 with `fault` None.

Faults never touch the world or the signer: they only change what goes on the wire.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from gcfs.fakegc.api import ENDPOINTS

CUT_LIMIT = 1024 * 1024  # a reset or truncated body carries at most this much

_SITE_DETAIL = {
    500: "A server error occurred.",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_STORAGE_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "Bad Gateway"),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "Gateway Timeout"),
    429: ("TooManyRequests", "Please reduce your request rate."),
}
_KNOBS = (
    "error_rates",
    "retry_after",
    "reset_rate",
    "truncate_rate",
    "wrong_range_rate",
    "stall_rate",
    "stall_seconds",
    "blackhole",
    "blackhole_storage",
    "down",
    "down_storage",
    "hold_pages_from",
    "revoked_tokens",
    "only",
    "spare",
)


@dataclass(frozen=True)
class Decision:
    """What to do to one request: stall first, then an error status, or cut or skew the body."""

    stall: float = 0.0
    status: int | None = None  # answer this error status instead
    cut: str | None = None  # "reset" or "truncate"
    wrong_range: float | None = None  # a draw in [0, 1) choosing how the range is wrong

    @property
    def marker(self) -> str | None:
        """The RequestRecord.fault text, None when nothing is injected."""
        parts = ["stall"] if self.stall > 0 else []
        if self.status is not None:
            parts.append(str(self.status))
        if self.cut is not None:
            parts.append(self.cut)
        if self.wrong_range is not None:
            parts.append("wrong-range")
        return "+".join(parts) or None


NO_FAULT = Decision()


@dataclass
class Faults:
    """The fault plan of one FakeGC (see the module docstring); safe to change while serving."""

    error_rates: dict[int, float] = field(default_factory=dict)
    retry_after: str = "1"
    reset_rate: float = 0.0
    truncate_rate: float = 0.0
    wrong_range_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 1.0
    blackhole: bool = False
    blackhole_storage: bool = False
    down: bool = False
    down_storage: bool = False
    hold_pages_from: int | None = None
    revoked_tokens: set[str] = field(default_factory=set)
    only: set[str] | None = None
    spare: set[str] = field(default_factory=set)
    seed: int | None = None
    _lock: threading.RLock = field(
        default_factory=threading.RLock, init=False, repr=False, compare=False
    )
    _injected: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("only", "spare") and value is not None:
            value = set(value)
            unknown = value - set(ENDPOINTS)
            if unknown:
                raise ValueError(f"unknown endpoint names in {name}: {sorted(unknown)}")
        if name == "seed":
            # Assigning the seed (again) restarts the sequence of decisions.
            object.__setattr__(self, "_rng", random.Random(value))
        object.__setattr__(self, name, value)

    # -- switching --------------------------------------------------------------------------------

    def configure(self, **knobs: Any) -> Faults:
        """Set several knobs at once, atomically for the handlers; unknown names: TypeError."""
        unknown = set(knobs) - {*_KNOBS, "seed"}
        if unknown:
            raise TypeError(f"unknown fault knobs: {sorted(unknown)}")
        with self._lock:
            for name, value in knobs.items():
                if name == "error_rates":
                    value = {int(status): float(rate) for status, rate in value.items()}
                elif name == "revoked_tokens":
                    value = set(value)
                setattr(self, name, value)
        return self

    def clear(self) -> Faults:
        """Switch every fault off (all knobs to their defaults); `seed` and counters stay."""
        defaults = Faults()
        with self._lock:
            for name in _KNOBS:
                setattr(self, name, getattr(defaults, name))
        return self

    # -- counters ---------------------------------------------------------------------------------

    @property
    def injected(self) -> dict[str, int]:
        """How many faults of each kind were injected (a snapshot)."""
        with self._lock:
            return dict(self._injected)

    def reset_injected(self) -> None:
        with self._lock:
            self._injected.clear()

    def count(self, kind: str) -> None:
        with self._lock:
            self._injected[kind] = self._injected.get(kind, 0) + 1

    # -- decisions, used by the handlers ----------------------------------------------------------

    def is_down(self, storage: bool) -> bool:
        return self.down or (storage and self.down_storage)

    def holds_page(self, offset: int) -> bool:
        held = self.hold_pages_from
        return held is not None and offset >= held

    def is_blackholed(self, storage: bool) -> bool:
        return self.blackhole or (storage and self.blackhole_storage)

    def token_revoked(self, token: str) -> bool:
        """Whether `token` is revoked (counted as "revoked" when it is)."""
        with self._lock:
            revoked = token in self.revoked_tokens
            if revoked:
                self._injected["revoked"] = self._injected.get("revoked", 0) + 1
        return revoked

    def decide(self, endpoint: str, *, ranged: bool = False) -> Decision:
        """The random faults for one request to `endpoint`; `ranged`: it would be a 206.

        Counts what it injects. Each eligible request draws three numbers (stall, fault, how).
        """
        with self._lock:
            if self.only is not None and endpoint not in self.only:
                return NO_FAULT
            if endpoint in self.spare:
                return NO_FAULT
            rng: random.Random = self.__dict__["_rng"]
            stall_draw, draw, how = rng.random(), rng.random(), rng.random()
            stall = self.stall_seconds if stall_draw < self.stall_rate else 0.0
            status: int | None = None
            cut: str | None = None
            wrong: float | None = None
            edge = 0.0
            for code, rate in list(self.error_rates.items()):
                edge += rate
                if draw < edge:
                    status = code
                    break
            else:
                if draw < (edge := edge + self.reset_rate):
                    cut = "reset"
                elif draw < (edge := edge + self.truncate_rate):
                    cut = "truncate"
                elif draw < edge + self.wrong_range_rate and ranged:
                    wrong = how
            decision = Decision(stall, status, cut, wrong)
            if stall > 0:
                self._injected["stall"] = self._injected.get("stall", 0) + 1
            kind = str(status) if status is not None else cut
            if kind is None and wrong is not None:
                kind = "wrong-range"
            if kind is not None:
                self._injected[kind] = self._injected.get(kind, 0) + 1
            return decision

    # -- error bodies -----------------------------------------------------------------------------

    def site_error(self, status: int) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """The JSON body and extra headers of an injected site error."""
        if status == 429:
            detail = "Request was throttled."
            if self.retry_after.isdigit():
                n = int(self.retry_after)
                detail += f" Expected available in {n} second{'' if n == 1 else 's'}."
            return {"detail": detail}, [("Retry-After", self.retry_after)]
        return {"detail": _SITE_DETAIL.get(status) or _phrase(status)}, []

    def storage_error(self, status: int) -> tuple[str, str, list[tuple[str, str]]]:
        """The S3 error code, message and extra headers of an injected storage error."""
        code, message = _STORAGE_ERRORS.get(status) or (
            _phrase(status).replace(" ", ""),
            _phrase(status),
        )
        headers = [("Retry-After", self.retry_after)] if status == 429 else []
        return code, message, headers


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def cut_length(length: int) -> int:
    """How many body bytes a reset or truncated answer of `length` bytes still carries."""
    return min(length // 2, CUT_LIMIT)


def wrong_range(start: int, end: int, total: int, how: float) -> tuple[int, int, int]:
    """(start, end exclusive, total) of a Content-Range that differs from the asked one.

    `how` (a draw in [0, 1)) picks among the other ranges that exist (the same length shifted
    forward or back, or one byte shorter) and a wrong total size.
    """
    length = end - start
    options: list[tuple[int, int, int]] = []
    if end < total:
        step = min(total - end, max(1, length))
        options.append((start + step, end + step, total))
    if start > 0:
        step = min(start, max(1, length))
        options.append((start - step, end - step, total))
    if length > 1:
        options.append((start, end - 1, total))
    options.append((start, end, total + 1))
    return options[min(int(how * len(options)), len(options) - 1)]
