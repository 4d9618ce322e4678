"""GcFilesystem: the tree of layout.md, built lazily from the API.

Directories are nodes that know how to build their children from API answers. A directory's
children are built once per cache lifetime and kept as a name -> node map, so `readdir`, every
`lookup` in it and the kernel's READDIRPLUS attributes all come from one listing.

Moving parts:
- `GcApiClient` does HTTP; `MetadataCache` keeps its answers (and the derived child maps) for
  `ttl` seconds and makes concurrent askers share one request.
- `InodeTable` maps inode numbers to the newest node for each identity.
- Names that cannot be identifiers fail before any request (`names.could_be_identifier`);
  names that were looked up and proved absent are remembered for `ttl` seconds.

Everything here raises `GcfsError`, never `FUSEError`: the adapter in `fuse_ops.py` translates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

from . import render
from .api import Existence, GcApiClient
from .cache import MetadataCache
from .errors import NotADirectory, NotFound
from .names import could_be_identifier, is_slug, is_uuid, slug_from_url
from .nodes import ROOT_INODE, FileNode, InodeTable, Node, SymlinkNode

log = logging.getLogger(__name__)

Children = Mapping[str, Node]

# Remembered absent names per directory. Probes of missing names come in bursts from shells and
# file managers; 10,000 (about 1 MiB) holds any burst we have seen.
NEGATIVE_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Collection:
    """How one top-level collection maps to the API (gc-api.md §3, §4)."""

    name: str  # directory name, website path segment and URL path segment: "archives"
    api_path: str  # list endpoint relative to /api/v1/
    metadata_name: str  # the object's JSON file inside its directory
    # A filter that validates pks against every object, visible or not: 400 = absent.
    oracle_path: str
    oracle_param: str
    # Whether `/<name>/<slug>/` tells hidden (302) from absent (404) without a login; archive
    # pages send every anonymous visitor to the login page instead.
    website_tells_existence: bool


ARCHIVES = Collection("archives", "archives/", "archive.json", "archives/items/", "archive", False)
ALGORITHMS = Collection(
    "algorithms", "algorithms/", "algorithm.json", "algorithms/images/", "algorithm", True
)
READER_STUDIES = Collection(
    "reader-studies",
    "reader-studies/",
    "reader-study.json",
    "reader-studies/questions/",
    "reader_study",
    True,
)
COLLECTIONS = (ARCHIVES, ALGORITHMS, READER_STUDIES)


class DirNode(Node):
    """A directory: builds its children on demand. Subclasses implement `build`."""

    __slots__ = ()

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        raise NotImplementedError

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        """The child called `name`; by default one of the listed children."""
        node = (await fs.children(self)).get(name)
        if node is None:
            raise NotFound(f"{self.identity}: no entry {name!r}")
        return node


class RootDir(DirNode):
    __slots__ = ()

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        readme = render.root_readme(base_url=fs.base_url, username=fs.username, ttl=fs.ttl)
        nodes: list[Node] = [FileNode("root/README.md", "README.md", data=readme)]
        nodes += [CollectionDir(f"collection:{c.name}", c.name, c) for c in COLLECTIONS]
        return {node.name: node for node in nodes}


class CollectionDir(DirNode):
    """`archives/`, `algorithms/`, `reader-studies/`: what the token sees, by slug."""

    __slots__ = ("collection",)

    def __init__(self, identity: str, name: str, collection: Collection) -> None:
        super().__init__(identity, name)
        self.collection = collection

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        c = self.collection
        children: dict[str, Node] = {}
        for obj in await fs.list_objects(c.api_path):
            pk = obj.get("pk")
            if not isinstance(pk, str) or not is_uuid(pk):
                log.warning("%s: skipping an object without a valid pk", c.api_path)
                continue
            name = _slug_of(obj, c) or pk
            if name in children:
                log.warning("%s: two objects named %r; showing %s by pk", c.name, name, pk)
                name = pk
            children[name] = ObjectDir(f"{c.name}:{pk}", name, c, obj)
        return children

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        if not could_be_identifier(name) or fs.is_known_absent(self, name):
            raise NotFound(f"{self.collection.name}/{name}: not an identifier or known absent")
        children = await fs.children(self)
        node = children.get(name)
        if node is not None:
            return node
        if is_uuid(name):
            for child in children.values():
                if isinstance(child, ObjectDir) and child.pk == name:
                    link = SymlinkNode(f"pk:{self.collection.name}:{name}", name, target=child.name)
                    return fs.inodes.add(link)
        return await fs.cache.get(("hidden", self.identity, name), lambda: self._hidden(fs, name))

    async def _hidden(self, fs: GcFilesystem, name: str) -> Node:
        """An object that is not in our listing: a stub if it may exist, else ENOENT."""
        c = self.collection
        if is_uuid(name):
            existence = await fs.api.filter_oracle(c.oracle_path, c.oracle_param, name)
        elif c.website_tells_existence:
            existence = await fs.api.website_oracle(c.name, name)
        else:
            existence = Existence.UNKNOWN
        if existence is Existence.VISIBLE and is_slug(name):
            # Public, but not in our (possibly older) listing: ask for it by slug.
            found = await fs.api.get_json(c.api_path, {"slug": name})
            results = found.get("results") if isinstance(found, dict) else None
            if isinstance(results, list) and len(results) == 1 and isinstance(results[0], dict):
                pk = results[0].get("pk")
                if isinstance(pk, str) and is_uuid(pk):
                    fs.cache.forget(("dir", self.identity))
                    return fs.inodes.add(ObjectDir(f"{c.name}:{pk}", name, c, results[0]))
        if existence is Existence.ABSENT:
            fs.remember_absent(self, name)
            raise NotFound(f"{c.name}/{name}: does not exist")
        log.info(
            "%s/%s: not visible to %s (%s); showing a stub",
            c.name,
            name,
            fs.username,
            existence.value,
        )
        stub = StubDir(f"stub:{c.name}:{name}", name)
        stub.readme = render.stub_readme(
            collection=c.name,
            name=name,
            base_url=fs.base_url,
            username=fs.username,
            ttl=fs.ttl,
            certain=existence is Existence.HIDDEN,
        )
        return fs.inodes.add(stub)


class ObjectDir(DirNode):
    """One archive, algorithm or reader study: its metadata file (and, later, its contents)."""

    __slots__ = ("collection", "obj")

    def __init__(self, identity: str, name: str, collection: Collection, obj: dict[str, Any]):
        super().__init__(identity, name)
        self.collection = collection
        self.obj = obj

    @property
    def pk(self) -> str:
        return str(self.obj["pk"])

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        name = self.collection.metadata_name
        # The listing already holds the full object (list and detail share one serializer),
        # so the metadata file costs no request of its own.
        meta = FileNode(f"{self.identity}/{name}", name, data=render.metadata_json(self.obj))
        return {name: meta}


class StubDir(DirNode):
    """An object the token may not see: a directory holding only README.md."""

    __slots__ = ("readme",)

    def __init__(self, identity: str, name: str) -> None:
        super().__init__(identity, name)
        self.readme = b""

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        return {"README.md": FileNode(f"{self.identity}/README.md", "README.md", data=self.readme)}


def _slug_of(obj: dict[str, Any], collection: Collection) -> str | None:
    slug = obj.get("slug")
    if isinstance(slug, str) and is_slug(slug):
        return slug
    url = obj.get("url")
    if isinstance(url, str):
        return slug_from_url(url, collection.name)
    return None


class GcFilesystem:
    """The filesystem core: nodes by inode, directories listed and looked up through the API."""

    def __init__(self, api: GcApiClient, *, username: str, ttl: float) -> None:
        self.api = api
        self.base_url = api.base_url
        self.username = username
        self.ttl = ttl
        self.cache = MetadataCache(ttl)
        self.inodes = InodeTable()
        self._absent: TTLCache[tuple[str, str], bool] = TTLCache(NEGATIVE_CACHE_SIZE, ttl)
        self.root = RootDir("root", "")
        self.root.inode = ROOT_INODE
        self.inodes.add_root(self.root)

    # -- the API, cached --------------------------------------------------------------------

    async def list_objects(self, api_path: str) -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = await self.cache.get(
            ("list", api_path), lambda: self.api.list_all(api_path)
        )
        return objects

    async def children(self, directory: DirNode) -> Children:
        async def build() -> Children:
            built = await directory.build(self)
            for node in built.values():
                self.inodes.add(node)
            return built

        children: Children = await self.cache.get(("dir", directory.identity), build)
        return children

    def is_known_absent(self, directory: DirNode, name: str) -> bool:
        return (directory.identity, name) in self._absent

    def remember_absent(self, directory: DirNode, name: str) -> None:
        self._absent[(directory.identity, name)] = True

    # -- what the adapter calls -------------------------------------------------------------

    def node(self, inode: int) -> Node:
        node = self.inodes.get(inode)
        if node is None:
            raise NotFound(f"inode {inode} is unknown")
        return node

    def directory(self, inode: int) -> DirNode:
        node = self.node(inode)
        if not isinstance(node, DirNode):
            raise NotADirectory(f"inode {inode} is not a directory")
        return node

    async def lookup(self, parent_inode: int, name: str) -> Node:
        parent = self.directory(parent_inode)
        if name == ".":
            return parent
        return await parent.find(self, name)

    async def listdir(self, inode: int) -> list[Node]:
        return list((await self.children(self.directory(inode))).values())
