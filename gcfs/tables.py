"""Pure part of the generated tables: `items.csv`, `display-sets.csv` and `jobs.csv`.

One row per listed object, one header row, UTF-8, RFC 4180 quoting with `\\r\\n` line ends (the
csv module's defaults, as answers.csv: what spreadsheets expect, and `pandas.read_csv` reads
it as it is). Columns:

- items.csv:         pk, title, then one column per socket slug
- display-sets.csv:  pk, title, order, then one column per socket slug
- jobs.csv:          pk, status, created (only when the listing has it: the real API does
                     not), then `input:<slug>` columns, then `output:<slug>` columns

Socket columns are the union over all rows, sorted by slug, so the order does not depend on
which object came first. A slug equal to a fixed column (`pk`, `title`, ...) is written as
`socket:<slug>` so that no two columns share a name.

A cell of a socket column is what the row's directory shows for that value, found by laying
the values out with layout.py (the one place that decides names, numbering included):
- Value socket: the JSON, exactly the bytes of the value file (`json.dumps(value)`).
- File socket: the file's path, relative to the table's directory (`items/<pk>/report.pdf`).
- Image socket: the path of the file a loader opens: its `.mha`, else the `.mhd` of a header
  and data pair, else its `.tif`; a DICOM set (no files) its directory; an image the token
  may not read, the README directory that stands for it.
- empty when the row has no value of that socket.

Nothing here does I/O; tree.py streams the listing through these functions in batches.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .errors import BadResponse

log = logging.getLogger(__name__)

ITEMS = "items"
DISPLAY_SETS = "display-sets"
JOBS = "jobs"

# Bumped when what a table holds changes, so a table rendered by an older gcfs and kept in
# the metadata store is rendered again.
FORMAT = 1
LINE_END = "\r\n"

# The file of an image that a loader opens, by extension, best first: SimpleITK reads `.mha`
# and `.mhd` (which names its `.zraw`), openslide and tifffile `.tif`.
_PREFERRED = (".mha", ".mhd", ".tif", ".tiff")

_FIXED = {
    ITEMS: ("pk", "title"),
    DISPLAY_SETS: ("pk", "title", "order"),
    JOBS: ("pk", "status"),
}
# Which value lists of an object have columns, and the column name prefix of each.
_GROUPS = {
    ITEMS: (("values", ""),),
    DISPLAY_SETS: (("values", ""),),
    JOBS: (("inputs", "input:"), ("outputs", "output:")),
}


def slug_of(value: object) -> str | None:
    if not isinstance(value, Mapping):
        return None
    slug = layout.socket_of(value).get("slug")
    return slug if isinstance(slug, str) and slug else None


def _values(obj: Mapping[str, Any], key: str) -> list[Any]:
    values = obj.get(key)
    return values if isinstance(values, list) else []


@dataclass(slots=True)
class Columns:
    """The columns of a table, gathered over its rows (`add`) before any row is written."""

    kind: str
    sockets: dict[str, set[str]] = field(default_factory=dict)  # value list -> slugs
    created: bool = False

    def add(self, obj: Mapping[str, Any]) -> None:
        for key, _ in _GROUPS[self.kind]:
            slugs = self.sockets.setdefault(key, set())
            slugs.update(s for v in _values(obj, key) if (s := slug_of(v)) is not None)
        if self.kind == JOBS and "created" in obj:
            self.created = True

    def fixed(self) -> tuple[str, ...]:
        return (*_FIXED[self.kind], *(("created",) if self.created else ()))

    def socket_columns(self) -> list[tuple[str, str, str]]:
        """(column name, value list, slug) of every socket column, in order."""
        fixed = set(self.fixed())
        found = []
        for key, prefix in _GROUPS[self.kind]:
            for slug in sorted(self.sockets.get(key, ())):
                name = f"{prefix}{slug}"
                found.append((f"socket:{name}" if name in fixed else name, key, slug))
        return found

    def names(self) -> list[str]:
        return [*self.fixed(), *(name for name, _, _ in self.socket_columns())]


def image_pks(kind: str, obj: Mapping[str, Any]) -> set[str]:
    """The pks of the images an object's values name."""
    return {
        pk
        for key, _ in _GROUPS[kind]
        for v in _values(obj, key)
        if isinstance(v, Mapping) and (pk := layout.image_pk_of(v))
    }


def text(value: object) -> str:
    """A plain field's cell: strings as they are, null empty, anything else as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return ""


# Layouts of values that are all Value sockets, by their sockets (see `_inline_cells`): most
# rows of a large archive share one. Bounded; past it, rows are laid out one by one.
_SHAPES: dict[tuple[object, ...], dict[str, int]] = {}
SHAPES_MAX = 1024


def _inline_cells(values: Sequence[object], base: str) -> dict[str, str] | None:
    """The cells of values that are all Value sockets, or None for other values.

    Laying out costs ~35 us a row, most of it making the same names again: the names depend
    on the sockets only. So the layout is made once per set of sockets, with each value
    replaced by its index (its file then holds `json.dumps(index)`), and a row's cells are its
    values' `json.dumps`, which is what the layout writes into a value file."""
    shape: list[object] = []
    for value in values:
        if not isinstance(value, Mapping) or value.get("image") is not None:
            return None
        if value.get("file") is not None:
            return None
        socket = layout.socket_of(value)
        shape.append((socket.get("slug"), socket.get("relative_path"), socket.get("super_kind")))
    key = tuple(shape)
    indexes = _SHAPES.get(key)
    if indexes is None:
        numbered = [{**v, "value": n} for n, v in enumerate(values) if isinstance(v, Mapping)]
        cells = _laid_out_cells(numbered, {}, base)
        indexes = {slug: int(cell) for slug, cell in cells.items() if cell.isdigit()}
        if len(_SHAPES) < SHAPES_MAX:  # dict writes are atomic: renders may run in threads
            _SHAPES[key] = indexes
    found = {slug: "" for value in values if (slug := slug_of(value)) is not None}
    for slug, index in indexes.items():
        value = values[index]
        assert isinstance(value, Mapping)
        try:
            found[slug] = json.dumps(value.get("value"))
        except (TypeError, ValueError, RecursionError):
            found[slug] = ""  # the layout skips such a value too
    return found


