"""The daemon's lifecycle: check the token, mount, serve until unmounted or signalled, clean up.

serve(cfg, on_ready)
  GcApiClient  -> whoami (the only request at mount time; a bad token ends here)
  (offline, --offline DIR: the snapshot's tree and read-only store instead, no token, no
   whoami, clients that refuse every request: serve_offline, offline.py)
  ContentStore -> GcFilesystem -> GcfsOperations -> pyfuse3.init (the mount appears)
  control socket (gcfs refresh/status), signal handler (SIGTERM/SIGINT unmount, SIGHUP forgets)
  INIT answered -> read_ahead_kb 1024 for this mount when we may (root): 1 MiB FUSE reads;
                 on_ready(): the foreground caller, the waiting parent or systemd learns the
                 mount is up
  pyfuse3.main() until `fusermount3 -u` (the kernel ends the session) or SIGTERM/SIGINT
                 (we call pyfuse3.terminate())
  pyfuse3.close(unmount=True): the mount point is left clean in every case, crash
                 included; a stale mount ("Transport endpoint is not connected") is
                 worse for a user than a missing one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pyfuse3
import trio

from . import notify, offline
from .api import GcApiClient
from .blockstore import BlockStore
from .config import Config, TokenSource, default_cache_dir, mount_options
from .content import ContentStore
from .control import serve_control, summary
from .errors import GcfsError, PermissionDenied, Unavailable, UserError
from .fs import GcFilesystem
from .fuse_ops import GcfsOperations, invalidate
from .metastore import (
    MetadataStore,
    StoreError,
    default_directory,
    find_store_for_token,
    open_store,
)
from .retry import RetryPolicy, Unreachable
from .storage_http import StorageClient

log = logging.getLogger(__name__)

MOUNT_OPTIONS = frozenset(
    {
        "fsname=gcfs",
        "subtype=gcfs",
        # The kernel refuses writes itself (EROFS) before they reach us; our handlers refuse
        # them too, for the calls `ro` does not cover.
        "ro",
        # Let the kernel check the 0555/0444 modes, so we need no access() handler.
        "default_permissions",
        "noatime",
    }
)


# Retrying at mount time: long enough to ride out a blip, short enough that a user who typed
# the wrong URL hears about it at once (systemd restarts a failed mount with a back-off).
MOUNT_CHECK_RETRY = RetryPolicy(budget=5.0)


class ServerUnreachable(UserError):
    """The server did not answer the mount's token check."""


async def check_token(api: GcApiClient, cfg: Config) -> str:
    """The username behind the token, or a UserError that says what to do."""
    try:
        with trio.fail_after(cfg.op_timeout):
            return await api.whoami(retry=MOUNT_CHECK_RETRY)
    except PermissionDenied as exc:
        raise UserError(
            f"{exc}; create a new token at {cfg.base_url}/settings/api-tokens/"
        ) from None
    except Unavailable as exc:
        raise ServerUnreachable(f"cannot reach {cfg.base_url}: {exc}") from None
    except trio.TooSlowError:
        raise ServerUnreachable(
            f"{cfg.base_url} did not answer within {cfg.op_timeout:g} s"
        ) from None
    except GcfsError as exc:
        raise UserError(f"{cfg.base_url} does not look like Grand Challenge: {exc}") from None


async def _user_and_store(
    api: GcApiClient, cfg: Config, token: TokenSource
) -> tuple[str, MetadataStore]:
    """Who the token is and that user's metadata store. When the server does not answer
    (a reboot during its maintenance), a store filled with this very token (its salted hash
    matches) lets the mount start and serve what it saw, marked down until the server answers;
    without one the mount fails as it always did."""
    directory = cfg.metadata_dir or default_directory()
    secret = token.token.reveal() if token.token is not None else None
    try:
        username = await check_token(api, cfg)
    except ServerUnreachable:
        found = None
        if secret is not None:
            found = await trio.to_thread.run_sync(
                find_store_for_token, directory, cfg.base_url, secret
            )
        if found is None:
            raise
        metadata, username = found
        newest = metadata.newest_answer()
        as_of = "an unknown time" if newest is None else _utc(newest)
        api.outage.gave_up(Unreachable(f"{cfg.base_url} did not answer the token check"))
        log.warning(
            "%s does not answer; serving what %s saw as of %s until it does",
            cfg.base_url,
            username,
            as_of,
            extra={"tell_user": True},
        )
        return username, metadata
    metadata = open_store(directory, cfg.base_url, username)
    if secret is not None:
        with contextlib.suppress(StoreError):
            metadata.remember_token(secret, username)
    return username, metadata


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))


