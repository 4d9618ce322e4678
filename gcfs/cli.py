"""The `gcfs` command: mount, demo, umount, refresh, status, mounts, prefetch, path, snapshot,
cache.

`gcfs mount` returns only once the mount answers (or has failed, with one line saying why):
it forks, the child becomes the daemon and reports "ready" or the error through a pipe. With
`--foreground` the same process serves the mount until it is unmounted or signalled, which
is what systemd wants (and it tells a `Type=notify` unit when the mount is up, see notify.py).

`gcfs SOURCE DIR -o OPTIONS`, the form mount.fuse3 uses for fstab lines of type `fuse.gcfs`,
is a mount too (see mount_helper.py).

The token never travels as an argument: it comes from a 0600 file or from the environment,
and the daemon is a fork of this process, so it never appears in /proc/<pid>/cmdline.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import trio

from . import __version__, configfile, notify, runtime
from .config import (
    DEFAULT_BASE_URL,
    DEFAULT_OP_TIMEOUT,
    DEFAULT_TTL,
    TOKEN_ENV,
    Config,
    Secret,
    check_mountpoint,
    default_cache_dir,
    find_token,
    normalize_base_url,
    parse_size,
)
from .configfile import default_config_path
from .errors import UserError
from .logsetup import check_log_file, setup_logging

if TYPE_CHECKING:
    from .fakegc import FakeGC

log = logging.getLogger("gcfs")

# How long `gcfs umount` waits for the daemon to exit after the unmount, before it sends
# SIGTERM; the daemon only has to close its HTTP connections, which takes milliseconds.
UMOUNT_WAIT = 10.0

T = TypeVar("T")


COMMANDS = (
    "mount",
    "demo",
    "umount",
    "refresh",
    "status",
    "mounts",
    "prefetch",
    "path",
    "cache",
    "snapshot",
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

EXIT_STATUS = """\
exit status:
  0    success
  1    failure; one line on stderr says what went wrong and what to do
  2    wrong usage (an unknown flag, a missing argument)"""

MAIN_DESCRIPTION = """\
Mount Grand Challenge (grand-challenge.org) archives, algorithms and reader studies as a
read-only directory tree. gcfs shows what your API token can see as ordinary directories
and files, fetches metadata only when you look at it and never writes to the platform."""

MAIN_EPILOG = f"""\
examples:
  gcfs demo ~/gc-demo                          try it on bundled sample data, no token
  gcfs mount ~/gc --token-file ~/.gctoken      mount your account; returns once it answers
  gcfs umount ~/gc                             unmount and stop the daemon
  gcfs status ~/gc                             what the daemon is doing
  gcfs mounts                                  your gcfs mounts here: server, pid, log
  gcfs snapshot ~/gc/archives/x --to DIR       record a subtree for offline mounts
  gcfs mount /tmp/gc --offline DIR             serve it with no token and no network
  gcfs snapshot --verify DIR                   check every byte of it, before a job
  gcfs cache status                            the block cache: where, mode, size
  gcfs path https://grand-challenge.org/api/v1/cases/images/<pk>/
                                               where an object is in the mount
  gcfs COMMAND --help                          more on one command

fstab:
  gcfs  /home/me/gc  fuse.gcfs  noauto,user,_netdev,token_file=/home/me/.gctoken  0 0
  (mount.fuse3 then runs `gcfs gcfs /home/me/gc -o OPTIONS`; see `mount.gcfs --help`)

the token:
  Create one at https://grand-challenge.org/settings/api-tokens/ and store it in a file only
  you can read (chmod 600). gcfs reads it from --token-file, else from the environment
  variable GRAND_CHALLENGE_AUTHORIZATION, else from token_file in the config file. It is
  never accepted as an argument and never logged.

files:
  $XDG_CONFIG_HOME/gcfs/config.toml  defaults for mount options (~/.config/gcfs/config.toml)
  $XDG_CACHE_HOME/gcfs/              the block cache of file contents (~/.cache/gcfs)
  $XDG_RUNTIME_DIR/gcfs/             pid files and background logs (else /tmp/gcfs-UID);
                                     those of mounts ended over a week ago are removed

{EXIT_STATUS}"""

MOUNT_DESCRIPTION = """\
Mount what your API token can see on MOUNTPOINT, an empty directory. The command returns
once the mount answers, leaving a daemon in the background; a rejected token, an unreachable
server or an unusable mount point ends it with status 1 and nothing stays mounted. With
--foreground it serves the mount itself until unmounted or sent SIGTERM (for systemd, which
it tells when the mount is ready: Type=notify).

