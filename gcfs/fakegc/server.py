"""`FakeGC`: the fake Grand Challenge served over real HTTP on loopback, in a daemon thread.

    fake = FakeGC(world)              # or: with FakeGC(world) as fake: ...
    fake.start()                      # binds 127.0.0.1:<free port>, serves until stop()
    httpx.get(fake.base_url + "/api/v1/archives/", headers={"Authorization": f"Bearer {tok}"})
    fake.count("archives-list")       # requests seen per endpoint name
    fake.stop()

It speaks HTTP/1.1 with keep-alive and a Content-Length on every response, as gcfs's httpx client
expects. Knobs, settable while running: `latency` (seconds added to every API request),
`per_item_latency` (seconds per serialized result of a list page), `media_latency` (seconds
added to every `/media/` request: the site's redirects are round trips to the same server as
the API, default 0), `socket_field` (values also carry `socket`, the live API's newer name for
`interface`, gc-api.md §9) and `job_filters_fixed` (False by default: `cases/images/?job_input=`
and `?job_output=` answer 500 with an HTML page for a valid pk, as the real server does,
gc-api.md §3.11; True behaves as a fixed server).

A second origin, the object store, runs beside the site on its own port (`fake.storage_url`):
`/media/` answers 302 to presigned URLs there (see storage.py). Its knobs: `signature_lifetime`
(X-Amz-Expires of new URLs, seconds, default 3600), `storage_latency` (seconds added to every
storage request), `storage_bandwidth` (bytes per second per connection, None = unlimited) and
`clock` (a time.time-like callable used to sign and to check expiry). Bodies are streamed in
64 KiB writes from at most 1 MiB pieces, so 300 MiB objects need no 300 MiB of memory;
`storage_bytes_sent` counts the body bytes handed to the socket, `storage_peak_concurrency` the
most storage requests answered at once. `presign(key)` builds a URL the way /media/ does, e.g.
an expired one with `signed_at=`. `plain_storage_view` (default False) is for benchmarks only:
it adds an unsigned view of the image files with HTML directory indexes,
`{storage_url}/plain/<image pk>/<file name>`, that rclone's http remote can mount; Grand
Challenge has no such thing, and while it is off `/plain/` is an unknown key like any other.

`fake.faults` (a `Faults`, see faults.py) injects, at run time and per request, error statuses,
connection resets, short bodies, wrong Content-Ranges, stalls, blackholes, outages and revoked
tokens on either origin; a faulted request's record names the fault in `fault`.

Endpoint names in `RequestRecord.endpoint` and `count()`:

    api-root                    GET /api/v1/ (403 for non-staff, 401 anonymous)
    profiles-self               /api/v1/profiles/users/self/
    archives-list/-detail       /api/v1/archives/[<pk>/]
    archives-items-list/-detail /api/v1/archives/items/[<pk>/]
    algorithms-list/-detail     /api/v1/algorithms/[<pk>/]
    algorithms-images-list/-detail  /api/v1/algorithms/images/[<pk>/]
    algorithms-jobs-list/-detail    /api/v1/algorithms/jobs/[<pk>/]
    reader-studies-list/-detail /api/v1/reader-studies/[<pk>/]
    display-sets-list/-detail   /api/v1/reader-studies/display-sets/[<pk>/]
    questions-list/-detail      /api/v1/reader-studies/questions/[<pk>/]
    answers-list/-detail        /api/v1/reader-studies/answers/[<pk>/]
    answers-mine                /api/v1/reader-studies/answers/mine/
    cases-images-list/-detail   /api/v1/cases/images/[<pk>/] (the list answers 500 HTML to
                                ?job_input=/?job_output= with a valid pk: job_filters_fixed)
    cases-images-dicom-instances  /api/v1/cases/images/<pk>/dicom/instances/ (signed requests)
    components-interfaces-list/-detail  /api/v1/components/interfaces/[<int pk>/]
    website-algorithm           /algorithms/<slug>/ (200 public, 302 hidden, 404 absent)
    website-reader-study        /reader-studies/<slug>/ (same)
    website-archive             /archives/<slug>/ (always 302 to the login page)
    redirect-slash              any path without a trailing slash (301), except /media/
    media-image-file            GET /media/images/<hh>/<hh>/<image>/<file>/<name>: 302 to storage,
                                403 hidden, 404 "Image not found." absent
    media-civ-file              GET /media/components/componentinterfacevalue/<hh>/<hh>/<pk>/<name>:
                                302, or 404 for hidden and absent alike
    media-algorithm-image       GET /media/docker/images/algorithms/algorithmimage/<pk>/<name>:
                                302 for the algorithm's editors, 403 others, 404 absent
    not-found                   everything else, incl. other /media/ paths (404 HTML)
    server-error                a bug in the fake (500 {"detail": "fake server error"})

On the storage origin (records carry `range` and `had_authorization`):

    storage-get                 GET of a valid presigned URL: 200, or 206 for a single Range;
                                GET of a DICOM instance with its signed headers, likewise
    storage-plain               GET or HEAD below /plain/ while `plain_storage_view` is on: an
                                HTML index (path ending in "/"), or a file, 200 or 206
    storage-rejected            400 (an Authorization header beside a presigned query: the
                                client forwarded its token), 403 (HEAD, expired, bad or missing
                                signature), 404 NoSuchKey, 416 unsatisfiable Range
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote

from gcfs.fakegc.api import JSON_TYPE, Reply, Request, Site, json_bytes
from gcfs.fakegc.faults import NO_FAULT, Decision, Faults, cut_length, wrong_range
from gcfs.fakegc.storage import (
    BUCKET,
    HTML_TYPE,
    NO_SUCH_KEY,
    OCTET_STREAM,
    PLAIN_PREFIX,
    TWO_AUTH_MECHANISMS,
    XML_TYPE,
    Signer,
    StorageError,
    dicom_object,
    object_for_key,
    parse_range,
    plain_listing,
    plain_object,
)
from gcfs.fakegc.world import Content, World, content_chunks, content_size

SEND_CHUNK = 64 * 1024  # storage bodies leave in writes of this size


@dataclass(frozen=True)
class RequestRecord:
    """One request as the fake saw it. `query` keeps the last value of each parameter."""

    method: str
    path: str
    query: dict[str, str]
    endpoint: str
    status: int
    user: str | None
    range: str | None = None  # the Range header as sent (storage requests)
    had_authorization: bool = False  # an Authorization header was present
    fault: str | None = None  # the injected fault(s), e.g. "503", "stall+reset" (faults.py)


class _Dropped(ConnectionError):
    """Raised after an injected reset, so the handler stops without a traceback."""


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that stop() can close idle keep-alive sockets too."""

    daemon_threads = True
    # socketserver's default listen backlog is 5: six or more clients connecting at once (curl
    # -Z with 8 transfers, a reader's parallel ranges) overflowed it, and each dropped SYN cost
    # its client the kernel's 1 s retransmit (TcpExtListenOverflows counted them).
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        fake: FakeGC,
        handler: type[BaseHTTPRequestHandler] | None = None,
        *,
        storage: bool = False,
    ) -> None:
        self.fake = fake
        self.storage = storage  # the object store origin (for the *_storage fault knobs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler or _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # faults.down: reset each new connection as soon as it is accepted.
        if self.fake.faults.is_down(self.storage):
            self.fake.faults.count("down")
            _reset(request)
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response (a reader that closed its file, a cancelled
        # read-ahead) is normal traffic, not a server error worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):  # the peer may have closed it already
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one buffered write (flushed by handle_one_request) with Nagle
    # off: otherwise every keep-alive response waits ~40 ms for a delayed ACK.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _serve(self) -> None:
        self._drain_body()
        fake = self.server.fake
        faults = fake.faults
        if faults.is_down(False):
            faults.count("down")
            self._drop()
        request = Request(self.command, self.path, self.headers.get("Authorization"))
        try:
            reply = fake.site.handle(
                request, socket_field=fake.socket_field, job_filters_fixed=fake.job_filters_fixed
            )
        except Exception:
            # A bug in the fake must not take the server down: answer 500 and show the traceback.
            traceback.print_exc(file=sys.stderr)
            reply = Reply(
                500, "server-error", json_bytes({"detail": "fake server error"}), JSON_TYPE
            )
        mutate = fake.mutate
        if mutate is not None and reply.status == 200 and reply.content_type == JSON_TYPE:
            # A broken or newer server: the test's function rewrites the JSON it would send.
            body = mutate(reply.endpoint, json.loads(reply.body))
            reply = dataclasses.replace(reply, body=json_bytes(body))
        had_authorization = request.authorization is not None
        if faults.is_blackholed(False):
            faults.count("blackhole")
            fake._record(
                request, reply, had_authorization=had_authorization, status=0, fault="blackhole"
            )
            _hold(self, lambda: faults.is_blackholed(False))
            return
        offset = _offset_of(request.target)
        if offset is not None and faults.holds_page(offset):
            _wait_while(self, lambda: faults.holds_page(offset))
        fake._delay(reply)
        decision = faults.decide(reply.endpoint)
        fake._stall(decision)
        if decision.status is not None:
            body, headers = faults.site_error(decision.status)
            reply = Reply(
                decision.status, reply.endpoint, json_bytes(body), JSON_TYPE, headers, reply.user
            )
        # Record before replying, so a client that has its answer always sees it counted.
        fake._record(
            request,
            reply,
            had_authorization=had_authorization,
            status=0 if decision.cut else reply.status,
            fault=decision.marker,
        )
        self._send(reply, decision.cut)

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)

    def _send(self, reply: Reply, cut: str | None = None) -> None:
        body = b"" if self.command == "HEAD" else reply.body
        if cut is not None and not body:
            _cut_head(self, reply.status, cut)
        self.send_response(reply.status)
        if reply.content_type is not None:
            self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[: cut_length(len(body))])
        _cut(self, cut)

    def _drop(self) -> None:
        _reset(self.connection, self)
        raise _Dropped("fault injected: down")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.log_requests:
            super().log_message(format, *args)


