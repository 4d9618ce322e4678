"""Issue 16, tables: items.csv, display-sets.csv and jobs.csv (gcfs/tables.py, tree.TableFile).

Real mounts against the fake on 127.0.0.1. Every cell is compared with the object's JSON as
the fake serves it, and every path a cell names is opened: its bytes are the value's (sha256
equal to a download the way a client makes it).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gcfs import layout
from gcfs.fakegc import DEMO_TOKEN, FakeGC
from tests.conftest import Mount, poll
from tests.test_metadata_store import big_archive

AUTH = {"Authorization": f"Bearer {DEMO_TOKEN}"}
MiB = 2**20
# Files larger than this (the demo's 300 MiB slide) are compared by size and first MiB.
WHOLE = 20 * MiB


def api(fake: FakeGC, path: str, **params: Any) -> Any:
    response = httpx.get(
        f"{fake.base_url}/api/v1/{path}", params={"limit": 1000, **params}, headers=AUTH
    )
    response.raise_for_status()
    return response.json()


def pk_of(fake: FakeGC, collection: str, slug: str) -> str:
    return str(api(fake, f"{collection}/", slug=slug)["results"][0]["pk"])


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a table; its stat size is its length, every row is full."""
    size = os.stat(path).st_size
    data = path.read_bytes()
    assert size == len(data) > 0
    assert data.endswith(b"\r\n")
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    header, body = rows[0], rows[1:]
    assert len(set(header)) == len(header)
    assert all(len(row) == len(header) for row in body)
    return header, [dict(zip(header, row, strict=True)) for row in body]


def download(fake: FakeGC, url: str, limit: int | None = None) -> tuple[int, bytes]:
    """Size and bytes (the first `limit`) of a /media/ file, fetched as a client would."""
    redirect = httpx.get(url, headers=AUTH, follow_redirects=False)
    assert redirect.status_code == 302, url
    headers = {"Range": f"bytes=0-{limit - 1}"} if limit else {}
    response = httpx.get(redirect.headers["location"], headers=headers, timeout=60)
    response.raise_for_status()
    if limit:
        return int(response.headers["content-range"].rsplit("/", 1)[1]), response.content
    return len(response.content), response.content


def assert_same_file(fake: FakeGC, path: Path, url: str) -> None:
    size = os.stat(path).st_size
    if size > WHOLE:
        total, head = download(fake, url, MiB)
        with open(path, "rb", buffering=0) as handle:
            # No read-ahead: a read the kernel started beyond what we read would be answered
            # after the close, which the daemon logs as an error.
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            assert os.pread(handle.fileno(), MiB, 0) == head
        assert size == total
        return
    total, data = download(fake, url)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert size == total


def check_value_cell(
    fake: FakeGC, table_dir: Path, base: str, cell: str, value: dict[str, Any] | None
) -> str:
    """Check one socket cell against its value (None: the row has none); the kind checked."""
    if value is None:
        assert cell == ""
        return "none"
    segments = layout.path_segments(layout.socket_of(value).get("relative_path") or "")
    at = "/".join([base, *segments])
    if value.get("image"):
        image = httpx.get(value["image"], headers=AUTH).json()
        files = {
            layout.file_name_of(f["file"]): f["file"]
            for f in image["files"]
            if f["image_type"] != "DZI"
        }
        if not files:  # a DICOM set: its directory, holding the instances
            assert image["dicom_image_set"] and cell == at
            names = os.listdir(table_dir / cell)
            assert names and all(n.endswith(".dcm") for n in names)
            return "dicom"
        directory, _, name = cell.rpartition("/")
        assert directory == at and name in files
        if any(n.endswith(".mhd") for n in files):
            assert name.endswith(".mhd")  # a header/data pair: the header, which finds its data
            assert set(files) <= set(os.listdir(table_dir / directory))
        else:
            assert name.endswith((".mha", ".tif"))
        assert_same_file(fake, table_dir / cell, files[name])
        return "image"
    if value.get("file"):
        assert cell == at
        assert_same_file(fake, table_dir / cell, value["file"])
        return "file"
    assert cell == json.dumps(value["value"])
    assert (table_dir / at).read_bytes() == cell.encode()
    return "value"