The token comes from --token-file (a file only you can read, holding '<token>' or
'Bearer <token>'), else from the GRAND_CHALLENGE_AUTHORIZATION environment variable, else
from token_file in the config file. Flags win over the config file, which wins over the
built-in defaults shown below."""

MOUNT_EPILOG = f"""\
examples:
  gcfs mount ~/gc --token-file ~/.gctoken
  GRAND_CHALLENGE_AUTHORIZATION="Bearer $TOKEN" gcfs mount ~/gc
  gcfs mount ~/gc --token-file ~/.gctoken --ttl 300 --cache-size 50G
  gcfs mount /srv/gc --token-file /etc/gcfs/token --allow-other   # shared with all users
  gcfs mount ~/gc --foreground --log-level DEBUG                  # watch every request
  gcfs mount /tmp/gc --offline /shared/snapshots/lidc             # a snapshot, no network

config file ($XDG_CONFIG_HOME/gcfs/config.toml, or --config PATH), TOML:
  token_file = "~/.gctoken"
  ttl = 300
  cache_size = "50G"
  keys: token_file, base_url, ttl, timeout, cache_dir, cache_size, log_level, log_file,
  allow_other, offline. The token itself is not allowed in it.

{EXIT_STATUS}"""


class Parser(argparse.ArgumentParser):
    """argparse without its two ways of leaking a secret onto the terminal:

    - abbreviations: `--token SECRET` was taken as `--token-file SECRET`, and the error then
      named the "file" SECRET. Every parser here has allow_abbrev=False;
    - echoed values: argparse repeats what it could not use ("invalid choice: 'SECRET'",
      "unrecognized arguments: --token SECRET", "ignored explicit argument 'SECRET'"). Here
      an error names options and never repeats a value (type functions say what is wrong
      without the text, `unrecognized` lists only words that look like options).

    A usage error is one line on stderr, exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._usage_error(unrecognized(extras))
        return parsed

    def error(self, message: str) -> NoReturn:
        self._usage_error(scrub(message))

    def _usage_error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


# An option as a user types one: what `unrecognized` may repeat. Anything else after a dash
# (`-fSECRET`, `--token=SECRET`) is shown up to its `=`, or not at all.
_OPTION_WORD = re.compile(r"--?[A-Za-z][A-Za-z0-9-]{0,29}")


def unrecognized(words: Sequence[str]) -> str:
    """'unrecognized arguments: --token (and 1 more word)': the option names among `words`,
    never a value (the word after `--token` is likely the token)."""
    shown = []
    for word in words:
        name = word.split("=", 1)[0]
        if _OPTION_WORD.fullmatch(name) and name not in shown:
            shown.append(name)
    others = len(words) - sum(1 for w in words if w.split("=", 1)[0] in shown)
    text = ", ".join(shown) if shown else "words that are no option here"
    if shown and others:
        text += f" (and {others} more word{'s' if others != 1 else ''})"
    return f"unrecognized arguments: {text}"


def scrub(message: str) -> str:
    """An argparse error without the value it quotes."""
    if "unrecognized arguments:" in message:
        return message.split("unrecognized arguments:", 1)[0] + "unrecognized arguments"
    if "invalid choice:" in message:
        head = message.split("invalid choice:", 1)[0]
        _, found, choices = message.rpartition(" (choose from ")
        return f"{head}invalid choice" + (f" (choose from {choices}" if found else "")
    if "ignored explicit argument" in message:
        return message.split("ignored explicit argument", 1)[0] + "takes no value"
    return re.sub(r"invalid (\S+) value: .*", "invalid value", message)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number greater than 0")
    return value


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _subparser(
    commands: argparse._SubParsersAction[Parser],
    name: str,
    *,
    help: str,
    description: str,
    epilog: str = EXIT_STATUS,
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        allow_abbrev=False,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_mount_options(parser: argparse.ArgumentParser) -> None:
    # Defaults are None here so that the config file can fill in what no flag gave;
    # resolve_config() applies the built-in defaults last.
    parser.add_argument(
        "mountpoint", metavar="MOUNTPOINT", type=Path, help="an empty directory to mount on"
    )
    parser.add_argument(
        "--foreground",
        "-f",
        action="store_true",
        help="stay in the foreground until unmounted (for systemd); logs go to stderr",
    )
    parser.add_argument(
        "--ttl",
        type=_positive_float,
        metavar="SECONDS",
        help=f"how long listings and metadata are trusted before being fetched again "
        f"(default {DEFAULT_TTL:g})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=f"deadline of every filesystem operation; past it the caller gets EIO "
        f"(default {DEFAULT_OP_TIMEOUT:g})",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)}; DEBUG logs one line per request (default INFO)",
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
        metavar="SIZE",
        help="size limit of the block cache, least recently used blocks evicted first "
        "(default 10G; 0 disables the cache)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        metavar="PATH",
        help="where the daemon logs, rotated at 10 MiB into PATH.1 .. PATH.3; default: stderr "
        "in the foreground (the journal under systemd), $XDG_RUNTIME_DIR/gcfs/<id>.log in the "
        "background",
    )
    parser.add_argument(
        "--allow-other",
        action=argparse.BooleanOptionalAction,
        help="let other users (and root) read the mount (default off); needs the line "
        "user_allow_other in /etc/fuse.conf unless you are root",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="config file with defaults for these options "
        "(default $XDG_CONFIG_HOME/gcfs/config.toml; a missing default file is fine)",
    )


