"""The daemon's lifecycle: check the token, mount, serve until unmounted or signalled, clean up.

serve(cfg, on_ready)
  GcApiClient  -> whoami (the only request at mount time; a bad token ends here)
  ContentStore -> GcFilesystem -> GcfsOperations -> pyfuse3.init (the mount appears)
  control socket (gcfs refresh/status), signal handler (SIGTERM/SIGINT unmount, SIGHUP forgets)
  on_ready()   -> the foreground caller, the waiting parent or systemd learns the mount is up
  pyfuse3.main() until `fusermount3 -u` (the kernel ends the session) or SIGTERM/SIGINT
                 (we call pyfuse3.terminate())
  pyfuse3.close(unmount=True): the mount point is left clean in every case, crash
                 included; a stale mount ("Transport endpoint is not connected") is
                 worse for a user than a missing one.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import httpx
import pyfuse3
import trio

from . import notify
from .api import GcApiClient
from .blockstore import BlockStore
from .config import Config, TokenSource, default_cache_dir, mount_options
from .content import ContentStore
from .control import serve_control
from .errors import GcfsError, PermissionDenied, Unavailable, UserError
from .fs import GcFilesystem
from .fuse_ops import GcfsOperations, invalidate
from .retry import RetryPolicy
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
        raise UserError(f"cannot reach {cfg.base_url}: {exc}") from None
    except trio.TooSlowError:
        raise UserError(f"{cfg.base_url} did not answer within {cfg.op_timeout:g} s") from None
    except GcfsError as exc:
        raise UserError(f"{cfg.base_url} does not look like Grand Challenge: {exc}") from None


# Connections for /media/ resolution on the site (one GET per opened file, no body read);
# storage has its own client (storage_http.DEFAULT_MAX_CONNECTIONS).
MEDIA_CONNECTIONS = 16


def open_block_store(cfg: Config) -> BlockStore | None:
    if cfg.cache_size <= 0:
        return None
    directory = cfg.cache_dir or default_cache_dir()
    try:
        return BlockStore(directory, cfg.cache_size)
    except OSError as exc:
        raise UserError(f"cannot use cache directory {directory}: {exc.strerror}") from None


async def serve(cfg: Config, on_ready: Callable[[], None]) -> None:
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
        username = await check_token(api, cfg)
        store = ContentStore(
            content_http,
            api.auth_headers,
            block_store,
            storage=StorageClient(timeout=cfg.request_timeout),
            http_timeout=cfg.request_timeout,
            retry=retry,
            site_outage=api.outage,
        )
        try:
            async with store as content:
                fs = GcFilesystem(api, content, username=username, ttl=cfg.ttl)
                await _mount_and_serve(cfg, fs, username, on_ready)
        finally:
            if block_store is not None:
                block_store.close()


async def _mount_and_serve(
    cfg: Config, fs: GcFilesystem, username: str, on_ready: Callable[[], None]
) -> None:
    operations = GcfsOperations(fs, op_timeout=cfg.op_timeout)
    try:
        pyfuse3.init(operations, str(cfg.mountpoint), mount_options(cfg, MOUNT_OPTIONS))
    except RuntimeError as exc:
        raise UserError(f"cannot mount on {cfg.mountpoint}: {exc}") from None
    fs.mountpoint = str(cfg.mountpoint)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_handle_signals, fs)
            await nursery.start(serve_control, fs, cfg.mountpoint, invalidate)
            log.info("mounted %s on %s as %s", cfg.base_url, cfg.mountpoint, username)
            on_ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        notify.stopping()  # sd_notify STOPPING=1 to a Type=notify unit; no-op otherwise
        pyfuse3.close(unmount=True)
        log.info(
            "unmounted %s; metadata %s; content %s",
            cfg.mountpoint,
            fs.cache.statistics(),
            fs.content.statistics(),
        )


async def _handle_signals(fs: GcFilesystem) -> None:
    """SIGTERM/SIGINT unmount; SIGHUP forgets every cached listing and object."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                entries, inodes = fs.forget_everything()
                await invalidate(entries, inodes)
                log.info("SIGHUP: forgot every cached listing and object")
                continue
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