@dataclass
class _StorageAnswer:
    status: int
    endpoint: str
    headers: list[tuple[str, str]]
    length: int  # the Content-Length
    body: bytes | None = None  # an error body, or None to stream content[start:end]
    content: Content = b""
    start: int = 0


class _StorageHandler(BaseHTTPRequestHandler):
    """The object store: presigned GETs of `/grand-challenge-protected/<key>`, DICOM instances."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        fake = self.server.fake
        fake._storage_busy(+1)
        try:
            self._serve()
        finally:
            fake._storage_busy(-1)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)
        fake = self.server.fake
        faults = fake.faults
        if faults.is_down(True):
            faults.count("down")
            _reset(self.connection, self)
            raise _Dropped("fault injected: down")
        raw_path, _, query_string = self.path.partition("?")
        path = unquote(raw_path)
        query = dict(parse_qsl(query_string, keep_blank_values=True))
        range_header = self.headers.get("Range")
        authorization = self.headers.get("Authorization")
        try:
            answer = self._answer(path, query, range_header, authorization)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            answer = self._error(StorageError(500, "InternalError", "fake server error"), path)

        def record(status: int, fault: str | None) -> None:
            fake._add_record(
                RequestRecord(
                    self.command,
                    raw_path,
                    query,
                    answer.endpoint,
                    status,
                    None,
                    range_header,
                    authorization is not None,
                    fault,
                )
            )

        if faults.is_blackholed(True):
            faults.count("blackhole")
            record(0, "blackhole")
            _hold(self, lambda: faults.is_blackholed(True))
            return
        if fake.storage_latency > 0:
            time.sleep(fake.storage_latency)
        decision = faults.decide(answer.endpoint, ranged=answer.status == 206)
        fake._stall(decision)
        answer = self._apply(answer, decision, path)
        record(0 if decision.cut else answer.status, decision.marker)
        try:
            self._send(answer, decision.cut)
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up mid-body (a cancelled read): not an error of the store.
            self.close_connection = True

    def _answer(
        self, path: str, query: dict[str, str], range_header: str | None, authorization: str | None
    ) -> _StorageAnswer:
        fake = self.server.fake
        signer = fake.signer
        world = fake.world
        prefix = f"/{BUCKET}/"
        content: Content | None
        if path.startswith(prefix):
            if authorization is not None and "X-Amz-Signature" in query:
                return self._error(TWO_AUTH_MECHANISMS, path)
            error = signer.check_query(self.command, path, query)
            if error is not None:
                return self._error(error, path)
            with world.lock:
                content = object_for_key(world, path[len(prefix) :])
        elif path.startswith("/datastore/"):
            error = signer.check_headers(
                self.command,
                path,
                authorization,
                self.headers.get("X-Amz-Date", ""),
                self.headers.get("Accept", ""),
            )
            if error is not None:
                return self._error(error, path)
            with world.lock:
                content = dicom_object(world, path, query.get("imageSetId"))
        elif fake.plain_storage_view and path.startswith(PLAIN_PREFIX):
            return self._plain(path, range_header)
        else:
            content = None
        return self._object(content, path, range_header, "storage-get")

    def _plain(self, path: str, range_header: str | None) -> _StorageAnswer:
        """The benchmark-only unsigned view: an HTML index for a path ending in "/", else a
        file, with Range and HEAD like any object (storage.plain_listing)."""
        world = self.server.fake.world
        with world.lock:
            if path.endswith("/"):
                index = plain_listing(world, path)
                if index is None:
                    return self._error(NO_SUCH_KEY, path)
                return _StorageAnswer(
                    200, "storage-plain", [("Content-Type", HTML_TYPE)], len(index), body=index
                )
            content = plain_object(world, path)
        return self._object(content, path, range_header, "storage-plain")

    def _object(
        self, content: Content | None, path: str, range_header: str | None, endpoint: str
    ) -> _StorageAnswer:
        """The answer for a stored object: 200, 206 for a single Range, 404 or 416."""
        if content is None:
            return self._error(NO_SUCH_KEY, path)
        total = content_size(content)
        wanted = parse_range(range_header, total)
        headers = [("Accept-Ranges", "bytes"), ("Content-Type", OCTET_STREAM)]
        if isinstance(wanted, StorageError):
            return self._error(
                wanted,
                path,
                [("Content-Range", f"bytes */{total}")],
                (("RangeRequested", range_header or ""), ("ActualObjectSize", str(total))),
            )
        if wanted is None:
            return _StorageAnswer(200, endpoint, headers, total, content=content)
        start, end = wanted
        headers.append(("Content-Range", f"bytes {start}-{end - 1}/{total}"))
        return _StorageAnswer(206, endpoint, headers, end - start, content=content, start=start)

    def _apply(self, answer: _StorageAnswer, decision: Decision, path: str) -> _StorageAnswer:
        """The answer with an injected error status or a wrong range, if the decision says so."""
        if decision.status is not None:
            code, message, headers = self.server.fake.faults.storage_error(decision.status)
            error = self._error(StorageError(decision.status, code, message), path, headers)
            error.endpoint = answer.endpoint
            return error
        if decision.wrong_range is not None and answer.status == 206:
            total = content_size(answer.content)
            start, end, named = wrong_range(
                answer.start, answer.start + answer.length, total, decision.wrong_range
            )
            headers = [(k, v) for k, v in answer.headers if k != "Content-Range"]
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{named}"))
            return _StorageAnswer(
                206, answer.endpoint, headers, end - start, content=answer.content, start=start
            )
        return answer

    @staticmethod
    def _error(
        error: StorageError,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> _StorageAnswer:
        body = error.body(path, extra)
        return _StorageAnswer(
            error.status,
            "storage-rejected",
            [("Content-Type", XML_TYPE), *(headers or [])],
            len(body),
            body=body,
        )

    def _send(self, answer: _StorageAnswer, cut: str | None = None) -> None:
        if cut is not None and (self.command == "HEAD" or answer.length == 0):
            _cut_head(self, answer.status, cut)
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(answer.length))
        self.end_headers()
        if self.command == "HEAD":
            return
        # An injected reset or truncation sends only the first part of the body.
        length = answer.length if cut is None else cut_length(answer.length)
        if answer.body is not None:
            self.wfile.write(answer.body[:length])
        else:
            self._stream(answer, length)
        if cut is not None:
            _cut(self, cut)

    def _stream(self, answer: _StorageAnswer, length: int) -> None:
        fake = self.server.fake
        started = time.monotonic()
        sent = 0
        for piece in content_chunks(answer.content, answer.start, answer.start + length):
            for chunk in _slices(piece, SEND_CHUNK):
                bandwidth = fake.storage_bandwidth
                if bandwidth:
                    # Never ahead of the rate: wait until `sent` bytes were due, then send.
                    due = started + sent / bandwidth
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                # Counted before the write: a client holding the whole body sees it counted.
                fake._count_bytes(len(chunk))
                self.wfile.write(chunk)
                sent += len(chunk)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.log_requests:
            super().log_message(format, *args)


def _reset(sock: socket.socket, handler: BaseHTTPRequestHandler | None = None) -> None:
    """Close `sock` with SO_LINGER 0, so that the peer gets an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        if handler is not None:
            # The socket's file objects hold the descriptor open: flush and close them first.
            with contextlib.suppress(OSError, ValueError):
                handler.wfile.flush()
            handler.wfile.close()
            handler.rfile.close()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _cut(handler: BaseHTTPRequestHandler, how: str) -> None:
    """End an answer whose body was cut short: an RST ("reset") or a clean close ("truncate")."""
    handler.close_connection = True
    if how == "reset":
        _reset(handler.connection, handler)
        raise _Dropped("fault injected: reset")
    handler.wfile.flush()  # then handle() returns and the server closes the socket: a FIN