def build_parser(prog: str = "gcfs") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        allow_abbrev=False,
        description=MAIN_DESCRIPTION,
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gcfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = _subparser(
        commands,
        "mount",
        help="mount Grand Challenge on a directory",
        description=MOUNT_DESCRIPTION,
        epilog=MOUNT_EPILOG,
    )
    _add_mount_options(mount)
    mount.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="file holding the token, readable only by you (chmod 600); "
        "default: $GRAND_CHALLENGE_AUTHORIZATION",
    )
    mount.add_argument(
        "--base-url",
        metavar="URL",
        help=f"the site root (default {DEFAULT_BASE_URL}); the API is at URL/api/v1/",
    )
    mount.add_argument(
        "--offline",
        type=Path,
        metavar="DIR",
        help="serve the snapshot in DIR (see gcfs snapshot) instead of the server: no token, "
        "no network; --token-file, --base-url, --cache-dir and --cache-size do not apply",
    )

    demo = _subparser(
        commands,
        "demo",
        help="mount a bundled demo server with sample data (no token needed)",
        description="Start the bundled fake Grand Challenge server on 127.0.0.1 with sample "
        "archives, algorithms and reader studies, and mount it on MOUNTPOINT. `gcfs umount` "
        "stops both. Takes the options of `gcfs mount` except --token-file and --base-url.",
        epilog=f"example:\n  mkdir -p ~/gc-demo && gcfs demo ~/gc-demo && ls ~/gc-demo/archives"
        f"\n\n{EXIT_STATUS}",
    )
    _add_mount_options(demo)

    umount = _subparser(
        commands,
        "umount",
        help="unmount and stop the daemon",
        description="Unmount MOUNTPOINT, a gcfs mount (anything else is refused), and wait "
        "until its daemon (and a demo server) has stopped. A busy mount (a process has a file "
        "or its working directory in it) is refused with the next step: `fuser -vm "
        "MOUNTPOINT` shows who, --lazy detaches it anyway. `fusermount3 -u MOUNTPOINT` and "
        "SIGTERM to the daemon unmount cleanly too.",
        epilog=f"examples:\n  gcfs umount ~/gc\n  gcfs umount --lazy ~/gc     # in a job's "
        f"exit trap\n\n{EXIT_STATUS}",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="where gcfs is mounted")
    umount.add_argument(
        "--lazy",
        "-z",
        action="store_true",
        help="detach the mount now even if it is busy (fusermount3 -u -z): processes with "
        "files open in it keep reading them, and the daemon stops after the last is closed",
    )

    refresh = _subparser(
        commands,
        "refresh",
        help="forget what the daemon cached under a path",
        description="Make the daemon forget the listings and metadata it cached for PATH "
        "(inside a gcfs mount), so that the next look fetches them again, without waiting "
        "for the TTL.",
        epilog=f"examples:\n  gcfs refresh ~/gc/archives\n"
        f"  gcfs refresh --recursive ~/gc/reader-studies/my-study\n\n{EXIT_STATUS}",
    )
    refresh.add_argument(
        "path", metavar="PATH", type=Path, help="a file or directory inside a gcfs mount"
    )
    refresh.add_argument(
        "--recursive", "-r", action="store_true", help="everything below PATH as well"
    )

    status = _subparser(
        commands,
        "status",
        help="show what a mount's daemon is doing",
        description="Print the status of the daemon serving MOUNTPOINT: server, user, "
        "caches and requests.",
        epilog=f"examples:\n  gcfs status ~/gc\n  gcfs status ~/gc --json | jq .\n\n{EXIT_STATUS}",
    )
    status.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="where gcfs is mounted")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    mounts = _subparser(
        commands,
        "mounts",
        help="list your gcfs mounts on this machine",
        description="List every gcfs mount of yours on this machine: mount point, server (or "
        "the snapshot of an offline mount), user, pid, uptime and log file. A mount whose "
        "daemon does not answer within 2 s, or is gone, is listed as such with the next step.",
        epilog=f"examples:\n  gcfs mounts\n  gcfs mounts --json | jq -r '.[].log_file'\n\n"
        f"{EXIT_STATUS}",
    )
    mounts.add_argument("--json", action="store_true", help="print JSON for scripts")

    prefetch = _subparser(
        commands,
        "prefetch",
        help="fill the block cache for a subtree ahead of reading it",
        description="Read everything below PATH (inside a gcfs mount) into the on-disk block "
        "cache, so that later reads, and reads while offline, are served locally.",
        epilog=f"example:\n  gcfs prefetch ~/gc/archives/lidc-lung-ct/items\n\n{EXIT_STATUS}",
    )
    prefetch.add_argument(
        "path", metavar="PATH", type=Path, help="a file or directory inside a gcfs mount"
    )
    prefetch.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="N",
        default=8,
        help="files read at once (default 8; more helps small files on a link with a long "
        "round trip, as long as the daemon has CPU to spare)",
    )

    path = _subparser(
        commands,
        "path",
        help="print where an object is in the mount, by pk, slug or URL",
        description="Print the path in the mount of the object IDENTIFIER names: a pk "
        "(UUID), a slug (bare when only one collection has it, or archives/<slug>), an API "
        "URL (https://grand-challenge.org/api/v1/...) or a website URL. MOUNTPOINT defaults "
        "to the gcfs mount holding the current directory, or the only one there is. Exit "
        "status 1 with one line when the object does not exist or is not visible to you.",
        epilog="examples:\n"
        "  gcfs path lidc-lung-ct\n"
        "  gcfs path 0b4c2f8e-6d1a-4c55-9a0e-3f1f5b9e2a11 ~/gc\n"
        "  gcfs path https://grand-challenge.org/api/v1/reader-studies/display-sets/<pk>/\n"
        '  cat "$(gcfs path https://grand-challenge.org/algorithms/corads-ai/)/algorithm.json"\n'
        f"\n{EXIT_STATUS}",
    )
    path.add_argument(
        "identifier", metavar="IDENTIFIER", help="a pk, a slug, an API URL or a website URL"
    )
    path.add_argument(
        "mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?", help="where gcfs is mounted"
    )
    snapshot = _subparser(
        commands,
        "snapshot",
        help="record subtrees of a mount, bytes included, for offline mounts",
        description=SNAPSHOT_DESCRIPTION,
        epilog=SNAPSHOT_EPILOG,
    )
    snapshot.add_argument(
        "paths",
        metavar="PATH",
        type=Path,
        nargs="*",
        help="a file or directory inside a gcfs mount (all in the same one)",
    )
    snapshot.add_argument("--to", type=Path, metavar="DIR", help="the snapshot directory")
    snapshot.add_argument(
        "--verify",
        type=Path,
        metavar="DIR",
        help="instead: check that every byte of the snapshot in DIR is there and intact "
        "(no mount, no network; exit status 1 when not)",
    )
    snapshot.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="N",
        default=8,
        help="files read at once (default 8)",
    )
    snapshot.set_defaults(snapshot_parser=snapshot)
    _add_cache_command(commands)
    return parser


