"""The top of the tree: the root, `archives/`, `algorithms/`, `reader-studies/` and one
directory per object in them (what each holds is tree.py's).

Layering: fs.py (the filesystem core) imports this module, apitree.py and tree.py; they
import each other only downwards (apitree -> toplevel -> tree -> listing -> metastore) and
fs.py only for type checking, so no module imports another inside a function.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import render, tree
from .api import Existence
from .errors import NotFound
from .names import API_DIR, could_be_identifier, is_slug, is_uuid, slug_from_url
from .nodes import (
    DirNode,
    FileNode,
    GeneratedFileNode,
    Node,
    StaticDir,
    SymlinkNode,
    describe,
    stub_dir,
)

if TYPE_CHECKING:
    from .fs import GcFilesystem

log = logging.getLogger(__name__)


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

    @property
    def kind(self) -> str:
        """`user.gc.kind` of its objects: archive, algorithm, reader-study."""
        return self.metadata_name.removesuffix(".json")


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
                offline_since=fs.api.outage.down_since,
            )

        nodes: list[Node] = [
            describe(GeneratedFileNode("root/README.md", "README.md", readme), "readme")
        ]
        for c in COLLECTIONS:
            directory = CollectionDir(f"collection:{c.name}", c.name, c)
            api_url, url = f"{fs.api.api_url}{c.api_path}", f"{fs.base_url}/{c.name}/"
            nodes.append(describe(directory, "collection", api_url=api_url, url=url))
        images = tree.ImagesRootDir("collection:images", "images")
        nodes.append(describe(images, "collection", api_url=f"{fs.api.api_url}cases/images/"))

        def status() -> bytes:
            return (json.dumps(fs.status(), indent=2) + "\n").encode()

        status_file = GeneratedFileNode("root/.gcfs/status.json", "status.json", status)
        control = StaticDir("root/.gcfs", ".gcfs", {"status.json": describe(status_file, "status")})
        nodes.append(describe(control, "status"))
        return {node.name: node for node in nodes}

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        # api/ is looked up, never listed: `ls ~/gc` shows the tree, not its second index.
        if name == API_DIR:
            return fs.inodes.add(fs.api_dir)
        return await super().find(fs, name)


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
            children[name] = describe(ObjectDir(f"{c.name}:{pk}", name, c, obj), c.kind, obj)
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

    def cache_keys(self) -> list[Hashable]:
        return [*super().cache_keys(), tree.list_key(self.collection.api_path)]

    def forget_lookups(self, fs: GcFilesystem, name: str | None = None) -> None:
        fs.forget_lookups_of(self, "hidden", name)

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
                    found_dir = ObjectDir(f"{c.name}:{pk}", name, c, results[0])
                    return fs.inodes.add(describe(found_dir, c.kind, results[0]))
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
        certain = existence is Existence.HIDDEN

        def readme() -> bytes:
            # Made when read: it names the mount point (fs.mountpoint, set once mounted).
            return render.stub_readme(
                collection=c.name,
                name=name,
                base_url=fs.base_url,
                username=fs.username,
                ttl=fs.ttl,
                certain=certain,
                mountpoint=fs.mountpoint,
            )

        request_url = f"{fs.base_url}/{c.name}/{name}/permission-requests/create/"
        stub = stub_dir(
            f"stub:{c.name}:{name}",
            name,
            readme,
            exists=existence is Existence.HIDDEN,
            url=request_url if is_slug(name) else "",
        )
        return fs.inodes.add(stub)


class ObjectDir(DirNode):
    """One archive, algorithm or reader study: its metadata file and its contents (tree.py)."""

    __slots__ = ("collection", "obj")

    def __init__(self, identity: str, name: str, collection: Collection, obj: dict[str, Any]):
        super().__init__(identity, name)
        self.collection = collection
        self.obj = obj

    @property
    def pk(self) -> str:
        return str(self.obj["pk"])

    def cache_keys(self) -> list[Hashable]:
        keys = super().cache_keys()
        if self.collection is READER_STUDIES:  # answers.json/.csv are built from these
            keys.append(
                tree.list_key("reader-studies/answers/", {"question__reader_study": self.pk})
            )
            keys.append(tree.list_key("reader-studies/display-sets/", {"reader_study": self.pk}))
        return keys

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        name = self.collection.metadata_name
        # The listing already holds the full object (list and detail share one serializer),
        # so the metadata file costs no request of its own.
        meta = FileNode(f"{self.identity}/{name}", name, data=render.metadata_json(self.obj))
        describe(meta, self.collection.kind, self.obj)
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
