"""`FakeGC`: the fake Grand Challenge served over real HTTP on loopback, in a daemon thread.

    fake = FakeGC(world)              # or: with FakeGC(world) as fake: ...
    fake.start()                      # binds 127.0.0.1:<free port>, serves until stop()
    httpx.get(fake.base_url + "/api/v1/archives/", headers={"Authorization": f"Bearer {tok}"})
    fake.count("archives-list")       # requests seen per endpoint name
    fake.stop()

It speaks HTTP/1.1 with keep-alive and a Content-Length on every response, as gcfs's httpx client
expects. Knobs, settable while running: `latency` (seconds added to every API request),
`per_item_latency` (seconds per serialized result of a list page) and `socket_field` (values also
carry `socket`, the live API's newer name for `interface`, gc-api.md §9).

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
    cases-images-list/-detail   /api/v1/cases/images/[<pk>/]
    components-interfaces-list/-detail  /api/v1/components/interfaces/[<int pk>/]
    website-algorithm           /algorithms/<slug>/ (200 public, 302 hidden, 404 absent)
    website-reader-study        /reader-studies/<slug>/ (same)
    website-archive             /archives/<slug>/ (always 302 to the login page)
    redirect-slash              any path without a trailing slash (301), except /media/
    not-found                   everything else, incl. /media/ for now (404 HTML)
    server-error                a bug in the fake (500 {"detail": "fake server error"})

`/media/` (file bytes behind 302s to a storage origin) is not served yet: `Site._website` is where
those routes will go.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

from gcfs.fakegc.api import JSON_TYPE, Reply, Request, Site, json_bytes
from gcfs.fakegc.world import World


@dataclass(frozen=True)
class RequestRecord:
    """One request as the fake saw it. `query` keeps the last value of each parameter."""

    method: str
    path: str
    query: dict[str, str]
    endpoint: str
    status: int
    user: str | None


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that stop() can close idle keep-alive sockets too."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeGC) -> None:
        self.fake = fake
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)

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
        request = Request(self.command, self.path, self.headers.get("Authorization"))
        try:
            reply = fake.site.handle(request, socket_field=fake.socket_field)
        except Exception:
            # A bug in the fake must not take the server down: answer 500 and show the traceback.
            traceback.print_exc(file=sys.stderr)
            reply = Reply(
                500, "server-error", json_bytes({"detail": "fake server error"}), JSON_TYPE
            )
        fake._delay(reply)
        # Record before replying, so a client that has its answer always sees it counted.
        fake._record(request, reply)
        self._send(reply)

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        if reply.content_type is not None:
            self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.log_requests:
            super().log_message(format, *args)


class FakeGC:
    """A fake grand-challenge.org on 127.0.0.1, serving `world` (see the module docstring)."""

    def __init__(self, world: World, host: str = "127.0.0.1", port: int = 0) -> None:
        self.world = world
        self.host = host
        self.port = port
        self.latency = 0.0
        self.per_item_latency = 0.0
        self.socket_field = False
        self.log_requests = False
        self._records: list[RequestRecord] = []
        self._records_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._site: Site | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeGC:
        """Bind and serve in a daemon thread; connections are accepted once this returns."""
        if self._server is not None:
            raise RuntimeError("FakeGC already started")
        server = _Server((self.host, self.port), self)  # binds and listens
        self.port = server.server_address[1]
        self._site = Site(self.world, self.base_url)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"FakeGC:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and join the serving thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()
        self._server = self._thread = None

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

    def reset_counts(self) -> None:
        with self._records_lock:
            self._records.clear()

    # -- used by the handler ------------------------------------------------------------------

    def _record(self, request: Request, reply: Reply) -> None:
        path, _, query_string = request.target.partition("?")
        query = dict(parse_qsl(query_string, keep_blank_values=True))
        record = RequestRecord(
            request.method, path, query, reply.endpoint, reply.status, reply.user
        )
        with self._records_lock:
            self._records.append(record)

    def _delay(self, reply: Reply) -> None:
        if not reply.is_api:
            return
        delay = self.latency + self.per_item_latency * reply.results
        if delay > 0:
            time.sleep(delay)