SNAPSHOT_DESCRIPTION = """\
Record everything under the PATHs (inside one gcfs mount): listings, metadata files, sizes,
README stubs, symlinks, extended attributes and every byte, into DIR, with a manifest naming
the server, the user, when and which subtrees (never the token). `gcfs mount MOUNTPOINT
--offline DIR` then serves exactly that tree with no token and no network, on a machine
that has none (a cluster's compute node); any number of offline mounts may read one DIR.

Run it again to refresh DIR in place: listings are recorded anew and only bytes DIR does not
hold yet are fetched; subtrees recorded before stay. An offline mount started during a
refresh sees the old snapshot or the new one, complete.

`gcfs snapshot --verify DIR` reads every byte the snapshot names and checks it against its
block checksums (CRC32), without a mount or a network and changing nothing: each file that is
missing or damaged is named by its path in the tree (exit status 1); an intact snapshot gets
a one-line summary (exit status 0). Fast enough for the start of every job."""

SNAPSHOT_EPILOG = f"""\
examples:
  gcfs snapshot ~/gc/archives/lidc-lung-ct --to /shared/snapshots/lidc
  gcfs snapshot ~/gc/reader-studies/my-study ~/gc/algorithms/my-algorithm/jobs \\
      --to /shared/snapshots/study
  gcfs mount /tmp/gc --offline /shared/snapshots/study     # on a node without network
  gcfs snapshot --verify /shared/snapshots/study || exit 1  # at the start of a job

{EXIT_STATUS}"""


