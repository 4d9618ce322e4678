"""StorageClient: ranged GETs on storage hosts, the body received straight into a block buffer.

Storage (S3, CloudFront, the fake's object store) answers `Range` requests for signed URLs
(gc-api.md §3.12). This is a small HTTP/1.1 client for exactly that, because the general client
costs too much per byte: httpx/httpcore/h11 hand a body over in 64 KiB chunks, each a new bytes
object that then had to be joined into a block (one copy) and went through several layers of
Python per chunk (~31 % of the daemon's CPU on a cold read; receiving with `recv_into` a
preallocated buffer took 0.21-0.24 CPU-s per GiB against 1.2-1.5, measured in isolation, issue
10). httpx still resolves `/media/` URLs (resolver.py): that is where the token goes, and it
needs redirects, proxies and everything else a general client does.

The path of a body: h11 (which ships with httpx) writes the request and parses the status line
and headers; the body bytes that arrived with the headers are copied into the caller's buffer,
and the rest is read with `socket.recv_into(buffer[pos:])`, straight from the socket into the
block buffer: one copy (kernel to buffer), no bytes object per chunk. Over TLS, trio's
SSLStream decrypts into a bytes object that is copied into the buffer (two copies; its records
are at most 16 KiB). A body without Content-Length (chunked, or ended by closing the
connection) goes through h11's events, copied into the buffer the same way: correct, slower,
and not what S3 sends.

Moving parts:

- `StorageClient`: one keep-alive pool of idle connections per origin (scheme, host, port),
  at most `max_connections` requests at once, TLS with httpx's trust store
  (`httpx.create_ssl_context()`, so storage trusts what the /media/ client trusts).
- `StorageResponse`: status and headers of one answer, `readinto()` for a body into a buffer
  (calling back as it passes given offsets, so that each block is handed on as soon as its
  last byte arrived) and `read()` for small bodies.

Invariants:
- We send only the headers the caller gives (Range, and a pre-signed request's own headers)
  plus Host, User-Agent and Accept-Encoding: identity. No token ever: this client has none.
- Error messages name the origin and path, never the query: a signed URL's query is a
  credential for up to an hour.
- Every transport failure (refused, reset, TLS, malformed HTTP, a stall longer than `timeout`
  between two receives) becomes `Unavailable`; a body that ends early or runs long is
  `BadResponse`. Both are retried by the caller; neither leaves a byte in a reader's hands that
  the caller did not verify (the caller checks status, Content-Range and length before using
  the body: `check_partial`).
- A connection returns to the pool only after its response was read to the exact end of a
  framed body (Content-Length or chunked); one that was cancelled, failed or left unread, or
  whose body was delimited by the server's close, is closed. A request on a reused connection that
  the server had closed (before any answer byte arrived) is sent once more on a new one.
- Blocking calls are bounded: connecting, sending, the head and each gap in the body by
  `timeout` each (the caller's deadline bounds the whole).

Proxies: like httpx for /media/ (and curl), the environment's `HTTPS_PROXY`, `HTTP_PROXY`,
`ALL_PROXY` and `NO_PROXY` (either case) apply: an https origin is reached through the proxy with
`CONNECT host:port` and TLS inside the tunnel, an http origin by sending the request to the
proxy in absolute form. Only `http://` proxy URLs; credentials in the proxy URL go out as
`Proxy-Authorization: Basic` to the proxy only, never into a log line or an error.

Limitations: HTTP/1.1 only; no proxy reached over TLS (`https://` proxy URLs are refused at
start with a warning and storage is reached directly).
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import unquote, urlsplit

import h11
import httpx
import trio

from .errors import BadResponse, NotFound, Unavailable
from .retry import is_transient_status, parse_retry_after

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
# Requests in flight at once across all origins: read-ahead keeps up to 8 ranges in flight
# per file; 64 lets several readers do that at once.
DEFAULT_MAX_CONNECTIONS = 64
# Idle keep-alive connections kept per origin, and for how long. S3 closes idle connections
# after about 20 s; a connection the server closed is noticed before use (it is readable) and
# one closed in the moment between is replaced once without a retry delay.
MAX_IDLE_PER_ORIGIN = 16
IDLE_TIMEOUT = 60.0
# Bodies we read to keep a connection (error answers, probes) are at most this long: S3's
# XML errors are < 1 KiB. Longer ones close the connection instead.
DRAIN_LIMIT = 64 << 10
# What one receive asks for while reading the head: a head is < 1 KiB, and what comes with it
# is the start of the body (copied once into the caller's buffer).
HEAD_RECEIVE = 64 << 10
USER_AGENT = "gcfs"

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


# -- the rules a storage answer must follow (pure) ------------------------------------------


class Expired(Exception):
    """Storage answered 401 or 403: the signature expired (or was never valid). The caller
    resolves the /media/ URL again, once; refused again, 403 is EACCES and 401 EIO."""

    def __init__(self, where: str, status: int = 403) -> None:
        super().__init__(where)
        self.status = status


# Answers that send us elsewhere: followed once (a storage region's 301/307), never more.
REDIRECTS = (301, 302, 303, 307, 308)


def check_partial(
    status: int, headers: Mapping[str, str], first: int, last: int, total: int
) -> int:
    """Check a ranged GET's answer to `bytes=first-last` of a `total`-byte file before its body
    is read; return the body length to expect. Raise BadResponse for anything but exactly that.
    """
    if status != 206:
        raise BadResponse(f"storage answered HTTP {status} to a range request")
    content_range = headers.get("content-range", "")
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    if match is None:
        raise BadResponse(f"storage sent a bad Content-Range {content_range!r}")
    got = tuple(int(group) for group in match.groups())
    if got != (first, last, total):
        raise BadResponse(
            f"storage sent bytes {got[0]}-{got[1]}/{got[2]} for bytes {first}-{last}/{total}"
        )
    expected = last - first + 1
    length = headers.get("content-length")
    if length is not None and length.strip() != str(expected):
        raise BadResponse(f"storage sent Content-Length {length} for a {expected}-byte range")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadResponse(f"storage sent a range with Content-Encoding {encoding}")
    return expected


def parse_size(status: int, headers: Mapping[str, str]) -> int:
    """The total size from the answer to `Range: bytes=0-0`."""
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(headers.get("content-range", "").strip())
        if match is None or int(match.group(1)) != 0:
            raise BadResponse(f"storage sent a bad Content-Range {headers.get('content-range')!r}")
        return int(match.group(3))
    if status == 200:  # Range ignored: the whole file is coming; its length is the size
        length = headers.get("content-length", "").strip()
        if not length.isdigit():
            raise BadResponse("storage ignored Range and sent no Content-Length")
        return int(length)
    if status == 416:  # only an empty file cannot satisfy bytes=0-0
        match = _UNSATISFIED_RANGE.fullmatch(headers.get("content-range", "").strip())
        if match is None or match.group(1) != "0":
            raise BadResponse("storage could not satisfy bytes=0-0 of a non-empty file")
        return 0
    raise BadResponse(f"storage answered HTTP {status} to a size probe")


def raise_for_status(status: int, where: str, headers: Mapping[str, str] | None = None) -> None:
    """The errors of a storage answer the caller does not handle itself: 401/403 are
    `Expired` (resolve again), 404 `NotFound`, 429/502/503/504 a transient `Unavailable`
    (with the server's Retry-After), other 5xx, a redirect the caller did not follow and
    other 4xx a permanent one: retrying the same request cannot change the answer."""
    if status in (401, 403):
        raise Expired(where, status)
    if status == 404:
        raise NotFound(f"{where}: the file is missing in storage")
    raise_unavailable(status, where, headers)
    if status in REDIRECTS or 400 <= status < 500:
        raise Unavailable(f"{where}: HTTP {status}", transient=False, status=status)


def raise_unavailable(status: int, where: str, headers: Mapping[str, str] | None) -> None:
    """429/502/503/504 are worth retrying (with the server's Retry-After); other 5xx not."""
    if is_transient_status(status):
        retry_after = parse_retry_after((headers or {}).get("retry-after"))
        raise Unavailable(f"{where}: HTTP {status}", retry_after=retry_after, status=status)
    if status >= 500:
        raise Unavailable(f"{where}: HTTP {status}", transient=False, status=status)


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> tuple[_Origin, str]:
    """The origin and the request target (path and query) of an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("storage URLs are absolute http(s) URLs")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return _Origin(parts.scheme, parts.hostname, port), target


def redact(url: str) -> str:
    """A URL without its query and fragment: a signed URL's query is a credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass(frozen=True, slots=True)
class _Proxy:
    """An http:// proxy: where it listens, and its Proxy-Authorization header (or None)."""

    origin: _Origin
    authorization: str | None = field(default=None, repr=False)  # a credential

    @classmethod
    def parse(cls, url: str) -> _Proxy | None:
        """The proxy of an environment variable's URL; None for one we cannot use."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            return None
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(_Origin("http", parts.hostname, parts.port or 80), authorization)


def proxy_setting(url: str) -> _Proxy:
    """The proxy of a setting such as `http://user:secret@proxy:3128` (ValueError if it is
    not an http:// proxy URL)."""
    proxy = _Proxy.parse(url)
    if proxy is None:
        raise ValueError("only http:// proxies are supported")
    return proxy


def environment_proxies() -> dict[str, _Proxy]:
    """scheme -> proxy from the environment, as httpx and curl read it, minus NO_PROXY hosts
    (applied per origin by `proxy_for`). An https:// proxy is refused with a warning."""
    found: dict[str, _Proxy] = {}
    settings = urllib.request.getproxies_environment()
    for scheme in ("http", "https"):
        url = settings.get(scheme) or settings.get("all")
        if not url:
            continue
        proxy = _Proxy.parse(url)
        if proxy is None:
            log.warning(
                "storage: ignoring the %s proxy setting (only http:// proxies work)", scheme
            )
            continue
        found[scheme] = proxy
    return found


def proxy_for(origin: _Origin, proxies: Mapping[str, _Proxy]) -> _Proxy | None:
    """The proxy to reach `origin` through, or None (none set, or NO_PROXY names the host)."""
    proxy = proxies.get(origin.scheme)
    if proxy is None or urllib.request.proxy_bypass(origin.host):
        return None
    return proxy


class _Connection:
    """One TCP (or TLS) connection to an origin, possibly through a proxy."""

    __slots__ = ("absolute_form", "idle_since", "origin", "proxy_authorization", "raw", "stream")

    def __init__(
        self,
        origin: _Origin,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        raw: trio.socket.SocketType,
        *,
        via: _Proxy | None = None,
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.raw = raw  # the TCP socket: recv_into for plain HTTP, closing, liveness
        self.idle_since = 0.0
        # Plain HTTP through a proxy: the request line carries the whole URL, and the proxy
        # its credentials (over TLS the tunnel's CONNECT carried them, the origin gets none).
        plain_via_proxy = via is not None and origin.scheme == "http"
        self.absolute_form = plain_via_proxy
        self.proxy_authorization = via.authorization if plain_via_proxy and via else None

    @property
    def plain(self) -> bool:
        return isinstance(self.stream, trio.SocketStream)

    async def receive_into(self, view: memoryview) -> int:
        """Receive up to len(view) bytes into `view`; 0 at the end of the stream."""
        if isinstance(self.stream, trio.SocketStream):
            return await self.raw.recv_into(view, len(view))
        data = await self.stream.receive_some(len(view))
        view[: len(data)] = data
        return len(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        return data if isinstance(data, bytes) else bytes(data)

    def usable(self, now: float) -> bool:
        """An idle connection is usable if it is young and nothing arrived on it: data (or
        the end of the stream) on an idle connection means the server closed or broke it."""
        return now - self.idle_since < IDLE_TIMEOUT and not self.raw.is_readable()

    def close(self) -> None:
        """Close at once, without a TLS close_notify (storage does not need one; trio's
        https_compatible mode does not expect one either). No checkpoint."""
        self.raw.close()


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


class StorageResponse:
    """The status and headers of one storage answer; the body is read on demand."""

    def __init__(
        self,
        connection: _Connection,
        h11_connection: h11.Connection,
        event: h11.Response,
        where: str,
        timeout: float,
    ) -> None:
        self.status = event.status_code
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            # Repeated headers are joined like httpx does, so a doubled Content-Range
            # fails the exact match that checks it.
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.headers: Mapping[str, str] = headers
        self.where = where
        self._connection = connection
        self._h11 = h11_connection
        self._timeout = timeout
        length = headers.get("content-length")
        # h11 has checked that a Content-Length is one well-formed number.
        self.content_length = int(length) if length is not None else None
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._framed = self.content_length is not None and not chunked
        # A body with no framing (no Content-Length, not chunked) ends when the server closes
        # the connection: it is dead once read, and must never go back to the pool.
        self._keep_alive = (
            event.http_version == b"1.1"
            and "close" not in headers.get("connection", "").lower()
            and (self.content_length is not None or chunked)
        )
        self.received = 0  # body bytes received so far (also after a failure)
        self.started = False  # readinto() was called: the body is no longer whole on the wire
        self.complete = self._framed and self.content_length == 0

    @property
    def reusable(self) -> bool:
        """The answer was read to its exact end and the server keeps the connection."""
        return self.complete and self._keep_alive

    async def readinto(
        self,
        buffer: memoryview,
        marks: Sequence[int] = (),
        on_mark: Callable[[int], None] | None = None,
    ) -> int:
        """Read the whole body into `buffer`; return its length. `on_mark(i)` is called as
        soon as `marks[i]` bytes (ascending offsets) have arrived. BadResponse when the body
        is longer than `buffer` or shorter than its Content-Length; Unavailable when the
        connection fails or stalls for `timeout`."""
        if self.started:
            raise RuntimeError("the body of a response can be read once")
        self.started = True
        state = _Marks(marks, on_mark)
        if self._framed:
            assert self.content_length is not None
            if self.content_length > len(buffer):
                raise BadResponse(
                    f"{self.where}: {self.content_length} bytes sent, {len(buffer)} asked for"
                )
            return await self._read_framed(buffer[: self.content_length], state)
        return await self._read_events(buffer, state)

    async def read(self, limit: int = DRAIN_LIMIT) -> bytes:
        """A small body as bytes (an error answer, a probe's byte); BadResponse if it is
        longer than `limit`."""
        buffer = bytearray(limit if self.content_length is None else self.content_length)
        if len(buffer) > limit:
            raise BadResponse(f"{self.where}: a {len(buffer)}-byte body where {limit} at most")
        length = await self.readinto(memoryview(buffer))
        return bytes(buffer[:length])

    async def _read_framed(self, view: memoryview, marks: _Marks) -> int:
        """Content-Length framing: what h11 holds already, then recv_into the rest."""
        length = len(view)
        pending, _ = self._h11.trailing_data
        pos = min(len(pending), length)
        view[:pos] = pending[:pos]
        marks.passed(pos)
        connection = self._connection
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + self._timeout
            try:
                while pos < length:
                    n = await connection.receive_into(view[pos:])
                    if n == 0:
                        break
                    pos += n
                    # The deadline is a gap between receives, not a limit on the whole body.
                    scope.deadline = trio.current_time() + self._timeout
                    marks.passed(pos)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Unavailable(f"{self.where}: {type(exc).__name__} in the body") from exc
            finally:
                self.received = pos
        if scope.cancelled_caught:
            raise Unavailable(f"{self.where}: timed out in the body")
        if pos < length:
            raise BadResponse(f"{self.where}: {pos} of {length} bytes arrived")
        # Bytes after the body on a connection we only ever sent one request on: the server
        # sent more than it announced. Do not reuse the connection.
        self.complete = len(pending) <= length
        return pos

    async def _read_events(self, view: memoryview, marks: _Marks) -> int:
        """Chunked or close-delimited bodies, through h11's events (not S3's way)."""
        pos = 0
        with trio.move_on_after(self._timeout) as scope:
            try:
                while True:
                    event = await self._next_event()
                    scope.deadline = trio.current_time() + self._timeout
                    if isinstance(event, h11.EndOfMessage):
                        break
                    if not isinstance(event, h11.Data):
                        raise Unavailable(f"{self.where}: unexpected {type(event).__name__}")
                    end = pos + len(event.data)
                    if end > len(view):
                        raise BadResponse(
                            f"{self.where}: more than the {len(view)} bytes asked for"
                        )
                    view[pos:end] = event.data
                    pos = end
                    marks.passed(pos)
            finally:
                self.received = pos
        if scope.cancelled_caught:
            raise Unavailable(f"{self.where}: timed out in the body")
        self.complete = self._h11.their_state is h11.DONE
        return pos

    async def _next_event(self) -> object:
        """h11's next event other than NEED_DATA (an Event, or PAUSED)."""
        try:
            while True:
                event = self._h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                data = await self._connection.receive_some(HEAD_RECEIVE)
                self._h11.receive_data(data)
        except h11.RemoteProtocolError as exc:
            # A body cut short without Content-Length framing (h11 sees the close early).
            raise BadResponse(f"{self.where}: the body ended early ({exc})") from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Unavailable(f"{self.where}: {type(exc).__name__} in the body") from exc


class _Marks:
    """Calls `on_mark(i)` once for each offset `marks[i]` the body has reached."""

    __slots__ = ("_marks", "_next", "_on_mark")

    def __init__(self, marks: Sequence[int], on_mark: Callable[[int], None] | None) -> None:
        self._marks = marks
        self._on_mark = on_mark
        self._next = 0

    def passed(self, position: int) -> None:
        marks, on_mark = self._marks, self._on_mark
        while self._next < len(marks) and position >= marks[self._next]:
            if on_mark is not None:
                on_mark(self._next)
            self._next += 1


class StorageClient:
    """Keep-alive HTTP/1.1 GETs on storage origins (module docstring)."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Mapping[str, _Proxy] | None = None,
    ) -> None:
        self.timeout = timeout
        self._limiter = trio.CapacityLimiter(max_connections)
        self._ssl_context = ssl_context
        # scheme -> proxy; the environment's by default, as for the /media/ client (httpx).
        self._proxies = environment_proxies() if proxies is None else dict(proxies)
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self.connections_opened = 0  # statistics: new TCP connections

    def request(self, url: str, headers: Mapping[str, str], *, where: str) -> StorageRequest:
        """`async with client.request(url, headers, where=...) as response:` one GET."""
        origin, target = split_url(url)
        return StorageRequest(self, origin, target, headers, where)

    def close(self) -> None:
        """Close the idle connections; no checkpoint."""
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()

    async def __aenter__(self) -> StorageClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- connections ------------------------------------------------------------------------

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = trio.current_time()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            if connection.usable(now):
                return connection
            connection.close()
        return None

    def _put_idle(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.origin, deque())
        connection.idle_since = trio.current_time()
        idle.append(connection)
        while len(idle) > MAX_IDLE_PER_ORIGIN:
            idle.popleft().close()

    async def _connect(self, origin: _Origin, where: str) -> _Connection:
        proxy = proxy_for(origin, self._proxies)
        peer = origin if proxy is None else proxy.origin
        try:
            with trio.fail_after(self.timeout):
                tcp = await trio.open_tcp_stream(peer.host, peer.port)
                self.connections_opened += 1
                if origin.scheme == "http":
                    return _Connection(origin, tcp, tcp.socket, via=proxy)
                try:
                    if proxy is not None:
                        await _tunnel(tcp, origin, proxy, where)
                    if self._ssl_context is None:
                        self._ssl_context = httpx.create_ssl_context()
                    tls = trio.SSLStream(
                        tcp, self._ssl_context, server_hostname=origin.host, https_compatible=True
                    )
                    await tls.do_handshake()
                except BaseException:
                    tcp.socket.close()
                    raise
                return _Connection(origin, tls, tcp.socket, via=proxy)
        except trio.TooSlowError:
            raise Unavailable(f"{where}: connecting timed out") from None
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise Unavailable(f"{where}: cannot connect ({type(exc).__name__})") from exc


async def _tunnel(tcp: trio.SocketStream, origin: _Origin, proxy: _Proxy, where: str) -> None:
    """Ask the proxy for a tunnel to `origin` (CONNECT); Unavailable unless it answers 2xx."""
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    authority = f"{host}:{origin.port}"  # CONNECT names the port, default or not
    headers = [("Host", authority)]
    if proxy.authorization is not None:
        headers.append(("Proxy-Authorization", proxy.authorization))
    protocol = h11.Connection(h11.CLIENT)
    await tcp.send_all(
        protocol.send(h11.Request(method="CONNECT", target=authority, headers=headers))
    )
    while True:
        event = protocol.next_event()
        if event is h11.NEED_DATA:
            protocol.receive_data(await tcp.receive_some(HEAD_RECEIVE))
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response) and 200 <= event.status_code < 300:
            if protocol.trailing_data[0]:
                raise Unavailable(f"{where}: the proxy sent bytes before the tunnel opened")
            return
        status = getattr(event, "status_code", "?")
        raise Unavailable(f"{where}: the proxy refused the tunnel (HTTP {status})")


class StorageRequest:
    """One GET: entering sends it and returns the response head; leaving returns the
    connection to the pool if the body was read to its end, and closes it otherwise."""

    def __init__(
        self,
        client: StorageClient,
        origin: _Origin,
        target: str,
        headers: Mapping[str, str],
        where: str,
    ) -> None:
        self._client = client
        self._origin = origin
        self._target = target
        self._headers = headers
        self._where = where
        self._connection: _Connection | None = None
        self._response: StorageResponse | None = None

    async def __aenter__(self) -> StorageResponse:
        client = self._client
        await client._limiter.acquire_on_behalf_of(self)
        try:
            for _ in range(2):
                reused = client._take_idle(self._origin)
                connection = reused or await client._connect(self._origin, self._where)
                self._connection = connection
                try:
                    self._response = await self._send(connection, reused is not None)
                    return self._response
                except _Stale:
                    connection.close()
                    self._connection = None
                    log.debug("%s: a kept-alive connection was closed; sending again", self._where)
            raise Unavailable(f"{self._where}: the connection closed before the answer")
        except BaseException:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            client._limiter.release_on_behalf_of(self)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection, response = self._connection, self._response
        self._connection = self._response = None
        try:
            if connection is None or response is None:
                return
            # An error answer read to its end keeps the connection; so does a small body
            # nobody began to read (a probe's one byte), unless we are being cancelled. A body
            # whose reading failed part way is never read again: the connection closes.
            if (
                not response.complete
                and not response.started
                and (exc is None or isinstance(exc, Exception))
                and response.content_length is not None
                and response.content_length <= DRAIN_LIMIT
            ):
                try:
                    with trio.move_on_after(self._client.timeout):
                        await response.read()
                except (BadResponse, Unavailable):
                    pass
            if response.reusable:
                self._client._put_idle(connection)
            else:
                connection.close()
        finally:
            self._client._limiter.release_on_behalf_of(self)

    async def _send(self, connection: _Connection, reused: bool) -> StorageResponse:
        """Send the request and read the head. `_Stale` when a reused connection turns out
        closed before any byte of the answer arrived (the GET is safe to send again)."""
        where = self._where
        protocol = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", self._origin.host_header),
            ("User-Agent", USER_AGENT),
            ("Accept-Encoding", "identity"),
            *self._headers.items(),
        ]
        target = self._target
        if connection.absolute_form:
            target = f"http://{self._origin.host_header}{target}"
            if connection.proxy_authorization is not None:
                headers.append(("Proxy-Authorization", connection.proxy_authorization))
        request = h11.Request(method="GET", target=target, headers=headers)
        data = protocol.send(request) + (protocol.send(h11.EndOfMessage()) or b"")
        received_any = False
        try:
            with trio.fail_after(self._client.timeout):
                await connection.stream.send_all(data)
                while True:
                    event = protocol.next_event()
                    if event is h11.NEED_DATA:
                        chunk = await connection.receive_some(HEAD_RECEIVE)
                        if not chunk and reused and not received_any:
                            raise _Stale
                        received_any = received_any or bool(chunk)
                        protocol.receive_data(chunk)
                        continue
                    if isinstance(event, h11.InformationalResponse):
                        continue  # 100 Continue and friends: the real answer follows
                    if isinstance(event, h11.Response):
                        return StorageResponse(
                            connection, protocol, event, where, self._client.timeout
                        )
                    raise Unavailable(f"{where}: unexpected {type(event).__name__}")
        except _Stale:
            raise
        except trio.TooSlowError:
            raise Unavailable(f"{where}: no answer within {self._client.timeout:g} s") from None
        except h11.RemoteProtocolError as exc:
            if reused and not received_any:
                raise _Stale from exc
            raise Unavailable(f"{where}: a malformed answer") from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if reused and not received_any:
                raise _Stale from exc
            raise Unavailable(f"{where}: {type(exc).__name__}") from exc


__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_TIMEOUT",
    "REDIRECTS",
    "Expired",
    "StorageClient",
    "StorageRequest",
    "StorageResponse",
    "check_partial",
    "parse_size",
    "raise_for_status",
    "raise_unavailable",
    "redact",
    "split_url",
]
