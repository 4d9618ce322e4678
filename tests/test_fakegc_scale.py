"""The fake at issue 15's scale: archives of a million generated items (World.add_generated_items).

Items of a generated block are made on demand by index, so creating a million costs one object,
a page costs its own items, and a detail lookup inverts the pk (the index is its low 48 bits).
These tests hold them to what a built item is: the same JSON, the same paging, oracles and
visibility. Memory is asserted through tracemalloc, never through seconds.
"""

from __future__ import annotations

import json
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gcfs.fakegc import DEMO_B_TOKEN, DEMO_TOKEN, FakeGC, GeneratedItems, World
from gcfs.fakegc.api import Request, Site
from gcfs.fakegc.serializers import Serializer, json_text
from gcfs.fakegc.world import Archive

SAMPLES = Path("/work/shared/gc-samples")
BASE = "http://testserver"
MILLION = 1_000_000
ABSENT = "00000000-0000-4000-8000-000000000000"


def world_with(count: int, built: int = 0) -> tuple[World, Archive, GeneratedItems]:
    """demo sees archive "big" (`built` built items, then `count` generated); demo-b does not."""
    w = World()
    w.add_user("demo", DEMO_TOKEN)
    w.add_user("demo-b", DEMO_B_TOKEN)
    age = w.add_socket("patient-age", kind="Integer")
    archive = w.add_archive("big", viewers={"demo"})
    for n in range(built):
        w.add_archive_item(archive, [w.add_value(age, n)], title=f"built-{n}")
    return w, archive, w.add_generated_items(archive, count, age)


@pytest.fixture(scope="module")
def million() -> tuple[World, Archive, GeneratedItems]:
    return world_with(MILLION)


def get(site: Site, target: str, token: str | None = DEMO_TOKEN) -> tuple[int, Any]:
    reply = site.handle(Request("GET", target, f"Bearer {token}" if token else None))
    return reply.status, json.loads(reply.body)


def page(site: Site, archive: Archive, offset: int, limit: int = 1000) -> dict[str, Any]:
    status, body = get(
        site, f"/api/v1/archives/items/?archive={archive.pk}&limit={limit}&offset={offset}"
    )
    assert status == 200, body
    return dict(body)


def test_a_million_items_cost_one_object() -> None:
    """Creating 1,000,000 items allocates a few hundred bytes, not a table per item."""
    w = World()
    age = w.add_socket("patient-age", kind="Integer")
    archive = w.add_archive("big")
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        generated = w.add_generated_items(archive, MILLION, age)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Measured ~1.4 KB; a dict of a million pks alone would be ~40 MiB.
    assert peak - before < 64 * 1024
    assert len(generated) == MILLION
    assert archive.generated == [generated]
    assert w.archive_items == {}


def test_pages_first_middle_last(million: tuple[World, Archive, GeneratedItems]) -> None:
    """count is right on every page; pages hold the items at their offsets, in index order."""
    w, archive, generated = million
    site = Site(w, BASE)
    for offset in (0, 1000, 500_000, 999_000):
        body = page(site, archive, offset)
        assert body["count"] == MILLION
        titles = [r["title"] for r in body["results"]]
        assert titles == [f"item-{i:07d}" for i in range(offset, offset + 1000)]
        assert [r["pk"] for r in body["results"]] == [
            generated.pk(i) for i in range(offset, offset + 1000)
        ]
    last = page(site, archive, 999_500)
    assert len(last["results"]) == 500
    assert last["next"] is None
    assert last["previous"] == (
        f"{BASE}/api/v1/archives/items/?archive={archive.pk}&limit=1000&offset=998500"
    )
    beyond = page(site, archive, MILLION)
    assert (beyond["count"], beyond["results"]) == (MILLION, [])


def test_limit_is_clamped_and_results_counted(
    million: tuple[World, Archive, GeneratedItems],
) -> None:
    """limit=5000 gives DRF's 1000; the reply counts 1000 results for the per-item latency."""
    w, archive, _ = million
    site = Site(w, BASE)
    reply = site.handle(
        Request(
            "GET",
            f"/api/v1/archives/items/?archive={archive.pk}&limit=5000&offset=10",
            f"Bearer {DEMO_TOKEN}",
        )
    )
    body = json.loads(reply.body)
    assert len(body["results"]) == 1000
    assert reply.results == 1000
    assert body["next"].endswith("limit=1000&offset=1010")


