"""`gcfs snapshot PATH... --to DIR`: record subtrees of a mount for offline mounts.

A compute node without a route to the internet cannot mount Grand Challenge. A snapshot taken
on a machine that can (a cluster's login node) holds everything the tree showed under the
given subtrees, and `gcfs mount MOUNTPOINT --offline DIR` serves exactly that with no token
and no network (offline.py).

The format (FORMAT):

    DIR/manifest.json   which server, which user, when (taken, updated), on which machine,
                        which subtrees, how many files and bytes in them, whether the
                        identifiers of every subtree are recorded ("identifiers"); never
                        the token
    DIR/tree.json       {"format", "manifest": (the same), "root": the recorded tree}, nested:
                        {"type": "dir", "xattrs": {...}, "entries": {name: ...}}, files
                        {"type": "file", "size", "key", "xattrs"}, symlinks {"type":
                        "symlink", "target"}; an entry with "hidden": true is looked up but
                        not listed (pk links, `api/`)
    DIR/store/          the bytes, in the block store's format (blockstore.py)

An offline mount reads tree.json only (one file replaced atomically: its manifest always
belongs to its tree); manifest.json is its copy for people and scripts.

Format 1 grew compatibly (no new entry types, so any gcfs serves any snapshot): snapshots
now also hold the identifiers of what they record (below) and say so in the manifest
("identifiers": true). An older snapshot, without them, still mounts and serves its subtrees;
`gcfs path` there says that it lacks the identifiers and that taking it again adds them.

What is recorded: each PATH's subtree as the mount shows it (names, sizes, symlinks, xattrs,
README stubs, metadata files), the directories above it (holding only what leads to a
recorded subtree, with their own xattrs), and the pk links of the archives, algorithms and
reader studies it holds (`archives/<pk>`), which online are looked up rather than listed.
The root README and `.gcfs/` belong to the offline mount itself. A PATH that is a symlink in
the mount (`archives/<pk>`) is recorded as what it points to.

Identifiers (offline parity: an offline mount finds by pk and API URL what online finds): the
pk links of every archive, algorithm and reader study in the tree (also above a partial
subtree) and `algorithms/<slug>/images/<pk>` -> `<pk>.json`; `images/<pk>` (image.json and
its files, walked through the mount) for every image the recorded values show; and `api/`
with a link or file for every object in the tree, as apitree.py answers online
(record_identifiers). They cost no request: pks and kinds come from the recorded nodes' xattrs
(user.gc.kind, user.gc.pk), questions and answers from the recorded questions.json and
answers.json, and the image objects from the listings the daemon laid the values out from
(the control op `images`, GcFilesystem.hold_images). `api/` is rebuilt from the whole tree
on every run, so a refresh keeps it whole; `images/<pk>` recorded before stay, like subtrees.

How: the listings are refreshed first (`gcfs refresh --recursive`: a snapshot shows the
server as it is now, not the daemon's cache), the subtrees are walked through the mount, the
daemon says which files are remote and their keys (their identity on the platform, which
never changes: `resolver.file_key`), and the bytes are read through the mount, JOBS files at a
time (threads; 8 by default), so a subtree of many small files is bounded by the link, not by
one round trip per file after another. They are stored under their keys; generated files
(JSON, CSV, README stubs) under the sha256 of their bytes (`gcfs-snapshot://sha256/<hex>`).

Refreshing in place: `gcfs snapshot` again into the same DIR records the listings anew and
reads only the remote files the store does not hold completely (files are immutable by key);
what was recorded before outside the new PATHs stays. tree.json and manifest.json are replaced
atomically, and only once every byte of the new tree is in the store: an offline mount
started at any moment sees the old snapshot or the new one, complete. The store only grows
(bytes of files that left the tree stay), so offline mounts running during a refresh keep
reading the tree they loaded. Two snapshots of one DIR at once are refused (a lock file).

The directory (DIR, `--to`): created 0700 when missing, else it must be empty or a snapshot
already (its marker, `.gcfs-directory.json`, or a snapshot made before markers, which is
adopted); a block cache (the default one by path too), another version's snapshot or any
other non-empty directory is refused with one line. Its mode is never changed and nothing in
it is removed. A shared directory is hostile (safeio.py): every name is opened relative to
the directory's descriptor, the lock file as a regular file only, the temporary files of
tree.json and manifest.json with O_EXCL | O_NOFOLLOW under random names.

Durability: every data and index file of the store, their directories and `store/` are
fsynced (BlockStore.sync) before tree.json names them; tree.json and manifest.json are
fsynced before their rename and the directory after it. A power loss leaves the old
snapshot or the new one.

The token: the snapshot talks to the daemon over its control socket and reads through the
mount; it never has the token, and nothing it writes contains it. Errors name DIR as "the
snapshot directory given with --to", never by the path typed (cli.py: no option's value is
repeated).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import mmap
import os
import secrets
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import __version__, cachedir, marker, render, safeio
from .blockstore import NO_LIMIT, BlockStore
from .config import default_cache_dir
from .control import files_info, find_mount, request
from .errors import UserError
from .names import API_DIR, is_uuid
from .nodes import FileNode, describe
from .progress import ProgressLine, fetch_parallel
from .units import format_size

FORMAT = "gcfs-snapshot/1"
MANIFEST = "manifest.json"
TREE = "tree.json"
LOCK = ".snapshot.lock"
# Files read at once: each costs a /media/ resolution and a storage round trip (20-100 ms on
# S3) before its first byte, which eight overlap for small files; for large ones the daemon's
# read-ahead budget (64 MiB) is what they share. As `gcfs prefetch`.
DEFAULT_JOBS = 8
# Bytes read per call and written to the store per call: 8 blocks of 1 MiB, one index append.
CHUNK = 8 << 20
# Kinds whose directories have a pk link beside them in their collection (`archives/<pk>`).
OBJECT_KINDS = frozenset({"archive", "algorithm", "reader-study"})
# The offline mount's own: not recorded.
SKIPPED = frozenset({"README.md", ".gcfs"})
GENERATED_SCHEME = "gcfs-snapshot://sha256/"


def generated_key(data: bytes) -> str:
    """The store key of a generated file's bytes (JSON, CSV, README): their sha256. A URL
    that `resolver.file_key` leaves as it is, so the offline mount finds it."""
    return GENERATED_SCHEME + hashlib.sha256(data).hexdigest()


def read_xattrs(path: Path) -> dict[str, str]:
    """The user.gc.* attributes of a file or directory (symlinks carry none on Linux)."""
    found = {}
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        if name.startswith("user.gc."):
            found[name] = os.getxattr(path, name, follow_symlinks=False).decode("utf-8")
    return found


# -- the format -------------------------------------------------------------------------------


# A manifest is a few hundred bytes; a tree.json a few hundred bytes per file recorded. The
# limits only bound what a hostile or mistaken file makes us read.
MANIFEST_LIMIT = 1 << 20
TREE_LIMIT = 1 << 32
# The deepest directory a snapshot records is about 8 below its root (api/v1/<kind>/<pk>/...
# or archives/<slug>/items/<pk>/<dicom set>/); a tree.json nested deeper than 64 is refused, so
# nothing that walks the tree comes near Python's recursion limit of 1,000, which a hostile
# file nested 100,000 deep would otherwise reach (a RecursionError, not a message).
TREE_DEPTH_LIMIT = 64


def decode_json(data: bytes) -> Any:
    """json.loads, where JSON nested too deeply for the decoder (a RecursionError) is a
    ValueError like any other file that is not JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def too_deep(root: dict[str, Any], limit: int = TREE_DEPTH_LIMIT) -> bool:
    """Whether directories in the recorded tree nest deeper than `limit` (without recursion)."""
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        spec, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend(
            (child, depth + 1)
            for child in _entries(spec).values()
            if isinstance(child, dict) and child.get("type") == "dir"
        )
    return False


