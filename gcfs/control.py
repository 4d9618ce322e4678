"""Talking to a running daemon: `gcfs refresh`, `gcfs status`, and what `gcfs prefetch` asks.

The daemon listens on a Unix socket next to its pid file (`$XDG_RUNTIME_DIR/gcfs/<id>.sock`,
in a 0700 directory, the socket itself 0600: only the mounting user may talk to it). The
protocol is one JSON object per connection each way, a line each:

    {"op": "refresh", "path": "archives/lidc", "recursive": false}  -> {"ok": true, ...}
    {"op": "status"}                                                -> {"ok": true, "status": {...}}
    {"op": "cached", "path": "archives/x/items/<pk>/scan.mha"}      -> {"ok": true, "size": ..,
                                                                        "cached_bytes": ..}
    {"op": "files", "paths": [...], "cached": true}                 -> {"ok": true, "files":
                                 [{"size": .., "key": .. or null, "cached_bytes": ..}, ...]}
`files` answers for many paths at once (`gcfs prefetch` and `gcfs snapshot` ask about
thousands of files: one request per file would be a round trip each); `key` is a remote
file's identity (resolver.file_key), null for a generated one; `cached_bytes` only when asked.

    {"op": "images", "paths": [...]}                               -> {"ok": true, "images":
                                                                        [<image pk>, ...]}
`images` (what `gcfs snapshot` asks of the values directories it recorded: items, display
sets, job inputs and outputs) names the images they show and makes `images/<pk>` of each
answer from what the daemon holds, with no request (GcFilesystem.hold_images).
Errors come back as {"ok": false, "error": "..."}; a request gets 10 s to arrive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import inject, runtime
from .errors import GcfsError, NotFound, UserError
from .units import format_size

if TYPE_CHECKING:
    from .fs import GcFilesystem

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
REQUEST_DEADLINE = 10.0
Invalidate = Callable[[list[tuple[int, str]], list[int]], Awaitable[None]]


# -- the daemon's side ------------------------------------------------------------------------


async def serve_control(
    fs: GcFilesystem,
    mountpoint: Path,
    invalidate: Invalidate,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    path = runtime.control_socket(mountpoint)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is created 0600
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:

        async def handle(stream: trio.SocketStream) -> None:
            await _handle(stream, fs, invalidate)

        await trio.serve_listeners(handle, [listener])
    finally:
        path.unlink(missing_ok=True)


async def _handle(stream: trio.SocketStream, fs: GcFilesystem, invalidate: Invalidate) -> None:
    async with stream:
        try:
            with trio.fail_after(REQUEST_DEADLINE):
                request = await _read_line(stream)
            reply = await _dispatch(json.loads(request), fs, invalidate)
        except (trio.TooSlowError, ValueError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        except GcfsError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug: keep the daemon up, tell the caller
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


async def _dispatch(request: Any, fs: GcFilesystem, invalidate: Invalidate) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    op = request.get("op")
    if op == "status":
        return {"ok": True, "status": fs.status()}
    path = request.get("path", "")
    if not isinstance(path, str):
        raise ValueError("path must be a string")
    if op == "refresh":
        inject.maybe_fail("refresh")
        parent, node = await fs.resolve(path)
        entries, inodes = fs.forget(parent, node, recursive=bool(request.get("recursive")))
        await invalidate(entries, inodes)
        log.info("refresh %s: forgot %d entries", path or "/", len(entries))
        return {"ok": True, "forgotten": len(entries)}
    if op == "cached":
        _, node = await fs.resolve(path)
        size, cached = await fs.cached_bytes(node)
        return {"ok": True, "size": size, "cached_bytes": cached}
    if op == "files":
        paths = request.get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("paths must be a list of strings")
        if request.get("cached"):
            inject.maybe_fail("prefetch")  # what `gcfs prefetch` asks (prefetch.make_plan)
        files = []
        for each in paths:
            _, node = await fs.resolve(each)
            files.append(await fs.file_info(node, cached=bool(request.get("cached"))))
        return {"ok": True, "files": files}
    if op == "images":
        paths = request.get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("paths must be a list of strings")
        images: set[str] = set()
        for each in paths:
            try:
                _, node = await fs.resolve(each)
            except NotFound:
                continue  # gone since the snapshot walked it: it shows no images now
            images.update(await fs.hold_images(node))
        return {"ok": True, "images": sorted(images)}
    raise ValueError(f"unknown op {op!r}")


# -- the command's side -----------------------------------------------------------------------


def find_mount(path: Path) -> tuple[Path, str]:
    """The gcfs mount point holding `path`, and `path` relative to it."""
    absolute = Path(os.path.abspath(path.expanduser()))
    mounts = gcfs_mounts()
    for candidate in (absolute, *absolute.parents):
        if str(candidate) in mounts:
            return candidate, str(absolute.relative_to(candidate))
    raise UserError(f"{path} is not inside a gcfs mount")


def mount_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The filesystem type of the mount whose mount point is exactly `path` (the newest one,
    when several are stacked there), from /proc/self/mountinfo; None when nothing is mounted
    there. gcfs mounts are "fuse.gcfs" (daemon.py: subtype=gcfs)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mountinfo = f.read()
    target = os.path.realpath(path)
    found = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if " - " in line and len(fields) > 4 and _unescape(fields[4]) == target:
            found = line.split(" - ", 1)[1].split(" ", 1)[0]
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


GCFS_TYPE = "fuse.gcfs"


def gcfs_mounts() -> set[str]:
    found = set()
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] in ("fuse.gcfs", "fuse"):
                found.add(fields[1].replace("\\040", " "))
    return found


def request(mountpoint: Path, message: dict[str, Any], *, timeout: float = 120.0) -> Any:
    """Send one request to the daemon serving `mountpoint`; its reply, or a UserError."""
    path = runtime.control_socket(mountpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise UserError(f"cannot reach the gcfs daemon of {mountpoint}: {exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise UserError(f"the gcfs daemon of {mountpoint} sent no answer") from None
    if not reply.get("ok"):
        raise UserError(str(reply.get("error", "the daemon refused")))
    return reply


# Files asked about per "files" request: its answer is one JSON line of ~100 bytes per file.
PATHS_PER_REQUEST = 500


def files_info(mountpoint: Path, paths: list[str], *, cached: bool = False) -> Iterator[Any]:
    """The daemon's answer about each of `paths` (inside the mount), in order, asked of it
    PATHS_PER_REQUEST at a time: one request per file was a round trip each, seconds for
    10,000 files before prefetch read a byte. `cached`: with the bytes the cache holds."""
    for start in range(0, len(paths), PATHS_PER_REQUEST):
        batch = paths[start : start + PATHS_PER_REQUEST]
        message: dict[str, Any] = {"op": "files", "paths": batch}
        if cached:
            message["cached"] = True
        answers = request(mountpoint, message)["files"]
        if not isinstance(answers, list) or len(answers) != len(batch):
            raise UserError(f"the gcfs daemon of {mountpoint} answered for other files")
        yield from answers


def refresh_command(path: Path, *, recursive: bool) -> int:
    """`gcfs refresh PATH [--recursive]`: forget what the daemon cached under PATH."""
    mountpoint, relative = find_mount(path)
    if not os.path.lexists(path):
        # Named as the user gave it; the daemon would say "root: no entry 'zzz'".
        raise UserError(f"{path}: no such file or directory")
    message = {"op": "refresh", "path": relative, "recursive": recursive}
    reply = request(mountpoint, message)
    print(f"refreshed {path} ({reply['forgotten']} entries)")
    return 0


def status_command(mountpoint: Path, *, as_json: bool) -> int:
    """`gcfs status MOUNTPOINT [--json]`: print the daemon's status."""
    root, _ = find_mount(mountpoint)
    status = request(root, {"op": "status"})["status"]
    if as_json:
        json.dump(status, sys.stdout, indent=2)
        print()
        return 0
    for line in format_status(status):
        print(line)
    return 0


