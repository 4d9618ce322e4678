"""Mounting from /etc/fstab: `-o` options, `mount.gcfs`, and `gcfs SOURCE DIR -o OPTIONS`.

Two ways in, both ending in `gcfs mount DIR <flags>` (in the background, so that mount(8)
returns once the mount answers):

- type `gcfs`: mount(8) runs `/sbin/mount.gcfs SPEC DIR [-sfnv] [-o OPTIONS] [-t TYPE]`
  (this module's `main`, installed as the `mount.gcfs` script);
- type `fuse.gcfs`: mount(8) runs mount.fuse3, which drops the options it handles itself
  (user, users, nouser, auto, noauto, nofail, _netdev, setuid=USER, drop_privileges), adds
  `dev,suid` unless told `nodev`/`nosuid`, and runs `gcfs SPEC DIR -o OPTIONS` through
  /bin/sh, with the `gcfs` found on PATH (`cli.main` recognises that form).

SPEC (fstab's first field) is a label such as `gcfs`, or the site URL
(`https://grand-challenge.org`), which then sets the base URL.

Every `gcfs mount` flag has an `-o` spelling (see `VALUE_OPTIONS` and `FLAG_OPTIONS`); the
generic mount options fstab lines carry are accepted and ignored (gcfs is always read-only,
nodev and nosuid); anything else is an error naming the option, so a typo in fstab is not
silently dropped.
"""

from __future__ import annotations

import contextlib
import getopt
import os
import pwd
import sys
import textwrap
from collections.abc import Callable, Sequence

from .config import parse_size
from .configfile import LOG_LEVELS
from .errors import UserError

# -o NAME=VALUE -> `gcfs mount` flag
VALUE_OPTIONS = {
    "token_file": "--token-file",
    "base_url": "--base-url",
    "ttl": "--ttl",
    "timeout": "--timeout",
    "cache_dir": "--cache-dir",
    "cache_size": "--cache-size",
    "log_level": "--log-level",
    "log_file": "--log-file",
    "config": "--config",
    "offline": "--offline",
}
# -o NAME -> `gcfs mount` flag
FLAG_OPTIONS = {
    "foreground": "--foreground",
    "allow_other": "--allow-other",
}
# Generic mount(8) and fstab options: accepted, and without effect on a read-only FUSE mount
# (the kernel forces nodev and nosuid on FUSE mounts of unprivileged users anyway).
IGNORED_OPTIONS = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "_netdev",
        "nofail",
        "rw",
        "ro",
        "exec",
        "noexec",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "atime",
        "noatime",
        "relatime",
        "strictatime",
        "nodiratime",
        "async",
        "sync",
    }
)
# `x-systemd.automount`, `x-gvfs-show`, ... (userspace options, see mount(8)), `comment=...`,
# and the `user=NAME` that mount(8) may hand a helper for a user mount.
IGNORED_PREFIXES = ("x-", "comment=", "user=")