def _read_json(directory_fd: int, name: str, limit: int) -> Any:
    """The JSON in regular file `name` of the directory open as `directory_fd`: a link or a
    special file planted there is refused (safeio), and at most `limit` bytes are read.
    Raises FileNotFoundError, OSError, ValueError."""
    fd = safeio.open_regular(name, os.O_RDONLY, dir_fd=directory_fd)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as stream:
            return decode_json(stream.read(limit + 1))
    finally:
        os.close(fd)


def open_snapshot_directory(directory: Path, shown: str) -> int:
    """A descriptor of the snapshot directory the user named (their path: links followed);
    one line naming it as `shown` when it cannot be opened."""
    try:
        return safeio.open_directory(directory, follow=True)
    except FileNotFoundError:
        raise UserError(f"{shown} does not exist") from None
    except NotADirectoryError:
        raise UserError(f"{shown} is not a directory") from None
    except OSError as exc:
        raise UserError(f"cannot open {shown}: {exc.strerror}") from None


def load_manifest(directory: Path, shown: str | None = None) -> dict[str, Any] | None:
    """The manifest of the snapshot in `directory`; None when there is none. `shown` names
    the directory in messages (default: its path)."""
    fd = open_snapshot_directory(directory, shown or str(directory))
    try:
        return _manifest_at(fd, shown or str(directory))
    finally:
        os.close(fd)