def _cut_head(handler: BaseHTTPRequestHandler, status: int, how: str) -> None:
    """An answer without a body can only be cut in its head: send the status line alone."""
    handler.wfile.write(f"HTTP/1.1 {status} {_reason(status)}\r\n".encode())
    _cut(handler, how)
    raise _Dropped("fault injected: truncated head")


def _reason(status: int) -> str:
    return BaseHTTPRequestHandler.responses.get(status, ("Error", ""))[0]


def _offset_of(target: str) -> int | None:
    """The `offset` of a request-target's query, if it has a numeric one."""
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query).get("offset")
    return int(values[0]) if values and values[0].isdigit() else None


def _wait_while(handler: BaseHTTPRequestHandler, held: Callable[[], bool]) -> None:
    """faults.hold_pages_from: wait while `held()` and the fake runs."""
    server = handler.server
    assert isinstance(server, _Server)
    stopping = server.fake._stopping
    while held() and not stopping.is_set():
        stopping.wait(0.02)


def _hold(handler: BaseHTTPRequestHandler, held: Callable[[], bool]) -> None:
    """faults.blackhole: keep the request unanswered while `held()` and the fake runs, then
    close the connection without a response."""
    server = handler.server
    assert isinstance(server, _Server)
    stopping = server.fake._stopping
    while held() and not stopping.is_set():
        stopping.wait(0.02)
    handler.close_connection = True


