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

Nothing here does I/O: callers fetch images and DICOM instances first and pass them in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from .names import is_uuid

log = logging.getLogger(__name__)

# Image file types that are data; DZI files are the viewer's tile pyramids.
SHOWN_IMAGE_TYPES = frozenset({"MHD", "TIFF"})


@dataclass(frozen=True, slots=True)
class InlineFile:
    """A file whose bytes we already have (a Value socket's JSON)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file whose bytes live behind a `/media/` URL (or a pre-signed DICOM request)."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Something a visible object references that the token may not read."""

    what: str  # "image <pk>" or "file <name>"
    url: str


@dataclass(slots=True)
class Directory:
    entries: dict[str, Entry] = field(default_factory=dict)


Entry = InlineFile | RemoteFile | Unreadable | Directory


@dataclass(frozen=True, slots=True)
class DicomInstance:
    sop_instance_uid: str
    url: str
    headers: tuple[tuple[str, str], ...]


def dicom_instances(instances: Sequence[object]) -> list[DicomInstance]:
    """Parse `cases/images/<pk>/dicom/instances/` (pre-signed GETs, their own headers)."""
    parsed: list[DicomInstance] = []
    for instance in instances:
        if not isinstance(instance, Mapping):
            continue
        uid, request = instance.get("sop_instance_uid"), instance.get("get_instance")
        if not isinstance(uid, str) or not isinstance(request, Mapping):
            continue
        url, headers = request.get("url"), request.get("headers") or {}
        if not _is_safe_uid(uid) or not isinstance(url, str) or not isinstance(headers, Mapping):
            continue
        pairs = tuple((str(k), str(v)) for k, v in headers.items())
        parsed.append(DicomInstance(uid, url, pairs))
    return parsed


def _is_safe_uid(uid: str) -> bool:
    # DICOM UIDs are digits and dots, at most 64 characters (PS3.5 §9.1).
    return 0 < len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid)


def socket_of(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """The value's socket: `socket` on the live API, `interface` on older servers (§9)."""
    socket = value.get("socket")
    if not isinstance(socket, Mapping):
        socket = value.get("interface")
    return socket if isinstance(socket, Mapping) else {}


def image_pk_of(value: Mapping[str, Any]) -> str | None:
    """The pk in an Image value's `image` API URL (`.../cases/images/<pk>/`)."""
    url = value.get("image")
    if not isinstance(url, str):
        return None
    parts = [p for p in urlsplit(url).path.split("/") if p]
    return parts[-1] if parts and is_uuid(parts[-1]) else None


def file_name_of(url: str) -> str:
    """The last segment of a file URL, percent-decoded: the platform's file name."""
    return unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])


def path_segments(relative_path: str) -> list[str]:
    """`relative_path` as safe path segments: no empty, `.` or `..` segment, no NUL."""
    return [
        segment
        for segment in relative_path.replace("\0", "").split("/")
        if segment not in ("", ".", "..")
    ]


def image_files(
    image: Mapping[str, Any], dicom: Sequence[DicomInstance] | None
) -> dict[str, Entry]:
    """The files an image shows: its MHD/TIFF files, or its DICOM instances."""
    files: dict[str, Entry] = {}
    for image_file in image.get("files") or []:
        if not isinstance(image_file, Mapping):
            continue
        url, kind = image_file.get("file"), image_file.get("image_type")
        if isinstance(url, str) and kind in SHOWN_IMAGE_TYPES:
            name = file_name_of(url)
            if name and name not in files:
                files[name] = RemoteFile(url)
    for instance in dicom or ():
        files[f"{instance.sop_instance_uid}.dcm"] = RemoteFile(instance.url, instance.headers)
    return files


def lay_out_values(
    values: Sequence[Mapping[str, Any]],
    images: Mapping[str, Mapping[str, Any]],
    dicom: Mapping[str, Sequence[DicomInstance]],
) -> Directory:
    """The directory tree of a list of values.

    `images` maps image pk -> image JSON for every image the token may read (an image not in
    it is unreadable); `dicom` maps image pk -> its instances for DICOM image sets.
    """
    root = Directory()
    for value in values:
        socket = socket_of(value)
        relative = socket.get("relative_path")
        segments = path_segments(relative) if isinstance(relative, str) else []
        super_kind = socket.get("super_kind")
        slug = socket.get("slug", "?")
        if super_kind == "Image" or value.get("image"):
            pk = image_pk_of(value)
            image = images.get(pk) if pk else None
            if image is None:
                entry: Entry = Unreadable(f"image {pk}", str(value.get("image")))
                _place(root, segments or [str(slug)], entry)
                continue
            files = image_files(image, dicom.get(pk) if pk else None)
            if segments:
                _place(root, segments, Directory(files))
            else:
                for name, file_entry in files.items():
                    _place(root, [name], file_entry)
        elif isinstance(value.get("file"), str):
            if segments:
                _place(root, segments, RemoteFile(value["file"]))
        elif segments:
            data = json.dumps(value.get("value")).encode("utf-8")
            _place(root, segments, InlineFile(data))
    return root


def _place(root: Directory, segments: list[str], entry: Entry) -> None:
    directory = root
    for segment in segments[:-1]:
        existing = directory.entries.get(segment)
        if existing is None:
            existing = directory.entries[segment] = Directory()
        if not isinstance(existing, Directory):
            log.warning(
                "values: %s is both a file and a directory; keeping the file", "/".join(segments)
            )
            return
        directory = existing
    name = segments[-1]
    existing = directory.entries.get(name)
    if existing is None:
        directory.entries[name] = entry
    elif isinstance(existing, Directory) and isinstance(entry, Directory):
        for child, child_entry in entry.entries.items():
            existing.entries.setdefault(child, child_entry)
    else:
        log.warning("values: two values at %s; keeping the first", "/".join(segments))


def metadata_name(base: str, taken: Mapping[str, object]) -> str:
    """`item.json`, or `_item.json` (and so on) when a value already uses the name."""
    name = base
    while name in taken:
        name = "_" + name
    return name
