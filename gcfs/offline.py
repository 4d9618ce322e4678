"""The tree of an offline mount: exactly what a snapshot recorded (snapshot.py), no network.

`gcfs mount MOUNTPOINT --offline DIR` serves DIR/tree.json through the same FUSE adapter,
filesystem core and file reader as an online mount: directories list the recorded names (and
look up the recorded hidden ones: pk links, `api/`), files have the recorded sizes and bytes
(read from DIR's block store, opened read-only), symlinks their targets, every node its
recorded extended attributes. The snapshot holds the identifiers of its objects (pk links,
`images/<pk>`, `api/v1/`, recorded as hidden entries: snapshot.py), so they answer as online
with nothing special here. A name that was not recorded is ENOENT. The root README says
that this is a snapshot, of which server, by whom, when and of what; `.gcfs/status.json` is
there as online.

Moving parts: `load` reads the manifest and the tree once at mount; directories become nodes
when they are listed or looked up (a snapshot of 100,000 files does not become 100,000 nodes
at mount). Every file is a RemoteFileNode whose URL is its store key, vouched for forever
(`vouched_at=inf`): the snapshot is the proof that its user could read it.

Invariant: no request ever leaves the machine. The content store runs offline (a block that
is not in the store is EIO, `NotInSnapshot`, never a fetch: content.py), and the HTTP clients
the core holds (for statistics and types only) have a transport that refuses every request
(`NoNetwork`); the daemon skips the mount-time token check. The tests run the offline daemon
in a network namespace without interfaces and check that it opened no socket.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from .errors import NotFound, UserError
from .nodes import (
    DirNode,
    FileNode,
    GeneratedFileNode,
    Node,
    RemoteFileNode,
    StaticDir,
    SymlinkNode,
    describe,
)
from .snapshot import load_manifest, load_tree

if TYPE_CHECKING:
    from .fs import GcFilesystem


class NoNetwork(httpx.AsyncBaseTransport):
    """An httpx transport that refuses every request: what an offline mount's clients get."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("an offline mount sends no requests", request=request)


class SnapshotDir(DirNode):
    """A recorded directory: its listed entries, and its looked-up-only ones (hidden)."""

    __slots__ = ("spec",)

    def __init__(self, identity: str, name: str, spec: dict[str, Any]) -> None:
        super().__init__(identity, name)
        self.spec = spec
        _set_xattrs(self, spec)

    def _entries(self) -> dict[str, Any]:
        entries = self.spec.get("entries")
        return entries if isinstance(entries, dict) else {}

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        return {
            name: _node(f"{self.identity}/{name}", name, child)
            for name, child in self._entries().items()
            if isinstance(child, dict) and not child.get("hidden")
        }

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        child = self._entries().get(name)
        if isinstance(child, dict) and child.get("hidden"):
            return fs.inodes.add(_node(f"{self.identity}/{name}", name, child))
        node = (await fs.children(self)).get(name)
        if node is None:
            raise NotFound(f"{self.identity}/{name}: not in the snapshot")
        return node


class OfflineRoot(SnapshotDir):
    """The recorded root, plus the mount's own README and `.gcfs/status.json`."""

    __slots__ = ("manifest", "snapshot")

    def __init__(self, spec: dict[str, Any], manifest: dict[str, Any], snapshot: Path) -> None:
        super().__init__("snapshot:", "", spec)
        self.manifest = manifest
        self.snapshot = snapshot

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        nodes = await super().build(fs)
        readme = FileNode("snapshot:README.md", "README.md", data=snapshot_readme(self.manifest))
        nodes["README.md"] = describe(readme, "readme")

        def status() -> bytes:
            return (json.dumps(fs.status(), indent=2) + "\n").encode()

        status_file = GeneratedFileNode("snapshot:.gcfs/status.json", "status.json", status)
        control = StaticDir(
            "snapshot:.gcfs", ".gcfs", {"status.json": describe(status_file, "status")}
        )
        nodes[".gcfs"] = describe(control, "status")
        return nodes


def _set_xattrs(node: Node, spec: dict[str, Any]) -> None:
    xattrs = spec.get("xattrs")
    if isinstance(xattrs, dict) and xattrs:
        node.xattrs = {str(k): str(v) for k, v in xattrs.items()}


def _node(identity: str, name: str, spec: dict[str, Any]) -> Node:
    kind = spec.get("type")
    node: Node
    if kind == "dir":
        return SnapshotDir(identity, name, spec)
    if kind == "symlink":
        node = SymlinkNode(identity, name, target=str(spec.get("target", "")))
    elif kind == "file":
        # Vouched for forever (math.inf): opening sends nothing; the store has the bytes.
        node = RemoteFileNode(
            identity,
            name,
            url=str(spec.get("key", "")),
            length=int(spec.get("size", 0)),
            vouched_at=math.inf,
        )
    else:
        raise NotFound(f"{identity}: an entry of unknown type {kind!r} in the snapshot")
    _set_xattrs(node, spec)
    return node


def snapshot_readme(manifest: dict[str, Any]) -> bytes:
    """The root README of an offline mount: what this is, of what, by whom, when."""
    subtrees = "\n".join(f"    {s or '/'}" for s in manifest.get("subtrees", []))
    identifiers = (
        "\nTheir objects are found as online: pks (archives/<pk>, ...), images/<pk> and API\n"
        "URLs under api/v1/ (`gcfs path IDENTIFIER` prints where anything is).\n"
        if manifest.get("identifiers") is True
        else ""
    )
    text = f"""# Grand Challenge: a snapshot, served offline by gcfs

This is a read-only snapshot, not a live view: nothing here talks to the network, and
nothing changes until the snapshot is taken again and this mount remounted.

Server:    {manifest.get("server")}
Taken by:  {manifest.get("user")} (the Grand Challenge user whose token the mount used)
Taken:     {manifest.get("taken")}
Updated:   {manifest.get("updated")}
On:        {manifest.get("host")}
Files:     {manifest.get("files")} ({manifest.get("bytes")} bytes)

It holds these subtrees, exactly as that mount showed them; anything else is absent
("No such file or directory"):

{subtrees}
{identifiers}
Refresh it on a machine with network access by running `gcfs snapshot PATH... --to DIR`
again (only what changed or is missing is fetched).
"""
    return text.encode("utf-8")


def load(directory: Path) -> tuple[OfflineRoot, dict[str, Any]]:
    """The root of the snapshot in `directory`, and its manifest (the copy in tree.json,
    which always belongs to that tree); UserError if there is none."""
    if load_manifest(directory) is None:
        raise UserError(f"{directory} holds no gcfs snapshot (no manifest.json; see gcfs snapshot)")
    spec, manifest = load_tree(directory)
    root = OfflineRoot(spec, manifest, directory)
    describe(root, "root")
    return root, manifest


__all__ = ["NoNetwork", "OfflineRoot", "load", "snapshot_readme"]