# Connections for /media/ resolution on the site (one GET per opened file, no body read);
# storage has its own client (storage_http.DEFAULT_MAX_CONNECTIONS).
MEDIA_CONNECTIONS = 16

# The kernel's read-ahead for the mount, in KiB. Its default of 128 makes the kernel ask for a
# sequential reader's file in 128 KiB requests, 8,192 per GiB, each a round trip through
# pyfuse3; at 1024 they are 1 MiB (libfuse negotiates 1 MiB requests), 1,026 per GiB, and
# cached re-reads gained 17-31 % (issue 10). 4096 brought no more and more out-of-order reads.
READ_AHEAD_KB = 1024


def open_block_store(cfg: Config) -> BlockStore | None:
    if cfg.cache_size <= 0:
        return None
    directory = cfg.cache_dir or default_cache_dir()
    try:
        return BlockStore(directory, cfg.cache_size)
    except OSError as exc:
        shown = cfg.cache_dir_label or f"cache directory {directory}"
        raise UserError(f"cannot use {shown}: {exc.strerror}") from None


def mount_device(mountinfo: str, mountpoint: str) -> str | None:
    """The "major:minor" of the newest mount on `mountpoint`, from /proc/self/mountinfo."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
            found = fields[2]
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def set_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> bool:
    """Set the mount's read_ahead_kb, which needs root (or the system unit's ExecStartPost).

    The device comes from /proc/self/mountinfo, not os.stat(mountpoint): a stat of our own
    mount point would wait for an answer from this daemon, which is not serving yet."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            device = mount_device(f.read(), mountpoint)
        if device is None:
            log.debug("read_ahead_kb: %s is not in /proc/self/mountinfo", mountpoint)
            return False
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(f"{kb}\n")
    except OSError as exc:
        log.debug(
            "cannot set read_ahead_kb of %s (%s); as root: echo %d > "
            "/sys/class/bdi/$(mountpoint -d %s)/read_ahead_kb",
            mountpoint,
            exc.strerror,
            kb,
            mountpoint,
        )
        return False
    log.debug("read_ahead_kb of %s (bdi %s) set to %d", mountpoint, device, kb)
    return True


async def serve(cfg: Config, on_ready: Callable[[], None]) -> None:
    if cfg.offline is not None:
        await serve_offline(cfg, cfg.offline, on_ready)
        return
    block_store = open_block_store(cfg)
    content_http = httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.request_timeout),
        limits=httpx.Limits(max_connections=MEDIA_CONNECTIONS),
        follow_redirects=False,
        headers={"User-Agent": "gcfs"},
    )
    retry = RetryPolicy(budget=cfg.retry_budget)
    token = TokenSource(cfg.token, cfg.token_file)
    api = GcApiClient(cfg.base_url, token, http_timeout=cfg.request_timeout, retry=retry)
    async with api, content_http:
        username, metadata = await _user_and_store(api, cfg, token)
        store = ContentStore(
            content_http,
            api.auth_headers,
            block_store,
            storage=StorageClient(timeout=cfg.request_timeout),
            http_timeout=cfg.request_timeout,
            retry=retry,
            site_outage=api.outage,
            health=api.health,
        )
        try:
            async with store as content:
                fs = GcFilesystem(api, content, username=username, ttl=cfg.ttl, store=metadata)
                await _mount_and_serve(cfg, fs, username, on_ready)
        finally:
            metadata.close()
            if block_store is not None:
                block_store.close()


# A snapshot never changes while mounted: the kernel may keep names and attributes this long
# (an hour; `gcfs refresh` and SIGHUP still work).
OFFLINE_TTL = 3600.0


async def serve_offline(cfg: Config, directory: Path, on_ready: Callable[[], None]) -> None:
    """Serve the snapshot in `directory`: its tree and its store, opened read-only. No token,
    no whoami, and clients that refuse every request (offline.py)."""
    root, manifest = offline.load(directory)
    try:
        store = BlockStore(directory, OFFLINE_STORE_LIMIT, readonly=True)
    except OSError as exc:
        raise UserError(f"cannot read the snapshot in {directory}: {exc.strerror}") from None
    api = GcApiClient(
        str(manifest.get("server", cfg.base_url)),
        TokenSource(None),
        http_timeout=cfg.request_timeout,
        transport=offline.NoNetwork(),
    )
    content_http = httpx.AsyncClient(transport=offline.NoNetwork())
    username = str(manifest.get("user", ""))
    async with api, content_http:
        content = ContentStore(
            content_http, {}, store, http_timeout=cfg.request_timeout, offline=True
        )
        try:
            async with content:
                fs = GcFilesystem(
                    api,
                    content,
                    username=username,
                    ttl=max(cfg.ttl, OFFLINE_TTL),
                    root=root,
                    offline=str(directory),
                )
                await _mount_and_serve(cfg, fs, username, on_ready)
        finally:
            store.close()


