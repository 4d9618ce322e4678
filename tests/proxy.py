"""A small HTTP proxy on 127.0.0.1 for tests: CONNECT tunnels and absolute-form requests.

    with TestProxy() as proxy:
        ... proxy.url ...          # http://127.0.0.1:<port>
        proxy.requests             # [(method, target, Proxy-Authorization or None), ...]

CONNECT host:port opens a tunnel and relays bytes both ways until one side closes. A request
in absolute form (`GET http://host:port/path HTTP/1.1`) is sent to its origin in origin form,
with the Proxy-* headers removed and `Connection: close`, and the answer is relayed until the
origin closes; then the client's connection closes too (one request per connection).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

from tests.rawhttp import LoopbackServer


class TestProxy(LoopbackServer):
    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, client: socket.socket, number: int) -> None:
        with contextlib.suppress(OSError):
            buffered = b""
            while b"\r\n\r\n" not in buffered:
                chunk = client.recv(65536)
                if not chunk:
                    return
                buffered += chunk
            head, _, rest = buffered.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = [line.split(":", 1) for line in lines[1:] if ":" in line]
            auth = next((v.strip() for k, v in headers if k.lower() == "proxy-authorization"), None)
            with self._lock:
                self.requests.append((method, target, auth))
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                origin = socket.create_connection((host.strip("[]"), int(port)))
                self.track(origin)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    origin.sendall(rest)
                threading.Thread(target=_pipe, args=(origin, client), daemon=True).start()
                _pipe(client, origin)
                return
            parts = urlsplit(target)
            origin = socket.create_connection((parts.hostname, parts.port or 80))
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            kept = [
                f"{k}:{v}"
                for k, v in headers
                if not k.lower().startswith("proxy-") and k.lower() != "connection"
            ]
            request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close"])
            origin.sendall(request.encode("latin-1") + b"\r\n\r\n" + rest)
            _pipe(origin, client)
            client.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
