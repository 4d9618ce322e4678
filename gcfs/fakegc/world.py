"""The fake server's data: an in-memory Grand Challenge site and the builders that fill it.

Nothing here knows about HTTP. A `World` holds users, sockets (component interfaces), images,
archives and their items, algorithms with their container images and jobs, and reader studies with
their questions, display sets and answers. Visibility is modelled the way the real server assigns
object permissions (gc-api.md §4): each archive, algorithm, reader study and job has `public` plus a
set of usernames who may view it; algorithms and reader studies keep their editors apart because
the API treats them differently (algorithm images are editors-only; answers are visible to their
creator and to the study's editors; display sets and questions to readers and editors only).

Primary keys are deterministic (uuid5 of a name, or counters for the integer pks), so two worlds
built by the same code are identical. Every builder is O(1): list endpoints sort at request time.
`add_generated_items(archive, count, socket)` gives an archive items made on demand by index
(GeneratedItems), for worlds of a million items: a block costs one object, a page its own items,
and a generated pk carries its index in its low 48 bits, so a detail lookup needs no table.
`demo_world()` builds the small realistic site that `python -m gcfs.fakegc` serves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, overload

JSON: TypeAlias = Any
Username: TypeAlias = str | None  # None is the anonymous user

# Fixed namespace so that pks depend only on the names given to the builders.
PK_NAMESPACE = uuid.UUID("6a1d9c9e-52c4-4b8e-9a57-1f0e5c3b7d20")
# Creation times count up from here, a second per object: `created` order equals build order.
EPOCH = dt.datetime(2025, 6, 2, 9, 0, 0, 123456, tzinfo=dt.UTC)
PUBLIC_MEDIA = "https://public.grand-challenge-user-content.org"

# InterfaceKindChoices labels grouped the way the server derives `super_kind` (gc-api.md §3.6).
IMAGE_KINDS = frozenset(
    {"Image", "Segmentation", "Heat Map", "Displacement field", "DICOM Image Set"}
)
THUMBNAIL_KINDS = frozenset({"Thumbnail jpg", "Thumbnail png"})
FILE_KINDS = frozenset(
    {
        "PDF file",
        "SQREG file",
        "OBJ file",
        "MP4 file",
        "Newick tree-format file",
        "BIOM format",
        "CSV file",
        "ZIP file",
        *THUMBNAIL_KINDS,
    }
)
COLOR_COMPONENTS = {"GRAY": 1, "RGB": 3, "RGBA": 4, "YCBCR": 4}
IMAGE_TYPES = {
    ".mha": "MHD",
    ".mhd": "MHD",
    ".zraw": "MHD",
    ".raw": "MHD",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".dzi": "DZI",
}


GENERATED_BLOCK = 1 << 20  # GeneratedContent derives its bytes in blocks of this size
DICOM_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # a UID root for examples, as pydicom uses
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


class GeneratedContent:
    """`size` deterministic pseudo-random bytes, computed on demand and never held whole.

    Byte i is byte i % 1 MiB of SHAKE-128(seed || block index as 8 bytes little-endian) for
    block i // 1 MiB, after an optional literal `header` that replaces the first bytes (e.g. a
    TIFF's header and IFD, tiled_tiff). Any range is computable without the bytes before it;
    `sha256()` of the whole is computed once, on first use, and cached.
    """

    def __init__(self, size: int, seed: str, *, header: bytes = b"") -> None:
        if size < 0 or len(header) > size:
            raise ValueError("size must be >= 0 and hold the header")
        self.size = size
        self.seed = seed
        self.header = header
        self._seed_bytes = seed.encode()
        self._sha256: str | None = None
        self._lock = threading.Lock()
        self._last: tuple[int, bytes] = (-1, b"")  # one-block cache; swapped atomically

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"GeneratedContent(size={self.size}, seed={self.seed!r})"

    def _block(self, index: int) -> bytes:
        cached_index, cached = self._last
        if cached_index == index:
            return cached
        length = min(GENERATED_BLOCK, self.size - index * GENERATED_BLOCK)
        data = hashlib.shake_128(self._seed_bytes + index.to_bytes(8, "little")).digest(length)
        self._last = (index, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        """The bytes [offset, offset + length), clipped to the content's end."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        end = min(self.size, offset + length)
        parts = []
        position = offset
        while position < end:
            index, start = divmod(position, GENERATED_BLOCK)
            take = min(end - position, GENERATED_BLOCK - start)
            parts.append(self._block(index)[start : start + take])
            position += take
        data = b"".join(parts)
        if offset < len(self.header) and data:
            head = self.header[offset:end]
            data = head + data[len(head) :]
        return data

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes [start, end) in block-aligned pieces of at most 1 MiB."""
        end = self.size if end is None else min(end, self.size)
        position = start
        while position < end:
            take = min(end - position, GENERATED_BLOCK - position % GENERATED_BLOCK)
            yield self.read(position, take)
            position += take

    def sha256(self) -> str:
        with self._lock:
            if self._sha256 is None:
                digest = hashlib.sha256()
                for piece in self.chunks():
                    digest.update(piece)
                self._sha256 = digest.hexdigest()
            return self._sha256


Content: TypeAlias = bytes | GeneratedContent


def content_size(content: Content) -> int:
    return len(content)


def content_read(content: Content, offset: int, length: int) -> bytes:
    """`length` bytes from `offset` (fewer at the end) of plain or generated content."""
    if isinstance(content, GeneratedContent):
        return content.read(offset, length)
    return bytes(content[offset : offset + length])


def content_chunks(content: Content, start: int, end: int, size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes [start, end) in pieces of at most `size` bytes (1 MiB): bounded memory."""
    if isinstance(content, GeneratedContent):
        yield from content.chunks(start, end)
        return
    view = memoryview(content)
    for position in range(start, min(end, len(content)), size):
        yield bytes(view[position : min(end, position + size)])


def content_sha256(content: Content) -> str:
    if isinstance(content, GeneratedContent):
        return content.sha256()
    return hashlib.sha256(content).hexdigest()


def dicom_uid(name: str) -> str:
    """A deterministic 62-character DICOM UID (digits and dots) derived from `name`."""
    digits = str(int.from_bytes(hashlib.sha256(name.encode()).digest(), "big"))
    return DICOM_UID_ROOT + digits[: 62 - len(DICOM_UID_ROOT)]


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
# VRs whose explicit-VR element has 2 reserved bytes and a 4-byte length (PS3.5 §7.1.2).
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"})


def _dicom_element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element, its value padded to even length (UIDs with
    NUL, text with a space, as PS3.5 §6.2 asks)."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    tag = struct.pack("<HH", group, elem) + vr
    if vr in _LONG_VRS:
        return tag + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + struct.pack("<H", len(value)) + value


def dicom_bytes(
    sop_instance_uid: str,
    *,
    study_instance_uid: str = "",
    series_instance_uid: str = "",
    instance_number: int = 1,
    rows: int = 4,
    columns: int = 4,
    seed: int = 0,
) -> bytes:
    """A small but valid DICOM Part 10 file (an 8-bit MR slice, explicit VR little endian)
    that pydicom reads, pixels included: 128-byte preamble, "DICM", the file meta group with
    its length, then the dataset's elements in ascending tag order."""

    def us(n: int) -> bytes:  # an unsigned short value
        return struct.pack("<H", n)

    meta = b"".join(
        [
            _dicom_element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _dicom_element(0x0002, 0x0002, b"UI", MR_IMAGE_STORAGE.encode()),
            _dicom_element(0x0002, 0x0003, b"UI", sop_instance_uid.encode()),
            _dicom_element(0x0002, 0x0010, b"UI", EXPLICIT_VR_LITTLE_ENDIAN.encode()),
            _dicom_element(0x0002, 0x0012, b"UI", dicom_uid("gcfs fakegc").encode()),
        ]
    )
    pixels = bytes((i * 5 + seed) % 256 for i in range(rows * columns))
    dataset = b"".join(
        [
            _dicom_element(0x0008, 0x0016, b"UI", MR_IMAGE_STORAGE.encode()),
            _dicom_element(0x0008, 0x0018, b"UI", sop_instance_uid.encode()),
            _dicom_element(0x0008, 0x0060, b"CS", b"MR"),
            _dicom_element(0x0020, 0x000D, b"UI", study_instance_uid.encode()),
            _dicom_element(0x0020, 0x000E, b"UI", series_instance_uid.encode()),
            _dicom_element(0x0020, 0x0013, b"IS", str(instance_number).encode()),
            _dicom_element(0x0028, 0x0002, b"US", us(1)),
            _dicom_element(0x0028, 0x0004, b"CS", b"MONOCHROME2"),
            _dicom_element(0x0028, 0x0010, b"US", us(rows)),
            _dicom_element(0x0028, 0x0011, b"US", us(columns)),
            _dicom_element(0x0028, 0x0100, b"US", us(8)),
            _dicom_element(0x0028, 0x0101, b"US", us(8)),
            _dicom_element(0x0028, 0x0102, b"US", us(7)),
            _dicom_element(0x0028, 0x0103, b"US", us(0)),
            _dicom_element(0x7FE0, 0x0010, b"OB", pixels),
        ]
    )
    group_length = _dicom_element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta)))
    return b"\x00" * 128 + b"DICM" + group_length + meta + dataset


