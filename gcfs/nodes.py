"""What the tree is made of: nodes with stable inode numbers, and the table that finds them.

A node is a value: a name, a kind and its content (bytes for small generated files, a target
for symlinks). Directories know how to list and look up their children; those live in `fs.py`
because they need the API. Every node has an identity string that names the object it shows
(for example `archive:<pk>/archive.json`), and its inode number is derived from that identity,
so the same object keeps its inode across listings, cache expiry and remounts.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from .errors import NotFound

if TYPE_CHECKING:
    from .fs import GcFilesystem

log = logging.getLogger(__name__)

N = TypeVar("N", bound="Node")

ROOT_INODE = 1


class NodeKind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"


def inode_for(identity: str) -> int:
    """A stable 63-bit inode number for an identity string (never 0 or the root's 1).

    With 63 random bits, a collision among a million nodes has a probability of about 5e-8;
    the table still detects one and moves the newcomer to the next free number.
    """
    digest = hashlib.blake2b(identity.encode("utf-8"), digest_size=8).digest()
    number = int.from_bytes(digest, "big") & (2**63 - 1)
    return number if number > ROOT_INODE else number + 2


@dataclass(eq=False, slots=True)
class Node:
    """One entry of the tree. Subclasses in fs.py add directory behaviour."""

    identity: str
    name: str
    inode: int = field(init=False, default=0)
    # Extended attributes (user.gc.pk, .api_url, .url, .kind) of nodes that show an object.
    xattrs: dict[str, str] | None = field(init=False, default=None)

    kind = NodeKind.DIR
    # A node whose content can change at any time (the root README): the kernel may keep its
    # attributes for a second only, instead of the cache lifetime.
    volatile = False

    @property
    def size(self) -> int:
        return 0


@dataclass(eq=False, slots=True)
class FileNode(Node):
    """A small file whose bytes we generate (metadata JSON, README)."""

    data: bytes = b""
    kind = NodeKind.FILE

    @property
    def size(self) -> int:
        return len(self.data)


class GeneratedFileNode(Node):
    """A small file whose bytes are made when asked (the root README, which follows the
    daemon's state); the kernel keeps its attributes for a second only."""

    __slots__ = ("produce",)
    kind = NodeKind.FILE
    volatile = True

    def __init__(self, identity: str, name: str, produce: Callable[[], bytes]) -> None:
        super().__init__(identity, name)
        self.produce = produce

    @property
    def data(self) -> bytes:
        return self.produce()

    @property
    def size(self) -> int:
        return len(self.produce())


class LateFileNode(GeneratedFileNode):
    """A small file whose bytes depend on what is known only once mounted (a stub README
    names the mount point): made at each open, like the root README, but unchanging while
    mounted, so the kernel keeps its attributes for the cache lifetime like any file's."""

    __slots__ = ()
    volatile = False


@dataclass(eq=False, slots=True)
class SymlinkNode(Node):
    target: str = ""
    kind = NodeKind.SYMLINK

    @property
    def size(self) -> int:
        return len(self.target.encode("utf-8"))


@dataclass(eq=False, slots=True)
class RemoteFileNode(Node):
    """A file whose bytes are fetched on read; its size was learned when it was listed.

    `vouched_at`: when the oldest of the API answers that listed it (its item's listing, its
    image's) was fetched (trio clock), None if unknown. While that is younger than the TTL,
    those answers are the proof that the token may read the file, as they are for every
    other name in the tree, so an open of cached bytes needs no request
    (GcFilesystem.is_vouched_for)."""

    url: str = ""
    length: int = 0
    vouched_at: float | None = None
    kind = NodeKind.FILE

    @property
    def size(self) -> int:
        return self.length


class DirNode(Node):
    """A directory: builds its children on demand. Subclasses implement `build`."""

    __slots__ = ()

    async def build(self, fs: GcFilesystem) -> Mapping[str, Node]:
        raise NotImplementedError

    def cache_keys(self) -> list[Hashable]:
        """The metadata cache entries this directory is built from (`gcfs refresh`)."""
        return [("dir", self.identity)]

    def forget_lookups(self, fs: GcFilesystem, name: str | None = None) -> None:
        """Forget what lookups of names that are not listed found (stubs, absent names):
        of `name`, or of every name when None. Most directories have none."""

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        """The child called `name`; by default one of the listed children."""
        node = (await fs.children(self)).get(name)
        if node is None:
            raise NotFound(f"{self.identity}: no entry {name!r}")
        return node


class StaticDir(DirNode):
    """A directory whose children are known when it is made (stubs, fixed layouts)."""

    __slots__ = ("entries",)

    def __init__(self, identity: str, name: str, entries: dict[str, Node]) -> None:
        super().__init__(identity, name)
        self.entries = entries

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        return self.entries


def stub_dir(
    identity: str,
    name: str,
    readme: bytes | Callable[[], bytes],
    *,
    exists: bool | None,
    url: str = "",
) -> StaticDir:
    """A directory holding only README.md: what stands in for what we may not see. `readme`
    is its bytes, or makes them when read (a text that names the mount point, LateFileNode).

    Both carry `user.gc.kind` `no-access`, `user.gc.url` the request-access page (`url`, where
    there is one) and `user.gc.exists`: `yes` when the server confirmed that the object
    exists, `unknown` when it cannot tell (archive slugs, archive items), absent when the
    README stands for a file or image that a visible object names (it exists)."""
    extra = {} if exists is None else {"user.gc.exists": "yes" if exists else "unknown"}
    readme_node: Node = (
        LateFileNode(f"{identity}/README.md", "README.md", readme)
        if callable(readme)
        else FileNode(f"{identity}/README.md", "README.md", data=readme)
    )
    describe(readme_node, "no-access", url=url, extra=extra)
    directory = StaticDir(identity, name, {"README.md": readme_node})
    return describe(directory, "no-access", url=url, extra=extra)


def describe(
    node: N,
    kind: str,
    obj: object = None,
    *,
    url: str = "",
    api_url: str = "",
    extra: Mapping[str, str] | None = None,
) -> N:
    """Give `node` the extended attributes of what it shows; returns the node.

    `user.gc.kind` always; `user.gc.pk`, `user.gc.api_url` and `user.gc.url` (the web page)
    default to the object's own fields and are left out where the object has none (an image
    has no page, an archive item no API URL field: the caller builds it). `extra` adds others
    (`user.gc.socket` of a value).
    """
    fields = obj if isinstance(obj, dict) else {}
    values = {
        "user.gc.kind": kind,
        "user.gc.pk": fields.get("pk"),
        "user.gc.api_url": api_url or fields.get("api_url"),
        "user.gc.url": url or fields.get("url"),
        **(extra or {}),
    }
    node.xattrs = {
        k: str(v)
        for k, v in values.items()
        if isinstance(v, str | int) and not isinstance(v, bool) and v != ""
    }
    return node


class InodeTable:
    """inode number -> node, for the nodes the kernel currently knows.

    Numbers come from identities (`inode_for`), so a node gets its number when it is built
    (`add`) but is only registered when the kernel learns of it: a lookup or a READDIRPLUS
    entry (`remember`, which counts like the kernel's lookup count). `forget` undoes that;
    at zero the node leaves the table, so memory follows what the kernel holds (it reclaims
    inodes under memory pressure), not everything ever listed. A node rebuilt from a fresh
    listing replaces the registered one for its identity, so getattr sees new sizes.
    """

    def __init__(self) -> None:
        self._nodes: dict[int, Node] = {}
        self._by_identity: dict[str, int] = {}
        self._lookups: dict[int, int] = {}

    def add(self, node: Node) -> Node:
        """Give `node` its inode number; if the kernel knows that number, `node` becomes the
        node it refers to (the newest version of the object)."""
        number = self._by_identity.get(node.identity)
        if number is None:
            number = inode_for(node.identity)
            while number in self._nodes and self._nodes[number].identity != node.identity:
                log.warning(
                    "inode collision between %r and %r", node.identity, self._nodes[number].identity
                )
                number += 1
        node.inode = number
        if number in self._nodes:
            self._nodes[number] = node
        return node

    def remember(self, node: Node) -> None:
        """The kernel was told about `node` (a lookup or a directory entry): count it."""
        if node.inode == 0:
            self.add(node)
        self._nodes[node.inode] = node
        self._by_identity[node.identity] = node.inode
        self._lookups[node.inode] = self._lookups.get(node.inode, 0) + 1

    def forget(self, inode: int, count: int) -> bool:
        """The kernel dropped `count` references; True when the node left the table."""
        if inode == ROOT_INODE or inode not in self._lookups:
            return False
        left = self._lookups[inode] - count
        if left > 0:
            self._lookups[inode] = left
            return False
        del self._lookups[inode]
        node = self._nodes.pop(inode, None)
        if node is not None and self._by_identity.get(node.identity) == inode:
            del self._by_identity[node.identity]
        return True

    def add_root(self, node: Node) -> None:
        node.inode = ROOT_INODE
        self._nodes[ROOT_INODE] = node
        self._by_identity[node.identity] = ROOT_INODE

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def __len__(self) -> int:
        return len(self._nodes)