def values_by_slug(values: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {layout.socket_of(v)["slug"]: v for v in values}


def socket_columns(header: list[str], fixed: list[str]) -> list[str]:
    assert header[: len(fixed)] == fixed
    return header[len(fixed) :]


def test_items_csv_cells_are_the_values_and_paths_that_open(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """items.csv of each demo archive: one row per item in listing order, pk and title as
    served, a column per socket (sorted by slug, the union over the items), and every cell
    the value's JSON (the value file's bytes) or a path that opens to the value's bytes: an
    .mha, the .mhd of an .mhd/.zraw pair, a .tif, a file, a DICOM set's directory."""
    mount = mount_gcfs()
    kinds: set[str] = set()
    for slug in ("lidc-lung-ct", "prostate-mri-picai"):
        table_dir = mount.path / "archives" / slug
        header, rows = read_table(table_dir / "items.csv")
        # The size a directory listing gives (READDIRPLUS) is true too.
        sizes = {entry.name: entry.stat().st_size for entry in os.scandir(table_dir)}
        assert sizes["items.csv"] == len((table_dir / "items.csv").read_bytes())
        assert os.getxattr(table_dir / "items.csv", "user.gc.kind") == b"items-csv"
        items = api(fake, "archives/items/", archive=pk_of(fake, "archives", slug))["results"]
        sockets = socket_columns(header, ["pk", "title"])
        expected = {layout.socket_of(v)["slug"] for item in items for v in item["values"]}
        assert sockets == sorted(expected)
        assert [row["pk"] for row in rows] == [item["pk"] for item in items]
        assert sorted(os.listdir(table_dir / "items")) == sorted(row["pk"] for row in rows)
        for row, item in zip(rows, items, strict=True):
            assert row["title"] == item["title"]
            values = values_by_slug(item["values"])
            for socket in sockets:
                base = f"items/{item['pk']}"
                kinds.add(check_value_cell(fake, table_dir, base, row[socket], values.get(socket)))
    assert kinds == {"none", "image", "dicom", "file", "value"}


def test_display_sets_csv_cells_are_the_values_and_paths_that_open(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """display-sets.csv: pk, title, order, then a column per socket, every cell checked."""
    mount = mount_gcfs()
    checked = 0
    for slug in ("lung-nodule-reader-study", "prostate-mri-reader-study"):
        table_dir = mount.path / "reader-studies" / slug
        header, rows = read_table(table_dir / "display-sets.csv")
        kind = os.getxattr(table_dir / "display-sets.csv", "user.gc.kind")
        assert kind == b"display-sets-csv"
        study = pk_of(fake, "reader-studies", slug)
        display_sets = api(fake, "reader-studies/display-sets/", reader_study=study)["results"]
        assert display_sets
        sockets = socket_columns(header, ["pk", "title", "order"])
        expected = {layout.socket_of(v)["slug"] for ds in display_sets for v in ds["values"]}
        assert sockets == sorted(expected)
        assert [row["pk"] for row in rows] == [ds["pk"] for ds in display_sets]
        for row, ds in zip(rows, display_sets, strict=True):
            assert row["title"] == ds["title"]
            assert row["order"] == str(ds["order"])
            values = values_by_slug(ds["values"])
            for socket in sockets:
                base = f"display-sets/{ds['pk']}"
                check_value_cell(fake, table_dir, base, row[socket], values.get(socket))
                checked += 1
    assert checked


def test_jobs_csv_columns_and_cells(mount_gcfs: Callable[..., Mount], fake: FakeGC) -> None:
    """jobs.csv: pk, status (no `created`: jobs have none), then `input:<slug>` and
    `output:<slug>` columns; every cell as in items.csv: a value's bytes, a file's path, an
    image's `.mha` (or `.mhd`, `.tif`, DICOM directory) under inputs/ or outputs/, opened and
    compared with the server's bytes. The job image filters fail as on the real server (500),
    so the images come one by one, as for the jobs' inputs/ and outputs/ directories."""
    mount = mount_gcfs()
    kinds: list[str] = []
    for slug in ("corads-ai", "nodule-detector"):
        table_dir = mount.path / "algorithms" / slug
        header, rows = read_table(table_dir / "jobs.csv")
        assert os.getxattr(table_dir / "jobs.csv", "user.gc.kind") == b"jobs-csv"
        algorithm = pk_of(fake, "algorithms", slug)
        jobs = api(fake, "algorithms/jobs/", algorithm_image__algorithm=algorithm)["results"]
        sockets = socket_columns(header, ["pk", "status"])
        expected = [
            f"{key[:-1]}:{s}"
            for key in ("inputs", "outputs")
            for s in sorted({layout.socket_of(v)["slug"] for job in jobs for v in job[key]})
        ]
        assert sockets == expected
        assert [row["pk"] for row in rows] == [job["pk"] for job in jobs]
        for row, job in zip(rows, jobs, strict=True):
            assert row["status"] == job["status"]
            for column in sockets:
                group, _, socket = column.partition(":")
                key = f"{group}s"
                value = values_by_slug(job[key]).get(socket)
                base = f"jobs/{job['pk']}/{key}"
                kinds.append(check_value_cell(fake, table_dir, base, row[column], value))
    assert "image" in kinds and "value" in kinds


def test_a_table_of_10000_items_costs_only_its_listing(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """items.csv of 10,000 generated items (Value sockets): the item listing's pages are
    its only requests (no request per row, no image listing: no item names an image), its
    rows are the items with their values, listing the items directory afterwards costs
    nothing, and a second daemon within the TTL serves the same bytes from the metadata
    store with no request at all."""
    count = 10_000
    pks = big_archive(world, count)
    archive = world.find_by_slug(world.archives.values(), "big")
    generated = archive.generated[0]
    mount = mount_gcfs()
    table = mount.path / "archives" / "big" / "items.csv"
    os.stat(table.parent)
    fake.reset_counts()
    header, rows = read_table(table)
    assert {r.endpoint for r in fake.requests} == {"archives-items-list"}
    assert fake.count("archives-items-list") == 1 + (count - 100 + 999) // 1000
    assert header == ["pk", "title", "big-age"]
    assert [row["pk"] for row in rows] == pks
    socket = generated.socket.relative_path
    for index in (0, 1, 4567, count - 1):
        row = rows[index]
        assert row["title"] == f"item-{index:07d}"
        assert row["big-age"] == json.dumps(generated.value(index))
        assert (table.parent / "items" / row["pk"] / socket).read_bytes() == row["big-age"].encode()
    fake.reset_counts()
    assert len(os.listdir(table.parent / "items")) == count
    assert table.read_bytes() == (data := table.read_bytes())
    assert fake.requests == []
    mount.unmount()
    second = mount_gcfs()
    fake.reset_counts()
    assert (second.path / "archives" / "big" / "items.csv").read_bytes() == data
    assert fake.requests == []


def test_a_table_changes_when_its_listing_does(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """The bytes stay the same while the listing does, and once the listing is fetched again
    (a 1 s TTL here) with a new item, the table has its row and a true size."""
    mount = mount_gcfs("--ttl", "1")
    table = mount.path / "archives" / "lidc-lung-ct" / "items.csv"
    _, before = read_table(table)
    archive = world.find_by_slug(world.archives.values(), "lidc-lung-ct")
    value = world.add_value("patient-age", 99)
    item = world.add_archive_item(archive, [value], title="LIDC-IDRI-NEW")

    def has_row() -> bool:
        # The kernel keeps a file's size for the attribute lifetime (the TTL): until it asks
        # again, a stat may give the previous listing's size.
        data = table.read_bytes()
        return item.pk.encode() in data and os.stat(table).st_size == len(data)

    poll(has_row, 30, "the new item's row")
    _, after = read_table(table)
    assert [row["pk"] for row in after[:-1]] == [row["pk"] for row in before]
    new = after[-1]
    assert new["title"] == "LIDC-IDRI-NEW" and new["patient-age"] == "99"
    assert new["ct-image"] == ""


def test_a_table_whose_listing_fails_leaves_its_directory_listing(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """The server fails the item listing: the archive's directory still lists (a table is
    listed before it is rendered), items.csv itself is EIO (stat and read), and once the
    server answers the table is back."""
    mount = mount_gcfs()
    directory = mount.path / "archives" / "lidc-lung-ct"
    fake.faults.configure(error_rates={500: 1.0}, only={"archives-items-list"})
    assert sorted(os.listdir(directory)) == ["archive.json", "items", "items.csv"]
    for attempt in (os.stat, Path.read_bytes):
        with pytest.raises(OSError) as failed:
            attempt(directory / "items.csv")
        assert failed.value.errno == errno.EIO
    fake.faults.clear()

    def back() -> bool:
        try:
            return "items.csv" in os.listdir(directory) and bool(
                read_table(directory / "items.csv")[1]
            )
        except OSError:
            return False

    poll(back, 15, "items.csv once the listing answers")


def test_listing_a_large_archive_does_not_wait_for_its_table(
    mount_gcfs: Callable[..., Mount], fake: FakeGC, world: Any
) -> None:
    """`ls` of an archive whose item listing is still arriving answers at once: the table
    is listed before it is rendered (no item listing request at all for the `ls`), and its
    size is true as soon as a program looks at it (stat waits for the listing and the
    render, and equals the bytes read)."""
    big_archive(world, 3000)
    mount = mount_gcfs()
    directory = mount.path / "archives" / "big"
    fake.reset_counts()
    fake.faults.hold_pages_from = 100
    try:
        assert sorted(os.listdir(directory)) == ["archive.json", "items", "items.csv"]
        assert fake.count("archives-items-list") == 0
    finally:
        fake.faults.hold_pages_from = None
    size = os.stat(directory / "items.csv").st_size
    data = (directory / "items.csv").read_bytes()
    assert size == len(data) and data.count(b"\r\n") == 3001
    # What a directory walk sees (scandir's stat) is the same true size.
    sizes = {e.name: e.stat().st_size for e in os.scandir(directory) if e.is_file()}
    assert sizes["items.csv"] == size


def test_a_render_that_outlives_its_operation_finishes_for_the_next_look(
    mount_gcfs: Callable[..., Mount], fake: FakeGC
) -> None:
    """A table whose render takes longer than the operation that asked for it (a deadline of
    4 s here; a table of millions of rows with the default 60 s): that operation gets EIO,
    the render goes on in the background and is stored, and the next look reads it at once,
    rendered once. Every answer takes 1.5 s (within the 2 s an attempt may take), and jobs.csv
    needs three rounds of them: the jobs, each job's image filters (which fail with 500 as on
    the real server), then each image."""
    mount = mount_gcfs("--timeout", "4")
    table = mount.path / "algorithms" / "corads-ai" / "jobs.csv"
    assert "jobs.csv" in os.listdir(table.parent)
    fake.faults.configure(stall_rate=1.0, stall_seconds=1.5, spare={"profiles-self"})
    with pytest.raises(OSError) as late:
        table.read_bytes()
    assert late.value.errno == errno.EIO

    def rendered() -> list[str]:
        return [
            line
            for line in mount.log_text().splitlines()
            if "jobs.csv" in line and "rendered" in line
        ]

    # Nothing looks at the mount meanwhile: the render that line reports is the first one,
    # finishing after its operation gave up (before the change, it was cancelled with it).
    poll(lambda: bool(rendered()), 60, "the render to finish in the background")
    fake.faults.clear()
    fake.reset_counts()
    header, rows = read_table(table)
    assert header[:2] == ["pk", "status"] and len(rows) == 3
    assert fake.requests == []  # the stored render, within the TTL
    assert len(rendered()) == 1, rendered()
