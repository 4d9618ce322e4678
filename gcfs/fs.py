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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from cachetools import TTLCache

from . import layout, render, tree
from .api import Existence, GcApiClient
from .cache import MetadataCache
from .errors import BadResponse, NotADirectory, NotFound, PermissionDenied
from .names import could_be_identifier, is_slug, is_uuid, slug_from_url
from .nodes import (
    DirNode,
    FileNode,
    GeneratedFileNode,
    InodeTable,
    Node,
    RemoteFileNode,
    SymlinkNode,
    stub_dir,
)

if TYPE_CHECKING:
    from .content import ContentStore

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
    # What an object's directory holds besides its metadata file (tree.py).
    contents: Callable[[GcFilesystem, str, dict[str, Any]], Awaitable[list[Node]]]


ARCHIVES = Collection(
    name="archives",
    api_path="archives/",
    metadata_name="archive.json",
    oracle_path="archives/items/",
    oracle_param="archive",
    website_tells_existence=False,
    contents=tree.archive_contents,
)
ALGORITHMS = Collection(
    name="algorithms",
    api_path="algorithms/",
    metadata_name="algorithm.json",
    oracle_path="algorithms/images/",
    oracle_param="algorithm",
    website_tells_existence=True,
    contents=tree.algorithm_contents,
)
READER_STUDIES = Collection(
    name="reader-studies",
    api_path="reader-studies/",
    metadata_name="reader-study.json",
    oracle_path="reader-studies/questions/",
    oracle_param="reader_study",
    website_tells_existence=True,
    contents=tree.reader_study_contents,
)
COLLECTIONS = (ARCHIVES, ALGORITHMS, READER_STUDIES)


class RootDir(DirNode):
    __slots__ = ()

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        def readme() -> bytes:
            return render.root_readme(
                base_url=fs.base_url,
                username=fs.username,
                ttl=fs.ttl,
                token_rejected=fs.api.token_rejected,
            )

        nodes: list[Node] = [GeneratedFileNode("root/README.md", "README.md", readme)]
        nodes += [CollectionDir(f"collection:{c.name}", c.name, c) for c in COLLECTIONS]
        nodes.append(tree.ImagesRootDir("collection:images", "images"))
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
        readme = render.stub_readme(
            collection=c.name,
            name=name,
            base_url=fs.base_url,
            username=fs.username,
            ttl=fs.ttl,
            certain=existence is Existence.HIDDEN,
        )
        return fs.inodes.add(stub_dir(f"stub:{c.name}:{name}", name, readme))


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
        contents = await self.collection.contents(fs, self.identity, self.obj)
        return {node.name: node for node in [meta, *contents]}


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

    def __init__(
        self, api: GcApiClient, content: ContentStore, *, username: str, ttl: float
    ) -> None:
        self.api = api
        self.content = content
        self.base_url = api.base_url
        self.username = username
        self.ttl = ttl
        self.cache = MetadataCache(ttl)
        self.inodes = InodeTable()
        self._absent: TTLCache[tuple[str, str], bool] = TTLCache(NEGATIVE_CACHE_SIZE, ttl)
        self.root = RootDir("root", "")
        self.inodes.add_root(self.root)

    # -- the API, cached --------------------------------------------------------------------

    async def list_objects(
        self, api_path: str, params: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        key = ("list", api_path, tuple(sorted((params or {}).items())))
        objects: list[dict[str, Any]] = await self.cache.get(
            key, lambda: self.api.list_all(api_path, params)
        )
        return objects

    async def images_by_pk(self, param: str, pk: str) -> dict[str, dict[str, Any]]:
        """The images the token may see among those of an archive, study or job, by pk.

        One paged listing (`cases/images/?archive=<pk>`, ...) serves every directory of that
        archive or study, instead of one request per image.
        """
        images = await self.list_objects("cases/images/", {param: pk})
        return {
            image["pk"]: image
            for image in images
            if isinstance(image, dict) and isinstance(image.get("pk"), str)
        }

    async def dicom_for(
        self, images: list[dict[str, Any]]
    ) -> dict[str, list[layout.DicomInstance]]:
        """The instances of those images that are DICOM image sets, fetched concurrently."""
        dicom_images = [
            i
            for i in images
            if i.get("dicom_image_set") and not i.get("files") and isinstance(i.get("pk"), str)
        ]
        found: dict[str, list[layout.DicomInstance]] = {}

        async def fetch(pk: str) -> None:
            found[pk] = await self.cache.get(("dicom", pk), lambda: self._dicom_instances(pk))

        async with trio.open_nursery() as nursery:
            for image in dicom_images:
                nursery.start_soon(fetch, str(image["pk"]))
        return found

    async def _dicom_instances(self, pk: str) -> list[layout.DicomInstance]:
        body = await self.api.get_json(f"cases/images/{pk}/dicom/instances/")
        instances = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(instances, list):
            raise BadResponse(f"cases/images/{pk}/dicom/instances/: no instances list")
        return layout.dicom_instances(instances)

    async def materialize(
        self, identity: str, entries: Mapping[str, layout.Entry]
    ) -> dict[str, Node]:
        """Nodes for a values layout; remote files get their true size first (probed
        concurrently), and a file we may not read becomes a README stub."""
        remote = {n: e for n, e in entries.items() if isinstance(e, layout.RemoteFile)}
        sizes = await self._probe(remote)  # a file missing here may not be read
        nodes: dict[str, Node] = {}
        for name, entry in entries.items():
            path = f"{identity}/{name}"
            if isinstance(entry, layout.InlineFile):
                nodes[name] = FileNode(path, name, data=entry.data)
            elif isinstance(entry, layout.Directory):
                nodes[name] = tree.EntriesDir(path, name, entry.entries)
            elif isinstance(entry, layout.RemoteFile) and name in sizes:
                nodes[name] = RemoteFileNode(path, name, url=entry.url, length=sizes[name])
            else:
                what, url = (
                    (entry.what, entry.url)
                    if isinstance(entry, layout.Unreadable)
                    else (f"file {name}", getattr(entry, "url", ""))
                )
                readme = render.unreadable_readme(what, url, username=self.username, ttl=self.ttl)
                nodes[name] = stub_dir(path, name, readme)
        return nodes

    async def _probe(self, files: Mapping[str, layout.RemoteFile]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        limiter = trio.CapacityLimiter(tree.SIZE_PROBE_CONCURRENCY)

        for entry in files.values():
            if entry.headers:
                self.content.register_presigned(entry.url, dict(entry.headers))

        async def probe(name: str, url: str) -> None:
            async with limiter:
                try:
                    sizes[name] = await self.content.size(url)
                except (NotFound, PermissionDenied) as exc:
                    log.info("%s: not readable (%s); showing a stub", url, exc)

        async with trio.open_nursery() as nursery:
            for name, entry in files.items():
                nursery.start_soon(probe, name, entry.url)
        return sizes

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