def stable_pk(kind: str, name: str) -> str:
    """A UUID string that depends only on `kind` and `name`."""
    return str(uuid.uuid5(PK_NAMESPACE, f"{kind}:{name}"))


def default_token(username: str) -> str:
    """A deterministic 64-hex-char token, shaped like `secrets.token_hex()`."""
    return hashlib.sha256(f"gcfs-fake-token:{username}".encode()).hexdigest()


@dataclass(eq=False)
class User:
    username: str
    token: str
    is_staff: bool = False
    institution: str = ""
    department: str = ""
    location: str = ""
    website: str = ""


@dataclass(eq=False)
class ComponentInterface:
    """A socket. `pk` is an integer on the real server."""

    pk: int
    slug: str
    title: str
    kind: str
    super_kind: str  # "Image" | "File" | "Value"
    relative_path: str
    description: str = ""
    default_value: JSON = None
    overlay_segments: list[JSON] = field(default_factory=list)
    look_up_table: JSON = None

    @property
    def is_json_kind(self) -> bool:
        return self.kind not in IMAGE_KINDS and self.kind not in FILE_KINDS


@dataclass(eq=False)
class ImageFile:
    pk: str
    image_pk: str
    name: str
    image_type: str  # "MHD" | "TIFF" | "DZI"
    # The bytes the storage origin serves; the API itself never exposes sizes.
    content: Content = b""


