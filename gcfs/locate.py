"""`gcfs path IDENTIFIER [MOUNTPOINT]`: where an object lives in a mount.

The platform identifies objects three ways (its getting-started guide says so): by pk, by slug
and by API URL; users also paste website URLs. All four become one path:

    <pk>                          tried as each kind of object, through the lookup-only
                                  api/v1/<kind>/<pk> links (an archive, algorithm or reader
                                  study first, then an image, job, display set, item, ...)
    <slug>, archives/<slug>       the collection's directory; a bare slug must name one
                                  visible object only
    https://.../api/v1/<path>     api/v1/<path> in the mount (the prefix swap)
    https://.../<collection>/...  the same path in the mount (website URLs map onto the tree)

It asks the mount itself (lstat, readlink, getxattr), so it costs what looking there costs,
and it answers what the tree answers: the resolved path, or exit status 1 with one line when
the object does not exist or is a README stub (not visible to this account).

An offline mount (a snapshot) answers the same way for what the snapshot holds: gcfs snapshot
records the pk links, `images/<pk>` and `api/v1/` of its objects (snapshot.py). For anything
else it cannot tell whether the object exists, only that the snapshot lacks it: "not in this
snapshot (taken <when> of <server>)", from the snapshot's manifest.

`candidates` is pure; `locate` and `path_command` do the file system calls.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .control import find_mount, gcfs_mounts, request
from .errors import UserError
from .names import API_DIR, is_slug, is_uuid
from .snapshot import load_manifest

COLLECTIONS = ("archives", "algorithms", "reader-studies")
# The order a bare pk is tried in: the three collections (one cached listing each, plus an
# existence check), then the kinds whose lookups cost a detail request.
PK_KINDS = (
    "archives",
    "algorithms",
    "reader-studies",
    "cases/images",
    "algorithms/jobs",
    "reader-studies/display-sets",
    "archives/items",
    "algorithms/images",
    "reader-studies/questions",
    "reader-studies/answers",
)


@dataclass(frozen=True, slots=True)
class Candidates:
    """Paths (relative to the mount's root) where the identifier may be, in order. `any_of`:
    the first that exists is the answer (a pk, a URL); otherwise all are looked at and must
    not name two visible objects (a bare slug)."""

    paths: tuple[str, ...]
    any_of: bool = True


def candidates(identifier: str, server: str | None) -> Candidates:
    """Where `identifier` may be in a mount of `server` (None: not known, URLs then refused).
    Raises UserError for what is no identifier at all, or a URL of another server."""
    text = identifier.strip()
    if "://" in text:
        return Candidates((_url_path(text, server),))
    bare = text.strip("/")
    if is_uuid(bare):
        return Candidates(tuple(f"{API_DIR}/v1/{kind}/{bare}" for kind in PK_KINDS))
    if is_slug(bare):
        return Candidates(tuple(f"{c}/{bare}" for c in COLLECTIONS), any_of=False)
    first = bare.split("/", 1)[0]
    if first in (*COLLECTIONS, "images", API_DIR) and ".." not in bare.split("/"):
        return Candidates((bare,))
    raise UserError(f"{identifier!r} is not a pk, a slug, an API URL or a website URL")


def _url_path(url: str, server: str | None) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UserError(f"{url!r} is not a URL") from None
    if server is None:
        raise UserError("cannot tell which server this mount shows; give a pk or a path")
    site = urlsplit(server)
    if (parts.scheme, parts.netloc) != (site.scheme, site.netloc):
        raise UserError(f"{url} is not on {server}, the server this mount shows")
    path = unquote(parts.path)
    prefix = site.path.rstrip("/")
    if prefix and not path.startswith(prefix + "/"):
        raise UserError(f"{url} is not on {server}, the server this mount shows")
    relative = path[len(prefix) :].strip("/")
    segments = relative.split("/")
    if ".." in segments or "." in segments:
        raise UserError(f"{url} has . or .. in its path")
    if relative.startswith(f"{API_DIR}/v1/") or segments[0] in (*COLLECTIONS, "images"):
        return relative
    raise UserError(f"{url} names no object gcfs shows (API objects and the collections' pages)")


@dataclass(frozen=True, slots=True)
class Found:
    path: Path | None  # the resolved path of a visible object
    stub: Path | None = None  # a README stub that stands for the object
    exists: bool = False  # the stub's object exists (hidden), rather than "cannot tell"


def _look(root: Path, relative: str) -> Found | None:
    """What the mount shows at `relative`: None when nothing is there."""
    path = root / relative
    try:
        os.lstat(path)
        real = Path(os.path.realpath(path))
        os.stat(real)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise UserError(f"{path}: {exc.strerror}") from None
    kind = _xattr(real, "user.gc.kind")
    if kind == "no-access":
        return Found(None, real, _xattr(real, "user.gc.exists") == "yes")
    return Found(real)


def _xattr(path: Path, name: str) -> str:
    try:
        return os.getxattr(path, name).decode()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What an offline mount serves, for saying that something is not in it."""

    taken: str
    server: str
    identifiers: bool  # pks and API URLs recorded (False: an older gcfs's snapshot)

    def lacks(self, identifier: str) -> UserError:
        older = (
            ""
            if self.identifiers
            else "; an older gcfs took it, which recorded no pks or API URLs but those of "
            "archives, algorithms and reader studies: run gcfs snapshot again to add them"
        )
        return UserError(
            f"{identifier} is not in this snapshot (taken {self.taken} of {self.server}){older}"
        )


def locate(
    identifier: str, root: Path, server: str | None, snapshot: Snapshot | None = None
) -> Path:
    """The path of the object in the mount at `root`, or a UserError saying why not;
    `snapshot` when the mount is an offline one."""
    wanted = candidates(identifier, server)
    if wanted.any_of:
        return _first(identifier, root, wanted.paths, snapshot)
    return _only(identifier, root, wanted.paths, snapshot)


def _first(identifier: str, root: Path, paths: tuple[str, ...], snapshot: Snapshot | None) -> Path:
    """The first candidate that shows a visible object; a confirmed-hidden object ends the
    search (a pk names one object, whatever its kind)."""
    uncertain: Found | None = None
    for relative in paths:
        found = _look(root, relative)
        if found is None:
            continue
        if found.path is not None:
            return found.path
        if found.exists:
            raise UserError(
                f"{identifier} exists but is not visible to you; see {found.stub}/README.md"
            )
        uncertain = uncertain or found
    if uncertain is not None:
        raise UserError(
            f"{identifier} was not found: it does not exist or is not visible to you "
            f"(see {uncertain.stub}/README.md)"
        )
    if snapshot is not None:
        raise snapshot.lacks(identifier)
    raise UserError(f"{identifier} was not found in {root}")


def _only(identifier: str, root: Path, paths: tuple[str, ...], snapshot: Snapshot | None) -> Path:
    """The one candidate that shows a visible object (a bare slug in the three collections)."""
    looked = [(relative, found) for relative in paths if (found := _look(root, relative))]
    visible = [(relative, f.path) for relative, f in looked if f.path is not None]
    if len(visible) > 1:
        names = ", ".join(relative for relative, _ in visible)
        raise UserError(f"{identifier} is ambiguous: {names}; give the collection too")
    if visible:
        return visible[0][1]
    hidden = next((f for _, f in looked if f.exists), None)
    if hidden is not None:
        raise UserError(
            f"{identifier} exists but is not visible to you; see {hidden.stub}/README.md"
        )
    if snapshot is not None:
        raise snapshot.lacks(identifier)
    raise UserError(
        f"{identifier} was not found (an archive you may not see cannot be told apart from "
        "one that does not exist)"
    )


def mount_root(mountpoint: Path | None) -> Path:
    """The gcfs mount to look in: the one given, the one holding the current directory, or
    the only one there is."""
    if mountpoint is not None:
        return find_mount(mountpoint)[0]
    try:
        return find_mount(Path.cwd())[0]
    except UserError:
        pass
    mounts = sorted(gcfs_mounts())
    if len(mounts) == 1:
        return Path(mounts[0])
    if not mounts:
        raise UserError("no gcfs mount found; mount one, or give MOUNTPOINT")
    raise UserError(f"several gcfs mounts ({', '.join(mounts)}); give MOUNTPOINT")


def path_command(identifier: str, mountpoint: Path | None) -> int:
    """`gcfs path IDENTIFIER [MOUNTPOINT]`: print the object's path in the mount."""
    root = mount_root(mountpoint)
    status = request(root, {"op": "status"})["status"]
    server = str(status["server"])
    print(locate(identifier, root, server, _snapshot(status, server)))
    return 0


def _snapshot(status: dict[str, Any], server: str) -> Snapshot | None:
    """The snapshot an offline mount serves (None for an online mount), from the manifest
    in its directory: `taken` and `server` stay what they were when the snapshot is
    refreshed, so they are those of the tree the mount loaded."""
    directory = status.get("offline")
    if not directory:
        return None
    try:
        manifest = load_manifest(Path(str(directory))) or {}
    except UserError:
        manifest = {}  # unreadable since the mount started: say what the status knows
    return Snapshot(
        taken=str(manifest.get("taken", "at a time its manifest no longer tells")),
        server=str(manifest.get("server", server)),
        identifiers=manifest.get("identifiers") is True,
    )
