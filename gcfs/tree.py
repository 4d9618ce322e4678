"""Everything inside an archive, algorithm or reader study, and the `images/` lookup root.

    archives/<slug>/items/<item-pk>/             item.json + values (layout.py)
    algorithms/<slug>/images/<pk>.json           container images (editors only)
    algorithms/<slug>/jobs/<job-pk>/             job.json, inputs/, outputs/
    reader-studies/<slug>/questions.json         the study's nested questions, in order
    reader-studies/<slug>/display-sets/<pk>/     display-set.json + values
    reader-studies/<slug>/answers.json|.csv      every answer the token may see
    archives/<slug>/items.csv                    tables of the listings (tables.py, TableFile)
    reader-studies/<slug>/display-sets.csv
    algorithms/<slug>/jobs.csv
    images/<pk>/                                 image.json + the image's files (lookup only)

Requests: one paged listing per directory of objects; the images of an archive's items or a
study's display sets come from one paged `cases/images/?archive=<pk>` (or `?reader_study=`)
listing shared by all its directories, never one request per image; a job's images come from
`?job_input=<pk>` / `?job_output=<pk>`. When such a listing fails (the real server answers 500
to the job filters), each image is fetched by its own API URL (`GcFilesystem.objects_among`).
Listing a directory that holds remote files probes their
sizes concurrently (one ranged GET each, remembered forever: files are immutable by pk).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from . import layout, render, tables
from .answers_csv import render_answers_csv
from .background import InternalError, report_bug
from .errors import GcfsError, NotFound, Timeout, one_error
from .listing import BATCH, Listing, ListingChildren
from .metastore import StoreError, key_text
from .names import is_uuid
from .nodes import (
    DirNode,
    FileNode,
    Node,
    NodeKind,
    RemoteFileNode,
    StaticDir,
    SymlinkNode,
    describe,
    stub_dir,
)

if TYPE_CHECKING:
    from .fs import GcFilesystem

log = logging.getLogger(__name__)

# Remote files probed for their size at once when a directory is listed; an image directory
# rarely holds more than two (MHD + ZRAW), a DICOM set can hold hundreds of instances.
SIZE_PROBE_CONCURRENCY = 16


def _pk(obj: dict[str, Any]) -> str | None:
    pk = obj.get("pk")
    return pk if isinstance(pk, str) and is_uuid(pk) else None


class ObjectListDir(DirNode):
    """A directory of API objects named by pk, from one paged listing that may be huge: it
    streams (listing.py) and its children are made from the store when asked for, never all
    at once (`ListingChildren`)."""

    __slots__ = ("api_path", "api_root", "current", "params", "web_url")
    gc_kind = "listing"  # user.gc.kind of the directory itself

    def __init__(
        self,
        identity: str,
        name: str,
        api_path: str,
        params: dict[str, str],
        *,
        api_root: str,
        web_url: str = "",
        page: str = "",
    ) -> None:
        super().__init__(identity, name)
        self.api_path = api_path
        self.params = params
        self.api_root = api_root  # .../api/v1/, for objects whose JSON lacks api_url
        self.web_url = web_url  # the parent object's page, for its children's pages
        self.current: Listing | None = None  # the generation last asked for
        query = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
        describe(self, self.gc_kind, api_url=f"{api_root}{api_path}?{query}", url=page)

    def child(self, pk: str, listing: Listing) -> Node:
        """The node of one listed object (its object stays in the store until needed)."""
        raise NotImplementedError

    def child_xattrs(self, pk: str, obj: Callable[[], dict[str, Any] | None]) -> dict[str, str]:
        """The extended attributes of a child, asked for when the kernel asks."""
        raise NotImplementedError

    def cache_keys(self) -> list[Hashable]:
        return [*super().cache_keys(), list_key(self.api_path, self.params)]

    async def listing(self, fs: GcFilesystem) -> Listing:
        self.current = await fs.listing(self.api_path, self.params)
        return self.current

    async def build(self, fs: GcFilesystem) -> Mapping[str, Node]:
        listing = await self.listing(fs)
        return ListingChildren(listing, lambda pk: fs.inodes.add(self.child(pk, listing)))

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        if not is_uuid(name):
            raise NotFound(f"{self.identity}: no entry {name!r}")
        listing = await self.listing(fs)
        if await listing.find(name) is None:
            raise NotFound(f"{self.identity}: no entry {name!r}")
        return fs.inodes.add(self.child(name, listing))

    def object_of(self, pk: str, listing: Listing) -> dict[str, Any] | None:
        """A child's object from its generation; when a refresh replaced that one, from the
        generation last asked for, or the newest complete one in the store (the last asked
        for may have failed half way and been dropped)."""
        found = listing.object(pk)
        if found is None and self.current is not None and self.current is not listing:
            found = self.current.object(pk)
        if found is None:
            newest = listing.owner.latest(listing.key)
            if newest is not None and newest.generation != listing.generation:
                found = newest.object(pk)
        return found


class ListedDir(DirNode):
    """A directory of one object of a listing (an item, a display set, a job) whose object
    stays in the metadata store until the directory is built, and whose extended attributes
    are computed when asked. Small on purpose (~100 bytes plus its two strings): the kernel
    may hold a million of them after `ls -l` of a large archive."""

    __slots__ = ("listing", "parent")

    def __init__(self, identity: str, name: str, parent: ObjectListDir, listing: Listing):
        super().__init__(identity, name)
        self.parent = parent
        self.listing = listing

    @property
    def xattrs(self) -> dict[str, str] | None:
        return self.parent.child_xattrs(self.name, self._object)

    @xattrs.setter
    def xattrs(self, value: dict[str, str] | None) -> None:
        pass  # computed (Node.__init__ sets None)

    def _object(self) -> dict[str, Any] | None:
        return self.parent.object_of(self.name, self.listing)


class ListedValuesDir(ListedDir):
    """An archive item or a display set: a ValuesDir once built."""

    __slots__ = ()
    parent: ItemsDir | DisplaySetsDir

    def values_dir(self) -> ValuesDir:
        obj = self._object()
        if obj is None:
            raise NotFound(f"{self.identity}: no longer listed")
        parent = self.parent
        values = ValuesDir(
            self.identity,
            self.name,
            obj,
            values_key="values",
            images_filter=parent.images_filter(),
            metadata=parent.metadata_name,
            fetched_at=self.listing.started_at,
        )
        values.xattrs = self.xattrs
        return values

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        return await self.values_dir().build(fs)

    def cache_keys(self) -> list[Hashable]:
        try:
            return self.values_dir().cache_keys()
        except NotFound:
            return super().cache_keys()


def _older(first: float | None, second: float | None) -> float | None:
    """The older of two fetch times; None (unknown) wins."""
    return None if first is None or second is None else min(first, second)


def list_key(api_path: str, params: dict[str, str] | None = None) -> Hashable:
    """The metadata cache key of a listing (as `GcFilesystem.list_objects` makes it)."""
    return ("list", api_path, tuple(sorted((params or {}).items())))


class ValuesDir(DirNode):
    """A directory of values laid out as an algorithm's /input, with a metadata file."""

    __slots__ = ("fetched_at", "images_filter", "metadata", "obj", "values_key")
    # The xattrs of the object (set with `describe`) go to its metadata file too.

    def __init__(
        self,
        identity: str,
        name: str,
        obj: dict[str, Any],
        *,
        values_key: str,
        images_filter: tuple[str, str],
        metadata: str | None,
        fetched_at: float | None,
    ) -> None:
        super().__init__(identity, name)
        self.obj = obj
        self.values_key = values_key
        self.images_filter = images_filter
        self.metadata = metadata
        self.fetched_at = fetched_at  # when the answer `obj` came from was fetched

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        values = self.obj.get(self.values_key)
        values = [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []
        wanted = self.image_pks()
        vouched_at = self.fetched_at
        images: dict[str, Any] = {}
        if wanted:
            among = await fs.images_for(self.images_filter, wanted)
            images = among.objects
            vouched_at = _older(vouched_at, among.fetched_at)
        dicom = await fs.dicom_for(list(images.values()))
        tree = layout.lay_out_values(values, images, dicom)
        entries: dict[str, layout.Entry] = dict(tree.entries)
        name = layout.metadata_name(self.metadata or "", entries)
        if self.metadata is not None:
            entries[name] = layout.InlineFile(render.metadata_json(self.obj))
        nodes = await fs.materialize(self.identity, entries, vouched_at)
        if self.metadata is not None and self.xattrs:
            nodes[name].xattrs = dict(self.xattrs)
        return nodes

    def image_pks(self) -> set[str]:
        """The pks of the images its values name."""
        values = self.obj.get(self.values_key)
        if not isinstance(values, list):
            return set()
        return {pk for v in values if isinstance(v, dict) and (pk := layout.image_pk_of(v))}

    def cache_keys(self) -> list[Hashable]:
        param, pk = self.images_filter
        objects = [("object", f"cases/images/{image}/") for image in sorted(self.image_pks())]
        return [*super().cache_keys(), list_key("cases/images/", {param: pk}), *objects]


class EntriesDir(DirNode):
    """A subdirectory of a values layout (an image socket's directory, say)."""

    __slots__ = ("entries", "vouched_at")

    def __init__(
        self,
        identity: str,
        name: str,
        entries: dict[str, layout.Entry],
        vouched_at: float | None,
    ) -> None:
        super().__init__(identity, name)
        self.entries = entries
        self.vouched_at = vouched_at  # of the answers its parent was built from

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        return await fs.materialize(self.identity, self.entries, self.vouched_at)


# -- tables (items.csv, display-sets.csv, jobs.csv) --------------------------------------------


@dataclass(slots=True)
class TableState:
    """What is known of one table, shared by the nodes that show it (an archive's directory
    is rebuilt every TTL, and the kernel must keep seeing a true size meanwhile)."""

    # (items stamp, images stamp) of the listings it was rendered from; "" images stamp when
    # it names no image. None: never rendered.
    stamp: tuple[str, str] | None = None
    length: int = 0
    data: bytes | None = None  # only when the metadata store could not keep the bytes
    lock: trio.Lock = field(default_factory=trio.Lock)
    render: TableRender | None = None  # the latest render, running or ended


@dataclass
class TableRender:
    """One render of a table, run in the daemon's nursery rather than in the operation that
    wanted it: a table that takes longer than the operation's deadline (items.csv takes
    ~31 s per million rows here, the deadline is 60 s) keeps rendering after that operation
    got EIO, and the next look finds it done instead of starting over, and failing, again."""

    items_stamp: str  # of the listing it renders
    done: trio.Event = field(default_factory=trio.Event)
    error: GcfsError | None = None
    # Cancelled when a newer render of the table starts: nobody waits on this one then (a
    # waiter holds the table's lock), and its older table must not be stored over the newer.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


# A render in the background still ends: after ten minutes (~20 million rows at the rate
# above), it fails as an operation would, and the next look starts again.
TABLE_RENDER_DEADLINE = 600.0
# Renders at once: each holds its table's text (~55 bytes per row) until it is stored.
TABLE_RENDERS = 2


def _stamp(listing: Listing) -> str:
    # Generation ids are the store's row ids, kept across restarts; the start time makes a
    # reused id (a new store) a different stamp.
    return f"{listing.generation}@{listing.started_at!r}"


class TableFile(Node):
    """A generated CSV table of a listing (tables.py): `items.csv`, `display-sets.csv`,
    `jobs.csv`.

    Rendered when the kernel first learns of it (lookup, or a listing of its directory:
    `prepare`), from the stored listing in batches of BATCH objects (parsed and laid out in a
    worker thread, so the mount answers meanwhile) and the images of one `cases/images/`
    listing; no request per row. The bytes go to the metadata store under the stamps of the
    listings they came from, and only the size stays in memory; `open` reads them back. They
    are rendered again only when a listing they came from is a new generation."""

    __slots__ = ("api_path", "directory", "images_filter", "params", "state", "table")
    kind = NodeKind.FILE

    def __init__(
        self,
        fs: GcFilesystem,
        identity: str,
        name: str,
        *,
        table: str,
        api_path: str,
        params: dict[str, str],
        directory: str,
        images_filter: tuple[str, str] | None,
    ) -> None:
        super().__init__(identity, name)
        self.table = table
        self.api_path = api_path
        self.params = params
        self.directory = directory  # where the tree shows the rows' objects (`items`)
        # None: a job's images are listed per job (_job_images), not by one listing.
        self.images_filter = images_filter
        state = fs.tables.get(identity)
        if state is None:
            state = fs.tables[identity] = TableState()
        self.state = state

    @property
    def size(self) -> int:
        return self.state.length

    @property
    def store_key(self) -> str:
        return key_text(("table", self.identity))

    async def prepare(self, fs: GcFilesystem) -> None:
        """Make `size` true for the current listings (render when they changed)."""
        await self._current(fs, want_bytes=False)

    async def contents(self, fs: GcFilesystem) -> bytes:
        """The bytes, for `open` (held by the handle while it is open)."""
        data = await self._current(fs, want_bytes=True)
        assert data is not None
        return data

    async def _current(self, fs: GcFilesystem, *, want_bytes: bool) -> bytes | None:
        state = self.state
        # One render at a time per table: a lookup and a readdir arriving together share it.
        async with state.lock:
            listing = await fs.listing(self.api_path, self.params)
            await listing.wait_complete()
            items_stamp = _stamp(listing)
            known = (state.stamp, state.length) if state.stamp is not None else None
            if known is None or known[0][0] != items_stamp:
                known = self._stored_stamp(fs)
            if known is not None and known[0][0] == items_stamp:
                stamp, length = known
                if not stamp[1] or stamp[1] == _stamp(await self._images(fs)):
                    if state.stamp != stamp:
                        state.stamp, state.length, state.data = stamp, length, None
                    if not want_bytes:
                        return None
                    data = state.data if state.data is not None else self._stored_bytes(fs)
                    if data is not None and len(data) == length:
                        return data
            render = state.render
            # A render still running for this listing is joined (its first waiter ran out of
            # time); one that ended is not reused: the state checks above found it stale.
            if render is None or render.done.is_set() or render.items_stamp != items_stamp:
                if render is not None:
                    render.scope.cancel()
                render = state.render = TableRender(items_stamp)
                nursery = fs.listings.nursery
                if nursery is None:  # no daemon nursery (a unit test): in this operation
                    await self._render_into(fs, listing, render)
                else:
                    nursery.start_soon(self._render_into, fs, listing, render)
            await render.done.wait()
            if render.error is not None:
                raise render.error
            if not want_bytes:
                return None
            data = state.data if state.data is not None else self._stored_bytes(fs)
            if data is None or len(data) != state.length:
                raise InternalError(f"{self.identity}: the rendered table was not kept")
            return data

    async def _render_into(self, fs: GcFilesystem, listing: Listing, render: TableRender) -> None:
        """Render, store, and record the result in the shared state; then wake the waiters.
        Raises nothing: it runs in the daemon's nursery, where an exception ends the mount."""
        state = self.state
        # Its rows stay while it reads them, however long: a refresh of the listing meanwhile
        # (its TTL is 60 s) would otherwise delete the generation under the render.
        fs.listings.pin(listing)
        try:
            with render.scope, trio.fail_after(TABLE_RENDER_DEADLINE):
                async with fs.table_renders:
                    started = trio.current_time()
                    stamp, chunks, length = await self._render(fs, listing)
                    log.info(
                        "%s: rendered %d bytes in %.1f s",
                        self.identity,
                        length,
                        trio.current_time() - started,
                    )
                    header = json.dumps({"stamp": stamp, "size": length, "format": tables.FORMAT})
                    # One copy of the text (the chunks go with this frame).
                    body = "".join([header, "\n", *chunks])
                    del chunks
                    try:
                        # 200,000 rows are ~11 MB: written in a worker thread.
                        await trio.to_thread.run_sync(
                            fs.store.put_answer, self.store_key, body, 0.0
                        )
                        kept = None
                    except StoreError:
                        # Memory keeps it instead (bounded by fs.tables).
                        kept = body[len(header) + 1 :].encode()
                    state.stamp, state.length, state.data = stamp, length, kept
        except GcfsError as exc:
            render.error = exc
        except trio.TooSlowError:
            render.error = Timeout(
                f"{self.identity}: rendering took over {TABLE_RENDER_DEADLINE:g} s"
            )
        except Exception as exc:
            render.error = report_bug(f"rendering {self.name}", exc)
        finally:
            fs.listings.unpin(listing)
            if render.scope.cancelled_caught:
                render.error = Timeout(f"{self.identity}: superseded by a newer render")
            render.done.set()

    def _stored(self, fs: GcFilesystem) -> tuple[dict[str, Any], str] | None:
        """The stored table's header and CSV text, if a table of this format is stored."""
        try:
            found = fs.store.get_answer(self.store_key)
        except StoreError:
            return None
        if found is None:
            return None
        head, _, body = found[0].partition("\n")
        try:
            header = json.loads(head)
        except ValueError:
            return None
        if not isinstance(header, dict) or header.get("format") != tables.FORMAT:
            return None
        return header, body

    def _stored_stamp(self, fs: GcFilesystem) -> tuple[tuple[str, str], int] | None:
        found = self._stored(fs)
        if found is None:
            return None
        stamp, size = found[0].get("stamp"), found[0].get("size")
        if not (isinstance(stamp, list) and len(stamp) == 2 and isinstance(size, int)):
            return None
        return (str(stamp[0]), str(stamp[1])), size

    def _stored_bytes(self, fs: GcFilesystem) -> bytes | None:
        found = self._stored(fs)
        if found is None or found[0].get("stamp") != list(self.state.stamp or ()):
            return None
        return found[1].encode()

    async def _images(self, fs: GcFilesystem) -> Listing:
        assert self.images_filter is not None
        param, pk = self.images_filter
        images = await fs.listing("cases/images/", {param: pk})
        await images.wait_complete()
        return images

    async def _render(
        self, fs: GcFilesystem, listing: Listing
    ) -> tuple[tuple[str, str], list[str], int]:
        """The table of `listing`: two passes over the stored listing in batches (the columns
        are the union over all rows, needed before the first row); memory holds one batch of
        objects and the CSV text (str chunks, joined once)."""
        columns = tables.Columns(self.table)
        needs_images = False

        def gather(bodies: list[str]) -> bool:
            objects = [json.loads(body) for body in bodies]
            for obj in objects:
                columns.add(obj)
            return any(tables.image_pks(self.table, obj) for obj in objects)

        async for bodies in _batches(listing):
            needs_images = await trio.to_thread.run_sync(gather, bodies) or needs_images
        images = await self._images(fs) if needs_images and self.images_filter else None
        sockets = columns.socket_columns()
        head, length = tables.valid_text(tables.csv_text([columns.names()]))
        chunks = [head]

        def parse(bodies: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
            objects = [json.loads(body) for body in bodies]
            wanted = set().union(*(tables.image_pks(self.table, obj) for obj in objects))
            return objects, sorted(wanted)

        def rows(objects: list[dict[str, Any]], found: dict[str, Any] | None) -> tuple[str, int]:
            made = (tables.row(columns, sockets, obj, found, self.directory) for obj in objects)
            return tables.valid_text(tables.csv_text(made))

        async for bodies in _batches(listing):
            objects, wanted = await trio.to_thread.run_sync(parse, bodies)
            found: dict[str, Any] | None = None
            if images is not None:
                found = images.objects_among(wanted) if wanted else {}
            elif self.images_filter is not None:
                found = {}  # no row names an image
            else:
                found = await _job_images(fs, objects) if wanted else {}
            chunk, size = await trio.to_thread.run_sync(rows, objects, found)
            chunks.append(chunk)
            length += size
        stamp = (_stamp(listing), _stamp(images) if images is not None else "")
        return stamp, chunks, length


# Jobs whose images are asked for at once while jobs.csv is rendered (each job one listing,
# or one request per image where the server fails the job filters): the value of
# fs.FALLBACK_CONCURRENCY, so a table does not take all 16 API connections.
JOB_IMAGE_CONCURRENCY = 8


async def _job_images(fs: GcFilesystem, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """The images (by pk) that the inputs and outputs of `jobs` name and the token may see.

    A job's images are listed per job (`cases/images/?job_input=<pk>`; the real server fails
    that filter, and gcfs then asks for each image by its URL): the same cached answers a
    job's `inputs/` and `outputs/` directories use, so jobs.csv names the `.mha` a loader
    opens at the cost of those requests, once per TTL, and a look into the jobs within the
    TTL costs nothing more afterwards."""
    found: dict[str, Any] = {}
    limiter = trio.CapacityLimiter(JOB_IMAGE_CONCURRENCY)

    async def fetch(pk: str, param: str, wanted: set[str]) -> None:
        async with limiter:
            among = await fs.images_for((param, pk), wanted)
        found.update(among.objects)

    async with one_error(), trio.open_nursery() as nursery:
        for job in jobs:
            pk = job.get("pk")
            if not isinstance(pk, str):
                continue
            for key, param in (("inputs", "job_input"), ("outputs", "job_output")):
                values = job.get(key)
                wanted = {
                    image
                    for value in (values if isinstance(values, list) else [])
                    if isinstance(value, dict) and (image := layout.image_pk_of(value))
                }
                if wanted:
                    nursery.start_soon(fetch, pk, param, wanted)
    return found


async def _batches(listing: Listing) -> AsyncIterator[list[str]]:
    """The stored bodies of a complete listing, BATCH at a time (read on the trio thread:
    the store's reading connection belongs to it)."""
    start = 0
    while True:
        found = listing.owner.store.bodies(listing.generation, start, BATCH)
        if not found:
            return
        yield [body for _, body in found]
        start = found[-1][0] + 1


# -- archives ------------------------------------------------------------------------------


class ItemsDir(ObjectListDir):
    __slots__ = ()
    gc_kind = "archive-items"
    metadata_name = "item.json"

    def child(self, pk: str, listing: Listing) -> Node:
        return ListedValuesDir(f"item:{pk}", pk, self, listing)

    def images_filter(self) -> tuple[str, str]:
        return ("archive", self.params["archive"])

    def child_xattrs(self, pk: str, obj: Callable[[], dict[str, Any] | None]) -> dict[str, str]:
        # Items have no api_url or url field (gc-api.md §3.2): both are built, and the
        # object is not needed (`ls -l` of 200,000 items must not parse 200,000 objects).
        api_url = f"{self.api_root}archives/items/{pk}/"
        attrs = describe(_Attrs("", ""), "archive-item", {"pk": pk}, api_url=api_url)
        page = self._page(pk)
        if page and attrs.xattrs is not None:
            attrs.xattrs["user.gc.url"] = page
        return attrs.xattrs or {}

    def _page(self, pk: str) -> str:
        return f"{self.web_url}items/{pk}/" if self.web_url.endswith("/") else ""


async def archive_contents(fs: GcFilesystem, identity: str, obj: dict[str, Any]) -> list[Node]:
    pk = str(obj["pk"])
    url = obj.get("url")
    web_url = url if isinstance(url, str) else ""
    items = ItemsDir(
        f"{identity}/items",
        "items",
        "archives/items/",
        {"archive": pk},
        api_root=fs.api.api_url,
        web_url=web_url,
        page=f"{web_url}items/" if web_url.endswith("/") else "",
    )
    table = TableFile(
        fs,
        f"{identity}/items.csv",
        "items.csv",
        table=tables.ITEMS,
        api_path=items.api_path,
        params=items.params,
        directory="items",
        images_filter=("archive", pk),
    )
    return [items, describe(table, "items-csv", api_url=_listing_url(fs, items))]


def _listing_url(fs: GcFilesystem, directory: ObjectListDir) -> str:
    query = "&".join(f"{k}={v}" for k, v in sorted(directory.params.items()))
    return f"{fs.api.api_url}{directory.api_path}?{query}"


# -- algorithms ----------------------------------------------------------------------------


class AlgorithmImagesDir(DirNode):
    """`images/<pk>.json`: the algorithm's container images (only editors see any).

    `images/<pk>` (lookup only) links to `<pk>.json`, so that the website's URL of an image
    (`/algorithms/<slug>/images/<pk>/`) maps onto the tree like every other page."""

    __slots__ = ("algorithm_pk",)

    def __init__(self, identity: str, name: str, algorithm_pk: str, api_root: str) -> None:
        super().__init__(identity, name)
        self.algorithm_pk = algorithm_pk
        api_url = f"{api_root}algorithms/images/?algorithm={algorithm_pk}"
        describe(self, "algorithm-images", api_url=api_url)

    def cache_keys(self) -> list[Hashable]:
        params = {"algorithm": self.algorithm_pk}
        return [*super().cache_keys(), list_key("algorithms/images/", params)]

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        objects = await fs.list_objects("algorithms/images/", {"algorithm": self.algorithm_pk})
        children: dict[str, Node] = {}
        for obj in objects:
            pk = _pk(obj)
            if pk is not None:
                name = f"{pk}.json"
                data = render.metadata_json(obj)
                node = FileNode(f"algorithm-image:{pk}/json", name, data=data)
                children[name] = describe(node, "algorithm-image", obj)
        return children

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        children = await fs.children(self)
        if name not in children and f"{name}.json" in children:
            link = SymlinkNode(f"{self.identity}/{name}", name, target=f"{name}.json")
            return fs.inodes.add(describe(link, "link"))
        return await super().find(fs, name)


class JobsDir(ObjectListDir):
    __slots__ = ()
    gc_kind = "jobs"

    def child(self, pk: str, listing: Listing) -> Node:
        return ListedJobDir(f"job:{pk}", pk, self, listing)

    def child_xattrs(self, pk: str, obj: Callable[[], dict[str, Any] | None]) -> dict[str, str]:
        return describe(_Attrs("", ""), "job", obj()).xattrs or {}


class ListedJobDir(ListedDir):
    """A job; what it holds (job_dir) is made when it is listed or looked in."""

    __slots__ = ()

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        job = self._object()
        if job is None:
            raise NotFound(f"{self.identity}: no longer listed")
        made = job_dir(self.identity, self.name, job, fetched_at=self.listing.started_at)
        return made.entries


def job_dir(
    identity: str, name: str, job: dict[str, Any], *, fetched_at: float | None
) -> StaticDir:
    """A job's directory: job.json, inputs/ and outputs/, each showing the job. `fetched_at`:
    when the answer `job` came from was fetched."""
    pk = str(job.get("pk"))
    job_json = FileNode(f"{identity}/job.json", "job.json", data=render.metadata_json(job))
    entries: dict[str, Node] = {"job.json": describe(job_json, "job", job)}
    for key, images_filter in (("inputs", "job_input"), ("outputs", "job_output")):
        values = ValuesDir(
            f"{identity}/{key}",
            key,
            job,
            values_key=key,
            images_filter=(images_filter, pk),
            metadata=None,
            fetched_at=fetched_at,
        )
        entries[key] = describe(values, f"job-{key}", job)
    return describe(StaticDir(identity, name, entries), "job", job)


async def algorithm_contents(fs: GcFilesystem, identity: str, obj: dict[str, Any]) -> list[Node]:
    pk = str(obj["pk"])
    api_root = fs.api.api_url
    jobs = JobsDir(
        f"{identity}/jobs",
        "jobs",
        "algorithms/jobs/",
        {"algorithm_image__algorithm": pk},
        api_root=api_root,
    )
    # A job's images come from `?job_input=<job pk>` (a request per job, and one the real
    # server fails): the table names each image's directory instead (images_filter None).
    table = TableFile(
        fs,
        f"{identity}/jobs.csv",
        "jobs.csv",
        table=tables.JOBS,
        api_path=jobs.api_path,
        params=jobs.params,
        directory="jobs",
        images_filter=None,
    )
    return [
        AlgorithmImagesDir(f"{identity}/images", "images", pk, api_root),
        jobs,
        describe(table, "jobs-csv", api_url=_listing_url(fs, jobs)),
    ]


# -- reader studies ------------------------------------------------------------------------


class DisplaySetsDir(ObjectListDir):
    __slots__ = ()
    gc_kind = "display-sets"
    metadata_name = "display-set.json"

    def child(self, pk: str, listing: Listing) -> Node:
        return ListedValuesDir(f"display-set:{pk}", pk, self, listing)

    def images_filter(self) -> tuple[str, str]:
        return ("reader_study", self.params["reader_study"])

    def child_xattrs(self, pk: str, obj: Callable[[], dict[str, Any] | None]) -> dict[str, str]:
        page = f"{self.web_url}display-sets/{pk}/" if self.web_url.endswith("/") else ""
        return describe(_Attrs("", ""), "display-set", obj(), url=page).xattrs or {}


class _Attrs(Node):
    """A throwaway node for `describe` to fill in, for xattrs computed when asked."""

    __slots__ = ()


async def reader_study_contents(fs: GcFilesystem, identity: str, obj: dict[str, Any]) -> list[Node]:
    pk = str(obj["pk"])
    questions = obj.get("questions")
    questions = [q for q in questions if isinstance(q, dict)] if isinstance(questions, list) else []
    # Display sets and answers are fetched together: answers.csv needs the display set titles,
    # and both files need their true size as soon as the directory is listed.
    async with one_error(), trio.open_nursery() as nursery:
        results: dict[str, list[dict[str, Any]]] = {}

        async def fetch(key: str, path: str, params: dict[str, str]) -> None:
            results[key] = await fs.list_objects(path, params)

        nursery.start_soon(
            fetch, "answers", "reader-studies/answers/", {"question__reader_study": pk}
        )
        nursery.start_soon(
            fetch, "display_sets", "reader-studies/display-sets/", {"reader_study": pk}
        )
    answers, display_sets = results["answers"], results["display_sets"]
    api_root = fs.api.api_url
    answers_url = f"{api_root}reader-studies/answers/?question__reader_study={pk}"

    display_sets_dir = DisplaySetsDir(
        f"{identity}/display-sets",
        "display-sets",
        "reader-studies/display-sets/",
        {"reader_study": pk},
        api_root=api_root,
        web_url=obj["url"] if isinstance(obj.get("url"), str) else "",
    )
    display_sets_url = _listing_url(fs, display_sets_dir)
    display_sets_table = TableFile(
        fs,
        f"{identity}/display-sets.csv",
        "display-sets.csv",
        table=tables.DISPLAY_SETS,
        api_path=display_sets_dir.api_path,
        params=display_sets_dir.params,
        directory="display-sets",
        images_filter=("reader_study", pk),
    )

    def study_file(name: str, data: bytes, kind: str, api_url: str) -> Node:
        return describe(FileNode(f"{identity}/{name}", name, data=data), kind, api_url=api_url)

    return [
        study_file(
            "questions.json",
            render.metadata_json(questions),
            "questions",
            f"{api_root}reader-studies/questions/?reader_study={pk}",
        ),
        display_sets_dir,
        describe(display_sets_table, "display-sets-csv", api_url=display_sets_url),
        study_file("answers.json", render.metadata_json(answers), "answers", answers_url),
        study_file(
            "answers.csv",
            render_answers_csv(answers, questions, display_sets),
            "answers-csv",
            answers_url,
        ),
    ]


# -- images/<pk>/ --------------------------------------------------------------------------


class ImageDir(DirNode):
    __slots__ = ("fetched_at", "image")

    def __init__(
        self, identity: str, name: str, image: dict[str, Any], fetched_at: float | None
    ) -> None:
        super().__init__(identity, name)
        self.image = image
        self.fetched_at = fetched_at  # when `image` was fetched

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        pk = self.name  # the pk it was looked up by
        dicom = (await fs.dicom_for([self.image])).get(pk)
        entries: dict[str, layout.Entry] = dict(layout.image_files(self.image, dicom))
        name = layout.metadata_name("image.json", entries)
        entries[name] = layout.InlineFile(render.metadata_json(self.image))
        nodes = await fs.materialize(self.identity, entries, self.fetched_at)
        nodes[name].xattrs = dict(self.xattrs or {})
        return nodes


def _image_object_key(key: Hashable) -> bool:
    """A cache key of an image object (`("object", "cases/images/<pk>/")`)."""
    return (
        isinstance(key, tuple)
        and len(key) == 2
        and key[0] == "object"
        and isinstance(key[1], str)
        and key[1].startswith("cases/images/")
    )


class ImagesRootDir(DirNode):
    """`images/`: any image the token may see, by pk; lookup only (listing it is empty)."""

    __slots__ = ()

    def forget_lookups(self, fs: GcFilesystem, name: str | None = None) -> None:
        fs.forget_lookups_of(self, "image-dir", name)
        # A lookup is built from the image's own object, whose 404 the cache remembers for a
        # few seconds: forget it too, or the refresh a stub's README prints (`gcfs refresh
        # <mount>/images`) right after access is granted would show the stub again.
        if name is not None:
            fs.cache.forget(("object", f"cases/images/{name}/"))
        else:
            fs.cache.forget_matching(_image_object_key)

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        return {}

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        if not is_uuid(name) or fs.is_known_absent(self, name):
            raise NotFound(f"images/{name}: not a pk or known absent")
        return await fs.cache.get(("image-dir", name), lambda: self._lookup(fs, name))

    async def _lookup(self, fs: GcFilesystem, pk: str) -> Node:
        try:
            image = await fs.api_object(f"cases/images/{pk}/")
        except NotFound:
            image = None
        if isinstance(image, dict):
            fetched_at = fs.cache.fetched_at(("object", f"cases/images/{pk}/"))
            image_dir = ImageDir(f"image:{pk}", pk, image, fetched_at)
            return fs.inodes.add(describe(image_dir, "image", image))
        # 404 for hidden and absent alike; the job filter validates pks against all images.
        existence = await fs.api.filter_oracle("algorithms/jobs/", "input_image", pk)
        if existence.value == "absent":
            fs.remember_absent(self, pk)
            raise NotFound(f"images/{pk}: does not exist")
        url = f"{fs.api.api_url}cases/images/{pk}/"

        def readme() -> bytes:  # made when read: it names the mount point
            return render.hidden_image_readme(
                pk, url, username=fs.username, ttl=fs.ttl, mountpoint=fs.mountpoint
            )

        return fs.inodes.add(stub_dir(f"stub:image:{pk}", pk, readme, exists=True))


__all__ = [
    "EntriesDir",
    "ImagesRootDir",
    "RemoteFileNode",
    "TableFile",
    "algorithm_contents",
    "archive_contents",
    "reader_study_contents",
]
