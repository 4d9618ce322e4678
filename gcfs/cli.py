"""The `gcfs` command: mount, demo, umount.

`gcfs mount` returns only once the mount answers (or has failed, with one line saying why):
it forks, the child becomes the daemon and reports "ready" or the error through a pipe. With
`--foreground` the same process serves the mount until it is unmounted or signalled, which
is what systemd wants.

The token never travels as an argument: it comes from a 0600 file or from the environment,
and the daemon is a fork of this process, so it never appears in /proc/<pid>/cmdline.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import trio

from . import __version__, runtime
from .config import (
    DEFAULT_BASE_URL,
    DEFAULT_OP_TIMEOUT,
    DEFAULT_TTL,
    Config,
    Secret,
    check_mountpoint,
    default_cache_dir,
    find_token,
    is_stale_mount,
    normalize_base_url,
    parse_size,
)
from .errors import UserError
from .logsetup import setup_logging

log = logging.getLogger("gcfs")

# How long `gcfs umount` waits for the daemon to exit after the unmount, before it sends
# SIGTERM; the daemon only has to close its HTTP connections, which takes milliseconds.
UMOUNT_WAIT = 10.0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _add_mount_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", type=Path, help="an empty directory to mount on")
    parser.add_argument(
        "--foreground",
        "-f",
        action="store_true",
        help="stay in the foreground until unmounted (for systemd); logs go to stderr",
    )
    parser.add_argument(
        "--ttl",
        type=_positive_float,
        default=DEFAULT_TTL,
        metavar="SECONDS",
        help=f"how long listings and metadata are trusted before being fetched again "
        f"(default {DEFAULT_TTL:g})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_OP_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of every filesystem operation; past it the caller gets EIO "
        f"(default {DEFAULT_OP_TIMEOUT:g})",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="DEBUG logs one line per request (default INFO)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="on-disk block cache of file contents (default $XDG_CACHE_HOME/gcfs, "
        "i.e. ~/.cache/gcfs; created with mode 0700)",
    )
    parser.add_argument(
        "--cache-size",
        default="10G",
        metavar="SIZE",
        help="size limit of the block cache, least recently used blocks evicted first "
        "(default 10G; 0 disables the cache)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        metavar="PATH",
        help="where the daemon logs; default: stderr in the foreground, "
        "$XDG_RUNTIME_DIR/gcfs/<id>.log in the background",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcfs",
        description="Mount Grand Challenge archives, algorithms and reader studies "
        "as a read-only directory tree.",
    )
    parser.add_argument("--version", action="version", version=f"gcfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount",
        help="mount Grand Challenge on a directory",
        description="Mount what your API token can see on MOUNTPOINT. The token comes from "
        "--token-file (a file only you can read, holding '<token>' or 'Bearer <token>') "
        "or from the GRAND_CHALLENGE_AUTHORIZATION environment variable.",
    )
    _add_mount_options(mount)
    mount.add_argument("--token-file", type=Path, metavar="PATH", help="file holding the token")
    mount.add_argument(
        "--base-url",
        default=DEFAULT_BASE_URL,
        metavar="URL",
        help=f"the site root (default {DEFAULT_BASE_URL}); the API is at URL/api/v1/",
    )

    demo = commands.add_parser(
        "demo",
        help="mount a bundled demo server with sample data (no token needed)",
        description="Start the bundled fake Grand Challenge server on 127.0.0.1 with sample "
        "archives, algorithms and reader studies, and mount it. `gcfs umount` stops both.",
    )
    _add_mount_options(demo)

    umount = commands.add_parser("umount", help="unmount and stop the daemon")
    umount.add_argument("mountpoint", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "umount":
            return unmount(args.mountpoint)
        return mount(args)
    except UserError as exc:
        print(f"gcfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- mount --------------------------------------------------------------------------------


def mount(args: argparse.Namespace) -> int:
    mountpoint = check_mountpoint(args.mountpoint)
    demo = args.command == "demo"
    if demo:
        base_url, token = "http://127.0.0.1", None  # filled in once the demo server runs
    else:
        base_url = normalize_base_url(args.base_url)
        token = find_token(args.token_file, os.environ)
    cfg = Config(
        mountpoint=mountpoint,
        base_url=base_url,
        token=token,
        token_file=None if demo or not args.token_file else args.token_file.absolute(),
        ttl=args.ttl,
        op_timeout=args.timeout,
        foreground=args.foreground,
        log_level=args.log_level,
        cache_dir=(args.cache_dir or default_cache_dir()).expanduser().absolute(),
        cache_size=parse_size(args.cache_size),
    )

    def daemon(on_ready: Callable[[], None]) -> None:
        run_daemon(cfg, demo=demo, on_ready=on_ready)

    if cfg.foreground:
        setup_logging(cfg.log_level, args.log_file)
        daemon(lambda: None)
        return 0
    log_file = args.log_file or runtime.default_log_file(mountpoint)
    return _run_in_background(daemon, log_file=log_file, log_level=cfg.log_level)


def run_daemon(cfg: Config, *, demo: bool, on_ready: Callable[[], None]) -> None:
    """Serve the mount in this process until it is unmounted; the demo server too."""
    from .daemon import serve  # pyfuse3 is imported only by the processes that mount

    with contextlib.ExitStack() as stack:
        if demo:
            from .fakegc import DEMO_TOKEN, FakeGC, demo_world

            fake = stack.enter_context(FakeGC(demo_world()))
            cfg = replace(cfg, base_url=fake.base_url, token=Secret(DEMO_TOKEN), token_file=None)
            log.info("demo server listening on %s", fake.base_url)
        pid_path = runtime.write_pid(cfg.mountpoint)
        stack.callback(pid_path.unlink, missing_ok=True)
        trio.run(serve, cfg, on_ready)


def _run_in_background(
    daemon: Callable[[Callable[[], None]], None], *, log_file: Path, log_level: str
) -> int:
    """Fork; the child serves the mount, the parent returns once it is ready or has failed."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os._exit(_daemon_child(daemon, write_fd, log_file, log_level))
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode("utf-8", errors="replace").strip()
    if message == "ready":
        return 0
    os.waitpid(pid, 0)
    print(
        f"gcfs: {message or f'the daemon stopped before the mount was ready; see {log_file}'}",
        file=sys.stderr,
    )
    return 1