def _manifest_at(directory_fd: int, shown: str) -> dict[str, Any] | None:
    try:
        manifest = _read_json(directory_fd, MANIFEST, MANIFEST_LIMIT)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"the {MANIFEST} in {shown} cannot be read: {exc.strerror}") from None
    except ValueError:
        raise UserError(f"the {MANIFEST} in {shown} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"the {MANIFEST} in {shown} is not a {FORMAT} manifest")
    return manifest


def load_tree(directory: Path, shown: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The root of the recorded tree in `directory`, and the manifest that belongs to it."""
    fd = open_snapshot_directory(directory, shown or str(directory))
    try:
        return _tree_at(fd, shown or str(directory))
    finally:
        os.close(fd)


def _tree_at(directory_fd: int, shown: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        tree = _read_json(directory_fd, TREE, TREE_LIMIT)
    except OSError as exc:
        raise UserError(f"the {TREE} in {shown} cannot be read: {exc.strerror}") from None
    except ValueError:
        raise UserError(f"the {TREE} in {shown} is not JSON") from None
    root = tree.get("root") if isinstance(tree, dict) else None
    manifest = tree.get("manifest") if isinstance(tree, dict) else None
    if (
        not isinstance(root, dict)
        or root.get("type") != "dir"
        or not isinstance(manifest, dict)
        or tree.get("format") != FORMAT
    ):
        raise UserError(f"the {TREE} in {shown} holds no {FORMAT} tree")
    if too_deep(root):
        raise UserError(
            f"the {TREE} in {shown} holds no {FORMAT} tree: its directories nest deeper"
            f" than {TREE_DEPTH_LIMIT}"
        )
    return root, manifest


def walk_files(spec: dict[str, Any], relative: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, spec) of every file below a recorded directory, depth first in recorded order;
    entries that are not records of a file or directory are passed over. Without recursion:
    however deep a (hostile) tree, no RecursionError."""
    stack: list[Iterator[tuple[str, Any]]] = [iter(_entries(spec).items())]
    prefixes = [relative]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            prefixes.pop()
            continue
        name, child = step
        path = f"{prefixes[-1]}/{name}" if prefixes[-1] else name
        if not isinstance(child, dict):
            continue
        if child.get("type") == "dir":
            stack.append(iter(_entries(child).items()))
            prefixes.append(path)
        elif child.get("type") == "file":
            yield path, child


# Tries at a fresh temporary name: one that exists already was planted (or is another
# snapshot's, which the lock rules out); a name that keeps existing is an attack, not luck.
TEMPORARY_ATTEMPTS = 5
TEMPORARY_PREFIX = ".tmp-snapshot-"


def _write_json(directory_fd: int, name: str, data: Any, mode: int) -> None:
    """Replace `name` in the directory open as `directory_fd` atomically (a temporary file
    renamed over it): a reader, an offline mount starting, sees the old file or the new one.
    The temporary file is created O_EXCL | O_NOFOLLOW under a random name, so a link planted
    in a shared directory is never followed; it is fsynced and closed before the rename
    (closing is what makes its bytes visible to other NFS clients: close-to-open). The
    caller fsyncs the directory once its renames are done."""
    text = (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    for _ in range(TEMPORARY_ATTEMPTS):
        temporary = f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}-{name}"
        try:
            fd = safeio.create_exclusive(temporary, os.O_WRONLY, mode, dir_fd=directory_fd)
        except FileExistsError:
            continue
        break
    else:
        raise UserError(
            f"cannot create a temporary file for {name}: {TEMPORARY_ATTEMPTS} fresh names "
            "were all taken (is somebody planting files in the snapshot directory?)"
        )
    try:
        try:
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory_fd)
        raise


# -- recording the tree ----------------------------------------------------------------------


@dataclass
class Recorder:
    """Walks subtrees of a mount into nested entries (the tree.json format)."""

    root: Path  # the mount point
    files: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # path in mount, spec

    def place(self, tree: dict[str, Any], relative: str) -> None:
        """Record the subtree at `relative` into `tree` (replacing what was there), with the
        directories above it."""
        parts = [p for p in relative.split("/") if p]
        here = tree
        here["xattrs"] = read_xattrs(self.root)
        for depth, name in enumerate(parts[:-1]):
            above = "/".join(parts[:depth])
            path = "/".join(parts[: depth + 1])
            entries = here.setdefault("entries", {})
            existing = entries.get(name)
            if not isinstance(existing, dict) or existing.get("type") != "dir":
                existing = {"type": "dir", "entries": {}}
                entries[name] = existing
            existing["xattrs"] = read_xattrs(self.root / path)
            self._mark_hidden(existing, above, name)
            here = existing
        if not parts:  # the whole mount
            fresh = self.directory("")
            tree["entries"] = fresh["entries"]
            return
        name = parts[-1]
        above = "/".join(parts[:-1])
        record = self.directory if _is_dir(self.root / relative) else self.leaf
        spec = record(relative)
        self._mark_hidden(spec, above, name)
        entries = here.setdefault("entries", {})
        entries[name] = spec
        self._pk_link(entries, name, spec)

    def directory(self, relative: str) -> dict[str, Any]:
        path = self.root / relative if relative else self.root
        spec: dict[str, Any] = {"type": "dir", "xattrs": read_xattrs(path)}
        entries: dict[str, Any] = {}
        with os.scandir(path) as listing:
            names = sorted(entry.name for entry in listing)
        for name in names:
            if not relative and name in SKIPPED:
                continue
            child = f"{relative}/{name}" if relative else name
            record = self.directory if _is_dir(self.root / child) else self.leaf
            entries[name] = record(child)
            self._pk_link(entries, name, entries[name])
        spec["entries"] = entries
        return spec

    def leaf(self, relative: str) -> dict[str, Any]:
        path = self.root / relative
        if path.is_symlink():
            return {"type": "symlink", "target": os.readlink(path)}
        spec: dict[str, Any] = {
            "type": "file",
            "size": path.stat().st_size,
            "xattrs": read_xattrs(path),
        }
        self.files.append((relative, spec))
        return spec

    def _mark_hidden(self, spec: dict[str, Any], above: str, name: str) -> None:
        """Online, some names are looked up but not listed (`api/`, `images/<pk>`, stubs of
        objects we may not see): the same offline."""
        parent = self.root / above if above else self.root
        if name in os.listdir(parent):
            spec.pop("hidden", None)
        else:
            spec["hidden"] = True

    @staticmethod
    def _pk_link(entries: dict[str, Any], name: str, spec: dict[str, Any]) -> None:
        xattrs = spec.get("xattrs", {})
        pk = xattrs.get("user.gc.pk", "")
        is_object = spec["type"] == "dir" and xattrs.get("user.gc.kind") in OBJECT_KINDS
        if is_object and pk and pk != name and pk not in entries:
            entries[pk] = {"type": "symlink", "target": name, "hidden": True}


def _files_in(tree: dict[str, Any], subtree: str) -> list[dict[str, Any]]:
    """The specs of the files recorded at and under `subtree`; for the whole mount (""),
    without the identifiers' (images/<pk>, api/), which show the same objects again."""
    spec: Any = tree
    for name in (p for p in subtree.split("/") if p):
        spec = _entries(spec).get(name)
    if not isinstance(spec, dict):
        return []
    if spec.get("type") == "file":
        return [spec]
    if not subtree:
        spec = {"entries": {k: v for k, v in _entries(spec).items() if k not in IDENTIFIERS}}
    return [file for _, file in walk_files(spec)]


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


# -- identifiers: pks, images/<pk>, api/v1/ (what offline parity needs) ---------------------
#
# Online, an object is found by pk or API URL through lookups that cost requests (apitree.py):
# an offline mount cannot make them, so the snapshot records their answers for every object it
# holds, derived from what the walk saw (xattrs user.gc.kind/pk of the recorded nodes, the
# recorded questions.json and answers.json) and from what the daemon holds already (the image
# objects its value directories were laid out from): no request of its own. All of it is
# plain tree.json entries (hidden ones: looked up, not listed, as online), so an offline mount
# of any gcfs serves it, and an older snapshot without it still mounts.

# Directories whose values may show images (tree.py: items, display sets, job inputs/outputs).
VALUES_KINDS = frozenset({"archive-item", "display-set", "job-inputs", "job-outputs"})
# The request line of a control request is bounded (control.MAX_REQUEST, 64 KiB): paths are
# sent in batches of at most this many characters.
IMAGES_REQUEST_CHARS = 32 * 1024
# Where the tree shows each kind of object, and the api/v1/ directory that links to it:
# (collection, its objects' kind, ((subdirectory, kind, api/v1 directory), ...)).
API_PLACES = (
    ("archives", "archive", (("items", "archive-item", "archives/items"),)),
    (
        "algorithms",
        "algorithm",
        (("jobs", "job", "algorithms/jobs"), ("images", "algorithm-image", "algorithms/images")),
    ),
    (
        "reader-studies",
        "reader-study",
        (("display-sets", "display-set", "reader-studies/display-sets"),),
    ),
)
# Reader-study files whose objects are files of their own under api/v1/ (apitree._detail_file):
# (file in the study's directory, api/v1 directory, user.gc.kind of the object's file).
API_FILES = (
    ("questions.json", "reader-studies/questions", "question"),
    ("answers.json", "reader-studies/answers", "answer"),
)
IMAGES_DIR = "images"
# Top-level directories of identifiers only: nothing in them is counted in the manifest.
IDENTIFIERS = frozenset({API_DIR, IMAGES_DIR})


def _entries(spec: Any) -> dict[str, Any]:
    entries = spec.get("entries") if isinstance(spec, dict) else None
    return entries if isinstance(entries, dict) else {}


def _kind_pk(spec: Any) -> tuple[str, str]:
    """user.gc.kind and user.gc.pk of a recorded node ("" where it has none)."""
    xattrs = spec.get("xattrs") if isinstance(spec, dict) else None
    if not isinstance(xattrs, dict):
        return "", ""
    return str(xattrs.get("user.gc.kind", "")), str(xattrs.get("user.gc.pk", ""))


def _values_dirs(tree: dict[str, Any], subtree: str) -> Iterator[str]:
    """The values directories at, above and below `subtree` in the recorded tree."""
    parts = [p for p in subtree.split("/") if p]
    spec: Any = tree
    for depth, name in enumerate(parts):
        spec = _entries(spec).get(name)
        if _kind_pk(spec)[0] in VALUES_KINDS:
            yield "/".join(parts[: depth + 1])
            return  # no values directory lies inside another one
    if not isinstance(spec, dict):
        return
    pending = [(subtree, spec)]
    while pending:
        path, here = pending.pop()
        for name, child in _entries(here).items():
            if not isinstance(child, dict) or child.get("type") != "dir" or child.get("hidden"):
                continue
            below = f"{path}/{name}" if path else name
            if _kind_pk(child)[0] in VALUES_KINDS:
                yield below
            else:
                pending.append((below, child))


def _batches(paths: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    used = 0
    for path in paths:
        if batch and used + len(path) + 4 > IMAGES_REQUEST_CHARS:
            yield batch
            batch, used = [], 0
        batch.append(path)
        used += len(path) + 4  # quotes, comma, space
    if batch:
        yield batch


def record_images(root: Path, recorder: Recorder, tree: dict[str, Any], subtrees: list[str]) -> int:
    """Record `images/<pk>` (hidden, as online: image.json + its files) for every image the
    values under `subtrees` show; how many. The daemon names them and holds their objects
    (the `images` op: from the listings the walk just made, no request), so walking
    `images/<pk>` through the mount records exactly what online shows; its files are the
    values' files (same keys: their bytes are fetched once)."""
    paths = sorted({path for subtree in subtrees for path in _values_dirs(tree, subtree)})
    seen: set[str] = set()
    recorded = 0
    for batch in _batches(paths):
        reply = request(root, {"op": "images", "paths": batch})
        images = sorted({str(pk) for pk in reply.get("images", []) if is_uuid(str(pk))} - seen)
        seen.update(images)
        # Walked batch by batch, while the answers the daemon was just asked about are
        # fresh (they last its TTL; a large archive's walk alone may take longer).
        for pk in images:
            try:
                recorder.place(tree, f"{IMAGES_DIR}/{pk}")
            except FileNotFoundError:
                # Shown a moment ago, gone now (its permission revoked in between): not
                # recorded, like any name that vanished during the walk.
                continue
            recorded += 1
    return recorded


def record_identifiers(root: Path, tree: dict[str, Any], store: BlockStore) -> None:
    """Record what makes every object of the tree findable by pk and API URL offline, as
    online: the pk links of the collections' objects (`archives/<pk>`), the links
    `algorithms/<slug>/images/<pk>` -> `<pk>.json`, and `api/` (hidden) with a link or a
    file for every object the tree holds (apitree.py's answers). Built from the whole tree,
    not only the subtrees just recorded, so a refresh keeps it whole; it replaces the `api/`
    recorded before. Question and answer files are rendered from the recorded questions.json
    and answers.json (read from `store`, which holds every byte of the tree by now) and
    stored under the sha256 of their bytes. The store must be synced afterwards."""
    api = Recorder(root).directory(API_DIR)  # its kinds' directories, as online lists them
    api["hidden"] = True  # looked up, never listed (toplevel.RootDir)

    def add(where: str, pk: str, spec: dict[str, Any]) -> None:
        here: Any = api
        for name in f"v1/{where}".split("/"):
            here = _entries(here).get(name)
        if isinstance(here, dict) and here.get("type") == "dir" and is_uuid(pk):
            here.setdefault("entries", {}).setdefault(pk, {**spec, "hidden": True})

    def link(where: str, pk: str, target: str) -> None:
        up = "../" * len(f"{API_DIR}/v1/{where}".split("/"))  # relative: any mount point
        add(where, pk, {"type": "symlink", "target": up + target})

    top = _entries(tree)
    for collection, kind, nested in API_PLACES:
        objects = _entries(top.get(collection))
        for name, spec in list(objects.items()):
            if not isinstance(spec, dict) or spec.get("type") != "dir":
                continue
            if _kind_pk(spec)[0] == kind and (pk := _kind_pk(spec)[1]):
                link(collection, pk, f"{collection}/{name}")
                if pk != name and pk not in objects:  # also above a partial subtree
                    objects[pk] = {"type": "symlink", "target": name, "hidden": True}
            for sub, sub_kind, where in nested:
                children = _entries(_entries(spec).get(sub))
                for child_name, child in list(children.items()):
                    child_kind, pk = _kind_pk(child)
                    if child_kind != sub_kind or not pk:
                        continue
                    link(where, pk, f"{collection}/{name}/{sub}/{child_name}")
                    if child_name == f"{pk}.json" and pk not in children:
                        # The website's URL of a container image (tree.AlgorithmImagesDir).
                        children[pk] = {"type": "symlink", "target": child_name, "hidden": True}
            if kind == "reader-study":
                for file_name, where, file_kind in API_FILES:
                    for obj in _stored_objects(store, _entries(spec).get(file_name)):
                        add(where, str(obj.get("pk", "")), _object_file(store, obj, file_kind))
    for name, spec in _entries(top.get(IMAGES_DIR)).items():
        kind, pk = _kind_pk(spec)
        if kind == "image" and pk == name:
            link("cases/images", pk, f"{IMAGES_DIR}/{name}")
    top[API_DIR] = api


def _stored_objects(store: BlockStore, spec: Any) -> list[dict[str, Any]]:
    """The objects of a recorded JSON list file (questions.json, answers.json), read from
    the store; [] when there is none or it is not whole."""
    if not isinstance(spec, dict) or spec.get("type") != "file" or not spec.get("key"):
        return []
    size = int(spec.get("size", 0))
    count = -(-size // store.block_size)
    if count == 0:
        return []
    buffer = memoryview(bytearray(count * store.block_size))
    got = store.read_into(str(spec["key"]), 0, count, buffer, size)
    if sum(got.values()) != size or len(got) != count:
        return []
    try:
        found = decode_json(bytes(buffer[:size]))
    except ValueError:
        return []
    return [o for o in found if isinstance(o, dict)] if isinstance(found, list) else []


def _object_file(store: BlockStore, obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """The spec of a file holding `obj` as online's api/v1/ lookup shows it (the same bytes:
    list and detail share a serializer), its bytes put in the store."""
    data = render.metadata_json(obj)
    key = generated_key(data)
    if (
        not store.fully_cached(key, len(data))
        and store.write(key, 0, memoryview(data), len(data)) == 0
    ):
        raise UserError(
            "cannot write to the snapshot's store (is its filesystem full or read-only? "
            "see the messages above)"
        )
    xattrs = describe(FileNode("", ""), kind, obj).xattrs or {}
    return {"type": "file", "size": len(data), "key": key, "xattrs": xattrs}


def identifiers_complete(old: dict[str, Any] | None, subtrees: list[str]) -> bool:
    """Whether every subtree of the snapshot has its identifiers recorded: true unless an
    older gcfs recorded subtrees that this run did not record again (their images/<pk>)."""
    if old is None or old.get("identifiers") is True:
        return True
    return all(
        any(s == "" or kept == s or kept.startswith(s + "/") for s in subtrees)
        for kept in old.get("subtrees", [])
    )


# -- fetching the bytes ----------------------------------------------------------------------


class Fetcher:
    """Reads files through the mount into the snapshot's store, `jobs` at a time."""

    def __init__(self, root: Path, store: BlockStore, jobs: int) -> None:
        self.root = root
        self.store = store
        self.jobs = max(1, jobs)
        self.files = 0  # files recorded (paths)
        self.fetched_files = 0
        self.fetched_bytes = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def run(self, files: list[tuple[str, dict[str, Any]]], progress: ProgressLine) -> None:
        """Store every file's bytes; raises UserError naming the first file that failed,
        after the others finished (a rerun carries on where this one stopped). A remote file
        shown at several paths (an image in an archive and in a reader study) is read once."""
        jobs: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for relative, spec in files:
            jobs.setdefault(spec.get("key") or f"generated:{relative}", []).append((relative, spec))
        failures = fetch_parallel(
            lambda same: self._one(same, progress),
            jobs.values(),
            self.jobs,
            progress,
            keep_going=True,
        )
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise UserError(f"{failures[0]}{more}; run gcfs snapshot again to carry on")

    def _buffer(self) -> mmap.mmap:
        # Page-aligned (a memory map), so the store can write it with O_DIRECT.
        buffer: mmap.mmap | None = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = mmap.mmap(-1, CHUNK)
        return buffer

    def _one(self, same: list[tuple[str, dict[str, Any]]], progress: ProgressLine) -> None:
        """The bytes of one file (shown at the paths in `same`) into the store."""
        relative, spec = same[0]
        path = self.root / relative
        key = spec.get("key")
        try:
            if key is None:  # generated: small; its bytes name it
                data = path.read_bytes()
                spec["key"] = key = generated_key(data)
                spec["size"] = len(data)
                if not self.store.fully_cached(key):
                    self._store(key, memoryview(data), 0, len(data))
            elif not self.store.fully_cached(key, int(spec["size"])):
                read = self._copy(path, key, int(spec["size"]), progress)
                with self._lock:
                    self.fetched_files += 1
                    self.fetched_bytes += read
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
        progress.add(0, done=len(same))

    def _copy(self, path: Path, key: str, size: int, progress: ProgressLine) -> int:
        bs = self.store.block_size
        buffer = self._buffer()
        view = memoryview(buffer)
        read = 0
        with open(path, "rb", buffering=0) as handle:
            while True:
                got = _read_full(handle, view)
                if got == 0:
                    break
                if read + got > size or (got % bs and read + got != size):
                    raise UserError(f"{path}: more bytes than its size {size}")
                self._store(key, view[:got], read // bs, size)
                read += got
                progress.add(got, done=0)
                if got < len(view):
                    break
        if read != size:
            raise UserError(f"{path}: read {read} of its {size} bytes")
        if size == 0:
            self._store(key, view[:0], 0, 0)
        return read

    def _store(self, key: str, data: memoryview, first: int, size: int) -> None:
        if size == 0:
            self.store.put_size(key, 0)
            return
        if self.store.write(key, first, data, size) == 0:
            raise UserError(
                "cannot write to the snapshot's store (is its filesystem full or read-only? "
                "see the messages above)"
            )


def _read_full(handle: Any, view: memoryview) -> int:
    """Fill `view` from `handle`; fewer bytes only at the end of the file."""
    done = 0
    while done < len(view):
        n = handle.readinto(view[done:])
        if not n:
            break
        done += n
    return done


# -- the command ------------------------------------------------------------------------------


SHOWN = "the snapshot directory given with --to"  # never its path: an option's value


@contextlib.contextmanager
def _locked(directory_fd: int, mode: int) -> Iterator[None]:
    """One snapshot of a directory at a time. The lock file is opened as a regular file
    only (a link or FIFO planted in a shared directory is refused, not followed or waited
    on) and given `mode` only when we create it. Where the filesystem has no locks (Lustre
    without -o flock), we go on without."""
    try:
        fd, _ = safeio.open_or_create(LOCK, os.O_RDWR, mode, dir_fd=directory_fd)
    except OSError as exc:
        raise UserError(f"cannot open the lock file {LOCK} in {SHOWN}: {_reason(exc)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"another gcfs snapshot is writing {SHOWN}") from None
            # ENOLCK, EOPNOTSUPP, ENOSYS: no locking on this filesystem
        yield
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link (refused in a snapshot directory)"
    if isinstance(exc, safeio.NotRegular):
        return "it is not a regular file"
    return exc.strerror or str(exc)


@dataclass(frozen=True)
class Target:
    """The snapshot directory, open: its descriptor (every name in it is opened relative to
    it), whether it is a group directory, and what was there before."""

    fd: int
    group: bool
    kind: marker.Kind  # MISSING when we created it

    @property
    def file_mode(self) -> int:
        return cachedir.GROUP_FILE if self.group else cachedir.PRIVATE_FILE

    @property
    def dir_mode(self) -> int:
        return cachedir.GROUP_DIR if self.group else cachedir.PRIVATE_DIR


def open_target(to: Path) -> Target:
    """Open (or create, 0700) the snapshot directory and say what it holds; UserError for
    anything gcfs may not write into: a non-empty directory that is not a snapshot, a block
    cache (marked, old, or the default cache directory by path), another version's."""
    created = False
    try:
        fd = safeio.open_directory(to, follow=True)
    except FileNotFoundError:
        try:
            parent = safeio.open_directory(to.parent, follow=True)
        except FileNotFoundError:
            raise UserError(f"cannot create {SHOWN}: its parent does not exist") from None
        try:
            fd, created = safeio.make_directory(to.name, cachedir.PRIVATE_DIR, dir_fd=parent)
        finally:
            os.close(parent)
    except NotADirectoryError:
        raise UserError(f"{SHOWN} is not a directory") from None
    try:
        info = os.fstat(fd)
        kind = marker.Kind.MISSING if created else marker.classify_open(fd)
        refusal = _refusal(kind, info)
        if refusal:
            raise UserError(f"{SHOWN} {refusal}")
    except BaseException:
        os.close(fd)
        raise
    return Target(fd, cachedir.is_group_directory(info.st_mode), kind)


def _refusal(kind: marker.Kind, info: os.stat_result) -> str | None:
    """Why a snapshot may not be written into a directory of `kind`; None if it may."""
    with contextlib.suppress(OSError):
        cache = os.stat(default_cache_dir())
        if (cache.st_dev, cache.st_ino) == (info.st_dev, info.st_ino):
            return "is the default block cache of gcfs mounts, not a snapshot; use another one"
    if kind.is_cache:
        return "is a gcfs block cache, not a snapshot; use another directory"
    if kind is marker.Kind.OTHER_VERSION:
        return "holds a snapshot of another version of gcfs; use another directory"
    if kind is marker.Kind.FOREIGN:
        return "is not empty and holds no gcfs snapshot; use another directory (a new or empty one)"
    return None


def _mark(target: Target) -> None:
    """Write the snapshot marker (a new, empty or old-format snapshot directory). A marker
    that appeared meanwhile (a snapshot started at the same moment) must be a snapshot's."""
    try:
        marker.write(target.fd, marker.SNAPSHOT, target.file_mode)
    except FileExistsError:
        if marker.classify_open(target.fd) is not marker.Kind.SNAPSHOT:
            raise UserError(f"{SHOWN} was taken by something else meanwhile") from None


def open_store(to: Path) -> BlockStore:
    """The snapshot's block store. Opened as a snapshot's (`kind`), it keeps the directory's
    mode, creates `store/` without following links and removes nothing."""
    return BlockStore(to, NO_LIMIT, kind=marker.SNAPSHOT)


def sync_store(store: BlockStore) -> None:
    """Make every file in the store durable before the tree that names it is: the data and
    index files, their directories and `store/` (BlockStore.sync). A power loss after
    tree.json was replaced then cannot leave records whose bytes were lost."""
    store.sync()


def _locate(paths: list[Path]) -> tuple[Path, list[str]]:
    """The mount all PATHs lie in, and each PATH relative to it (symlinks inside the mount
    followed: `archives/<pk>` is recorded as the archive)."""
    located = []
    for path in paths:
        mountpoint, _ = find_mount(path)
        real = Path(os.path.realpath(path))
        try:
            relative = real.relative_to(mountpoint)
        except ValueError:
            raise UserError(f"{path} leads out of its gcfs mount") from None
        if not real.exists():
            raise UserError(f"{path} does not exist")
        located.append((mountpoint, "" if str(relative) == "." else str(relative)))
    roots = {root for root, _ in located}
    if len(roots) != 1:
        raise UserError("all PATHs must lie in one gcfs mount")
    return roots.pop(), sorted({relative for _, relative in located})


def _normalized(subtrees: list[str]) -> list[str]:
    """Subtrees without those inside another one."""
    kept: list[str] = []
    for subtree in sorted(set(subtrees), key=lambda s: (s.count("/"), s)):
        if not any(k == "" or subtree == k or subtree.startswith(k + "/") for k in kept):
            kept.append(subtree)
    return sorted(kept)


def _file_keys(root: Path, files: list[tuple[str, dict[str, Any]]]) -> None:
    """Ask the daemon which files are remote (their key) and generated (no key)."""
    answers = files_info(root, [relative for relative, _ in files])
    for (_, spec), info in zip(files, answers, strict=True):
        if info.get("key"):
            spec["key"] = str(info["key"])
            spec["size"] = int(info["size"])


def snapshot_command(
    paths: list[Path], to: Path, *, jobs: int = DEFAULT_JOBS, out: TextIO | None = None
) -> int:
    """`gcfs snapshot PATH... --to DIR`: record the subtrees (module docstring)."""
    stream = out or sys.stderr
    root, subtrees = _locate(paths)
    status = request(root, {"op": "status"})["status"]
    server, user = str(status["server"]), str(status["user"])
    if status.get("offline"):
        raise UserError(f"{root} is an offline mount; take snapshots of an online one")
    to = to.expanduser().absolute()
    try:
        return _take(root, subtrees, server, user, to, jobs, stream)
    except OSError as exc:
        raise UserError(f"cannot write {SHOWN}: {_reason(exc)}") from None


def _take(
    root: Path, subtrees: list[str], server: str, user: str, to: Path, jobs: int, stream: TextIO
) -> int:
    target = open_target(to)
    try:
        if target.kind in (marker.Kind.MISSING, marker.Kind.EMPTY):
            _mark(target)
        with _locked(target.fd, target.file_mode):
            old = _manifest_at(target.fd, SHOWN)
            if old is not None and (old.get("server"), old.get("user")) != (server, user):
                raise UserError(
                    f"{SHOWN} holds a snapshot of {old.get('server')} by {old.get('user')}, "
                    f"not {server} by {user}; use another directory"
                )
            if target.kind is marker.Kind.OLD_SNAPSHOT:
                _mark(target)  # adopted: a snapshot made before markers
            tree: dict[str, Any] = {"type": "dir", "entries": {}}
            if old is not None:
                tree = _tree_at(target.fd, SHOWN)[0]
            store = open_store(to)
            try:
                fetcher = _record(root, subtrees, store, jobs, stream, tree)
                record_identifiers(root, tree, store)
                sync_store(store)
            finally:
                store.close()
            identifiers = identifiers_complete(old, subtrees)
            _publish(target, tree, old, server, user, subtrees, identifiers=identifiers)
    finally:
        os.close(target.fd)
    print(
        f"snapshot: {fetcher.files} files under {', '.join(s or '/' for s in subtrees)}; "
        f"fetched {fetcher.fetched_files} files, {format_size(fetcher.fetched_bytes)}",
        file=stream,
    )
    return 0


def _record(
    root: Path, subtrees: list[str], store: BlockStore, jobs: int, stream: TextIO, tree: Any
) -> Fetcher:
    """Record the subtrees into `tree` and their bytes into `store`."""
    for subtree in subtrees:  # the server as it is now, not the daemon's cache
        request(root, {"op": "refresh", "path": subtree, "recursive": True})
    recorder = Recorder(root)
    for subtree in subtrees:
        recorder.place(tree, subtree)
    record_images(root, recorder, tree, subtrees)
    _file_keys(root, recorder.files)
    files = recorder.files
    missing = {
        spec["key"]: int(spec["size"])
        for _, spec in files
        if "key" in spec and not store.fully_cached(spec["key"], int(spec["size"]))
    }
    progress = ProgressLine(
        stream,
        "snapshot",
        files_total=len(files),
        bytes_total=sum(missing.values()),
        suffix=" fetched",
    )
    fetcher = Fetcher(root, store, jobs)
    fetcher.run(files, progress)
    fetcher.files = sum(1 for relative, _ in files if _counted(relative, subtrees))
    progress.finish()
    return fetcher


def _counted(relative: str, subtrees: list[str]) -> bool:
    """Whether a recorded file counts as one of the snapshot's files, as the manifest counts
    them: a file under images/ or api/ shows an object already counted under archives/,
    algorithms/ or reader-studies/ again, unless it is inside a subtree the user named."""
    if relative.split("/", 1)[0] not in IDENTIFIERS:
        return True
    return any(s and (relative == s or relative.startswith(s + "/")) for s in subtrees)


def _publish(
    target: Target,
    tree: dict[str, Any],
    old: dict[str, Any] | None,
    server: str,
    user: str,
    subtrees: list[str],
    *,
    identifiers: bool,
) -> None:
    """tree.json (the one file an offline mount reads), then its copy manifest.json, each
    replaced atomically, then the directory synced: only after the store was."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    kept = _normalized([*(old or {}).get("subtrees", []), *subtrees])
    recorded = [spec for subtree in kept for spec in _files_in(tree, subtree)]
    manifest = {
        "format": FORMAT,
        "server": server,
        "user": user,
        "taken": (old or {}).get("taken", now),
        "updated": now,
        "host": socket.gethostname(),
        "subtrees": kept,
        "files": len(recorded),
        "bytes": sum(int(spec.get("size", 0)) for spec in recorded),
        "gcfs": __version__,
        # pks, images/<pk> and api/v1/ recorded for every subtree (absent: an older gcfs's).
        "identifiers": identifiers,
    }
    document = {"format": FORMAT, "manifest": manifest, "root": tree}
    _write_json(target.fd, TREE, document, target.file_mode)
    _write_json(target.fd, MANIFEST, manifest, target.file_mode)
    os.fsync(target.fd)


__all__ = [
    "FORMAT",
    "decode_json",
    "generated_key",
    "load_manifest",
    "load_tree",
    "open_snapshot_directory",
    "snapshot_command",
    "too_deep",
    "walk_files",
]