@dataclass(eq=False)
class DicomInstance:
    """One instance of a DICOM image set, served by the storage origin's DICOMweb route."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    content: Content = b""
    transfer_syntax_uid: str = EXPLICIT_VR_LITTLE_ENDIAN


@dataclass(eq=False)
class Image:
    pk: str
    name: str
    seq: int
    files: list[ImageFile] = field(default_factory=list)
    dicom_image_set: JSON = None  # {"image_set_id": str} for DICOM image sets
    dicom_instances: list[DicomInstance] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    depth: int | None = None
    color_space: str = "GRAY"
    modality: str | None = None
    eye_choice: str = "NA"
    stereoscopic_choice: str | None = None
    field_of_view: str | None = None
    voxel_width_mm: float | None = None
    voxel_height_mm: float | None = None
    voxel_depth_mm: float | None = None
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str | None = None
    patient_age: str = ""
    patient_sex: str = ""
    study_date: str | None = None
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    study_description: str = ""
    series_description: str = ""
    window_center: float | None = None
    window_width: float | None = None
    segments: JSON = None
    # Direct grants; everything else follows the objects that use the image.
    viewers: set[str] = field(default_factory=set)
    archives: list[Archive] = field(default_factory=list, repr=False)
    reader_studies: list[ReaderStudy] = field(default_factory=list, repr=False)
    job_inputs: list[Job] = field(default_factory=list, repr=False)
    job_outputs: list[Job] = field(default_factory=list, repr=False)

    @property
    def shape_without_color(self) -> list[int]:
        return [d for d in (self.depth, self.height, self.width) if d is not None]

    @property
    def shape(self) -> list[int] | None:
        """With the colour channels appended when there is more than one; None if unknown."""
        components = COLOR_COMPONENTS.get(self.color_space)
        if components is None:
            return None
        return self.shape_without_color + ([components] if components > 1 else [])

    def visible_to(self, user: Username) -> bool:
        if user is not None and user in self.viewers:
            return True
        return (
            any(a.items_visible_to(user) for a in self.archives)
            or any(rs.cases_visible_to(user) for rs in self.reader_studies)
            or any(j.visible_to(user) for j in (*self.job_inputs, *self.job_outputs))
        )


@dataclass(eq=False)
class ComponentInterfaceValue:
    pk: int
    interface: ComponentInterface
    value: JSON = None
    file_name: str | None = None
    content: Content = b""
    image: Image | None = None


@dataclass(eq=False)
class Archive:
    pk: str
    slug: str
    title: str
    seq: int
    description: str = ""
    logo: str = ""
    public: bool = False
    viewers: set[str] = field(default_factory=set)  # editors, uploaders and users alike
    hanging_protocol: JSON = None
    optional_hanging_protocols: list[JSON] = field(default_factory=list)
    view_content: JSON = field(default_factory=dict)
    items: list[ArchiveItem] = field(default_factory=list, repr=False)
    # Items made on demand by index (World.add_generated_items), after the built ones.
    generated: list[GeneratedItems] = field(default_factory=list, repr=False)

    def visible_to(self, user: Username) -> bool:
        return self.public or self.items_visible_to(user)

    def all_items(self) -> ItemChain:
        """The built items, then each generated block: len() and slices without a copy."""
        return ItemChain([self.items, *self.generated])

    def items_visible_to(self, user: Username) -> bool:
        # A public archive exposes its metadata only; items follow the archive's groups.
        return user is not None and user in self.viewers


@dataclass(eq=False)
class ArchiveItem:
    pk: str
    archive: Archive
    seq: int
    title: str = ""
    values: list[ComponentInterfaceValue] = field(default_factory=list)

    def visible_to(self, user: Username) -> bool:
        return self.archive.items_visible_to(user)


# A generated item's pk is a uuid5 of its block (archive pk and block number) whose low 48
# bits, the UUID's `node` field, are replaced by the item's index: version and variant bits
# stay those of a uuid5, the pk parses like any other, and pk -> index is a mask, not a table.
# 48 bits allow 2.8e14 items per block, far beyond the 1,000,000 of issue 15.
GENERATED_INDEX_BITS = 48
GENERATED_INDEX_MASK = (1 << GENERATED_INDEX_BITS) - 1
# Generated values get integer pks from here up, one range of `count` per block: far above
# the pks add_value counts up from 1, so the two never meet (1e12 values would be needed).
GENERATED_CIV_BASE = 1 << 40


def _default_generated_value(index: int) -> JSON:
    # What tests/bench/harness.py gives its built items: an age in 20..89.
    return 20 + index % 70


@dataclass(eq=False)
class GeneratedItems(Sequence[ArchiveItem]):
    """`total` archive items made on demand by index, never stored: World.add_generated_items.

    Item i has pk `pk(i)` (uuid5 of the block with i in its low 48 bits), title
    `title_format.format(index=i)` and one value of `socket` (a Value socket), `value(i)`, with
    integer pk `civ_base + i`. Objects are built per call, so a page of 1,000 costs 1,000
    small objects and a block of any size costs this object alone.
    """

    archive: Archive
    total: int  # how many items (`count` is Sequence's method)
    socket: ComponentInterface
    seq: int
    prefix: int  # the block's uuid5 as an int, with the index bits cleared
    civ_base: int
    title_format: str = "item-{index:07d}"
    value: Callable[[int], JSON] = _default_generated_value
    # "xxxxxxxx-xxxx-xxxx-xxxx-": every pk of the block starts so; the index is the rest.
    pk_head: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pk_head = str(uuid.UUID(int=self.prefix))[:24]

    def __len__(self) -> int:
        return self.total

    @overload
    def __getitem__(self, key: int) -> ArchiveItem: ...
    @overload
    def __getitem__(self, key: slice) -> list[ArchiveItem]: ...
    def __getitem__(self, key: int | slice) -> ArchiveItem | list[ArchiveItem]:
        if isinstance(key, slice):
            return [self.item(i) for i in range(*key.indices(self.total))]
        index = key + self.total if key < 0 else key
        if not 0 <= index < self.total:
            raise IndexError(key)
        return self.item(index)

    def pk(self, index: int) -> str:
        # The node field is the last 12 hex digits: formatting them beats building a UUID.
        return f"{self.pk_head}{index:012x}"

    def index_of(self, pk: str) -> int | None:
        """The index of the item with this (canonical) pk, None if it is not one of ours."""
        try:
            number = uuid.UUID(pk).int
        except ValueError:
            return None
        index = number & GENERATED_INDEX_MASK
        if number - index != self.prefix or index >= self.total:
            return None
        return index

    def civ(self, index: int) -> ComponentInterfaceValue:
        return ComponentInterfaceValue(
            pk=self.civ_base + index, interface=self.socket, value=self.value(index)
        )

    def item(self, index: int) -> ArchiveItem:
        return ArchiveItem(
            pk=self.pk(index),
            archive=self.archive,
            seq=self.seq,
            title=self.title_format.format(index=index),
            values=[self.civ(index)],
        )


class ItemChain(Sequence[ArchiveItem]):
    """Several sequences of items read as one, for len() and slices: a page of a generated
    block costs its own items only. Indexing and slicing beyond the end behave as a list's."""

    def __init__(self, parts: Sequence[Sequence[ArchiveItem]]) -> None:
        self.parts = [p for p in parts if len(p)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @overload
    def __getitem__(self, key: int) -> ArchiveItem: ...
    @overload
    def __getitem__(self, key: slice) -> list[ArchiveItem]: ...
    def __getitem__(self, key: int | slice) -> ArchiveItem | list[ArchiveItem]:
        if isinstance(key, int):
            found = self[key : key + 1] if key >= 0 else self[len(self) + key :][:1]
            if not found:
                raise IndexError(key)
            return found[0]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("ItemChain slices take no step")
        out: list[ArchiveItem] = []
        for part, low, high in self.segments(start, stop):
            out.extend(part[low:high])
        return out

    def segments(self, start: int, stop: int) -> Iterator[tuple[Sequence[ArchiveItem], int, int]]:
        """(part, low, high) for each part that [start, stop) of the chain overlaps, with
        the part's own bounds; 0 <= start, stop as slice.indices() gives them."""
        for part in self.parts:
            size = len(part)
            if start < size and stop > 0:
                yield part, max(start, 0), min(stop, size)
            start, stop = start - size, stop - size
            if stop <= 0:
                break


@dataclass(eq=False)
class AlgorithmInterface:
    inputs: list[ComponentInterface]
    outputs: list[ComponentInterface]


@dataclass(eq=False)
class Algorithm:
    pk: str
    slug: str
    title: str
    seq: int
    description: str | None = ""
    logo: str = ""
    public: bool = False
    viewers: set[str] = field(default_factory=set)  # the users group
    editors: set[str] = field(default_factory=set)
    average_duration: float | None = None
    interfaces: list[AlgorithmInterface] = field(default_factory=list)
    hanging_protocol: JSON = None
    optional_hanging_protocols: list[JSON] = field(default_factory=list)
    view_content: JSON = field(default_factory=dict)
    images: list[AlgorithmImage] = field(default_factory=list, repr=False)

    def visible_to(self, user: Username) -> bool:
        return self.public or (user is not None and (user in self.viewers or user in self.editors))


@dataclass(eq=False)
class AlgorithmImage:
    pk: str
    algorithm: Algorithm
    seq: int
    created: dt.datetime
    import_status: str = "Completed"
    file_name: str | None = "algorithm.tar.gz"
    content: Content = b""  # the container image's bytes, when file_name is set

    def visible_to(self, user: Username) -> bool:
        return user is not None and user in self.algorithm.editors


@dataclass(eq=False)
class Job:
    pk: str
    algorithm_image: AlgorithmImage
    seq: int
    status: str = "Succeeded"
    creator: str | None = None
    public: bool = False
    viewers: set[str] = field(default_factory=set)
    inputs: list[ComponentInterfaceValue] = field(default_factory=list)
    outputs: list[ComponentInterfaceValue] = field(default_factory=list)
    exec_duration: dt.timedelta | None = None
    invoke_duration: dt.timedelta | None = None

    @property
    def algorithm(self) -> Algorithm:
        return self.algorithm_image.algorithm

    def visible_to(self, user: Username) -> bool:
        if self.public:
            return True
        return user is not None and (user == self.creator or user in self.viewers)


@dataclass(eq=False)
class ReaderStudy:
    pk: str
    slug: str
    title: str
    seq: int
    description: str = ""
    logo: str = ""
    help_text: str = ""  # markdown; served as HTML
    case_text: str = ""  # HTML shown as every display set's `description`
    end_of_study_text: str = ""
    public: bool = False
    viewers: set[str] = field(default_factory=set)  # the readers
    editors: set[str] = field(default_factory=set)
    is_educational: bool = False
    instant_verification: bool = False
    allow_answer_modification: bool = True
    enable_autosaving: bool = False
    allow_case_navigation: bool = True
    allow_show_all_annotations: bool = False
    roll_over_answers_for_n_cases: int = 0
    hanging_protocol: JSON = None
    optional_hanging_protocols: list[JSON] = field(default_factory=list)
    view_content: JSON = field(default_factory=dict)
    questions: list[Question] = field(default_factory=list, repr=False)
    display_sets: list[DisplaySet] = field(default_factory=list, repr=False)
    answers: list[Answer] = field(default_factory=list, repr=False)

    def visible_to(self, user: Username) -> bool:
        return self.public or self.cases_visible_to(user)

    def cases_visible_to(self, user: Username) -> bool:
        """Display sets, the questions endpoint and images: readers and editors only."""
        return user is not None and (user in self.viewers or user in self.editors)

    @property
    def has_ground_truth(self) -> bool:
        return any(a.is_ground_truth for a in self.answers)

    def sorted_questions(self) -> list[Question]:
        return sorted(self.questions, key=lambda q: (q.order, q.seq))

    def sorted_display_sets(self) -> list[DisplaySet]:
        return sorted(self.display_sets, key=lambda d: (d.order, d.seq))


@dataclass(eq=False)
class QuestionOption:
    id: int
    title: str
    default: bool = False


@dataclass(eq=False)
class Question:
    pk: str
    reader_study: ReaderStudy
    seq: int
    question_text: str
    answer_type: str = "Bool"
    order: int = 100
    required: bool = True
    options: list[QuestionOption] = field(default_factory=list)
    widget: str = ""
    help_text: str = ""
    form_direction: str = "Horizontal"
    image_port: str = ""
    default_annotation_color: str = ""
    interface: ComponentInterface | None = None
    answer_min_value: int | None = None
    answer_max_value: int | None = None
    answer_step_size: str | None = None  # a decimal, served as a string
    answer_min_length: int | None = None
    answer_max_length: int | None = None
    answer_match_pattern: str = ""

    def visible_to(self, user: Username) -> bool:
        return self.reader_study.cases_visible_to(user)


@dataclass(eq=False)
class DisplaySet:
    pk: str
    reader_study: ReaderStudy
    seq: int
    title: str = ""
    order: int = 0
    values: list[ComponentInterfaceValue] = field(default_factory=list)

    def visible_to(self, user: Username) -> bool:
        return self.reader_study.cases_visible_to(user)


@dataclass(eq=False)
class Answer:
    pk: str
    question: Question
    display_set: DisplaySet | None
    creator: str
    seq: int
    created: dt.datetime
    modified: dt.datetime
    answer: JSON = None
    is_ground_truth: bool = False
    answer_image: Image | None = None
    last_edit_duration: dt.timedelta | None = None
    total_edit_duration: dt.timedelta | None = None

    def visible_to(self, user: Username) -> bool:
        return user is not None and (
            user == self.creator or user in self.question.reader_study.editors
        )


def _image_type(name: str) -> str:
    dot = name.rfind(".")
    return IMAGE_TYPES.get(name[dot:].lower(), "MHD") if dot >= 0 else "MHD"


def _super_kind(kind: str, store_in_database: bool) -> str:
    if kind in IMAGE_KINDS:
        return "Image"
    if kind in FILE_KINDS or not store_in_database:
        return "File"
    return "Value"


def _default_relative_path(slug: str, kind: str) -> str:
    if kind in IMAGE_KINDS:
        return f"images/{slug}"
    if kind in FILE_KINDS:
        ext = {
            "PDF file": ".pdf",
            "CSV file": ".csv",
            "ZIP file": ".zip",
            "MP4 file": ".mp4",
            "OBJ file": ".obj",
            "Thumbnail jpg": ".jpg",
            "Thumbnail png": ".png",
            "SQREG file": ".sqreg",
            "Newick tree-format file": ".newick",
            "BIOM format": ".biom",
        }[kind]
        return slug + ext
    return f"{slug}.json"


class World:
    """Everything the fake server knows. Builders lock `lock`; the server reads under it too."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users: dict[str, User] = {}
        self.users_by_token: dict[str, User] = {}
        self.sockets: dict[int, ComponentInterface] = {}
        self.sockets_by_slug: dict[str, ComponentInterface] = {}
        self.images: dict[str, Image] = {}
        self.civs: dict[int, ComponentInterfaceValue] = {}
        self.archives: dict[str, Archive] = {}
        self.archive_items: dict[str, ArchiveItem] = {}
        self.algorithms: dict[str, Algorithm] = {}
        self.algorithm_images: dict[str, AlgorithmImage] = {}
        self.jobs: dict[str, Job] = {}
        self.reader_studies: dict[str, ReaderStudy] = {}
        self.questions: dict[str, Question] = {}
        self.display_sets: dict[str, DisplaySet] = {}
        self.answers: dict[str, Answer] = {}
        # SOP Instance UID -> (image, instance), for the storage origin's DICOMweb route
        self.dicom_instances: dict[str, tuple[Image, DicomInstance]] = {}
        # Generated item blocks by their pk prefix (uuid int >> 48): pk -> block in O(1).
        self.generated_items: dict[int, GeneratedItems] = {}
        self._next_generated_civ = GENERATED_CIV_BASE
        self._seq = 0
        self._option_id = 900
        self._next_socket_pk = 1

    # -- helpers ---------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    @staticmethod
    def _timestamp(seq: int) -> dt.datetime:
        return EPOCH + dt.timedelta(seconds=seq, microseconds=seq * 7919 % 1_000_000)

    @staticmethod
    def _claim(table: dict[str, Any], pk: str, what: str) -> str:
        if pk in table:
            raise ValueError(f"duplicate {what} pk {pk}")
        return pk

    def socket(self, slug_or_socket: str | ComponentInterface) -> ComponentInterface:
        if isinstance(slug_or_socket, ComponentInterface):
            return slug_or_socket
        return self.sockets_by_slug[slug_or_socket]

    def find_by_slug(self, table: Iterable[Archive | Algorithm | ReaderStudy], slug: str) -> Any:
        return next((o for o in table if o.slug == slug), None)

    # -- builders ----------------------------------------------------------------------------------

    def add_user(
        self,
        username: str,
        token: str | None = None,
        *,
        is_staff: bool = False,
        institution: str = "",
        department: str = "",
        location: str = "",
        website: str = "",
    ) -> User:
        with self.lock:
            if username in self.users:
                raise ValueError(f"duplicate user {username}")
            user = User(
                username,
                token or default_token(username),
                is_staff,
                institution,
                department,
                location,
                website,
            )
            self.users[username] = user
            self.users_by_token[user.token] = user
            return user

    def add_socket(
        self,
        slug: str,
        *,
        title: str | None = None,
        kind: str = "Anything",
        relative_path: str | None = None,
        store_in_database: bool = True,
        description: str = "",
        pk: int | None = None,
        default_value: JSON = None,
    ) -> ComponentInterface:
        """Add a socket; `super_kind` follows the server's rule (store_in_database matters)."""
        with self.lock:
            if slug in self.sockets_by_slug:
                raise ValueError(f"duplicate socket {slug}")
            pk = pk if pk is not None else self._next_socket_pk
            self._next_socket_pk = max(self._next_socket_pk, pk + 1)
            if pk in self.sockets:
                raise ValueError(f"duplicate socket pk {pk}")
            socket = ComponentInterface(
                pk=pk,
                slug=slug,
                title=title or slug.replace("-", " ").title(),
                kind=kind,
                super_kind=_super_kind(kind, store_in_database),
                relative_path=(
                    relative_path
                    if relative_path is not None
                    else _default_relative_path(slug, kind)
                ),
                description=description,
                default_value=default_value,
            )
            self.sockets[pk] = socket
            self.sockets_by_slug[slug] = socket
            return socket

    def add_image(
        self,
        name: str,
        files: Sequence[str | tuple[str, Content]] = (),
        *,
        pk: str | None = None,
        dicom_image_set_id: str | None = None,
        dicom_instances: Sequence[Content] | int | None = None,
        viewers: Iterable[str] = (),
        **attrs: Any,
    ) -> Image:
        """Add an image. `files` are names (type from the extension) or (name, content) pairs,
        content being bytes or a GeneratedContent.

        A DICOM image set (`dicom_image_set_id`) gets `dicom_instances`: their contents, or how
        many small fake instances to make (default 3). `attrs` sets any other Image field
        (width, modality, voxel sizes, ...).
        """
        with self.lock:
            seq = self._next_seq()
            pk = self._claim(self.images, pk or stable_pk("image", f"{name}#{seq}"), "image")
            image = Image(pk=pk, name=name, seq=seq, viewers=set(viewers), **attrs)
            if dicom_image_set_id is not None:
                image.dicom_image_set = {"image_set_id": dicom_image_set_id}
                self._add_dicom_instances(image, 3 if dicom_instances is None else dicom_instances)
            for spec in files:
                fname, content = (
                    (spec, f"fake bytes of {spec}\n".encode()) if isinstance(spec, str) else spec
                )
                image.files.append(
                    ImageFile(
                        stable_pk("imagefile", f"{pk}/{fname}"),
                        pk,
                        fname,
                        _image_type(fname),
                        content,
                    )
                )
            self.images[pk] = image
            return image

    def _add_dicom_instances(self, image: Image, instances: Sequence[Content] | int) -> None:
        study = image.study_instance_uid or dicom_uid(f"study:{image.pk}")
        series = image.series_instance_uid or dicom_uid(f"series:{image.pk}")
        contents: Sequence[Content | None] = (
            [None] * instances if isinstance(instances, int) else instances
        )
        for n, content in enumerate(contents):
            sop = dicom_uid(f"sop:{image.pk}:{n}")
            if content is None:
                content = dicom_bytes(
                    sop,
                    study_instance_uid=study,
                    series_instance_uid=series,
                    instance_number=n + 1,
                    rows=image.height or 4,
                    columns=image.width or 4,
                    seed=n,
                )
            instance = DicomInstance(sop, study, series, content)
            image.dicom_instances.append(instance)
            self.dicom_instances[sop] = (image, instance)

    def add_value(
        self,
        socket: str | ComponentInterface,
        value: JSON = None,
        *,
        file: str | None = None,
        content: Content | None = None,
        image: Image | None = None,
    ) -> ComponentInterfaceValue:
        """A socket value; which argument is used depends on the socket's super_kind."""
        with self.lock:
            ci = self.socket(socket)
            pk = len(self.civs) + 1
            civ = ComponentInterfaceValue(pk=pk, interface=ci)
            if ci.super_kind == "Image":
                if image is None:
                    raise ValueError(f"socket {ci.slug} needs an image")
                civ.image = image
            elif ci.super_kind == "File":
                civ.file_name = file or ci.relative_path.rsplit("/", 1)[-1] or f"{ci.slug}.json"
                civ.content = (
                    content
                    if content is not None
                    else (f"{value!r}".encode() if value is not None else b"{}")
                )
            else:
                civ.value = value
            self.civs[pk] = civ
            return civ

    def add_archive(
        self,
        slug: str,
        title: str | None = None,
        *,
        description: str = "",
        viewers: Iterable[str] = (),
        public: bool = False,
        pk: str | None = None,
        logo: str | None = None,
        view_content: JSON = None,
        hanging_protocol: JSON = None,
    ) -> Archive:
        with self.lock:
            pk = self._claim(self.archives, pk or stable_pk("archive", slug), "archive")
            archive = Archive(
                pk=pk,
                slug=slug,
                title=title or slug,
                seq=self._next_seq(),
                description=description,
                public=public,
                viewers=set(viewers),
                logo=logo or f"{PUBLIC_MEDIA}/logos/archive/{pk}/logo.x20.png",
                view_content=view_content if view_content is not None else {},
                hanging_protocol=hanging_protocol,
            )
            self.archives[pk] = archive
            return archive

    def add_archive_item(
        self,
        archive: Archive,
        values: Iterable[ComponentInterfaceValue] = (),
        *,
        title: str = "",
        pk: str | None = None,
    ) -> ArchiveItem:
        with self.lock:
            name = f"{archive.pk}/{title or len(archive.items)}"
            pk = self._claim(self.archive_items, pk or stable_pk("item", name), "archive item")
            if self.generated_items and self.archive_item(pk) is not None:
                raise ValueError(f"duplicate archive item pk {pk} (a generated one)")
            item = ArchiveItem(
                pk=pk, archive=archive, seq=self._next_seq(), title=title, values=list(values)
            )
            for civ in item.values:
                if civ.image is not None and archive not in civ.image.archives:
                    civ.image.archives.append(archive)
            archive.items.append(item)
            self.archive_items[pk] = item
            return item

    def add_generated_items(
        self,
        archive: Archive,
        count: int,
        socket: str | ComponentInterface,
        *,
        value: Callable[[int], JSON] = _default_generated_value,
        title_format: str = "item-{index:07d}",
    ) -> GeneratedItems:
        """Give `archive` `count` more items, made on demand by index (see GeneratedItems).

        O(1) in time and memory whatever `count` is: a million items cost one object. They
        list after the archive's built items (and earlier blocks), each with one value of
        `socket`, which must be a Value socket (JSON in the database: no files, no images).
        """
        with self.lock:
            ci = self.socket(socket)
            if ci.super_kind != "Value":
                raise ValueError(f"generated items need a Value socket, not {ci.super_kind}")
            if not 0 <= count <= GENERATED_INDEX_MASK:
                raise ValueError(f"count must be in 0..{GENERATED_INDEX_MASK}")
            block = uuid.uuid5(
                PK_NAMESPACE, f"generated-items:{archive.pk}:{len(archive.generated)}"
            )
            prefix = block.int & ~GENERATED_INDEX_MASK
            if prefix in self.generated_items:
                raise ValueError(f"generated item block {block} exists")
            generated = GeneratedItems(
                archive=archive,
                total=count,
                socket=ci,
                seq=self._next_seq(),
                prefix=prefix,
                civ_base=self._next_generated_civ,
                title_format=title_format,
                value=value,
            )
            self._next_generated_civ += count
            archive.generated.append(generated)
            self.generated_items[prefix] = generated
            return generated

    def archive_item(self, pk: str) -> ArchiveItem | None:
        """The built or generated item with this canonical pk, None if there is none."""
        item = self.archive_items.get(pk)
        if item is not None or not self.generated_items:
            return item
        try:
            number = uuid.UUID(pk).int
        except ValueError:
            return None
        generated = self.generated_items.get(number & ~GENERATED_INDEX_MASK)
        if generated is None:
            return None
        index = generated.index_of(pk)
        return None if index is None else generated.item(index)

    def generated_civ(self, pk: int) -> tuple[ComponentInterfaceValue, ArchiveItem] | None:
        """A generated item's value by its integer pk, with its item; None if not one."""
        for generated in self.generated_items.values():
            index = pk - generated.civ_base
            if 0 <= index < generated.total:
                item = generated.item(index)
                return item.values[0], item
        return None

    def add_algorithm(
        self,
        slug: str,
        title: str | None = None,
        *,
        description: str | None = "",
        viewers: Iterable[str] = (),
        editors: Iterable[str] = (),
        public: bool = False,
        inputs: Iterable[str | ComponentInterface] = (),
        outputs: Iterable[str | ComponentInterface] = (),
        average_duration: float | None = None,
        pk: str | None = None,
        logo: str | None = None,
    ) -> Algorithm:
        """Add an algorithm with one interface made of `inputs` and `outputs` (if any)."""
        with self.lock:
            pk = self._claim(self.algorithms, pk or stable_pk("algorithm", slug), "algorithm")
            algorithm = Algorithm(
                pk=pk,
                slug=slug,
                title=title or slug,
                seq=self._next_seq(),
                description=description,
                public=public,
                viewers=set(viewers),
                editors=set(editors),
                average_duration=average_duration,
                logo=logo or f"{PUBLIC_MEDIA}/logos/algorithm/{pk}/logo.x20.png",
            )
            ins, outs = [self.socket(s) for s in inputs], [self.socket(s) for s in outputs]
            if ins or outs:
                algorithm.interfaces.append(AlgorithmInterface(ins, outs))
            self.algorithms[pk] = algorithm
            return algorithm

    def add_algorithm_image(
        self,
        algorithm: Algorithm,
        *,
        import_status: str = "Completed",
        file_name: str | None = "algorithm.tar.gz",
        content: Content | None = None,
        pk: str | None = None,
    ) -> AlgorithmImage:
        """Add a container image; `content` (bytes or GeneratedContent) defaults to a few bytes."""
        with self.lock:
            name = f"{algorithm.pk}/{len(algorithm.images)}"
            pk = self._claim(
                self.algorithm_images, pk or stable_pk("algorithmimage", name), "algorithm image"
            )
            seq = self._next_seq()
            ai = AlgorithmImage(
                pk=pk,
                algorithm=algorithm,
                seq=seq,
                created=self._timestamp(seq),
                import_status=import_status,
                file_name=file_name,
                content=(
                    content
                    if content is not None
                    else f"fake container image {pk} ({file_name})\n".encode()
                ),
            )
            algorithm.images.append(ai)
            self.algorithm_images[pk] = ai
            return ai

    def add_job(
        self,
        algorithm: Algorithm | AlgorithmImage,
        *,
        inputs: Iterable[ComponentInterfaceValue] = (),
        outputs: Iterable[ComponentInterfaceValue] = (),
        status: str = "Succeeded",
        creator: str | None = None,
        viewers: Iterable[str] = (),
        public: bool = False,
        exec_duration: dt.timedelta | None = None,
        invoke_duration: dt.timedelta | None = None,
        pk: str | None = None,
    ) -> Job:
        """Add a job; given an Algorithm it runs on its latest image (one is made if none)."""
        with self.lock:
            if isinstance(algorithm, Algorithm):
                ai = (
                    algorithm.images[-1]
                    if algorithm.images
                    else self.add_algorithm_image(algorithm)
                )
            else:
                ai = algorithm
            seq = self._next_seq()
            pk = self._claim(self.jobs, pk or stable_pk("job", f"{ai.pk}/{seq}"), "job")
            job = Job(
                pk=pk,
                algorithm_image=ai,
                seq=seq,
                status=status,
                creator=creator,
                public=public,
                viewers=set(viewers),
                inputs=list(inputs),
                outputs=list(outputs),
                exec_duration=exec_duration,
                invoke_duration=invoke_duration,
            )
            for civ in job.inputs:
                if civ.image is not None:
                    civ.image.job_inputs.append(job)
            for civ in job.outputs:
                if civ.image is not None:
                    civ.image.job_outputs.append(job)
            self.jobs[pk] = job
            return job

    def add_reader_study(
        self,
        slug: str,
        title: str | None = None,
        *,
        description: str = "",
        viewers: Iterable[str] = (),
        editors: Iterable[str] = (),
        public: bool = False,
        pk: str | None = None,
        logo: str | None = None,
        **attrs: Any,
    ) -> ReaderStudy:
        """Add a reader study; `viewers` are its readers. `attrs` sets any other field."""
        with self.lock:
            pk = self._claim(
                self.reader_studies, pk or stable_pk("readerstudy", slug), "reader study"
            )
            rs = ReaderStudy(
                pk=pk,
                slug=slug,
                title=title or slug,
                seq=self._next_seq(),
                description=description,
                public=public,
                viewers=set(viewers),
                editors=set(editors),
                logo=logo or f"{PUBLIC_MEDIA}/logos/readerstudy/{pk}/logo.x20.png",
                **attrs,
            )
            self.reader_studies[pk] = rs
            return rs

    def add_question(
        self,
        reader_study: ReaderStudy,
        question_text: str,
        answer_type: str = "Bool",
        *,
        options: Sequence[str | tuple[str, bool]] = (),
        order: int | None = None,
        pk: str | None = None,
        **attrs: Any,
    ) -> Question:
        """Add a question; `options` are titles or (title, default) pairs (Choice types)."""
        with self.lock:
            name = f"{reader_study.pk}/{question_text}"
            pk = self._claim(self.questions, pk or stable_pk("question", name), "question")
            opts = []
            for spec in options:
                title, default = (spec, False) if isinstance(spec, str) else spec
                self._option_id += 1
                opts.append(QuestionOption(self._option_id, title, default))
            attrs.setdefault(
                "widget",
                {
                    "Text": "Text Input",
                    "Choice": "Radio Select",
                    "Multiple choice": "Checkbox Select Multiple",
                }.get(answer_type, ""),
            )
            q = Question(
                pk=pk,
                reader_study=reader_study,
                seq=self._next_seq(),
                question_text=question_text,
                answer_type=answer_type,
                order=order if order is not None else 10 * (len(reader_study.questions) + 1),
                options=opts,
                **attrs,
            )
            reader_study.questions.append(q)
            self.questions[pk] = q
            return q

    def add_display_set(
        self,
        reader_study: ReaderStudy,
        values: Iterable[ComponentInterfaceValue] = (),
        *,
        title: str = "",
        order: int | None = None,
        pk: str | None = None,
    ) -> DisplaySet:
        with self.lock:
            name = f"{reader_study.pk}/{title or len(reader_study.display_sets)}"
            pk = self._claim(self.display_sets, pk or stable_pk("displayset", name), "display set")
            ds = DisplaySet(
                pk=pk,
                reader_study=reader_study,
                seq=self._next_seq(),
                title=title,
                order=order if order is not None else 10 * (len(reader_study.display_sets) + 1),
                values=list(values),
            )
            for civ in ds.values:
                if civ.image is not None and reader_study not in civ.image.reader_studies:
                    civ.image.reader_studies.append(reader_study)
            reader_study.display_sets.append(ds)
            self.display_sets[pk] = ds
            return ds

    def add_answer(
        self,
        question: Question,
        display_set: DisplaySet | None,
        creator: str,
        answer: JSON,
        *,
        is_ground_truth: bool = False,
        answer_image: Image | None = None,
        last_edit_duration: dt.timedelta | None = None,
        total_edit_duration: dt.timedelta | None = None,
        pk: str | None = None,
    ) -> Answer:
        with self.lock:
            ds_pk = display_set.pk if display_set else "-"
            name = f"{question.pk}/{ds_pk}/{creator}/{is_ground_truth}"
            pk = self._claim(self.answers, pk or stable_pk("answer", name), "answer")
            seq = self._next_seq()
            created = self._timestamp(seq)
            a = Answer(
                pk=pk,
                question=question,
                display_set=display_set,
                creator=creator,
                seq=seq,
                created=created,
                modified=created + dt.timedelta(seconds=3.5),
                answer=answer,
                is_ground_truth=is_ground_truth,
                answer_image=answer_image,
                last_edit_duration=last_edit_duration,
                total_edit_duration=total_edit_duration,
            )
            question.reader_study.answers.append(a)
            self.answers[pk] = a
            return a


# -- the demo site ------------------------------------------------------------------------------

DEMO_TOKEN = default_token("demo")
DEMO_B_TOKEN = default_token("demo-b")
EDITOR_TOKEN = default_token("study-editor")


def mha_bytes(dims: tuple[int, ...], *, seed: int = 0) -> bytes:
    """A small but valid MetaImage (.mha) with MET_UCHAR voxels, readable by SimpleITK."""
    header = _meta_header(dims, "LOCAL")
    return header + _voxels(dims, seed)


def mhd_zraw_pair(stem: str, dims: tuple[int, ...], *, seed: int = 0) -> tuple[bytes, bytes]:
    """A legacy .mhd header and its zlib-compressed .zraw data file."""
    raw = _voxels(dims, seed)
    header = _meta_header(dims, f"{stem}.zraw", compressed_size=len(zlib.compress(raw)))
    return header, zlib.compress(raw)


def _meta_header(dims: tuple[int, ...], data_file: str, compressed_size: int = 0) -> bytes:
    lines = [
        "ObjectType = Image",
        f"NDims = {len(dims)}",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
    ]
    if compressed_size:
        lines += ["CompressedData = True", f"CompressedDataSize = {compressed_size}"]
    lines += [
        f"DimSize = {' '.join(map(str, dims))}",
        "ElementType = MET_UCHAR",
        f"ElementDataFile = {data_file}",
    ]
    return ("\n".join(lines) + "\n").encode()


def _voxels(dims: tuple[int, ...], seed: int) -> bytes:
    count = 1
    for d in dims:
        count *= d
    return bytes((i * 7 + seed) % 256 for i in range(count))


def tiff_bytes(width: int, height: int) -> bytes:
    """A minimal uncompressed 8-bit greyscale baseline TIFF."""
    data = bytes((x + y) % 256 for y in range(height) for x in range(width))
    entries = [
        (256, 3, width),
        (257, 3, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),
        (277, 3, 1),
        (278, 3, height),
        (279, 4, len(data)),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, typ, value in entries:
        value = data_offset if tag == 273 else value
        fmt = "<HHIHH" if typ == 3 else "<HHII"
        ifd += (
            struct.pack(fmt, tag, typ, 1, value, 0)
            if typ == 3
            else struct.pack(fmt, tag, typ, 1, value)
        )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def _demo_sockets(w: World) -> None:
    # Integer pks as on the real site (1-9 are the development fixtures' sockets).
    w.add_socket(
        "generic-medical-image", title="Generic Medical Image", kind="Image", relative_path="", pk=1
    )
    w.add_socket(
        "generic-overlay", title="Generic Overlay", kind="Heat Map", relative_path="images", pk=2
    )
    w.add_socket("results-json-file", title="Results JSON File", relative_path="results.json", pk=3)
    w.add_socket(
        "metadata-json-file",
        title="Metadata JSON File",
        relative_path="metadata.json",
        store_in_database=False,
        pk=9,
    )
    w.add_socket("ct-image", title="CT Image", kind="Image", description="Chest CT", pk=31)
    w.add_socket(
        "transverse-t2-prostate-mri",
        title="Transverse T2 Prostate MRI",
        kind="Image",
        description="Transverse T2 MRI of the Prostate",
        pk=32,
    )
    w.add_socket(
        "prostate-cancer-likelihood",
        title="Case-level Cancer Likelihood Prostate MRI",
        kind="Float",
        relative_path="cspca-case-level-likelihood.json",
        pk=144,
    )
    w.add_socket(
        "cspca-detection-map",
        title="Transverse Cancer Detection Map Prostate MRI",
        kind="Heat Map",
        pk=151,
    )
    w.add_socket(
        "clinical-information-prostate-mri",
        title="Clinical Information Prostate MRI",
        description="Clinical information to support clinically significant prostate "
        "cancer detection in prostate MRI",
        pk=156,
    )
    w.add_socket(
        "patient-age", title="Patient Age", kind="Integer", description="Age in years", pk=211
    )
    w.add_socket("nodule-locations", title="Nodule Locations", store_in_database=False, pk=305)
    w.add_socket("co-rads-score", title="CO-RADS Score", kind="Integer", pk=320)
    w.add_socket("probability-covid-19", title="Probability COVID-19", kind="Float", pk=321)
    w.add_socket("pathology-report", title="Pathology Report", kind="PDF file", pk=330)
    w.add_socket("biopsy-wsi", title="Biopsy Whole-Slide Image", kind="Image", pk=331)
    w.add_socket("prostate-mri-dicom", title="Prostate MRI (DICOM)", kind="DICOM Image Set", pk=332)


def _ct_image(w: World, n: int) -> Image:
    dims = (8, 8, 4)
    return w.add_image(
        f"LIDC-IDRI-{n:04d}.mha",
        [(f"LIDC-IDRI-{n:04d}.mha", mha_bytes(dims, seed=n))],
        width=8,
        height=8,
        depth=4,
        modality="CT",
        voxel_width_mm=0.703125,
        voxel_height_mm=0.703125,
        voxel_depth_mm=2.5,
        window_center=-600.0,
        window_width=1500.0,
        patient_id=f"LIDC-IDRI-{n:04d}",
        study_description="CT CHEST W/O CONTRAST",
    )


def _demo_archives(w: World) -> list[Image]:
    lidc = w.add_archive(
        "lidc-lung-ct",
        "LIDC-IDRI Lung CT",
        description="Thoracic CT scans with marked-up annotated lesions (LIDC-IDRI).",
        viewers={"demo", "study-editor"},
    )
    ct_images = []
    for n in range(1, 13):
        values = [w.add_value("patient-age", 50 + n)]
        if n == 5:
            # A legacy image: .mhd header plus .zraw data, on the socket with an empty path.
            mhd, zraw = mhd_zraw_pair("LIDC-IDRI-0005", (8, 8, 4), seed=5)
            image = w.add_image(
                "LIDC-IDRI-0005.mhd",
                [("LIDC-IDRI-0005.mhd", mhd), ("LIDC-IDRI-0005.zraw", zraw)],
                width=8,
                height=8,
                depth=4,
                modality="CT",
            )
            values.append(w.add_value("generic-medical-image", image=image))
        else:
            image = _ct_image(w, n)
            values.append(w.add_value("ct-image", image=image))
        ct_images.append(image)
        locations = [{"x": 12.5 * n, "y": 40.0, "z": 3.0, "diameter_mm": 4.0 + n}]
        values.append(
            w.add_value(
                "nodule-locations",
                file="nodule-locations.json",
                content=json.dumps(locations).encode(),
            )
        )
        w.add_archive_item(lidc, values, title=f"LIDC-IDRI-{n:04d}")

    picai = w.add_archive(
        "prostate-mri-picai",
        "PI-CAI Prostate MRI",
        description="Bi-parametric prostate MRI from the PI-CAI challenge.",
        viewers={"demo", "demo-b", "study-editor"},
    )
    for n in range(1, 4):
        t2 = w.add_image(
            f"picai-{10000 + n}-t2w.mha",
            [(f"picai-{10000 + n}-t2w.mha", mha_bytes((6, 6, 3), seed=n))],
            width=6,
            height=6,
            depth=3,
            modality="MR",
        )
        clinical = {"patient_age": 60 + n, "psa": 4.2 + n, "prostate_volume": 38 + n}
        w.add_archive_item(
            picai,
            [
                w.add_value("transverse-t2-prostate-mri", image=t2),
                w.add_value("clinical-information-prostate-mri", clinical),
            ],
            title=f"picai-{10000 + n}",
        )
    wsi = w.add_image(
        "biopsy-10004.tif",
        [("biopsy-10004.tif", tiff_bytes(4, 3))],
        width=4,
        height=3,
        color_space="GRAY",
        modality="XC",
    )
    dicom = w.add_image(
        "picai-10004-dicom",
        dicom_image_set_id="a1b2c3d4e5f60718293a4b5c6d7e8f90",
        width=6,
        height=6,
        depth=3,
        modality="MR",
    )
    w.add_archive_item(
        picai,
        [
            w.add_value("biopsy-wsi", image=wsi),
            w.add_value("prostate-mri-dicom", image=dicom),
            w.add_value(
                "pathology-report",
                file="pathology-report.pdf",
                content=b"%PDF-1.4\n% fake pathology report\n%%EOF\n",
            ),
            w.add_value(
                "metadata-json-file", file="metadata.json", content=b'{"gleason": "3+4", "isup": 2}'
            ),
        ],
        title="picai-10004",
    )

    public = w.add_archive(
        "chest-xray-public",
        "Public Chest X-ray Archive",
        description="Frontal chest radiographs released for teaching.",
        viewers={"study-editor"},
        public=True,
    )
    xray = w.add_image(
        "cxr-0001.mha", [("cxr-0001.mha", mha_bytes((8, 8)))], width=8, height=8, modality="CR"
    )
    w.add_archive_item(public, [w.add_value("generic-medical-image", image=xray)])

    hidden = w.add_archive(
        "brain-mri-private",
        "Private Brain MRI",
        description="Glioma follow-up MRI (restricted).",
        viewers={"study-editor"},
    )
    brain = w.add_image(
        "brain-0001.mha",
        [("brain-0001.mha", mha_bytes((4, 4, 4)))],
        width=4,
        height=4,
        depth=4,
        modality="MR",
    )
    w.add_archive_item(hidden, [w.add_value("generic-medical-image", image=brain)])
    return ct_images


def _demo_algorithms(w: World, ct_images: list[Image]) -> None:
    corads = w.add_algorithm(
        "corads-ai",
        "CORADS-AI",
        description="Predicts CO-RADS score and COVID-19 probability from chest CT.",
        viewers={"demo-b"},
        editors={"demo"},
        inputs=["ct-image"],
        outputs=["co-rads-score", "probability-covid-19", "generic-overlay"],
        average_duration=182.4,
    )
    w.add_algorithm_image(corads, import_status="Completed", file_name="corads-ai-v1.tar.gz")
    image = w.add_algorithm_image(
        corads, import_status="Completed", file_name="corads-ai-v2.tar.gz"
    )
    for n, ct in enumerate(ct_images[:3], start=1):
        heat = w.add_image(
            f"corads-heatmap-{n}.mha",
            [(f"corads-heatmap-{n}.mha", mha_bytes((8, 8, 4), seed=100 + n))],
            width=8,
            height=8,
            depth=4,
            modality="CT",
        )
        w.add_job(
            image,
            creator="demo",
            inputs=[w.add_value("ct-image", image=ct)],
            outputs=[
                w.add_value("co-rads-score", 1 + n),
                w.add_value("probability-covid-19", 0.1 * n),
                w.add_value("generic-overlay", image=heat),
            ],
            exec_duration=dt.timedelta(minutes=2, seconds=n, microseconds=345678),
            invoke_duration=dt.timedelta(minutes=3, seconds=n),
        )

    nodules = w.add_algorithm(
        "nodule-detector",
        "Lung Nodule Detector",
        description="Detects pulmonary nodules in chest CT and reports their locations.",
        viewers={"demo", "demo-b"},
        editors={"study-editor"},
        inputs=["generic-medical-image"],
        outputs=["nodule-locations", "results-json-file"],
    )
    w.add_job(
        nodules,
        creator="demo",
        status="Failed",
        inputs=[w.add_value("generic-medical-image", image=ct_images[4])],
    )
    w.add_job(
        nodules,
        creator="demo",
        inputs=[w.add_value("generic-medical-image", image=ct_images[5])],
        outputs=[
            w.add_value(
                "nodule-locations",
                file="nodule-locations.json",
                content=b'[{"x": 10.0, "y": 20.0, "z": 2.0}]',
            ),
            w.add_value("results-json-file", {"nodules": 1, "max_score": 0.91}),
        ],
    )

    picai = w.add_algorithm(
        "pi-cai-baseline-nndetection",
        "PI-CAI: Baseline nnDetection (supervised)",
        description="Baseline algorithm submission for PI-CAI based on nnDetection.",
        editors={"study-editor"},
        public=True,
        inputs=["transverse-t2-prostate-mri", "clinical-information-prostate-mri"],
        outputs=["prostate-cancer-likelihood", "cspca-detection-map"],
        average_duration=363.5,
    )
    t2 = w.add_image(
        "picai-demo-t2w.mha",
        [("picai-demo-t2w.mha", mha_bytes((6, 6, 3)))],
        width=6,
        height=6,
        depth=3,
        modality="MR",
    )
    w.add_job(
        picai,
        creator="study-editor",
        public=True,
        inputs=[
            w.add_value("transverse-t2-prostate-mri", image=t2),
            w.add_value("clinical-information-prostate-mri", {"psa": 7.1}),
        ],
        outputs=[w.add_value("prostate-cancer-likelihood", 0.73)],
    )

    w.add_algorithm(
        "private-segmenter",
        "Private Liver Segmenter",
        description="Work in progress.",
        editors={"study-editor"},
        inputs=["ct-image"],
        outputs=["generic-overlay"],
    )


def _demo_reader_studies(w: World, ct_images: list[Image]) -> None:
    lung = w.add_reader_study(
        "lung-nodule-reader-study",
        "Lung Nodule Reader Study",
        description="Readers assess pulmonary nodules on low-dose chest CT.",
        viewers={"demo", "demo-b"},
        editors={"study-editor"},
        help_text="Scroll through the scan and answer every question.",
        view_content={"main": ["ct-image"]},
    )
    present = w.add_question(lung, "Is there a nodule?", "Bool")
    category = w.add_question(
        lung, "Lung-RADS category", "Choice", options=["1", "2", "3", ("4A", False), "4B"]
    )
    features = w.add_question(
        lung,
        "Nodule characteristics",
        "Multiple choice",
        options=["Solid", "Part-solid", "Ground-glass", "Calcified"],
        required=False,
    )
    size = w.add_question(
        lung,
        "Largest nodule diameter (mm)",
        "Number",
        answer_min_value=0,
        answer_max_value=100,
        answer_step_size="0.1",
    )
    comments = w.add_question(lung, "Comments", "Text", required=False)
    display_sets = []
    for n, ct in enumerate(ct_images[:4], start=1):
        display_sets.append(
            w.add_display_set(
                lung, [w.add_value("ct-image", image=ct), w.add_value("patient-age", 50 + n)]
            )
        )
    for reader, shift in (("demo", 0), ("demo-b", 1)):
        for n, ds in enumerate(display_sets):
            w.add_answer(
                present,
                ds,
                reader,
                (n + shift) % 2 == 0,
                last_edit_duration=dt.timedelta(seconds=12, microseconds=400000),
                total_edit_duration=dt.timedelta(seconds=30 + n),
            )
            w.add_answer(category, ds, reader, category.options[(n + shift) % 5].id)
            second = features.options[1 + (n + shift) % 3]  # never the first option again
            w.add_answer(features, ds, reader, [features.options[0].id, second.id])
            w.add_answer(size, ds, reader, 4.5 + n + shift)
        w.add_answer(comments, display_sets[0], reader, f"Reviewed by {reader}.")
    for n, ds in enumerate(display_sets):
        w.add_answer(present, ds, "study-editor", n % 2 == 0, is_ground_truth=True)
        w.add_answer(category, ds, "study-editor", category.options[n % 5].id, is_ground_truth=True)

    prostate = w.add_reader_study(
        "prostate-mri-reader-study",
        "Prostate MRI PI-RADS Reader Study",
        description="PI-RADS v2.1 scoring of bi-parametric prostate MRI.",
        viewers={"demo"},
        editors={"study-editor"},
        public=True,
        view_content={"main": ["transverse-t2-prostate-mri"]},
    )
    pirads = w.add_question(prostate, "PI-RADS score", "Choice", options=["1", "2", "3", "4", "5"])
    for n in range(1, 3):
        t2 = w.add_image(
            f"prostate-rs-{n}-t2w.mha",
            [(f"prostate-rs-{n}-t2w.mha", mha_bytes((6, 6, 3), seed=20 + n))],
            width=6,
            height=6,
            depth=3,
            modality="MR",
        )
        ds = w.add_display_set(
            prostate,
            [
                w.add_value("transverse-t2-prostate-mri", image=t2),
                w.add_value(
                    "pathology-report",
                    file=f"report-{n}.pdf",
                    content=b"%PDF-1.4\n% fake report\n%%EOF\n",
                ),
            ],
            title=f"Case {n}",
        )
        w.add_answer(pirads, ds, "demo", pirads.options[n + 1].id)

    hidden = w.add_reader_study(
        "mammography-screening-rs",
        "Mammography Screening Study",
        description="BI-RADS assessment of screening mammograms.",
        editors={"study-editor"},
    )
    w.add_question(hidden, "BI-RADS category", "Choice", options=["0", "1", "2", "3", "4", "5"])


def demo_world() -> World:
    """The small realistic site served by `python -m gcfs.fakegc`.

    Users: demo (DEMO_TOKEN), demo-b (DEMO_B_TOKEN), study-editor (EDITOR_TOKEN).
    demo sees archives lidc-lung-ct, prostate-mri-picai and the public chest-xray-public (items
    hidden), but not brain-mri-private; algorithms corads-ai (as editor), nodule-detector and
    the public pi-cai-baseline-nndetection, but not private-segmenter; reader studies
    lung-nodule-reader-study and the public prostate-mri-reader-study, but not
    mammography-screening-rs.

    File bytes: every image file, value file and container image has content; LIDC-IDRI-0005 is
    an .mhd + .zraw pair; picai-10004-dicom is a DICOM image set with 3 small instances; item
    picai-10005 holds biopsy-10005-wsi.tif, a 300 MiB TIFF of generated content (WSI_SIZE).
    """
    w = World()
    w.add_user(
        "demo",
        DEMO_TOKEN,
        institution="Radboud University Medical Center",
        department="Diagnostic Image Analysis Group",
        location="NL",
    )
    w.add_user("demo-b", DEMO_B_TOKEN, institution="Example Hospital", location="DE")
    w.add_user("study-editor", EDITOR_TOKEN, institution="Example Hospital")
    _demo_sockets(w)
    ct_images = _demo_archives(w)
    _demo_algorithms(w, ct_images)
    _demo_reader_studies(w, ct_images)
    # Built last, so that every pk above (some depend on build order) stays what it was.
    _demo_large_files(w)
    return w


WSI_SIZE = 300 * 1024 * 1024
TIFF_SIGNATURE = b"II*\x00\x08\x00\x00\x00"
TILE = 256  # tile edge of the whole-slide TIFF, in pixels
TILE_BYTES = TILE * TILE * 3  # an uncompressed 8-bit RGB tile: 192 KiB
# 41 x 39 tiles = 1599 tiles, which with one tile's room for the header and IFD ahead of them
# make exactly WSI_SIZE (1600 x 192 KiB = 300 MiB).
WSI_COLUMNS, WSI_ROWS = 41, 39


def tiled_tiff(columns: int, rows: int, seed: str) -> GeneratedContent:
    """A tiled, uncompressed 8-bit RGB TIFF of `columns` x `rows` tiles of TILE x TILE
    pixels (one level, no pyramid: tifffile reads it, and so does OpenSlide's generic-TIFF
    driver, which needs tiles), made lazily: only the header is held.

    Layout: the 8-byte header, one IFD at offset 8 (tags in ascending order, as TIFF 6.0
    asks), the BitsPerSample triple and the TileOffsets and TileByteCounts arrays after it,
    zeros up to one tile's room (TILE_BYTES); then tile k (row-major) at TILE_BYTES * (k + 1),
    its pixels GeneratedContent's pseudo-random bytes (noise, but valid pixels). Offsets
    are arithmetic, so no byte of a tile is needed to write the header.
    """
    count = columns * rows
    ifd_entries = 12
    ifd_size = 2 + 12 * ifd_entries + 4
    bits_at = 8 + ifd_size
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * count
    header_end = counts_at + 4 * count
    if header_end > TILE_BYTES:
        raise ValueError(f"{count} tiles: their offsets do not fit ahead of the first tile")
    SHORT, LONG = 3, 4  # TIFF field types
    entries = [
        (256, LONG, 1, columns * TILE),  # ImageWidth
        (257, LONG, 1, rows * TILE),  # ImageLength
        (258, SHORT, 3, bits_at),  # BitsPerSample: 8, 8, 8 (stored apart: 6 bytes > 4)
        (259, SHORT, 1, 1),  # Compression: none
        (262, SHORT, 1, 2),  # PhotometricInterpretation: RGB
        (277, SHORT, 1, 3),  # SamplesPerPixel
        (284, SHORT, 1, 1),  # PlanarConfiguration: contiguous (RGBRGB...)
        (296, SHORT, 1, 1),  # ResolutionUnit: none
        (322, LONG, 1, TILE),  # TileWidth
        (323, LONG, 1, TILE),  # TileLength
        (324, LONG, count, offsets_at),  # TileOffsets
        (325, LONG, count, counts_at),  # TileByteCounts
    ]
    assert len(entries) == ifd_entries
    ifd = struct.pack("<H", len(entries))
    for tag, kind, n, value in entries:
        # A single SHORT sits left-justified in the 4-byte value field.
        packed = (
            struct.pack("<HH", value, 0) if kind == SHORT and n == 1 else struct.pack("<I", value)
        )
        ifd += struct.pack("<HHI", tag, kind, n) + packed
    ifd += struct.pack("<I", 0)  # no next IFD
    header = (
        TIFF_SIGNATURE
        + ifd
        + struct.pack("<3H", 8, 8, 8)
        + struct.pack(f"<{count}I", *(TILE_BYTES * (k + 1) for k in range(count)))
        + struct.pack(f"<{count}I", *([TILE_BYTES] * count))
    )
    return GeneratedContent(TILE_BYTES * (count + 1), seed, header=header.ljust(TILE_BYTES, b"\0"))


def _demo_large_files(w: World) -> None:
    """A 300 MiB whole-slide TIFF (generated content) as item picai-10005 of prostate-mri-picai."""
    picai = w.find_by_slug(w.archives.values(), "prostate-mri-picai")
    content = tiled_tiff(WSI_COLUMNS, WSI_ROWS, "biopsy-10005-wsi.tif")
    assert content.size == WSI_SIZE
    wsi = w.add_image(
        "biopsy-10005-wsi.tif",
        [("biopsy-10005-wsi.tif", content)],
        width=WSI_COLUMNS * TILE,
        height=WSI_ROWS * TILE,
        color_space="RGB",
        modality="XC",
    )
    w.add_archive_item(picai, [w.add_value("biopsy-wsi", image=wsi)], title="picai-10005")