def _check_snapshot_usage(args: argparse.Namespace) -> None:
    """`gcfs snapshot PATH... --to DIR` or `gcfs snapshot --verify DIR`: a usage error (exit
    status 2) otherwise."""
    parser: argparse.ArgumentParser = args.snapshot_parser
    if args.verify is not None:
        if args.paths or args.to is not None:
            parser.error("--verify DIR takes no PATH and no --to")
    elif not args.paths or args.to is None:
        parser.error("give PATH... --to DIR (record), or --verify DIR (check)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


CACHE_DESCRIPTION = """\
Look after a block cache directory without a mount: one of your own, or one that many
daemons share (on several machines, by the users of one group; see README, On a cluster).
Running daemons may keep using it meanwhile: prune and clear only remove whole files (a
daemon reading one keeps its bytes, then fetches them again); status and verify only read.
Only a gcfs block cache is touched: anything else (a snapshot included) is refused, and no
action creates, chmods or marks anything.

  status         where it is, its mode (private or group), its filesystem, files and size
  prune SIZE     evict the least recently used files (by any daemon's use) until at most
                 SIZE is left (10G, 512M, or bytes)
  verify         read every block and check its length and checksum; damaged blocks are
                 reported (a daemon that reads one drops it and fetches it again)
  clear          remove everything"""

CACHE_EPILOG = f"""\
examples:
  gcfs cache status
  gcfs cache status --cache-dir /shared/gcfs-cache --json
  gcfs cache prune 50G --cache-dir /shared/gcfs-cache
  gcfs cache verify

The directory is --cache-dir, else cache_dir of the config file, else $XDG_CACHE_HOME/gcfs.

{EXIT_STATUS}"""


def _add_cache_command(commands: argparse._SubParsersAction[Parser]) -> None:
    cache = _subparser(
        commands,
        "cache",
        help="status, prune, verify or clear a block cache directory (no mount needed)",
        description=CACHE_DESCRIPTION,
        epilog=CACHE_EPILOG,
    )
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("status", "where the cache is, its mode, files and size"),
        ("prune", "evict least recently used files until at most SIZE is left"),
        ("verify", "read and check every block; report damaged ones"),
        ("clear", "remove everything"),
    ):
        action = actions.add_parser(
            name, allow_abbrev=False, help=text, description=text[0].upper() + text[1:] + "."
        )
        if name == "prune":
            action.add_argument("size", metavar="SIZE", help="what may stay: 10G, 512M, bytes")
        action.add_argument(
            "--cache-dir",
            type=Path,
            metavar="DIR",
            help="the cache directory (default: cache_dir of the config file, else "
            "$XDG_CACHE_HOME/gcfs)",
        )
        action.add_argument(
            "--config", type=Path, metavar="PATH", help="config file to take cache_dir from"
        )
        if name == "status":
            action.add_argument("--json", action="store_true", help="print JSON for scripts")


