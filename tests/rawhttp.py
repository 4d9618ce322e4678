"""A scripted HTTP/1.1 server on 127.0.0.1 for answers the fake cannot give.

Each request is handed to `handler(request)`, which returns the raw bytes to send (any bytes:
a wrong header, a short or long body, a chunked one), or a `Script` of steps (bytes to send,
pauses, a reset, a clean close). Connections are kept alive unless a script closes them. With
`tls=True` it serves HTTPS with the self-signed certificate in tests/data (127.0.0.1 and
localhost); `client_ssl_context()` trusts it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

DATA = Path(__file__).parent / "data"
CERT = DATA / "storage-cert.pem"
KEY = DATA / "storage-key.pem"


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lowercase names
    connection: int  # which accepted connection (0, 1, ...)


@dataclass
class Script:
    """Steps: bytes are sent; a float pauses that many seconds; a threading.Event pauses until
    the test sets it (at most EVENT_WAIT seconds: a test that forgot it still ends); "reset"
    ends the connection with an RST, "close" with a FIN."""

    steps: list[bytes | float | str | threading.Event] = field(default_factory=list)


Handler = Callable[[Request], "bytes | Script"]

# The longest a Script waits for a test's Event.
EVENT_WAIT = 30.0


def response(
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    length: int | None = None,
) -> bytes:
    """An HTTP/1.1 answer; Content-Length is len(body) unless `length` says otherwise
    (-1: none)."""
    lines = [f"HTTP/1.1 {status} X"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    size = len(body) if length is None else length
    if size >= 0:
        lines.append(f"Content-Length: {size}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def client_ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(CERT))
    return context


class LoopbackServer:
    """A TCP listener on 127.0.0.1 serving each connection in a thread (`_serve`); leaving
    the `with` block closes the listener and every connection it still has open."""

    def __init__(self) -> None:
        self.connections = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
        self._thread.join(timeout=5)

    def track(self, sock: socket.socket) -> None:
        """Close `sock` too when the server stops."""
        with self._lock:
            self._open.append(sock)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                number = self.connections
                self.connections += 1
                self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        raise NotImplementedError


class RawServer(LoopbackServer):
    def __init__(self, handler: Handler, *, tls: bool = False) -> None:
        super().__init__()
        self.handler = handler
        self.tls = tls
        self.requests: list[Request] = []
        self._context: ssl.SSLContext | None = None
        if tls:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(str(CERT), str(KEY))

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def close_idle(self) -> None:
        """Close every connection now (a server that drops idle keep-alive connections)."""
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _serve(self, sock: socket.socket, number: int) -> None:
        conn: socket.socket = sock
        try:
            if self._context is not None:
                conn = self._context.wrap_socket(sock, server_side=True)
            self.track(conn)
            buffered = b""
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buffered:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                request = Request(method, target, headers, number)
                with self._lock:
                    self.requests.append(request)
                answer = self.handler(request)
                steps = answer.steps if isinstance(answer, Script) else [answer]
                for step in steps:
                    if isinstance(step, bytes):
                        conn.sendall(step)
                    elif isinstance(step, float):
                        time.sleep(step)
                    elif isinstance(step, threading.Event):
                        step.wait(EVENT_WAIT)
                    elif step == "reset":
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        sock.close()
                        return
                    elif step == "close":
                        conn.close()
                        return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()
