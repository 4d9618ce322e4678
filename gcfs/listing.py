"""Listings that stream into the metadata store and are read back from it.

A `Listing` is one generation of one paged listing (`archives/items/?archive=<pk>`): either
complete (fetched earlier, by this daemon or one before it) or filling. Filling, its first page
is stored before anyone waits for more, and the other pages (up to PAGE_CONCURRENCY at once)
are stored as they arrive, by a task in the daemon's nursery. Readers see positions
`[0, filled)`: the prefix whose pages all arrived, so `readdir` can answer the first 100
entries of a 200,000-item directory after one request and go on as pages land, and its offsets
(positions + 1 in this generation) stay valid while it fills. A refresh makes a new generation;
directory handles pin theirs (`pin`/`unpin`) until they are closed, so an `ls` that straddles a
refresh sees one listing, every entry once.

Each page has the request's own deadline (the retry budget), not the listing as a whole: a
server that needs minutes for all its pages still lists. A page that fails after its retries
fails the generation (`error`): readers waiting on it get the error, and the half listing is
deleted, never taken for complete.

`Listings` makes and finds them, and keeps a bounded LRU of parsed objects, so memory holds
what is being looked at, not the listing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import trio
from cachetools import LRUCache

from . import background
from .api import FIRST_PAGE_SIZE, PAGE_CONCURRENCY, PAGE_SIZE, GcApiClient
from .errors import GcfsError, Unavailable
from .metastore import MetadataStore, StoreError, encode, key_text, now

log = logging.getLogger(__name__)

Params = Mapping[str, str]
JSONObject = dict[str, Any]

# Parsed objects kept in memory: what a user walking through items looks at (an item's JSON
# is ~1.3 KiB on the wire, ~5 KiB parsed), so 4,096 of them cost ~20 MiB at most.
OBJECT_CACHE_SIZE = 4096
# Store calls that write (pages) run in at most this many threads at once: one writer
# connection serialises them anyway, and more would only hold parsed pages longer.
WRITE_THREADS = 2
# Entries read from the store per query when a listing is walked.
BATCH = 512


class Listing:
    """One generation of a listing (see the module docstring)."""

    def __init__(
        self,
        owner: Listings,
        key: str,
        generation: int,
        started_at: float,
        *,
        complete: bool,
        count: int | None = None,
    ) -> None:
        self.owner = owner
        self.key = key
        self.generation = generation
        self.started_at = started_at  # wall clock: when its first page was asked for
        self.complete = complete
        self.count = count
        self.filled = count if complete and count is not None else 0
        self.error: GcfsError | None = None
        self._changed = trio.Event()
        # Page boundaries and which pages arrived, while filling.
        self._bounds: list[int] = []
        self._arrived: set[int] = set()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"filled {self.filled}"
        return f"<Listing {self.key} #{self.generation} {state}>"

    # -- waiting --------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_filled(self, position: int) -> None:
        """Wait until `position` is filled (its page and every page before it arrived) or the
        listing is complete."""
        while not self.complete and self.filled <= position:
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    async def names_from(self, start: int) -> list[tuple[int, str]]:
        """The next entries at positions >= start, waiting for pages as needed; [] at the end.
        Positions that duplicates left empty are skipped."""
        while True:
            await self.wait_filled(start)
            rows = self.names(start)
            if rows or self.complete:
                return rows
            start = max(start, self.filled)

    async def wait_complete(self) -> None:
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    # -- reading --------------------------------------------------------------------------

    def names(self, start: int, limit: int = BATCH) -> list[tuple[int, str]]:
        """(position, pk) of stored entries at positions >= start, in order, within what is
        filled (a later page may have landed before an earlier one: not yet)."""
        end = None if self.complete else self.filled
        return self.owner.store.positions(self.generation, start, limit, end)

    def object(self, pk: str) -> JSONObject | None:
        """The object `pk` as listed here (parsed, from the LRU or the store)."""
        return self.owner.parsed(self.generation, pk)

    async def find(self, pk: str) -> JSONObject | None:
        """The object `pk`, waiting for more pages while it may still come."""
        while True:
            found = self.object(pk)
            if found is not None or self.complete:
                return found
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    def objects_among(self, pks: list[str]) -> dict[str, JSONObject]:
        bodies = self.owner.store.find_many(self.generation, pks)
        return {pk: json.loads(body) for pk, body in bodies.items()}

    def all_objects(self) -> list[JSONObject]:
        """Every object, in order: for listings that are rendered whole (answers.json, the
        collections); never for the item listings that may be huge."""
        found: list[JSONObject] = []
        start = 0
        while True:
            rows = self.owner.store.bodies(self.generation, start, BATCH)
            if not rows:
                return found
            found.extend(json.loads(body) for _, body in rows)
            start = rows[-1][0] + 1

    def iter_names(self) -> Iterator[str]:
        start = 0
        while True:
            rows = self.names(start)
            if not rows:
                return
            yield from (pk for _, pk in rows)
            start = rows[-1][0] + 1

    def __len__(self) -> int:
        return self.owner.store.entry_count(self.generation)

    # -- filling (Listings only) --------------------------------------------------------------

    def _plan(self, count: int, first: int) -> list[int]:
        self._bounds = [0, first, *range(first + PAGE_SIZE, count, PAGE_SIZE)]
        self._bounds = [b for b in self._bounds if b < max(count, first)] + [max(count, first)]
        return self._bounds

    def _page_arrived(self, offset: int) -> None:
        self._arrived.add(offset)
        bounds = self._bounds
        index = bounds.index(self.filled) if self.filled in bounds else len(bounds) - 1
        while index < len(bounds) - 1 and bounds[index] in self._arrived:
            index += 1
        self.filled = bounds[index]
        self._notify()


class Listings:
    """Makes, keeps track of and reads listings (see the module docstring)."""

    def __init__(self, api: GcApiClient, store: MetadataStore) -> None:
        self.api = api
        self.store = store
        self.nursery: trio.Nursery | None = None
        self._parsed: LRUCache[tuple[int, str], JSONObject] = LRUCache(OBJECT_CACHE_SIZE)
        self._writers = trio.CapacityLimiter(WRITE_THREADS)
        # Generations that directory handles still read, by generation: bounded by the open
        # handles (the kernel's and the adapter's limits on open directories).
        self._pinned: dict[int, tuple[str, int]] = {}  # generation -> (key, handles)
        self._superseded: set[int] = set()  # pinned generations a newer one replaced
        self.pages_stored = 0
        # Told the cache key of a listing that failed half way (GcFilesystem: the cache entry
        # expires, so the next reader asks again instead of getting the error for a TTL).
        self.on_failed: Callable[[object], None] | None = None

    def parsed(self, generation: int, pk: str) -> JSONObject | None:
        cached = self._parsed.get((generation, pk))
        if cached is not None:
            return cached
        body = self.store.find(generation, pk)
        if body is None:
            return None
        obj: JSONObject = json.loads(body)
        self._parsed[(generation, pk)] = obj
        return obj

    def stored(self, key: object) -> Listing | None:
        """The newest complete listing of `key` in the store (however old), or None."""
        return self.latest(key_text(key))

    def latest(self, text: str) -> Listing | None:
        """The newest complete listing of the key whose store text is `text`, or None."""
        try:
            record = self.store.latest_listing(text)
        except StoreError:
            return None
        if record is None:
            return None
        return Listing(
            self,
            text,
            record.generation,
            record.started_at,
            complete=True,
            count=record.count,
        )

    async def fetch(self, key: object, path: str, params: Params) -> Listing:
        """A new generation of `key`: returns once its first page is stored; the other pages
        are stored by a task in the nursery (or before returning, without one)."""
        text = key_text(key)
        started = now()
        generation = await self._write(self.store.begin_listing, text, started)
        listing = Listing(self, text, generation, started, complete=False)
        try:
            count, first = await self.api.first_page(path, params)
            bounds = listing._plan(count, FIRST_PAGE_SIZE)
            await self._store_page(listing, 0, first)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abandon(listing)
            raise
        rest = bounds[1:-1]
        if not rest:
            await self._finish(listing, count)
        elif self.nursery is None:
            await self._fill(listing, path, params, rest, count)
        else:
            self.nursery.start_soon(
                self._fill_in_background, key, listing, path, params, rest, count
            )
        return listing

    async def _fill_in_background(
        self,
        key: object,
        listing: Listing,
        path: str,
        params: Params,
        offsets: list[int],
        count: int,
    ) -> None:
        try:
            await self._fill(listing, path, params, offsets, count)
        except GcfsError as exc:
            log.info("%s: listing failed after %d entries (%s)", path, listing.filled, exc)
            if self.on_failed is not None:
                self.on_failed(key)
        except Exception as exc:  # a bug: report it, keep the mount
            listing.error = listing.error or Unavailable(f"{path}: listing failed ({exc!r})")
            listing._notify()
            background.report_bug(f"filling {path}", exc)

    async def _fill(
        self, listing: Listing, path: str, params: Params, offsets: list[int], count: int
    ) -> None:
        limiter = trio.CapacityLimiter(PAGE_CONCURRENCY)
        try:

            async def page(offset: int) -> None:
                async with limiter:
                    _, objects = await self.api.page(path, params, offset=offset)
                    await self._store_page(listing, offset, objects)

            async with trio.open_nursery() as nursery:
                for offset in offsets:
                    nursery.start_soon(page, offset)
            await self._finish(listing, count)
        except BaseException as exc:
            error = _one(exc)
            listing.error = error if isinstance(error, GcfsError) else Unavailable(str(error))
            listing._notify()
            with trio.CancelScope(shield=True):
                await self._abandon(listing)
            raise

    async def _store_page(self, listing: Listing, offset: int, objects: list[JSONObject]) -> None:
        def encoded() -> list[tuple[str, str]]:
            pairs = []
            for obj in objects:
                pk = obj.get("pk")
                if isinstance(pk, str):
                    pairs.append((pk, encode(obj)))
            return pairs

        def write() -> None:
            self.store.add_page(listing.generation, offset, encoded())

        await self._write(write)
        self.pages_stored += 1
        listing._page_arrived(offset)

    async def _finish(self, listing: Listing, count: int) -> None:
        keep = [g for g, (key, _) in self._pinned.items() if key == listing.key]
        await self._write(self.store.complete_listing, listing.generation, count, keep)
        self._superseded.update(g for g in keep if g != listing.generation)
        listing.count = count
        listing.complete = True
        listing.filled = max(listing.filled, count)
        listing._notify()

    async def _abandon(self, listing: Listing) -> None:
        # Failing here is harmless: incomplete listings never survive a restart.
        with contextlib.suppress(StoreError, trio.TooSlowError):
            await self._write(self.store.drop_listing, listing.generation)

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._writers:
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)

    # -- handles ---------------------------------------------------------------------------

    def pin(self, listing: Listing) -> None:
        """A directory handle reads `listing`: its generation stays until `unpin`. Counted
        by generation (two Listing objects may stand for one generation)."""
        _, handles = self._pinned.get(listing.generation, (listing.key, 0))
        self._pinned[listing.generation] = (listing.key, handles + 1)

    def unpin(self, listing: Listing) -> None:
        key, handles = self._pinned.get(listing.generation, (listing.key, 1))
        if handles > 1:
            self._pinned[listing.generation] = (key, handles - 1)
            return
        self._pinned.pop(listing.generation, None)
        if listing.generation in self._superseded:
            self._superseded.discard(listing.generation)
            # Deleted in a worker thread (200,000 rows take a noticeable time); without a
            # nursery, at the next start (superseded generations never survive one).
            if self.nursery is not None:
                self.nursery.start_soon(self._abandon, listing)


def _one(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (pages fail alike: the first says it)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class ListingChildren(Mapping[str, Any]):
    """A directory's children as a mapping read from its listing, node by node: what
    `GcFilesystem.children` hands out for a directory of a listing that may be huge."""

    def __init__(self, listing: Listing, make: Callable[[str], Any]) -> None:
        self.listing = listing
        self._make = make

    def __getitem__(self, name: str) -> Any:
        if self.listing.object(name) is None:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self) -> Iterator[str]:
        return self.listing.iter_names()

    def __len__(self) -> int:
        return len(self.listing)
