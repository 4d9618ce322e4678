"""`gcfs cache status|prune SIZE|verify|clear [--cache-dir DIR]`: a block cache directory,
without a mount.

Each works on a directory that running daemons use at the same time, on this machine or on
others (blockstore.py, "Sharing"): prune and clear only unlink whole files (a daemon reading
one keeps its bytes, then misses); status and verify only read. The directory is
`--cache-dir`, else `cache_dir` of the config file, else the default (`$XDG_CACHE_HOME/gcfs`).

Only a block cache: a directory with gcfs's block-cache marker (marker.py), or one made
before markers (holding only `store/`, which is all a gcfs cache ever held; prune and clear
work on those too, since refusing would leave an upgraded user no way to empty their cache).
Anything else is refused with one line, a snapshot by name. None of the commands creates,
chmods or marks anything: the store is opened read-only (which changes nothing on disk) and
prune and clear are then allowed to unlink. A default directory that does not exist yet (or
is empty) is no error: there is nothing in it.
"""

from __future__ import annotations

import grp
import json
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import configfile, marker
from .blockstore import NO_LIMIT, BlockStore
from .config import default_cache_dir, parse_size
from .errors import UserError
from .units import format_size


@dataclass(frozen=True)
class CacheTarget:
    """The directory a `gcfs cache` command works on, and how messages name it."""

    path: Path
    shown: str  # "the directory given with --cache-dir" (never an option's value), or the path
    explicit: bool  # given with --cache-dir: it must be a block cache; a default may be absent


def cache_directory(given: Path | None, config: Path | None) -> CacheTarget:
    """`--cache-dir`, else the config file's `cache_dir`, else the default."""
    if given is not None:
        return CacheTarget(
            given.expanduser().absolute(), "the directory given with --cache-dir", True
        )
    explicit = config is not None
    path = config if explicit else configfile.default_config_path()
    label = "the config file given with --config" if explicit else None
    found = configfile.load(path, explicit=explicit, label=label).get("cache_dir")
    directory = Path(found).expanduser().absolute() if found else default_cache_dir()
    return CacheTarget(directory, str(directory), False)


# Why a directory is not one `gcfs cache` works on.
REFUSALS = {
    marker.Kind.MISSING: "does not exist",
    marker.Kind.EMPTY: "is an empty directory, not a gcfs block cache",
    marker.Kind.SNAPSHOT: "is a gcfs snapshot, not a block cache",
    marker.Kind.OLD_SNAPSHOT: "is a gcfs snapshot, not a block cache",
    marker.Kind.NOT_DIRECTORY: "is not a directory",
    marker.Kind.OTHER_VERSION: "was made by another version of gcfs; use that version",
    marker.Kind.FOREIGN: "is not a gcfs block cache (it has no gcfs marker); "
    "gcfs cache touches only directories gcfs made",
}


def classify(target: CacheTarget, *, allow_empty: bool = False) -> marker.Kind:
    """What the directory is: a block cache (marked, or made before markers: a directory
    holding only `store/`), or, for the default directory only, nothing yet (MISSING or
    EMPTY); with `allow_empty` (status), an empty directory given with --cache-dir too (an
    administrator checks the group directory made for a cache before anyone mounts with it);
    UserError for anything else. Reads, never creates or changes anything."""
    try:
        kind = marker.classify(target.path)
    except OSError as exc:
        raise UserError(f"cannot read {target.shown}: {exc.strerror}") from None
    if kind.is_cache or (kind is marker.Kind.EMPTY and allow_empty):
        return kind
    if kind in (marker.Kind.MISSING, marker.Kind.EMPTY) and not target.explicit:
        return kind
    raise UserError(f"{target.shown} {REFUSALS[kind]}")


def open_store(target: CacheTarget, *, write: bool) -> BlockStore:
    """The block store of a checked directory, opened so that nothing but the store's own
    files changes: a writable BlockStore would chmod the directory and create `store/` in
    it; a read-only one does neither. For prune and clear it is then allowed to unlink."""
    # Prune, verify and clear never evict on their own: the store is opened without a limit.
    store = BlockStore(target.path, NO_LIMIT, readonly=True)
    if write:
        store.readonly = False  # unlink (evict, clear) and append "dropped" records only
    return store


def describe(target: CacheTarget) -> dict[str, Any]:
    """What `gcfs cache status` shows, as a dict (also its --json output)."""
    directory = target.path
    kind = classify(target, allow_empty=True)
    if kind is marker.Kind.MISSING:
        return {"path": str(directory), "exists": False, "files": 0, "bytes": 0}
    store = open_store(target, write=False)
    files, used = store.usage()
    info = directory.stat()
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return {
        "path": str(directory),
        "exists": True,
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


def status_command(target: CacheTarget, *, as_json: bool) -> int:
    shown = describe(target)
    if as_json:
        json.dump(shown, sys.stdout, indent=2)
        print()
        return 0
    if not shown["exists"]:
        print(f"cache:        {shown['path']}")
        print("files:        none yet (nothing was stored there)")
        return 0
    sharing = (
        f"shared by group {shown['group']}"
        if shown["mode"] == "group"
        else "private (make it 3770, setgid and sticky, for a group: see README, On a cluster)"
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
    print(f"size:         {format_size(shown['bytes'])} on disk ({shown['bytes']} bytes)")
    return 0


def _nothing_yet(target: CacheTarget, action: str) -> bool:
    """The default directory holds no cache yet: say so (there is nothing to do)."""
    if classify(target).is_cache:
        return False
    print(f"{action}: no block cache at {target.path} yet; nothing to do")
    return True


def prune_command(target: CacheTarget, size: str) -> int:
    limit = parse_size(size, "SIZE")
    if _nothing_yet(target, "prune"):
        return 0
    store = open_store(target, write=True)
    evicted = store.evict_to(limit)
    files, used = store.usage()
    print(
        f"pruned {target.path}: evicted {evicted} files; {files} files, {format_size(used)} left "
        f"(at most {format_size(limit)})"
    )
    return 0


def verify_command(target: CacheTarget) -> int:
    if _nothing_yet(target, "verify"):
        return 0
    store = open_store(target, write=False)
    report = store.verify()
    print(
        f"verified {target.path}: {report.blocks} blocks of {report.files} files read and "
        f"checked; {report.damaged} damaged (a daemon that reads one drops it and fetches it "
        f"again), {report.damaged_records} damaged index records (skipped)"
    )
    return 0


def clear_command(target: CacheTarget) -> int:
    if _nothing_yet(target, "clear"):
        return 0
    store = open_store(target, write=True)
    removed = store.clear()
    print(f"cleared {target.path}: removed {removed} files")
    return 0


def cache_command(action: str, target: CacheTarget, *, size: str | None, as_json: bool) -> int:
    """`gcfs cache ACTION`: dispatch (cli.py parses)."""
    if action == "status":
        return status_command(target, as_json=as_json)
    if action == "prune":
        assert size is not None
        return prune_command(target, size)
    if action == "verify":
        return verify_command(target)
    if action == "clear":
        return clear_command(target)
    raise UserError(f"unknown cache action {action!r}")


__all__ = ["CacheTarget", "cache_command", "cache_directory", "classify", "describe"]
