"""GcFilesystem: the tree of layout.md, built lazily from the API.

Directories are nodes that know how to build their children from API answers. A directory's
children are built once per cache lifetime and kept as a name -> node map, so `readdir`, every
`lookup` in it and the kernel's READDIRPLUS attributes all come from one listing.

Moving parts:
- `GcApiClient` does HTTP; `MetadataCache` keeps its answers (and the derived child maps) for
  `ttl` seconds, makes concurrent askers share one request, and serves the last good value
  while the server fails.
- `ContentStore` gives files their true sizes (probed when their directory is built).
- `InodeTable` maps the inode numbers the kernel holds to the newest node for each identity.
- `gcfs refresh` and SIGHUP forget a directory's cache entries (`DirNode.cache_keys`) and the
  lookups of names it does not list (stubs, absent names).
- Names that cannot be identifiers fail before any request (`names.could_be_identifier`);
  names that were looked up and proved absent are remembered for `ttl` seconds.

Everything here raises `GcfsError`, never `FUSEError`: the adapter in `fuse_ops.py` translates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from cachetools import LRUCache, TTLCache

from . import __version__, inject, layout, render, tree
from .api import JSON, GcApiClient
from .apitree import api_root
from .cache import MetadataCache
from .errors import (
    BadResponse,
    NotADirectory,
    NotFound,
    PermissionDenied,
    Unavailable,
    one_error,
)
from .health import endpoint_family
from .listing import Listing, Listings
from .metastore import MetadataStore, StoreError, encode, key_text
from .nodes import (
    DirNode,
    FileNode,
    InodeTable,
    Node,
    RemoteFileNode,
    describe,
    stub_dir,
)
from .resolver import file_key
from .toplevel import RootDir

if TYPE_CHECKING:
    from .content import ContentStore

log = logging.getLogger(__name__)

Children = Mapping[str, Node]

# Remembered absent names per directory. Probes of missing names come in bursts from shells and
# file managers; 10,000 (about 1 MiB) holds any burst we have seen.
NEGATIVE_CACHE_SIZE = 10_000
# Objects asked for at once when a batch listing fails and each object is fetched by its own
# API URL instead. A job has a handful of images, an archive item one or two; 8 keeps a large
# display set quick (~1 round trip per 8 images) without taking all 16 of the API client's
# connections from the other operations.
FALLBACK_CONCURRENCY = 8
# Generated tables whose size is remembered: three per archive, algorithm or reader study a
# user looks at; one evicted is read back from the store (or rendered) when asked again.
TABLE_STATES = 1024


@dataclass(frozen=True, slots=True)
class Among:
    """What `objects_among` found: the objects by pk, and when the oldest answer that listed
    them was fetched (the proof, while younger than the TTL, that the token may read their
    files; None if unknown)."""

    objects: dict[str, JSON]
    fetched_at: float | None


class GcFilesystem:
    """The filesystem core: nodes by inode, directories listed and looked up through the API."""

    def __init__(
        self,
        api: GcApiClient,
        content: ContentStore,
        *,
        username: str,
        ttl: float,
        root: DirNode | None = None,
        offline: str | None = None,
        store: MetadataStore | None = None,
    ) -> None:
        """`root`: the tree's root directory (default: the live tree of the API, RootDir);
        an offline mount gives the recorded one, with `offline` the snapshot's directory."""
        self.api = api
        self.content = content
        self.mountpoint = ""  # set by the daemon once mounted, for status
        self.log_file: str | None = None  # set by the daemon (None: stderr), for status
        self.base_url = api.base_url
        self.username = username
        self.ttl = ttl
        # Answers on disk (metastore.py); in memory for this run when there is none.
        self.store = store if store is not None else MetadataStore(None)
        self.listings = Listings(api, self.store)
        self.cache = MetadataCache(ttl, backing=_StoredAnswers(self.store, self.listings))
        self.listings.on_failed = self.cache.expire
        self.inodes = InodeTable()
        self._absent: TTLCache[tuple[str, str], bool] = TTLCache(NEGATIVE_CACHE_SIZE, ttl)
        # Batch listings (by endpoint family) that failed while asking for each object worked:
        # not tried again for the TTL.
        self._failing_batches: TTLCache[str, bool] = TTLCache(256, ttl)
        self.fallbacks = 0  # directories filled object by object because a batch failed
        # What routing around cost, by batch family: directories filled object by object and
        # the object requests they sent (cached objects cost none), for `gcfs status`, which
        # says what a failing listing costs and not only that it fails.
        self.routed: dict[str, dict[str, int]] = {}
        # The children each directory was last built with: what `gcfs refresh` walks and
        # which kernel entries it invalidates.
        self._children_of: dict[int, Children] = {}
        # What is known of each generated table (tree.TableState: stamps and size, a few
        # hundred bytes), by identity; its bytes live in the store.
        self.tables: LRUCache[str, tree.TableState] = LRUCache(TABLE_STATES)
        self.table_renders = trio.CapacityLimiter(tree.TABLE_RENDERS)
        self.offline = offline
        self.root = root if root is not None else describe(RootDir("root", ""), "root")
        self.inodes.add_root(self.root)
        self.api_dir = api_root(self.api.api_url)

    # -- the API, cached --------------------------------------------------------------------

    async def listing(self, api_path: str, params: Mapping[str, str] | None = None) -> Listing:
        """The listing of `api_path` with `params`: cached for the TTL (in memory, and in the
        store across restarts), possibly still filling (listing.py)."""
        key = tree.list_key(api_path, dict(params or {}))
        listing: Listing = await self.cache.get(
            key, lambda: self.listings.fetch(key, api_path, params or {})
        )
        return listing

    async def list_objects(
        self, api_path: str, params: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Every object of a listing, parsed: for listings rendered whole (collections,
        answers, container images), never for item listings that may be huge."""
        listing = await self.listing(api_path, params)
        await listing.wait_complete()
        return listing.all_objects()

    async def images_for(self, listing: tuple[str, str], wanted: Set[str]) -> Among:
        """The images `wanted` (pks) that the token may see, by pk.

        `listing` is the filter (`("archive", <pk>)`, `("reader_study", <pk>)`,
        `("job_input", <job pk>)`) of one paged `cases/images/` listing that serves every
        directory of that archive, study or job instead of one request per image; when the
        server cannot answer it, each image is asked for by its own API URL.
        """
        param, pk = listing
        return await self.objects_among(
            "cases/images/", {param: pk}, wanted, lambda image: f"cases/images/{image}/"
        )

    async def objects_among(
        self,
        path: str,
        params: Mapping[str, str],
        wanted: Set[str],
        detail: Callable[[str], str],
    ) -> Among:
        """The objects `wanted` (pks) among those of the batch listing `path?params`, by pk;
        an object the token may not see is missing from the answer.

        Route around a failing batch request (issue: the real server answers 500 to its job
        image filters): when the listing fails in a way retrying cannot fix (a 5xx after
        retries, a 4xx other than 401/403/404, a body we cannot use), each wanted object is
        fetched by its detail URL (`detail(pk)`, relative to /api/v1/), at most
        FALLBACK_CONCURRENCY at a time, single-flight and cached like any object. When that
        works, the listing's family is remembered as failing for the TTL: later directories go
        straight to the objects, and the listing is tried again after the TTL (the server may
        have been fixed). 401/403/404 are answers about the objects, not failures: they stand.
        """
        family = endpoint_family(self.api.api_url + path, params, self.api.api_url)
        if family not in self._failing_batches:
            try:
                listing = await self.listing(path, params)
                await listing.wait_complete()
            except (Unavailable, BadResponse) as exc:
                log.debug("%s %s failed (%s); asking for each object", path, dict(params), exc)
            else:
                return Among(listing.objects_among(sorted(wanted)), listing.started_at)
        cost = self.routed.setdefault(family, {"directories": 0, "requests": 0})
        found = await self._each_object(sorted(wanted), detail, cost)
        cost["directories"] += 1
        if family not in self._failing_batches:
            # The objects answer where the batch did not: skip it for the TTL.
            self._failing_batches[family] = True
            log.info("asking for objects one by one instead of %s for %g s", family, self.ttl)
        self.fallbacks += 1
        return Among(found, self.oldest([("object", detail(pk)) for pk in found]))

    async def _each_object(
        self, pks: Sequence[str], detail: Callable[[str], str], cost: dict[str, int]
    ) -> dict[str, JSON]:
        found: dict[str, JSON] = {}
        limiter = trio.CapacityLimiter(FALLBACK_CONCURRENCY)

        async def counted(path: str) -> JSON:
            cost["requests"] += 1  # only a cache miss sends a request
            return await self.api.get_json(path)

        async def fetch(pk: str) -> None:
            async with limiter:
                path = detail(pk)
                try:
                    obj = await self.cache.get(("object", path), lambda: counted(path))
                except NotFound:
                    return  # hidden or gone: left out, as the listing would have left it out
            if isinstance(obj, dict):
                found[pk] = obj

        async with one_error(), trio.open_nursery() as nursery:
            for pk in pks:
                nursery.start_soon(fetch, pk)
        return found

    async def api_object(self, path: str) -> JSON:
        """One object by its API path (`cases/images/<pk>/`), cached for the TTL and fetched
        once however many directories ask for it at the same time."""
        return await self.cache.get(("object", path), lambda: self.api.get_json(path))

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

        async with one_error(), trio.open_nursery() as nursery:
            for image in dicom_images:
                nursery.start_soon(fetch, str(image["pk"]))
        return found

    async def _dicom_instances(self, pk: str) -> list[layout.DicomInstance]:
        body = await self.api_object(f"cases/images/{pk}/dicom/instances/")
        instances = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(instances, list):
            raise BadResponse(f"cases/images/{pk}/dicom/instances/: no instances list")
        return layout.dicom_instances(instances)

    async def materialize(
        self,
        identity: str,
        entries: Mapping[str, layout.Entry],
        vouched_at: float | None,
    ) -> dict[str, Node]:
        """Nodes for a values layout; remote files get their true size first (probed
        concurrently), and a file we may not read becomes a README stub. `vouched_at`: when
        the oldest answer that listed these files was fetched (RemoteFileNode)."""
        remote = {n: e for n, e in entries.items() if isinstance(e, layout.RemoteFile)}
        sizes = await self._probe(remote)  # a file missing here may not be read
        nodes: dict[str, Node] = {}
        for name, entry in entries.items():
            path = f"{identity}/{name}"
            shows = dict(entry.attrs)
            kind = shows.pop("kind", "")
            extra = {f"user.gc.{key}": value for key, value in shows.items() if key != "api_url"}
            api_url = shows.get("api_url", "")
            node: Node
            if isinstance(entry, layout.InlineFile):
                node = describe(FileNode(path, name, data=entry.data), kind or "value", extra=extra)
            elif isinstance(entry, layout.Directory):
                node = tree.EntriesDir(path, name, entry.entries, vouched_at)
                describe(node, kind or "directory", api_url=api_url, extra=extra)
            elif isinstance(entry, layout.RemoteFile) and name in sizes:
                # api_url of a file is the URL its bytes are fetched from (its /media/ URL).
                file_node = RemoteFileNode(
                    path, name, url=entry.url, length=sizes[name], vouched_at=vouched_at
                )
                node = describe(file_node, kind or "file", api_url=entry.url, extra=extra)
            else:
                what, url = (
                    (entry.what, entry.url)
                    if isinstance(entry, layout.Unreadable)
                    else (f"file {name}", getattr(entry, "url", ""))
                )
                readme = render.unreadable_readme(what, url, username=self.username, ttl=self.ttl)
                node = stub_dir(path, name, readme, exists=None)
                for stub_node in (node, *node.entries.values()):
                    stub_node.xattrs = {**(stub_node.xattrs or {}), **extra}
            nodes[name] = node
        return nodes

    async def _probe(self, files: Mapping[str, layout.RemoteFile]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        limiter = trio.CapacityLimiter(tree.SIZE_PROBE_CONCURRENCY)

        for entry in files.values():
            if entry.headers:
                self.content.register_presigned(entry.url, dict(entry.headers))

        async def probe(name: str, url: str) -> None:
            async with limiter:
                inject.maybe_fail("size-probe")
                try:
                    sizes[name] = await self.content.size(url)
                except (NotFound, PermissionDenied) as exc:
                    log.info("%s: not readable (%s); showing a stub", url, exc)

        async with one_error(), trio.open_nursery() as nursery:
            for name, entry in files.items():
                nursery.start_soon(probe, name, entry.url)
        return sizes

    async def children(self, directory: DirNode) -> Children:
        if isinstance(directory, tree.ObjectListDir):
            # Its listing is the cache entry: a map of children built from an older
            # generation would outlive it (and the store deletes superseded generations).
            listed = await directory.build(self)
            self._children_of[directory.inode] = listed
            return listed

        async def build() -> Children:
            built = await directory.build(self)
            for node in built.values():
                self.inodes.add(node)
            self._children_of[directory.inode] = built
            return built

        children: Children = await self.cache.get(("dir", directory.identity), build)
        return children

    def is_vouched_for(self, node: RemoteFileNode) -> bool:
        """True while every answer that listed the file is younger than the TTL: then the
        token may read it as surely as it may see its name, and opening its cached bytes
        needs no request. After the TTL an open asks the server again (a /media/
        resolution), so a revoked permission ends access within one TTL."""
        return node.vouched_at is not None and time.time() - node.vouched_at < self.ttl

    def oldest(self, keys: Iterable[Hashable]) -> float | None:
        """When the oldest of these cached answers was fetched; None if one is unknown."""
        times = [self.cache.fetched_at(key) for key in keys]
        if not times or any(t is None for t in times):
            return None
        return min(t for t in times if t is not None)

    def attach(self, nursery: trio.Nursery) -> None:
        """The daemon's nursery: listings fill in it after their first page was served."""
        self.listings.nursery = nursery

    def is_known_absent(self, directory: DirNode, name: str) -> bool:
        return (directory.identity, name) in self._absent

    def remember_absent(self, directory: DirNode, name: str) -> None:
        self._absent[(directory.identity, name)] = True

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `gcfs status` and `.gcfs/status.json` show."""
        block_cache = self.content.cache
        return {
            "server": self.base_url,
            "user": self.username,
            "mountpoint": self.mountpoint,
            "pid": os.getpid(),
            "log_file": self.log_file,
            "version": __version__,
            "token_rejected": self.api.token_rejected,
            "inodes": len(self.inodes),
            **self.api.stats.snapshot(),
            # Endpoint families the server fails now, and directories filled object by object
            # because a batch listing failed (objects_among).
            "failing_endpoints": self.api.health.snapshot(),
            "outage": self.api.outage.snapshot(),  # down, down_since, last_outage_seconds
            "fallbacks": self.fallbacks,
            # by family: {"directories": .., "requests": ..}, what the fallbacks cost
            "routed_around": {family: dict(cost) for family, cost in sorted(self.routed.items())},
            # the families routed around now (tried again after the TTL)
            "routing_around": sorted(self._failing_batches),
            "metadata_cache": dataclasses.asdict(self.cache.statistics()),
            # The store on disk (metastore.py): ":memory:" when this run keeps it in memory
            # (another daemon owns the file, or it failed); answers served from it with no
            # request (`loaded`: an earlier daemon's, within the TTL).
            "metadata_store": {
                "path": str(self.store.path),
                "loaded": self.cache.loaded,
                "pages_stored": self.listings.pages_stored,
            },
            "content": dataclasses.asdict(self.content.statistics()),
            "offline": self.offline,
            "block_cache": None
            if block_cache is None
            else {
                **dataclasses.asdict(block_cache.statistics()),
                "max_bytes": block_cache.max_bytes,
                "directory": str(block_cache.directory),
                "mode": block_cache.mode,
                "network": block_cache.network,
            },
        }

    async def file_info(self, node: Node, *, cached: bool) -> dict[str, Any]:
        """What `gcfs snapshot` and `gcfs prefetch` ask about a file: its size, its key in the
        block store when its bytes are remote (None for generated files), and with `cached`
        how much of it the block cache holds."""
        info: dict[str, Any] = {"size": node.size, "key": None}
        if isinstance(node, RemoteFileNode):
            info["key"] = file_key(node.url)
        if cached:
            info["cached_bytes"] = (await self.cached_bytes(node))[1]
        return info

    async def hold_images(self, node: Node) -> list[str]:
        """The pks of the images a values directory shows (an item, a display set, a job's
        inputs or outputs), each image's object put where `images/<pk>` looks for it (its
        detail URL's cache entry). `gcfs snapshot` asks this so that it can record
        `images/<pk>` at no cost: the objects come from the batch listing the directory was
        laid out from (cached by then, so no request), and list and detail serve one
        serializer. Any other node shows no images: []."""
        if isinstance(node, tree.ListedValuesDir):
            node = node.values_dir()
        if not isinstance(node, tree.ValuesDir):
            return []
        wanted = node.image_pks()
        if not wanted:
            return []
        among = await self.images_for(node.images_filter, wanted)
        for pk, image in among.objects.items():

            async def listed(image: JSON = image) -> JSON:
                return image

            # An answer already cached stays (cache.get); else this one counts as fetched now.
            await self.cache.get(("object", f"cases/images/{pk}/"), listed)
        return sorted(among.objects)

    async def cached_bytes(self, node: Node) -> tuple[int, int]:
        """A file's size and how much of it the block cache holds (`gcfs prefetch`)."""
        if not isinstance(node, RemoteFileNode):
            return node.size, node.size  # generated files need no fetching
        return node.size, await self.content.cached_bytes(node.url, node.size)

    # -- forgetting (gcfs refresh, SIGHUP) --------------------------------------------------

    def forget_lookups_of(self, directory: DirNode, kind: str, name: str | None) -> None:
        """Forget cached lookups `(kind, directory, name)` (or all names) and absent names."""
        if name is not None:
            self.cache.forget((kind, directory.identity, name))
            self.cache.forget((kind, name))
            self._absent.pop((directory.identity, name), None)
            return

        def matches(key: Hashable) -> bool:
            return (
                isinstance(key, tuple)
                and len(key) >= 2
                and key[0] == kind
                and (key[1] == directory.identity or len(key) == 2)
            )

        self.cache.forget_matching(matches)
        for absent in [k for k in self._absent if k[0] == directory.identity]:
            self._absent.pop(absent, None)

    def forget(
        self, parent: DirNode | None, node: Node, *, recursive: bool
    ) -> tuple[list[tuple[int, str]], list[int]]:
        """Forget what is cached of `node` (and everything below it when `recursive`).

        Returns the kernel's entries (parent inode, name) and inodes to invalidate, so that
        the next lookup or listing asks us again: new items, answers or granted access show.
        """
        entries: list[tuple[int, str]] = []
        inodes: list[int] = []
        if parent is not None:
            parent.forget_lookups(self, node.name)
            entries.append((parent.inode, node.name))
        pending = [node]
        while pending:
            current = pending.pop()
            inodes.append(current.inode)
            if not isinstance(current, DirNode):
                continue
            for key in current.cache_keys():
                self.cache.forget(key)
            current.forget_lookups(self)
            for name, child in self._children_of.pop(current.inode, {}).items():
                entries.append((current.inode, name))
                if recursive:
                    pending.append(child)
        return entries, inodes

    def forget_everything(self) -> tuple[list[tuple[int, str]], list[int]]:
        """SIGHUP: forget every listing, object and lookup."""
        entries = [
            (inode, name) for inode, children in self._children_of.items() for name in children
        ]
        inodes = list(self._children_of)
        self.cache.clear()
        # What the store holds stays as the last good answers, no longer fresh ones.
        with contextlib.suppress(StoreError):
            self.store.make_everything_stale()
        self._absent.clear()
        self._failing_batches.clear()
        self._children_of.clear()
        return entries, inodes

    async def resolve(self, relative: str) -> tuple[DirNode | None, Node]:
        """The node at a path relative to the mount root, and its parent directory."""
        parent: DirNode | None = None
        node: Node = self.root
        for name in [part for part in relative.split("/") if part not in ("", ".")]:
            if not isinstance(node, DirNode):
                raise NotADirectory(f"{relative}: {name} is below a file")
            parent, node = node, await node.find(self, name)
        await self.ready(node)
        return parent, node

    async def ready(self, node: Node) -> None:
        """Before the kernel (or a command) is told a node's size: a generated table is
        rendered for the current listings (tree.TableFile)."""
        if isinstance(node, tree.TableFile):
            await node.prepare(self)

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
        """The node `name` in a directory; the kernel now knows it (counted)."""
        parent = self.directory(parent_inode)
        node = parent if name == "." else await parent.find(self, name)
        await self.ready(node)
        self.inodes.remember(node)
        return node

    def forget_inode(self, inode: int, count: int) -> None:
        """The kernel forgot an inode `count` times (pyfuse3's forget)."""
        if self.inodes.forget(inode, count):
            self._children_of.pop(inode, None)

    async def listdir(self, inode: int) -> list[Node]:
        # A table (tree.TableFile) is listed without being rendered: its attributes expire at
        # once (fuse_ops), so its size is made true by the getattr that precedes any use.
        return list((await self.children(self.directory(inode))).values())


class _StoredAnswers:
    """What the metadata cache keeps on disk (MetadataCache's backing): API answers by path
    (`("object", path)`) as JSON, and listings, which listing.py writes as they arrive.
    Everything derived from them (children maps, stubs, lookups) is made again from them."""

    def __init__(self, store: MetadataStore, listings: Listings) -> None:
        self.store = store
        self.listings = listings

    def load(self, key: Hashable) -> tuple[Any, float] | None:
        kind = key[0] if isinstance(key, tuple) and key else None
        try:
            if kind == "list":
                listing = self.listings.stored(key)
                return None if listing is None else (listing, listing.started_at)
            if kind == "object":
                found = self.store.get_answer(key_text(key))
                return None if found is None else (json.loads(found[0]), found[1])
        except (StoreError, ValueError):
            return None
        return None

    def save(self, key: Hashable, value: Any, fetched_at: float) -> None:
        if isinstance(key, tuple) and key and key[0] == "object":
            # A failure is logged once by the store; memory still has the value.
            with contextlib.suppress(StoreError):
                self.store.put_answer(key_text(key), encode(value), fetched_at)

    def forget(self, key: Hashable) -> None:
        kind = key[0] if isinstance(key, tuple) and key else None
        try:
            if kind == "list":
                self.store.forget_listing(key_text(key))
            elif kind == "object":
                self.store.forget_answer(key_text(key))
        except StoreError:
            pass