def value_cells(
    values: Sequence[object], images: Mapping[str, object] | None, base: str
) -> dict[str, str]:
    """slug -> cell for a list of values laid out in the directory `base` (relative to the
    table). `images`: image pk -> image JSON of every image the token may read; None when
    the images are not known (the cell then names each image's directory)."""
    inline = _inline_cells(values, base)
    if inline is not None:
        return inline
    return _laid_out_cells(values, images, base)


def _laid_out_cells(
    values: Sequence[object], images: Mapping[str, object] | None, base: str
) -> dict[str, str]:
    if images is None:
        # Stand-ins without files: the layout places each image's directory where the real
        # one goes (merged and numbered the same way), and the cell names the directory.
        pks = {pk for v in values if isinstance(v, Mapping) and (pk := layout.image_pk_of(v))}
        images = {pk: {"pk": pk, "files": []} for pk in pks}
    try:
        # DICOM instances are not fetched (a request per image): a set's cell is its
        # directory, which the instances do not change.
        root = layout.lay_out_values(list(values), images, {})
    except BadResponse:
        return {}
    found: dict[str, list[tuple[list[str], layout.Entry]]] = {}

    def walk(directory: layout.Directory, path: list[str]) -> None:
        for name, entry in directory.entries.items():
            socket = dict(entry.attrs).get("socket")
            if socket is not None:
                found.setdefault(socket, []).append(([*path, name], entry))
            if isinstance(entry, layout.Directory):
                walk(entry, [*path, name])

    walk(root, [])
    cells: dict[str, str] = {}
    for value in values:
        slug = slug_of(value)
        if slug is None or slug in cells:
            continue
        cell = _cell(found.get(slug, []), base)
        if cell is None and isinstance(value, Mapping):
            pk = layout.image_pk_of(value)
            # A readable image with an empty relative_path puts its files (none, for a DICOM
            # set whose instances are not fetched) straight into the row's directory.
            cell = base if pk is not None and isinstance(images.get(pk), Mapping) else ""
        cells[slug] = cell or ""
    return cells


def _cell(entries: list[tuple[list[str], layout.Entry]], base: str) -> str | None:
    def path(segments: list[str]) -> str:
        return "/".join([base, *segments])

    for _, entry in entries:
        if isinstance(entry, layout.InlineFile):
            return entry.data.decode("utf-8", "replace")
    files = [(s, e) for s, e in entries if isinstance(e, layout.RemoteFile)]
    if files:
        rank = {ext: n for n, ext in enumerate(_PREFERRED)}

        def preference(item: tuple[list[str], layout.Entry]) -> int:
            name = item[0][-1].lower()
            return min((r for ext, r in rank.items() if name.endswith(ext)), default=len(rank))

        return path(min(files, key=preference)[0])
    for segments, entry in entries:
        if isinstance(entry, layout.Unreadable):
            return path(segments)
    for segments, entry in entries:
        if isinstance(entry, layout.Directory):
            return path(segments)
    return None


def row(
    columns: Columns,
    sockets: list[tuple[str, str, str]],
    obj: Mapping[str, Any],
    images: Mapping[str, object] | None,
    directory: str,
) -> list[str]:
    """The cells of one object's row. `sockets`: `columns.socket_columns()` (computed once
    per table, not per row); `directory`: where the tree shows the objects (`items`,
    `display-sets`, `jobs`), relative to the table."""
    pk = text(obj.get("pk"))
    cells: list[str] = [pk]
    if columns.kind == JOBS:
        cells.append(text(obj.get("status")))
        if columns.created:
            cells.append(text(obj.get("created")))
    else:
        title = obj.get("title")
        cells.append(text(title if isinstance(title, str) else obj.get("title_safe")))
        if columns.kind == DISPLAY_SETS:
            cells.append(text(obj.get("order")))
    by_group: dict[str, dict[str, str]] = {}
    for key, _ in _GROUPS[columns.kind]:
        base = f"{directory}/{pk}/{key}" if columns.kind == JOBS else f"{directory}/{pk}"
        by_group[key] = value_cells(_values(obj, key), images, base)
    cells.extend(by_group[key].get(slug, "") for _, key, slug in sockets)
    return cells


def csv_text(rows: Iterable[Sequence[str]]) -> str:
    """Rows as CSV text (RFC 4180 quoting, `\\r\\n` line ends)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=LINE_END)
    writer.writerows(rows)
    return out.getvalue()


def valid_text(chunk: str) -> tuple[str, int]:
    """The text as UTF-8 can hold it, and its length in UTF-8 bytes: a lone surrogate (JSON's
    `"\\ud800"`) has no UTF-8 form and becomes U+FFFD."""
    try:
        return chunk, len(chunk.encode("utf-8"))
    except UnicodeEncodeError:
        fixed = chunk.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed, len(fixed.encode("utf-8"))