def format_duration(seconds: float) -> str:
    """`45 s`, `3 min 12 s`, `2 h 05 min`, `3 d 4 h`: as precise as a reader of an uptime
    needs, which is less the longer it is."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _count(n: int, what: str, plural: str | None = None) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {plural or what + 's'}"


def routed_text(cost: dict[str, Any]) -> str:
    """What routing around a failing batch listing cost: a request per object of each
    directory instead of one listing (fs.objects_among)."""
    requests = _count(int(cost.get("requests", 0)), "request")
    return f"{requests} for {_count(int(cost.get('directories', 0)), 'directory', 'directories')}"


def format_status(status: dict[str, Any]) -> list[str]:
    """`gcfs status` for people: headed sections, sizes in binary units (exact bytes stay in
    --json and .gcfs/status.json), and for each problem what it costs."""
    cache = status.get("block_cache") or {}
    metadata = status.get("metadata_cache", {})
    lookups = metadata.get("hits", 0) + metadata.get("misses", 0)
    hit_rate = f"{100 * metadata.get('hits', 0) / lookups:.0f}%" if lookups else "-"
    server = status.get("server")
    if status.get("offline"):
        server = f"{server} (offline: the snapshot in {status['offline']})"
    store = status.get("metadata_store", {})
    content = status.get("content", {})
    lines = [
        "Server",
        f"  server:       {server}",
        f"  user:         {status.get('user')}",
        f"  mount:        {status.get('mountpoint')} (pid {status.get('pid')})",
        f"  log:          {status.get('log_file') or 'stderr (the journal under systemd)'}",
        f"  uptime:       {format_duration(status.get('uptime_seconds') or 0)}",
        "Caches",
        f"  metadata:     {metadata.get('size', 0)} entries cached, hit rate {hit_rate}",
        f"  stored in:    {store.get('path', '-')} "
        f"({store.get('loaded', 0)} answers served from it without a request)",
        (
            f"  snapshot:     {format_size(cache.get('bytes', 0))} in "
            f"{cache.get('directory', '-')} (read-only)"
            if status.get("offline")
            else f"  block cache:  {format_size(cache.get('bytes', 0))} of "
            f"{format_size(cache.get('max_bytes', 0))} in {cache.get('directory', '-')} "
            f"({cache.get('mode', '-')})"
            if cache
            else "  block cache:  off (--cache-size 0)"
        ),
        "Traffic",
        f"  requests:     {status.get('requests_total')} ({status.get('retries')} retries, "
        f"{status.get('in_flight_requests')} in flight)",
        f"  read:         {format_size(status.get('bytes_read') or 0)} to readers, "
        f"{format_size(content.get('bytes_fetched', 0))} fetched from storage",
    ]
    routed = status.get("routed_around") or {}
    if status.get("fallbacks"):
        requests = sum(int(cost.get("requests", 0)) for cost in routed.values())
        lines.append(
            f"  fallbacks:    "
            f"{_count(status['fallbacks'], 'directory', 'directories')} filled object by "
            f"object ({_count(requests, 'request')}) because a listing failed"
        )
    if status.get("requests"):
        lines.append("  by endpoint and status:")
    for endpoint, by_status in sorted(status.get("requests", {}).items()):
        counts = ", ".join(f"{code}: {n}" for code, n in sorted(by_status.items()))
        lines.append(f"    {endpoint:<40} {counts}")
    lines += ["Problems", *_problems(status, routed)]
    return lines


def _problems(status: dict[str, Any], routed: dict[str, Any]) -> list[str]:
    lines = [f"  errors:       {status.get('errors_last_hour')} in the last hour"]
    if status.get("token_rejected"):
        lines.append(
            "  token:        rejected by the server; put a new one in the token file "
            "(read again at the next refusal)"
        )
    outage = status.get("outage") or {}
    if outage.get("down"):
        since = outage.get("down_since") or 0
        lines.append(
            f"  DOWN:         the server has not answered since {_clock(since)} "
            f"({time.time() - since:.0f} s); serving what was seen, EIO for the rest"
        )
    elif outage.get("last_outage_seconds") is not None:
        lines.append(f"  last outage:  {outage['last_outage_seconds']} s (back now)")
    failing = status.get("failing_endpoints") or {}
    routing = set(status.get("routing_around") or [])
    for family, failure in sorted(failing.items()):
        lines.append(
            f"  failing:      {family}: HTTP {failure.get('status')} since "
            f"{_clock(failure.get('since', 0))} ({_count(failure.get('failures') or 0, 'time')})"
        )
        if family in routing or family in routed:
            lines.append("                " + _routed_line(routed.get(family, {})))
    for family in sorted(routing - set(failing)):
        lines.append(f"  routed:       {family} is {_routed_line(routed.get(family, {}))}")
    return lines


def _routed_line(cost: dict[str, Any]) -> str:
    return (
        "routed around: a request per object instead of one listing per directory "
        f"(so far {routed_text(cost)})"
    )


def summary(status: dict[str, Any]) -> str:
    """One line in `gcfs status`'s words, for the daemon's log as it unmounts."""
    metadata = status.get("metadata_cache", {})
    lookups = metadata.get("hits", 0) + metadata.get("misses", 0)
    hit_rate = f"{100 * metadata.get('hits', 0) / lookups:.0f}%" if lookups else "-"
    content = status.get("content", {})
    parts = [
        f"up {format_duration(status.get('uptime_seconds') or 0)}",
        f"{_count(status.get('requests_total') or 0, 'request')} "
        f"({_count(status.get('retries') or 0, 'retry', 'retries')})",
        f"metadata: {metadata.get('size', 0)} entries cached, hit rate {hit_rate}, "
        f"{metadata.get('stale', 0)} served stale",
        f"read: {format_size(status.get('bytes_read') or 0)} to readers, "
        f"{format_size(content.get('bytes_fetched', 0))} fetched from storage in "
        f"{_count(content.get('requests', 0), 'request')}, "
        f"{content.get('cache_hits', 0)} blocks from the block cache",
        f"{_count(status.get('errors_last_hour') or 0, 'error')} in the last hour",
    ]
    return "; ".join(parts)
