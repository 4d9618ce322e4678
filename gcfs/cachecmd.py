"""`gcfs cache status|prune SIZE|verify|clear [--cache-dir DIR]`: a block cache directory,
without a mount.

Each works on a directory that running daemons use at the same time, on this machine or on
others (blockstore.py, "Sharing"): prune and clear only unlink whole files (a daemon reading
one keeps its bytes, then misses), verify appends "dropped" records as a reader would. The
directory is `--cache-dir`, else `cache_dir` of the config file, else the default
(`$XDG_CACHE_HOME/gcfs`).
"""

from __future__ import annotations

import grp
import json
import stat
import sys
from pathlib import Path
from typing import Any

from . import configfile
from .blockstore import BlockStore
from .config import default_cache_dir, parse_size
from .errors import UserError
from .prefetch import human

# Prune, verify and clear never evict on their own: the store is opened without a limit.
NO_LIMIT = 1 << 62


def cache_directory(given: Path | None, config: Path | None) -> Path:
    """`--cache-dir`, else the config file's `cache_dir`, else the default."""
    if given is not None:
        return given.expanduser().absolute()
    explicit = config is not None
    path = config if explicit else configfile.default_config_path()
    found = configfile.load(path, explicit=explicit).get("cache_dir")
    return Path(found).expanduser().absolute() if found else default_cache_dir()


def _existing(directory: Path) -> Path:
    if not directory.is_dir():
        raise UserError(f"no block cache at {directory} (nothing was stored there yet)")
    return directory


def describe(directory: Path) -> dict[str, Any]:
    """What `gcfs cache status` shows, as a dict (also its --json output)."""
    store = BlockStore(_existing(directory), NO_LIMIT, readonly=True)
    files, used = store.usage()
    info = directory.stat()
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return {
        "path": str(directory),
        "mode": store.mode,
        "permissions": f"{stat.S_IMODE(info.st_mode):04o}",
        "group": group,
        "filesystem": store.dir.fstype or "unknown",
        "network": store.network,
        "files": files,
        # Of those, the files beyond what a daemon tracks in memory (blockaccount.MAX_ENTRIES):
        # counted, evicted least recently used first, found on disk when read.
        "untracked": store.statistics().untracked,
        "bytes": used,
    }


def status_command(directory: Path, *, as_json: bool) -> int:
    shown = describe(directory)
    if as_json:
        json.dump(shown, sys.stdout, indent=2)
        print()
        return 0
    sharing = (
        f"shared by group {shown['group']}"
        if shown["mode"] == "group"
        else "private (make it 2770 and setgid for a group: see README, On a cluster)"
    )
    kind = (
        "network: data flushed before it is published"
        if shown["network"]
        else "local: one page cache for every daemon of this machine"
    )
    print(f"cache:        {shown['path']}")
    print(f"mode:         {shown['permissions']}, {sharing}")
    print(f"filesystem:   {shown['filesystem']} ({kind})")
    untracked = shown["untracked"]
    beyond = f" ({untracked} beyond what a daemon tracks in memory)" if untracked else ""
    print(f"files:        {shown['files']} remote files{beyond}")
    print(f"size:         {human(shown['bytes'])} on disk ({shown['bytes']} bytes)")
    return 0


def prune_command(directory: Path, size: str) -> int:
    limit = parse_size(size)
    store = BlockStore(_existing(directory), NO_LIMIT)
    evicted = store.evict_to(limit)
    files, used = store.usage()
    print(
        f"pruned {directory}: evicted {evicted} files; {files} files, {human(used)} left "
        f"(at most {human(limit)})"
    )
    return 0


def verify_command(directory: Path) -> int:
    store = BlockStore(_existing(directory), NO_LIMIT)
    report = store.verify()
    print(
        f"verified {directory}: {report.blocks} blocks of {report.files} files read and "
        f"checked; {report.damaged} damaged (dropped: fetched again when next read), "
        f"{report.damaged_records} damaged index records (skipped)"
    )
    return 0


def clear_command(directory: Path) -> int:
    store = BlockStore(_existing(directory), NO_LIMIT)
    removed = store.clear()
    print(f"cleared {directory}: removed {removed} files")
    return 0


def cache_command(action: str, directory: Path, *, size: str | None, as_json: bool) -> int:
    """`gcfs cache ACTION`: dispatch (cli.py parses)."""
    if action == "status":
        return status_command(directory, as_json=as_json)
    if action == "prune":
        assert size is not None
        return prune_command(directory, size)
    if action == "verify":
        return verify_command(directory)
    if action == "clear":
        return clear_command(directory)
    raise UserError(f"unknown cache action {action!r}")


__all__ = ["cache_command", "cache_directory", "describe"]