def _daemon_child(
    daemon: Callable[[Callable[[], None]], None], write_fd: int, log_file: Path, log_level: str
) -> int:
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    pipe = os.fdopen(write_fd, "wb")

    def report(text: str) -> None:
        if not pipe.closed:
            with contextlib.suppress(OSError):
                pipe.write(text.encode("utf-8"))
                pipe.close()

    try:
        setup_logging(log_level, log_file)
        daemon(lambda: report("ready"))
    except UserError as exc:
        log.error("%s", exc)
        report(str(exc))
        return 1
    except BaseException as exc:
        log.exception("the daemon failed")
        report(f"the daemon failed: {type(exc).__name__}; see {log_file}")
        return 1
    finally:
        report("")
    return 0


# -- umount -------------------------------------------------------------------------------


def unmount(path: Path) -> int:
    mountpoint = path.expanduser().absolute()
    pid = runtime.read_pid(mountpoint)
    if not os.path.ismount(mountpoint) and not is_stale_mount(mountpoint):
        raise UserError(f"{path} is not mounted")
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [fusermount, "-u", str(mountpoint)] if fusermount else ["umount", str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise UserError(f"cannot unmount {path}: {reason}")
    if pid is not None and not _wait_for_exit(pid, UMOUNT_WAIT):
        os.kill(pid, signal.SIGTERM)
        if not _wait_for_exit(pid, UMOUNT_WAIT):
            raise UserError(f"unmounted {path}, but the daemon (pid {pid}) does not stop")
    return 0


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while runtime.is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