# The offline store evicts nothing (and, read-only, could not): no limit.
OFFLINE_STORE_LIMIT = 1 << 62


async def _mount_and_serve(
    cfg: Config, fs: GcFilesystem, username: str, on_ready: Callable[[], None]
) -> None:
    operations = GcfsOperations(fs, op_timeout=cfg.op_timeout)
    # Resolved before mounting: afterwards, looking at the mount point would ask us.
    canonical = await trio.to_thread.run_sync(os.path.realpath, cfg.mountpoint)
    # The receiver is open before the mount appears: a SIGTERM sent as soon as the mount is
    # seen (systemd stopping a unit just started, a script) is queued for _handle_signals
    # instead of killing the daemon by its default action and leaving a dead mount behind.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        try:
            pyfuse3.init(operations, str(cfg.mountpoint), mount_options(cfg, MOUNT_OPTIONS))
        except RuntimeError as exc:
            raise UserError(f"cannot mount on {cfg.mountpoint}: {exc}") from None
        await _serve(cfg, fs, operations, canonical, username, on_ready, signals)


async def _serve(
    cfg: Config,
    fs: GcFilesystem,
    operations: GcfsOperations,
    canonical: str,
    username: str,
    on_ready: Callable[[], None],
    signals: AsyncIterator[int],
) -> None:
    fs.mountpoint = str(cfg.mountpoint)
    fs.log_file = str(cfg.log_file) if cfg.log_file is not None else None
    try:
        async with trio.open_nursery() as nursery:
            fs.attach(nursery)
            nursery.start_soon(_handle_signals, fs, signals)
            if not fs.offline:  # issue 15: a down server answers at once; one task probes it
                fs.api.outage.watch(nursery, fs.api.probe, check=fs.api.check_alive)
                fs.cache.attach(nursery, deadline=cfg.op_timeout, origin=fs.api.outage)
            await nursery.start(serve_control, fs, cfg.mountpoint, invalidate)
            nursery.start_soon(_when_initialized, operations, canonical, on_ready)
            if fs.offline:
                log.info(
                    "mounted the snapshot in %s (%s as %s) on %s, offline",
                    fs.offline,
                    fs.base_url,
                    username,
                    cfg.mountpoint,
                )
            else:
                log.info("mounted %s on %s as %s", cfg.base_url, cfg.mountpoint, username)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        notify.stopping()  # sd_notify STOPPING=1 to a Type=notify unit; no-op otherwise
        logging.getLogger("pyfuse3").addFilter(_late_invalidations)
        pyfuse3.close(unmount=True)
        # In gcfs status's words: the line is read by people, who need no dataclass reprs.
        log.info("unmounted %s; %s", cfg.mountpoint, summary(fs.status()))


def _late_invalidations(record: logging.LogRecord) -> bool:
    """Installed as the session ends: entries still in pyfuse3's invalidation queue then (a
    `gcfs refresh` of 5,000 entries just before the unmount) fail with EINVAL, because the
    kernel has forgotten the whole mount, and pyfuse3's thread logs each as an ERROR with a
    traceback. Nothing is lost: they become DEBUG lines without the traceback."""
    if str(record.msg).startswith("Failed to submit invalidate_entry"):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
    return True


async def _when_initialized(
    operations: GcfsOperations, mountpoint: str, on_ready: Callable[[], None]
) -> None:
    """Once the kernel has our INIT reply: set read_ahead_kb (processing that reply sets the
    bdi's read-ahead to the smaller of its value and the reply's max_readahead, 128 KiB, so a
    value written before would be lost), then say we are ready. Readiness after INIT means the
    mount answers, and a unit's ExecStartPost (after READY=1) cannot race with INIT either."""
    await operations.initialized.wait()
    set_read_ahead(mountpoint)
    on_ready()


async def _handle_signals(fs: GcFilesystem, signals: AsyncIterator[int]) -> None:
    """SIGTERM/SIGINT unmount; SIGHUP forgets every cached listing and object."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            entries, inodes = fs.forget_everything()
            await invalidate(entries, inodes)
            log.info("SIGHUP: forgot every cached listing and object")
            continue
        log.info("%s: unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
