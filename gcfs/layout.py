"""Pure layout of values (archive items, display sets, job inputs and outputs) as files.

Each value appears at its socket's `relative_path`, as the platform provisions an algorithm's
`/input` (layout.md, "Values"; components/backends/base.py on the server):

- Value socket: a file holding `json.dumps(value)` (Python's defaults: compact, no newline).
- File socket: a file with the file's bytes, fetched from its `/media/` URL.
- Image socket: a directory at `relative_path` holding the image's MHD and TIFF files under
  their own names (DZI tile pyramids are left out); an empty `relative_path` (the legacy
  `generic-medical-image`) puts them straight into the object's directory. A DICOM image set
  shows its instances as `<SOPInstanceUID>.dcm`.
- A value whose image or file the token may not read becomes a directory holding README.md.

The metadata file (`item.json`, `display-set.json`, `job.json`) sits beside the values. If a
value's path takes its name, the value keeps the path and the metadata file gets a leading
underscore (`_item.json`, `__item.json`, ...): a script reading `/input` must see what the
platform would give it.

Names follow safenames.py. `relative_path` is split at `/`; empty, `.` and `..` segments are
dropped (so `images/../x` cannot climb out of the object's directory: it is `images/x`), every
other segment goes through `safe_name`, as do file names (the percent-decoded last segment of
a file URL, so `%2F` and `%00` become `_`) and DICOM names. Two *different* entries that ask
for one name in one directory are both shown, the later one numbered (`scan~2.mha`, rule 4);
the same entry listed twice (same URL, same bytes) is shown once. Two values whose paths share
a directory (an image socket at `images/ct`, a value at `images/ct/meta.json`) fill that one
directory, as on the platform; a directory that would take a file's name is numbered instead.

Malformed input (gc-api.md §9, "read tolerantly"): these functions take parsed JSON of any
shape and never raise anything but `BadResponse`. One value, image file or DICOM instance that
cannot be understood (not an object, a missing or wrong-typed field, a URL that does not parse
or is not http(s), an image URL without a pk, a value that cannot be serialised) is skipped
with a warning in the log, and the others are laid out: one broken value must not hide the
good ones. `BadResponse` (EIO for that directory) is raised only when the argument as a whole
is unusable: `values` is not a list, or an image passed to `image_files` is not an object.
An image socket's value with `"image": null` is not malformed (the real server has them): it
shows nothing and is logged once per value at DEBUG.

Nothing here does I/O: callers fetch images and DICOM instances first and pass them in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import BadResponse
from .names import is_uuid
from .safenames import NAME_MAX, numbered_name, safe_name

log = logging.getLogger(__name__)

# Image file types that are data; DZI files are the viewer's tile pyramids.
SHOWN_IMAGE_TYPES = frozenset({"MHD", "TIFF"})


# What an entry shows, for its extended attributes: ("kind", "value"), ("socket", <slug>),
# ("pk", <pk>), ("api_url", <url>). Not part of an entry's equality: the same file named by two
# values is still one file.
Attrs = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class InlineFile:
    """A file whose bytes we already have (a Value socket's JSON)."""

    data: bytes
    attrs: Attrs = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file whose bytes live behind a `/media/` URL (or a pre-signed DICOM request)."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()
    attrs: Attrs = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Something a visible object references that the token may not read."""

    what: str  # "image <pk>" or "file <name>"
    url: str
    attrs: Attrs = field(default=(), compare=False)


@dataclass(slots=True)
class Directory:
    entries: dict[str, Entry] = field(default_factory=dict)
    attrs: Attrs = ()  # an image socket's directory shows the image; others show nothing


Entry = InlineFile | RemoteFile | Unreadable | Directory


@dataclass(frozen=True, slots=True)
class DicomInstance:
    sop_instance_uid: str
    url: str
    headers: tuple[tuple[str, str], ...]


def dicom_instances(instances: Sequence[object]) -> list[DicomInstance]:
    """Parse `cases/images/<pk>/dicom/instances/` (pre-signed GETs, their own headers).

    An instance without a DICOM UID, a usable URL or string headers is skipped (logged)."""
    parsed: list[DicomInstance] = []
    for instance in instances:
        found = _dicom_instance(instance)
        if found is None:
            log.warning("dicom: skipping a malformed instance")
        else:
            parsed.append(found)
    return parsed


def _dicom_instance(instance: object) -> DicomInstance | None:
    if not isinstance(instance, Mapping):
        return None
    uid, request = instance.get("sop_instance_uid"), instance.get("get_instance")
    if not isinstance(uid, str) or not _is_safe_uid(uid) or not isinstance(request, Mapping):
        return None
    url, headers = request.get("url"), request.get("headers")
    if headers is None:
        headers = {}
    if not isinstance(url, str) or not _is_fetchable(url) or not isinstance(headers, Mapping):
        return None
    pairs = tuple(headers.items())
    if not all(_is_header_text(k) and _is_header_text(v) for k, v in pairs):
        return None
    return DicomInstance(uid, url, pairs)


def _is_header_text(text: object) -> bool:
    return isinstance(text, str) and text.isascii() and not any(c in text for c in "\r\n\0")


def _is_safe_uid(uid: str) -> bool:
    # DICOM UIDs are ASCII digits and dots, at most 64 characters (PS3.5 §9.1).
    return 0 < len(uid) <= 64 and all(c in "0123456789." for c in uid)


def _url_path(url: str) -> str | None:
    """The path of a URL, or None for one that does not parse (`http://[`)."""
    try:
        return urlsplit(url).path
    except ValueError:
        return None


def _is_fetchable(url: str) -> bool:
    """An absolute http(s) URL with a host: the only kind the content store may fetch."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def socket_of(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """The value's socket: `socket` on the live API, `interface` on older servers (§9)."""
    socket = value.get("socket")
    if not isinstance(socket, Mapping):
        socket = value.get("interface")
    return socket if isinstance(socket, Mapping) else {}


def image_pk_of(value: Mapping[str, Any]) -> str | None:
    """The pk in an Image value's `image` API URL (`.../cases/images/<pk>/`)."""
    url = value.get("image")
    path = _url_path(url) if isinstance(url, str) else None
    if path is None:
        return None
    parts = [p for p in path.split("/") if p]
    return parts[-1] if parts and is_uuid(parts[-1]) else None


def _raw_file_name(url: str) -> str | None:
    """The percent-decoded last segment of a file URL, unsanitised; None if there is none."""
    path = _url_path(url)
    if path is None:
        return None
    return unquote(path.rstrip("/").rsplit("/", 1)[-1]) or None


def file_name_of(url: str) -> str:
    """The last segment of a file URL, percent-decoded, as a safe name: the platform's file
    name (`_` for a URL without one)."""
    return safe_name(_raw_file_name(url) or "")


def path_segments(relative_path: str) -> list[str]:
    """`relative_path` as safe path segments: empty, `.` and `..` segments are dropped, every
    other segment goes through `safe_name` (so NUL becomes `_`, a long one is shortened)."""
    return [
        safe_name(segment) for segment in relative_path.split("/") if segment not in ("", ".", "..")
    ]


def image_files(image: object, dicom: Sequence[DicomInstance] | None) -> dict[str, Entry]:
    """The files an image shows: its MHD/TIFF files, or its DICOM instances, by safe and
    unique name. Raises BadResponse when `image` is not an object."""
    if not isinstance(image, Mapping):
        raise BadResponse("image: not a JSON object")
    directory = Directory()
    files = image.get("files")
    if not isinstance(files, list):
        if files is not None:
            log.warning("image %s: `files` is not a list; showing no files", image.get("pk"))
        files = []
    for image_file in files:
        if not isinstance(image_file, Mapping):
            log.warning("image %s: skipping a malformed file entry", image.get("pk"))
            continue
        url, kind = image_file.get("file"), image_file.get("image_type")
        if not isinstance(kind, str) or kind not in SHOWN_IMAGE_TYPES:
            continue
        name = _raw_file_name(url) if isinstance(url, str) and _is_fetchable(url) else None
        if not isinstance(url, str) or name is None:
            log.warning("image %s: skipping a file without a usable URL", image.get("pk"))
            continue
        file_pk = image_file.get("pk")
        attrs = _attrs(kind="file", pk=file_pk if isinstance(file_pk, str) else "")
        _put(directory, safe_name(name), RemoteFile(url, attrs=attrs))
    for instance in dicom or ():
        entry = RemoteFile(instance.url, instance.headers, attrs=_attrs(kind="file"))
        _put(directory, safe_name(f"{instance.sop_instance_uid}.dcm"), entry)
    return directory.entries


def _attrs(**values: object) -> Attrs:
    """Attrs from keyword arguments; empty and non-text values are left out."""
    return tuple(
        (key, str(value))
        for key, value in values.items()
        if isinstance(value, str | int) and not isinstance(value, bool) and value != ""
    )


def _with_socket(entry: Entry, socket: Attrs) -> Entry:
    """`entry` (a file or a directory of files) marked as a value of the socket."""
    if isinstance(entry, Directory):
        return Directory(
            {n: _with_socket(e, socket) for n, e in entry.entries.items()}, entry.attrs + socket
        )
    return dataclasses.replace(entry, attrs=entry.attrs + socket)


# An image socket whose value holds no image (`"image": null`) is a state the real server
# serves (issue 16: a `broken-image-ci` value at every relisting), not a malformed answer:
# it is shown as nothing and said once, at DEBUG, per value pk, since every relisting lays
# the same values out again. The pks said are remembered in insertion order,
# at most this many: past that the oldest is forgotten (and may be said once more).
IMAGELESS_REMEMBERED = 4096
_imageless_said: dict[object, None] = {}


def _note_imageless(what: str, value_pk: object) -> None:
    key = value_pk if isinstance(value_pk, int | str) and not isinstance(value_pk, bool) else None
    if key is not None:
        if key in _imageless_said:
            return
        _imageless_said[key] = None
        if len(_imageless_said) > IMAGELESS_REMEMBERED:
            del _imageless_said[next(iter(_imageless_said))]
    log.debug("values: %s (value pk %r) holds no image; nothing to show", what, value_pk)


def lay_out_values(
    values: Sequence[object],
    images: Mapping[str, object],
    dicom: Mapping[str, Sequence[DicomInstance]],
) -> Directory:
    """The directory tree of a list of values.

    `images` maps image pk -> image JSON for every image the token may read (an image not in
    it is unreadable); `dicom` maps image pk -> its instances for DICOM image sets. A malformed
    value is skipped with a warning; `values` that is not a list raises BadResponse.
    """
    if not isinstance(values, list | tuple):
        raise BadResponse("values: not a JSON list")
    root = Directory()
    for index, value in enumerate(values):
        if not isinstance(value, Mapping):
            log.warning("values: skipping value %d, not a JSON object", index)
            continue
        _lay_out_value(root, index, value, images, dicom)
    return root


def _lay_out_value(
    root: Directory,
    index: int,
    value: Mapping[str, Any],
    images: Mapping[str, object],
    dicom: Mapping[str, Sequence[DicomInstance]],
) -> None:
    socket = socket_of(value)
    relative = socket.get("relative_path")
    segments = path_segments(relative) if isinstance(relative, str) else []
    super_kind = socket.get("super_kind")
    slug = socket.get("slug")
    what = f"value {index} ({slug if isinstance(slug, str) else '?'})"
    of_socket = _attrs(socket=slug)
    if super_kind == "Image" or value.get("image") is not None:
        pk = image_pk_of(value)
        if pk is None:
            if value.get("image") is None:
                _note_imageless(what, value.get("pk"))
            else:
                log.warning("values: skipping %s: no image pk in %.200r", what, value.get("image"))
            return
        image = images.get(pk)
        if image is None:
            entry: Entry = Unreadable(f"image {pk}", str(value.get("image")), of_socket)
            fallback = slug if isinstance(slug, str) and slug else pk
            _place(root, segments or [safe_name(fallback)], entry)
            return
        if not isinstance(image, Mapping):
            log.warning("values: skipping %s: image %s is not a JSON object", what, pk)
            return
        files = image_files(image, dicom.get(pk))
        if segments:
            shows = _attrs(kind="image", pk=pk, api_url=value.get("image"))
            _place(root, segments, _with_socket(Directory(files, shows), of_socket))
        else:
            for name, file_entry in files.items():
                _place(root, [name], _with_socket(file_entry, of_socket))
    elif value.get("file") is not None:
        url = value.get("file")
        if not isinstance(url, str) or not _is_fetchable(url):
            log.warning("values: skipping %s: no usable file URL", what)
        elif not segments:
            log.warning("values: skipping %s: no usable relative_path", what)
        else:
            attrs = _attrs(kind="file", pk=value.get("pk")) + of_socket
            _place(root, segments, RemoteFile(url, attrs=attrs))
    elif not segments:
        log.warning("values: skipping %s: no usable relative_path", what)
    else:
        try:
            data = json.dumps(value.get("value")).encode("utf-8")
        except (TypeError, ValueError, RecursionError):
            log.warning("values: skipping %s: its value is not JSON", what)
            return
        _place(
            root, segments, InlineFile(data, _attrs(kind="value", pk=value.get("pk")) + of_socket)
        )


def _place(root: Directory, segments: list[str], entry: Entry) -> None:
    """Put `entry` at `segments` below `root`, creating directories on the way; a name that
    is taken by something else gets the next free number (safenames.py, rule 4)."""
    directory = root
    for segment in segments[:-1]:
        name = _put(directory, segment, Directory())
        child = directory.entries[name]
        assert isinstance(child, Directory)
        directory = child
    _put(directory, segments[-1], entry)


def _put(directory: Directory, name: str, entry: Entry) -> str:
    """Put `entry` in `directory` under `name` or the first free numbered name; returns the
    name it got. A directory merges into a directory of that name; an entry equal to the
    one already there is dropped (the same URL listed twice)."""
    n = 1
    while True:
        candidate = numbered_name(name, n)
        existing = directory.entries.get(candidate)
        if existing is None:
            directory.entries[candidate] = entry
            break
        if isinstance(existing, Directory) and isinstance(entry, Directory):
            for child, child_entry in entry.entries.items():
                _put(existing, child, child_entry)
            existing.attrs = existing.attrs or entry.attrs  # a made-up directory takes a name
            break
        if existing == entry:
            log.debug("%s listed twice; showing it once", candidate)
            break
        n += 1
    if n > 1:
        log.warning("two different entries named %s; the later one is %s", name, candidate)
    return candidate


def metadata_name(base: str, taken: Mapping[str, object]) -> str:
    """`item.json`, or `_item.json` (and so on) when a value already uses the name; past 255
    bytes of underscores (only a hostile server gets there), `item~2.json` and so on."""
    name = base
    while name in taken and len(name) < NAME_MAX:
        name = "_" + name
    n = 2
    while name in taken or len(name.encode("utf-8")) > NAME_MAX:
        name, n = numbered_name(base, n), n + 1
    return name