def _slices(data: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for position in range(0, len(data), size):
        yield bytes(view[position : position + size])


class FakeGC:
    """A fake grand-challenge.org on 127.0.0.1, serving `world` (see the module docstring)."""

    def __init__(self, world: World, host: str = "127.0.0.1", port: int = 0) -> None:
        self.world = world
        self.host = host
        self.port = port
        self.latency = 0.0
        self.per_item_latency = 0.0
        self.media_latency = 0.0
        self.socket_field = False
        # The real server answers 500 to cases/images/?job_input=<pk> and ?job_output=<pk>
        # (gc-api.md §3.11); True behaves as a server with that bug fixed.
        self.job_filters_fixed = False
        # mutate(endpoint, body) -> body: rewrites every 200 JSON answer of the site (tests of
        # malformed or unexpected JSON); None sends what the world serializes.
        self.mutate: Callable[[str, Any], Any] | None = None
        self.log_requests = False
        self.signature_lifetime = 3600
        self.storage_latency = 0.0
        self.storage_bandwidth: float | None = None
        # Benchmarks only: serve image files unsigned under {storage_url}/plain/ (storage.py).
        self.plain_storage_view = False
        self.clock: Callable[[], float] = time.time
        self.faults = Faults()
        self.storage_port = 0
        self._stopping = threading.Event()  # set by stop(): wakes blackholed and stalled handlers
        self._records: list[RequestRecord] = []
        self._records_lock = threading.Lock()
        self._bytes_sent = 0
        self._storage_active = 0  # storage requests being answered right now
        self._storage_peak = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._storage: _Server | None = None
        self._storage_thread: threading.Thread | None = None
        self._site: Site | None = None
        self._signer: Signer | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeGC:
        """Bind and serve in a daemon thread; connections are accepted once this returns."""
        if self._server is not None:
            raise RuntimeError("FakeGC already started")
        server = _Server((self.host, self.port), self)  # binds and listens
        try:
            storage = _Server((self.host, self.storage_port), self, _StorageHandler, storage=True)
        except OSError:
            server.server_close()
            raise
        self.port = server.server_address[1]
        self.storage_port = storage.server_address[1]
        self._signer = Signer(
            self.storage_url,
            lifetime=lambda: int(self.signature_lifetime),
            clock=lambda: self.clock(),
        )
        self._site = Site(self.world, self.base_url, self._signer, self.faults.token_revoked)
        self._stopping.clear()
        self._server, self._storage = server, storage
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"FakeGC:{self.port}",
            daemon=True,
        )
        self._storage_thread = threading.Thread(
            target=storage.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"FakeGC-storage:{self.storage_port}",
            daemon=True,
        )
        self._thread.start()
        self._storage_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and join the serving threads.

        Handler threads are daemon threads and not joined: one held by a blackhole or a stall
        wakes up within ~20 ms (`_stopping`) and finds its socket shut down.
        """
        self._stopping.set()
        for server, thread in ((self._server, self._thread), (self._storage, self._storage_thread)):
            if server is None or thread is None:
                continue
            server.shutdown()
            server.close_connections()
            server.server_close()
            thread.join(timeout=5.0)
        self._server = self._thread = self._storage = self._storage_thread = None

    def __enter__(self) -> FakeGC:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The site root, e.g. http://127.0.0.1:PORT; the API is under base_url + "/api/v1/"."""
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        """The object store's root, e.g. http://127.0.0.1:PORT2 (its own port)."""
        return f"http://{self.host}:{self.storage_port}"

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            raise RuntimeError("FakeGC not started")
        return self._signer

    def presign(
        self, key: str, *, signed_at: float | None = None, lifetime: int | None = None
    ) -> str:
        """A presigned storage URL for `key` (the path after /media/), as /media/ makes them.

        `signed_at` (epoch seconds, default `clock()`) and `lifetime` (default
        `signature_lifetime`) allow building expired URLs without waiting.
        """
        return self.signer.presign(key, signed_at=signed_at, lifetime=lifetime)

    @property
    def storage_bytes_sent(self) -> int:
        """Body bytes the storage origin has sent since start (or the last reset_counts())."""
        with self._records_lock:
            return self._bytes_sent

    @property
    def site(self) -> Site:
        if self._site is None:
            raise RuntimeError("FakeGC not started")
        return self._site

    # -- observation --------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request seen since start (or the last reset_counts())."""
        with self._records_lock:
            return list(self._records)

    def count(self, endpoint: str | None = None) -> int:
        with self._records_lock:
            if endpoint is None:
                return len(self._records)
            return sum(1 for r in self._records if r.endpoint == endpoint)

    @property
    def storage_peak_concurrency(self) -> int:
        """The most storage requests answered at the same moment (from the end of the request
        head to the end of the answer) since start or the last reset_counts()."""
        with self._records_lock:
            return self._storage_peak

    def reset_counts(self) -> None:
        """Forget the recorded requests, the storage byte count and concurrency peak, and
        `faults.injected`."""
        with self._records_lock:
            self._records.clear()
            self._bytes_sent = 0
            self._storage_peak = self._storage_active
        self.faults.reset_injected()

    # -- used by the handler ------------------------------------------------------------------

    def _record(
        self,
        request: Request,
        reply: Reply,
        *,
        had_authorization: bool = False,
        status: int | None = None,
        fault: str | None = None,
    ) -> None:
        path, _, query_string = request.target.partition("?")
        query = dict(parse_qsl(query_string, keep_blank_values=True))
        record = RequestRecord(
            request.method,
            path,
            query,
            reply.endpoint,
            reply.status if status is None else status,
            reply.user,
            had_authorization=had_authorization,
            fault=fault,
        )
        self._add_record(record)

    def _add_record(self, record: RequestRecord) -> None:
        with self._records_lock:
            self._records.append(record)

    def _storage_busy(self, change: int) -> None:
        with self._records_lock:
            self._storage_active += change
            self._storage_peak = max(self._storage_peak, self._storage_active)

    def _count_bytes(self, n: int) -> None:
        with self._records_lock:
            self._bytes_sent += n

    def _stall(self, decision: Decision) -> None:
        """An injected stall; stop() cuts it short."""
        if decision is not NO_FAULT and decision.stall > 0:
            self._stopping.wait(decision.stall)

    def _delay(self, reply: Reply) -> None:
        if reply.is_api:
            delay = self.latency + self.per_item_latency * reply.results
        elif reply.endpoint.startswith("media-"):
            delay = self.media_latency
        else:
            return
        if delay > 0:
            time.sleep(delay)