def _positive_number(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{text!r} must be greater than 0")
    return text


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text


def _size(text: str) -> str:
    try:
        parse_size(text)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    return text


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("needs a value")
    return text


VALIDATORS: dict[str, Callable[[str], str]] = {
    "ttl": _positive_number,
    "timeout": _positive_number,
    "log_level": _log_level,
    "cache_size": _size,
}


def known_options() -> list[str]:
    return [f"{name}=" for name in VALUE_OPTIONS] + list(FLAG_OPTIONS)


def options_to_flags(text: str, *, sloppy: bool = False) -> list[str]:
    """`token_file=/x,ttl=5,noauto` -> ["--token-file", "/x", "--ttl", "5"].

    Raises UserError naming the first unknown or malformed option (with `sloppy`, as with
    `mount -s`, unknown options are skipped instead).
    """
    flags: list[str] = []
    for option in text.split(","):
        if not option or option in IGNORED_OPTIONS or option.startswith(IGNORED_PREFIXES):
            continue
        name, has_value, value = option.partition("=")
        if name in VALUE_OPTIONS:
            if not has_value or not value:
                raise UserError(f"mount option {name} needs a value: {name}=...")
            try:
                value = VALIDATORS.get(name, _nonempty)(value)
            except ValueError as exc:
                raise UserError(f"mount option {option}: {exc}") from None
            flags += [VALUE_OPTIONS[name], value]
        elif name in FLAG_OPTIONS:
            if has_value:
                raise UserError(f"mount option {name} takes no value (got {option!r})")
            flags.append(FLAG_OPTIONS[name])
        elif not sloppy:
            raise UserError(
                f"unknown mount option {option!r}; gcfs knows {', '.join(known_options())} "
                "and ignores the generic ones (noauto, user, _netdev, nofail, x-systemd.*, ...)"
            )
    return flags


def mount_argv(
    source: str | None, mountpoint: str, options: Sequence[str], *, sloppy: bool = False
) -> list[str]:
    """The `gcfs mount` command line for a helper invocation."""
    flags: list[str] = []
    for text in options:
        flags += options_to_flags(text, sloppy=sloppy)
    if source and "://" in source:
        if "--base-url" in flags:
            given = flags[flags.index("--base-url") + 1]
            if given.rstrip("/") != source.rstrip("/"):
                raise UserError(
                    f"the source {source} and the mount option base_url={given} disagree"
                )
        else:
            flags += ["--base-url", source]
    return ["mount", mountpoint, *flags]


HELP = """\
usage: mount.gcfs SPEC DIR [-sfnv] [-o OPTIONS]

The mount(8) helper of gcfs: mounts Grand Challenge on DIR in the background and returns once
the mount answers. SPEC is a label (e.g. gcfs) or the site URL. An /etc/fstab line:

  gcfs  /home/me/gc  gcfs  noauto,user,_netdev,token_file=/home/me/.gctoken  0 0

Options (-o, comma-separated), each the `gcfs mount` flag of the same name:
{options}
Accepted and ignored:
{ignored}

  -s   sloppy: skip unknown options instead of failing
  -f   fake: check the options, token and mount point, but do not mount
  -n, -v, -t TYPE   ignored

Exit status: 0 mounted; 1 wrong usage or options; 32 the mount failed.
"""


def helper_environment() -> None:
    """Repair the environment mount(8) leaves a helper.

    For a `user` fstab mount, setuid mount(8) drops HOME (and PATH) from the environment, and
    mount.fuse3 then sets HOME=/root; gcfs would look for its config file and cache under
    someone else's home. The helper runs as the mounting user: take HOME from the password
    database.
    """
    with contextlib.suppress(KeyError):  # a uid without a passwd entry keeps what it has
        os.environ["HOME"] = pwd.getpwuid(os.getuid()).pw_dir


def _wrap(words: list[str]) -> str:
    return textwrap.fill(", ".join(words), width=90, initial_indent="  ", subsequent_indent="  ")


def main(argv: Sequence[str] | None = None) -> int:
    """`mount.gcfs SPEC DIR [-sfnv] [-o OPTIONS] [-t TYPE]`, as mount(8) calls it."""
    from . import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(
            HELP.format(
                options=_wrap(known_options()),
                ignored=_wrap([*sorted(IGNORED_OPTIONS), "x-*", "comment=", "user="]),
            ),
            end="",
        )
        return 0
    try:
        opts, positional = getopt.gnu_getopt(args, "sfnvo:t:N:")
    except getopt.GetoptError as exc:
        print(f"mount.gcfs: {exc}", file=sys.stderr)
        return 1
    sloppy = any(flag == "-s" for flag, _ in opts)
    fake = any(flag == "-f" for flag, _ in opts)
    if any(flag == "-N" for flag, _ in opts):
        print("mount.gcfs: -N (another mount namespace) is not supported", file=sys.stderr)
        return 1
    if len(positional) != 2:
        print("mount.gcfs: expected SPEC DIR (see mount.gcfs --help)", file=sys.stderr)
        return 1
    source, mountpoint = positional
    try:
        command = mount_argv(
            source, mountpoint, [value for flag, value in opts if flag == "-o"], sloppy=sloppy
        )
    except UserError as exc:
        print(f"mount.gcfs: {exc}", file=sys.stderr)
        return 1
    helper_environment()
    status = cli.main(command, dry_run=fake, prog="mount.gcfs")
    return {0: 0, 2: 1}.get(status, 32)


def split_fuse_form(argv: Sequence[str]) -> tuple[str | None, str, list[str]] | None:
    """`gcfs [SOURCE] DIR -o OPTIONS` as mount.fuse3 runs it -> (source, dir, [OPTIONS]).

    None when argv is not that form. Told apart from the subcommands by its first word, which
    is no subcommand, and by `-o` or a SOURCE of `gcfs` or a URL (so that a mistyped
    subcommand is an error, not a mount).
    """
    from .cli import COMMANDS

    if not argv or argv[0] in COMMANDS or argv[0].startswith("-"):
        return None
    positional: list[str] = []
    options: list[str] = []
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        if word == "-o":
            if not rest:
                raise UserError("-o needs OPTIONS")
            options.append(rest.pop(0))
        elif word.startswith("-o") and len(word) > 2:
            options.append(word[2:])
        elif word.startswith("-"):
            return None
        else:
            positional.append(word)
    if len(positional) == 1 and options:
        return None, positional[0], options
    first = positional[0]
    if len(positional) == 2 and (options or first == "gcfs" or "://" in first):
        return first, positional[1], options
    return None


if __name__ == "__main__":
    sys.exit(main())
