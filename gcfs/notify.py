"""sd_notify(3) without libsystemd: tell the service manager that the mount is up, or going.

Under a `Type=notify` unit systemd passes `$NOTIFY_SOCKET`, a datagram socket to which the
service writes newline-separated `KEY=VALUE` assignments: `READY=1` once the mount answers,
`STOPPING=1` when it starts to shut down. A name starting with `@` is a socket in the abstract
namespace (the `@` stands for the leading NUL byte). Without the variable every call does
nothing, so the same code runs in a terminal, under systemd and in the tests.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

SOCKET_ENV = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; True if it was sent.

    Never raises: the service manager going away must not take the mount with it.
    """
    address = os.environ.get(SOCKET_ENV)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("ignoring %s=%r: not a socket path", SOCKET_ENV, address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify the service manager (%s): %s", state, exc)
        return False
    return True


def ready() -> None:
    """The mount answers: a `Type=notify` unit becomes active now."""
    notify("READY=1\nSTATUS=mounted")


def stopping() -> None:
    """The daemon is unmounting and will exit."""
    notify("STOPPING=1\nSTATUS=unmounting")