def test_walk_has_no_duplicates_or_gaps() -> None:
    """Paging through 25,000 items with gcapi's pages of 100 then pages of 1000 sees each once,
    the built items first."""
    w, archive, generated = world_with(24_990, built=10)
    site = Site(w, BASE)
    for limit in (1000, 100):
        seen: list[str] = []
        offset = 0
        while True:
            results = page(site, archive, offset, limit)["results"]
            if not results:
                break
            seen += [r["pk"] for r in results]
            offset += limit
        assert len(seen) == 25_000
        assert len(set(seen)) == 25_000
        assert seen[:10] == [i.pk for i in archive.items]
        assert seen[10:] == [generated.pk(i) for i in range(24_990)]


def test_page_across_built_and_generated() -> None:
    """A page that starts among the built items ends among the generated ones."""
    w, archive, _ = world_with(100, built=3)
    body = page(Site(w, BASE), archive, 1, 4)
    assert body["count"] == 103
    assert [r["title"] for r in body["results"]] == [
        "built-1",
        "built-2",
        "item-0000000",
        "item-0000001",
    ]


def test_detail_inverts_the_pk(million: tuple[World, Archive, GeneratedItems]) -> None:
    """Detail of a generated pk is the item the list shows at that index; a pk of the block
    beyond its count, or in another block's space, is 404."""
    w, archive, generated = million
    site = Site(w, BASE)
    for index in (0, 123_456, MILLION - 1):
        status, body = get(site, f"/api/v1/archives/items/{generated.pk(index)}/")
        assert status == 200
        (listed,) = page(site, archive, index, 1)["results"]
        assert body == listed
        assert generated.index_of(body["pk"]) == index
    beyond = generated.pk(MILLION)
    assert get(site, f"/api/v1/archives/items/{beyond}/") == (
        404,
        {"detail": "No ArchiveItem matches the given query."},
    )
    assert generated.index_of(beyond) is None
    assert w.archive_item(ABSENT) is None
    # Upper-case hex is the same UUID: DRF's lookup goes through UUIDField too.
    status, _ = get(site, f"/api/v1/archives/items/{generated.pk(7).upper()}/")
    assert status == 200


def test_pks_are_uuids_of_their_block(million: tuple[World, Archive, GeneratedItems]) -> None:
    """Generated pks are canonical version-5 UUIDs, and two blocks never share a prefix."""
    generated = million[2]
    pk = uuid.UUID(generated.pk(MILLION - 1))
    assert (pk.version, pk.variant) == (5, uuid.RFC_4122)
    assert str(pk) == generated.pk(MILLION - 1)
    other = World()
    other.add_socket("patient-age", kind="Integer")
    second_archive = other.add_archive("big")  # the same archive pk, in another world
    first = other.add_generated_items(second_archive, 10, "patient-age")
    second = other.add_generated_items(second_archive, 10, "patient-age")
    assert first.pk(0) == generated.pk(0)  # deterministic: same archive, same block
    assert first.pk_head != second.pk_head
    found = other.archive_item(second.pk(3))
    assert found is not None
    assert (found.title, found.archive) == ("item-0000003", second_archive)
    assert other.archive_item(first.pk(3)) is not None
    assert other.archive_item(first.pk(10)) is None


def test_same_json_as_a_built_item() -> None:
    """A generated item serializes as the item the benchmark builds with add_archive_item (one
    Value each), pks aside, with the keys of the real server's item in its order."""
    w, archive, generated = world_with(5)
    age = w.sockets_by_slug["patient-age"]
    built = w.add_archive_item(
        archive, [w.add_value(age, generated.value(3))], title="item-0000003"
    )
    site = Site(w, BASE)
    _, ours = get(site, f"/api/v1/archives/items/{generated.pk(3)}/")
    _, theirs = get(site, f"/api/v1/archives/items/{built.pk}/")
    assert ours["values"][0]["pk"] == generated.civ_base + 3
    for body in (ours, theirs):
        body["pk"] = body["values"][0]["pk"] = None
    assert ours == theirs
    real = json.loads((SAMPLES / "archives-items-detail.json").read_text())["body"]
    assert list(ours) == list(real)
    assert list(ours["values"][0]) == list(real["values"][0])
    assert list(ours["values"][0]["interface"]) == list(real["values"][0]["interface"])