def main(argv: Sequence[str] | None = None, *, dry_run: bool = False, prog: str = "gcfs") -> int:
    """The `gcfs` command; `dry_run` checks everything a mount needs but does not mount."""
    from .mount_helper import helper_environment, mount_argv, split_fuse_form

    words = list(sys.argv[1:] if argv is None else argv)
    try:
        fuse_form = split_fuse_form(words)
        if fuse_form is not None:  # gcfs SOURCE DIR -o OPTIONS, from mount.fuse3
            source, directory, options = fuse_form
            helper_environment()
            words = mount_argv(source, directory, options)
    except UserError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    try:
        args = build_parser(prog).parse_args(words)
        if args.command == "snapshot":
            _check_snapshot_usage(args)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 1
    try:
        if args.command == "umount":
            return unmount(args.mountpoint, lazy=args.lazy)
        if args.command == "refresh":
            from . import control

            return control.refresh_command(args.path, recursive=args.recursive)
        if args.command == "status":
            from . import control

            return control.status_command(args.mountpoint, as_json=args.json)
        if args.command == "mounts":
            from . import mounts

            return mounts.mounts_command(as_json=args.json)
        if args.command == "prefetch":
            from . import prefetch

            return prefetch.prefetch_command(args.path, parallel=args.jobs)
        if args.command == "path":
            from . import locate

            return locate.path_command(args.identifier, args.mountpoint)
        if args.command == "snapshot" and args.verify is not None:
            from . import snapshotverify

            return snapshotverify.verify_command(args.verify, jobs=args.jobs)
        if args.command == "snapshot":
            from . import snapshot

            return snapshot.snapshot_command(args.paths, args.to, jobs=args.jobs)
        if args.command == "cache":
            from . import cachecmd

            cache_dir = cachecmd.cache_directory(args.cache_dir, args.config)
            return cachecmd.cache_command(
                args.action,
                cache_dir,
                size=getattr(args, "size", None),
                as_json=getattr(args, "json", False),
            )
        return mount(args, dry_run=dry_run)
    except UserError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A system call a command did not expect to fail: one line, without the path (it may
        # be an option's value), rather than a traceback.
        reason = exc.strerror or type(exc).__name__
        print(f"{prog} {args.command}: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- mount --------------------------------------------------------------------------------


def _first(*values: T | None) -> T | None:
    return next((value for value in values if value is not None), None)


@dataclass(frozen=True)
class MountPlan:
    cfg: Config
    demo: bool
    log_file: Path | None
    log_label: str | None = None  # how messages name log_file when a flag gave it


def given_with(what: str, flag: str, value: object) -> str | None:
    """How a message names a path that came from `flag` ("the token file given with
    --token-file"): never by the value, which may be a secret typed after the wrong flag.
    None (show the path) when no flag gave it (the config file, a default)."""
    return f"the {what} given with {flag}" if value is not None else None


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> MountPlan:
    """Flags, then the config file, then the built-in defaults; checked, without network."""
    demo = args.command == "demo"
    explicit = args.config is not None
    defaults = configfile.load(
        args.config if explicit else default_config_path(environ),
        explicit=explicit,
        label=given_with("config file", "--config", args.config),
    )
    mountpoint = check_mountpoint(args.mountpoint)
    token_file: Path | None = None
    offline: Path | None = None if demo else _first(args.offline, defaults.get("offline"))
    if demo:
        base_url, token = "http://127.0.0.1", None  # filled in once the demo server runs
    elif offline is not None:
        offline = offline.expanduser().absolute()
        label = given_with("directory", "--offline", args.offline)
        base_url, token = _offline_server(args, offline, label or str(offline)), None
    else:
        base_url = normalize_base_url(
            _first(args.base_url, defaults.get("base_url")) or DEFAULT_BASE_URL
        )
        token_file = args.token_file
        if token_file is None and not environ.get(TOKEN_ENV):
            token_file = defaults.get("token_file")
        label = given_with("token file", "--token-file", args.token_file)
        token = find_token(token_file, environ, label)
    cache_size = _first(args.cache_size, defaults.get("cache_size")) or "10G"
    cache_dir: Path = _first(args.cache_dir, defaults.get("cache_dir")) or default_cache_dir()
    if args.cache_dir is not None and cache_size != "0":
        _check_cache_parent(cache_dir.expanduser().absolute())
    cfg = Config(
        mountpoint=mountpoint,
        base_url=base_url,
        token=token,
        token_file=token_file.expanduser().absolute() if token_file else None,
        ttl=_first(args.ttl, defaults.get("ttl")) or DEFAULT_TTL,
        op_timeout=_first(args.timeout, defaults.get("timeout")) or DEFAULT_OP_TIMEOUT,
        foreground=args.foreground,
        log_level=_first(args.log_level, defaults.get("log_level")) or "INFO",
        cache_dir=cache_dir.expanduser().absolute(),
        cache_size=parse_size(cache_size, "--cache-size" if args.cache_size else None),
        allow_other=bool(_first(args.allow_other, defaults.get("allow_other"))),
        offline=offline,
        cache_dir_label=given_with("cache directory", "--cache-dir", args.cache_dir),
    )
    log_file: Path | None = _first(args.log_file, defaults.get("log_file"))
    log_label = given_with("log file", "--log-file", args.log_file)
    if log_file is not None:
        log_file = log_file.expanduser().absolute()
        check_log_file(log_file, log_label or str(log_file))
    return MountPlan(cfg, demo, log_file, log_label)


def _check_cache_parent(cache_dir: Path) -> None:
    """A --cache-dir that does not exist is created, but not its parents: a typo in the path
    is one line, not a new directory tree (the default's parents, ~/.cache, are created)."""
    if not cache_dir.exists() and not cache_dir.parent.is_dir():
        raise UserError(
            "cannot create the cache directory given with --cache-dir: its parent directory "
            "does not exist"
        )


def _offline_server(args: argparse.Namespace, directory: Path, shown: str) -> str:
    """The server a snapshot was taken of (for show); UserError when DIR holds none or a
    flag that needs the network was given too."""
    from . import marker
    from .snapshot import load_manifest

    given = [
        flag
        for flag, value in (
            ("--token-file", args.token_file),
            ("--base-url", args.base_url),
            ("--cache-dir", args.cache_dir),
            ("--cache-size", args.cache_size),
        )
        if value is not None
    ]
    if given:
        raise UserError(f"--offline serves a snapshot and uses no {', '.join(given)}")
    try:
        kind = marker.classify(directory)
    except OSError as exc:
        raise UserError(f"cannot read {shown}: {exc.strerror}") from None
    if not kind.is_snapshot:
        what = {
            marker.Kind.MISSING: "does not exist",
            marker.Kind.NOT_DIRECTORY: "is not a directory",
        }.get(kind, f"holds no gcfs snapshot ({kind.value})")
        raise UserError(
            f"{shown} {what}; take a snapshot on a machine with network: "
            "gcfs snapshot PATH... --to DIR"
        )
    manifest = load_manifest(directory, shown)
    if manifest is None:
        raise UserError(f"{shown} holds no gcfs snapshot (no manifest.json)")
    return str(manifest.get("server", ""))


def mount(args: argparse.Namespace, *, dry_run: bool = False) -> int:
    plan = resolve_config(args, os.environ)
    cfg, demo = plan.cfg, plan.demo
    if dry_run:
        return 0
    if cfg.foreground:
        setup_logging(cfg.log_level, plan.log_file)
        cfg = replace(cfg, log_file=plan.log_file)  # for gcfs status
        # A Type=notify unit becomes active once the mount answers.
        run_daemon(cfg, demo=demo, on_ready=notify.ready)
        return 0
    log_file = plan.log_file or runtime.default_log_file(cfg.mountpoint)
    shown = plan.log_label or str(log_file)
    background = replace(cfg, log_file=log_file)

    def daemon(on_ready: Callable[[], None]) -> None:
        run_daemon(background, demo=demo, on_ready=on_ready)

    return _run_in_background(daemon, log_file=log_file, log_level=cfg.log_level, shown=shown)


def run_daemon(cfg: Config, *, demo: bool, on_ready: Callable[[], None]) -> None:
    """Serve the mount in this process until it is unmounted; the demo server too."""
    from .daemon import serve  # pyfuse3 is imported only by the processes that mount

    with contextlib.ExitStack() as stack:
        if demo:
            from .fakegc import DEMO_TOKEN

            fake = start_demo_server()
            stack.callback(fake.stop)
            cfg = replace(cfg, base_url=fake.base_url, token=Secret(DEMO_TOKEN), token_file=None)
        pid_path = runtime.write_pid(cfg.mountpoint, cfg.log_file)
        stack.callback(pid_path.unlink, missing_ok=True)
        # After the pid file: this mount's own files are those of a live pid, never stale.
        removed = runtime.remove_stale()
        if removed:
            log.info(
                "removed %d log, pid and socket files of mounts that ended over a week ago from %s",
                len(removed),
                runtime.runtime_dir(),
            )
        trio.run(serve, cfg, on_ready)


# The demo server's port: the same for a user on every run where it is free, because the
# server's URL names everything made from the demo (the metadata store, a snapshot's manifest,
# the block cache's file keys), so a demo snapshot can be refreshed by the next demo. Ports
# 24000-27999, below Linux's ephemeral range (32768-60999), where outgoing connections would
# take ports at random; uids 1000-4999 each get their own.
DEMO_PORT_BASE = 24000
DEMO_PORT_COUNT = 4000
# Tests set another preferred port, so that a demo someone else runs meanwhile on this machine
# (the same uid: the same port) cannot make them flaky.
DEMO_PORT_ENV = "GCFS_TEST_DEMO_PORT"


def demo_port(uid: int | None = None) -> int:
    """The port the demo server tries first for this user."""
    override = os.environ.get(DEMO_PORT_ENV)
    if override:
        return int(override)
    return DEMO_PORT_BASE + (os.getuid() if uid is None else uid) % DEMO_PORT_COUNT


def start_demo_server() -> FakeGC:
    """The demo's fake server, started on demo_port(), else (busy) on a free port, which the
    log says. It serves the job image filters as a fixed server would: the real server's 500
    to `cases/images/?job_input=` is the tests' business, and a newcomer's first `gcfs
    status` should not show a failing endpoint."""
    from .fakegc import FakeGC, demo_world

    preferred = demo_port()
    for port in (preferred, 0):
        fake = FakeGC(demo_world(), port=port)
        fake.job_filters_fixed = True
        try:
            fake.start()
        except OSError as exc:
            if port == 0:
                raise
            log.info("demo server: port %d is not free (%s); taking another", port, exc.strerror)
            continue
        if fake.port == preferred:
            log.info("demo server listening on %s", fake.base_url)
        else:
            log.warning(
                "demo server listening on %s, not on this user's port %d (busy): a snapshot "
                "of this demo is refreshed by a demo on the same port",
                fake.base_url,
                preferred,
                extra={"tell_user": True},
            )
        return fake
    raise AssertionError("unreachable")


def _run_in_background(
    daemon: Callable[[Callable[[], None]], None], *, log_file: Path, log_level: str, shown: str
) -> int:
    """Fork; the child serves the mount, the parent returns once it is ready or has failed."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os._exit(_daemon_child(daemon, write_fd, log_file, log_level, shown))
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode("utf-8", errors="replace").strip()
    lines = message.splitlines()
    if lines and lines[0] == "ready":
        for notice in lines[1:]:  # what the daemon told the user (daemon.serve)
            print(f"gcfs: {notice}", file=sys.stderr)
        return 0
    os.waitpid(pid, 0)
    print(
        f"gcfs: {message or f'the daemon stopped before the mount was ready; see {shown}'}",
        file=sys.stderr,
    )
    return 1


def _daemon_child(
    daemon: Callable[[Callable[[], None]], None],
    write_fd: int,
    log_file: Path,
    log_level: str,
    shown: str,
) -> int:
    os.setsid()
    # Only a foreground daemon is a unit's main process; a forked one must not claim READY.
    os.environ.pop(notify.SOCKET_ENV, None)
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

    told = _TellUser()
    try:
        setup_logging(log_level, log_file)
        logging.getLogger("gcfs").addHandler(told)
        daemon(lambda: report("\n".join(["ready", *told.messages])))
    except UserError as exc:
        log.error("%s", exc)
        report(str(exc))
        return 1
    except BaseException as exc:
        log.exception("the daemon failed")
        report(f"the daemon failed: {type(exc).__name__}; see {shown}")
        return 1
    finally:
        report("")
    return 0


class _TellUser(logging.Handler):
    """Keeps the log messages marked `tell_user` before the mount is ready: `gcfs mount`
    prints them (a mount that starts from its store while the server is down says so)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "tell_user", False) and len(self.messages) < 8:
            self.messages.append(record.getMessage())


# -- umount -------------------------------------------------------------------------------


def unmount(path: Path, *, lazy: bool = False) -> int:
    """`gcfs umount [--lazy] MOUNTPOINT`: only a gcfs mount (its type in mountinfo), so that
    root running it on the wrong directory does not unmount a tmpfs or a home directory.
    `lazy` detaches the mount at once (fusermount3 -u -z); the daemon serves the files still
    open and stops when the last one is closed, so we do not wait for it."""
    from .control import GCFS_TYPE, mount_type

    mountpoint = path.expanduser().absolute()
    pid = runtime.daemon_pid(mountpoint)
    kind = mount_type(mountpoint)
    if kind is None:
        raise UserError(f"{path} is not mounted")
    if kind != GCFS_TYPE:
        raise UserError(f"{path} is not a gcfs mount (it is {kind}); gcfs umount leaves it alone")
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    lazy_flag = ["-z"] if lazy else []
    command = (
        [fusermount, "-u", *lazy_flag, str(mountpoint)]
        if fusermount
        else ["umount", *(["-l"] if lazy else []), str(mountpoint)]
    )
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        if "busy" in reason.lower():
            raise UserError(
                f"cannot unmount {path}: it is busy (a process has a file or its working "
                f"directory in it); see which with: fuser -vm {path}; or detach it now with: "
                f"gcfs umount --lazy {path}"
            )
        raise UserError(f"cannot unmount {path}: {reason}")
    if lazy:
        return 0
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