@pytest.mark.parametrize("socket_field", [False, True], ids=["interface", "socket-too"])
def test_template_matches_serializing_each_item(socket_field: bool) -> None:
    """The template behind generated pages gives what serializing each item gives, for values
    of every JSON type, titles that need escaping, and an archive field holding a slot
    character (then it falls back to serializing each item)."""
    w = World()
    w.add_socket("anything", kind="Anything")
    archive = w.add_archive("odd", view_content={"main": ["\ue000pk"]})
    kinds: list[Any] = [7, 2.5, True, None, 'ü"x', {"a": [1, "é"]}, [], 10**20]
    generated = w.add_generated_items(
        archive,
        len(kinds),
        "anything",
        value=lambda i: kinds[i],
        title_format='case "{index}" ü',
    )
    plain = w.add_archive("plain")
    plain_items = w.add_generated_items(plain, len(kinds), "anything", value=lambda i: kinds[i])
    ser = Serializer(BASE, socket_field)
    for block in (generated, plain_items):
        expected = [json_text(ser.archive_item(block.item(i))) for i in range(len(kinds))]
        assert ser.generated_items_json(block, 0, len(kinds)) == expected
        assert ser.generated_items_json(block, 2, 5) == expected[2:5]
        assert ser.generated_items_json(block, 3, 3) == []


def test_oracles_and_visibility(million: tuple[World, Archive, GeneratedItems]) -> None:
    """A user who does not see the archive's items gets count 0 and 404s, as for built items;
    the filter still answers 400 for an absent or malformed archive pk."""
    w, archive, generated = million
    site = Site(w, BASE)
    status, body = get(site, f"/api/v1/archives/items/?archive={archive.pk}", DEMO_B_TOKEN)
    assert (status, body["count"], body["results"]) == (200, 0, [])
    status, _ = get(site, f"/api/v1/archives/items/{generated.pk(5)}/", DEMO_B_TOKEN)
    assert status == 404
    status, _ = get(site, f"/api/v1/archives/items/{generated.pk(5)}/", None)
    assert status == 404
    assert get(site, f"/api/v1/archives/items/?archive={ABSENT}") == (
        400,
        {"archive": ["Select a valid choice. That choice is not one of the available choices."]},
    )
    assert get(site, "/api/v1/archives/items/?archive=foo") == (
        400,
        {"archive": ["\u201cfoo\u201d is not a valid UUID."]},
    )
    # Without a filter (or an empty one) every visible item is listed, generated ones too.
    status, body = get(site, "/api/v1/archives/items/?archive=&limit=2&offset=999999")
    assert (status, body["count"]) == (200, MILLION)
    assert [r["pk"] for r in body["results"]] == [generated.pk(MILLION - 1)]
    status, body = get(site, "/api/v1/archives/items/", DEMO_B_TOKEN)
    assert body["count"] == 0


def test_generated_values_have_no_file(million: tuple[World, Archive, GeneratedItems]) -> None:
    """/media/ for a generated value's pk: "File not found." to a viewer (a Value has no file),
    the plain 404 to anyone else, as for built values."""
    w, _, generated = million
    civ_pk = generated.civ_base + 42
    assert w.generated_civ(civ_pk) is not None
    assert w.generated_civ(generated.civ_base + MILLION) is None
    assert w.generated_civ(1) is None
    with FakeGC(w) as fake:
        path = f"/media/components/componentinterfacevalue/00/2a/{civ_pk}/patient-age.json"
        mine = httpx.get(fake.base_url + path, headers={"Authorization": f"Bearer {DEMO_TOKEN}"})
        theirs = httpx.get(
            fake.base_url + path, headers={"Authorization": f"Bearer {DEMO_B_TOKEN}"}
        )
    assert mine.status_code == theirs.status_code == 404
    assert "File not found." in mine.text
    assert "File not found." not in theirs.text


def test_only_value_sockets() -> None:
    """Generated items hold Value sockets only: no files or images to make up."""
    w = World()
    w.add_socket("ct-image", kind="Image")
    archive = w.add_archive("a")
    with pytest.raises(ValueError, match="Value socket"):
        w.add_generated_items(archive, 10, "ct-image")


@pytest.fixture
def served(million: tuple[World, Archive, GeneratedItems]) -> Iterator[FakeGC]:
    with FakeGC(million[0]) as fake:
        yield fake


def test_request_log_over_http(
    served: FakeGC, million: tuple[World, Archive, GeneratedItems]
) -> None:
    """Over real HTTP the pages of a generated archive are logged and counted like any list."""
    _, archive, generated = million
    headers = {"Authorization": f"Bearer {DEMO_TOKEN}"}
    with httpx.Client(base_url=served.base_url + "/api/v1/", headers=headers) as client:
        for offset in (0, 999_000):
            response = client.get(
                "archives/items/", params={"archive": archive.pk, "limit": 1000, "offset": offset}
            )
            assert response.json()["results"][0]["pk"] == generated.pk(offset)
        assert client.get(f"archives/items/{generated.pk(1)}/").status_code == 200
    assert served.count("archives-items-list") == 2
    assert served.count("archives-items-detail") == 1
    assert [r.query.get("offset") for r in served.requests][:2] == ["0", "999000"]
