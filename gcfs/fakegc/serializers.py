"""Turn world objects into the JSON the real serializers emit (gc-api.md §3, gc-samples/).

Key order matters: gcfs writes metadata files exactly as served, and the tests compare key order
with captured responses, so every function builds its dict in the serializer's field order.
All URLs are absolute and built from the server's base URL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
from dataclasses import dataclass, field
from typing import Any

from gcfs.fakegc.world import (
    Algorithm,
    AlgorithmImage,
    Answer,
    Archive,
    ArchiveItem,
    ComponentInterface,
    ComponentInterfaceValue,
    DisplaySet,
    GeneratedItems,
    Image,
    ImageFile,
    Job,
    Question,
    ReaderStudy,
    User,
)

Obj = dict[str, Any]

# Stand-ins for what differs between the items of a generated block (pk, title, the value and
# its pk), put into one serialized item to turn it into a template: private-use characters,
# which no real field holds and json.dumps(ensure_ascii=False) leaves as they are.
_SLOTS = ("\ue000pk", "\ue000title", "\ue000value", "\ue000civ")


# One encoder for every body: json.dumps with arguments builds a new one per call (~2 µs).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def json_text(data: Any) -> str:
    """DRF's JSONRenderer as text: compact separators, non-ASCII kept as is."""
    return _ENCODER.encode(data)


def _value_text(value: Any) -> str:
    # Most generated values are ints (an age): str() is what json.dumps writes for them.
    return str(value) if type(value) is int else json_text(value)


def iso_datetime(value: dt.datetime) -> str:
    """DRF's DateTimeField: isoformat, with UTC written as Z."""
    text = value.astimezone(dt.UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _components(value: dt.timedelta) -> tuple[int, int, int, int, int]:
    days = value.days
    seconds = value.seconds
    return days, seconds // 3600, seconds // 60 % 60, seconds % 60, value.microseconds


def django_duration(value: dt.timedelta | None) -> str | None:
    """Django's duration_string (DRF 3.16 DurationField): `[D days, ]HH:MM:SS[.ffffff]`."""
    if value is None:
        return None
    days, hours, minutes, seconds, micro = _components(value)
    text = f"{days} days, " if days else ""
    text += f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    return text + (f".{micro:06d}" if micro else "")


def iso_duration(value: dt.timedelta | None) -> str | None:
    """Django's duration_iso_string, used for job durations: `P0DT00H01M02.345678S`."""
    if value is None:
        return None
    sign = "-" if value < dt.timedelta(0) else ""
    days, hours, minutes, seconds, micro = _components(abs(value))
    ms = f".{micro:06d}" if micro else ""
    return f"{sign}P{days}DT{hours:02d}H{minutes:02d}M{seconds:02d}{ms}S"


def safe_html(markdown: str) -> str:
    """A stand-in for the server's markdown + bleach: paragraphs of escaped text."""
    paragraphs = [p.strip() for p in markdown.split("\n\n") if p.strip()]
    return "\n".join(f"<p>{html.escape(p, quote=False)}</p>" for p in paragraphs)


def civ_file_path(civ: ComponentInterfaceValue) -> str:
    """components/models.py: `<hh>/<hh>/<pk>/<name>`, hh from the last 4 hex digits of pk."""
    tail = f"{civ.pk:04x}"[-4:]
    return f"{tail[:2]}/{tail[2:]}/{civ.pk}/{civ.file_name}"


def image_file_path(f: ImageFile) -> str:
    """cases/models.py image_file_path: `<pk[0:2]>/<pk[2:4]>/<image pk>/<file pk>/<name>`."""
    return f"{f.image_pk[0:2]}/{f.image_pk[2:4]}/{f.image_pk}/{f.pk}/{f.name}"


@dataclass(frozen=True)
class Serializer:
    """Per-request settings: where URLs point and whether values carry `socket` (§9)."""

    base_url: str
    socket_field: bool = False
    # reader study pk -> {display set pk: index}; built once per request, not per display set.
    _indexes: dict[str, dict[str, int]] = field(default_factory=dict, compare=False, repr=False)

    def display_set_index(self, ds: DisplaySet) -> int:
        """A display set's position in its study's (order, created) ordering."""
        rs = ds.reader_study
        if rs.pk not in self._indexes:
            self._indexes[rs.pk] = {d.pk: i for i, d in enumerate(rs.sorted_display_sets())}
        return self._indexes[rs.pk][ds.pk]

    # -- URLs ---------------------------------------------------------------------------------

    def api(self, path: str) -> str:
        return f"{self.base_url}/api/v1/{path}"

    def site(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def image_url(self, image: Image) -> str:
        return self.api(f"cases/images/{image.pk}/")

    # -- shared pieces --------------------------------------------------------------------------

    def socket(self, ci: ComponentInterface) -> Obj:
        return {
            "title": ci.title,
            "description": ci.description,
            "slug": ci.slug,
            "kind": ci.kind,
            "pk": ci.pk,
            "default_value": ci.default_value,
            "super_kind": ci.super_kind,
            "relative_path": ci.relative_path,
            "overlay_segments": list(ci.overlay_segments),
            "look_up_table": ci.look_up_table,
        }

    def civ(self, civ: ComponentInterfaceValue) -> Obj:
        out: Obj = {"interface": self.socket(civ.interface)}
        if self.socket_field:
            out["socket"] = out["interface"]
        out["value"] = civ.value
        out["file"] = (
            self.site(f"media/components/componentinterfacevalue/{civ_file_path(civ)}")
            if civ.file_name is not None
            else None
        )
        out["image"] = self.image_url(civ.image) if civ.image is not None else None
        out["pk"] = civ.pk
        return out

    def civs(self, civs: list[ComponentInterfaceValue]) -> list[Obj]:
        return [self.civ(c) for c in sort_civs(civs)]

    # -- resources ----------------------------------------------------------------------------

    def profile(self, user: User) -> Obj:
        digest = _sha256_hex(f"{user.username}@example.org")
        return {
            "user": {"username": user.username},
            "mugshot": f"https://www.gravatar.com/avatar/{digest}?d=identicon&s=64",
            "institution": user.institution,
            "department": user.department,
            "location": user.location,
            "website": user.website,
        }

    def archive(self, a: Archive) -> Obj:
        return {
            "pk": a.pk,
            "title": a.title,
            "logo": a.logo,
            "description": a.description,
            "api_url": self.api(f"archives/{a.pk}/"),
            "url": self.site(f"archives/{a.slug}/"),
        }

    def archive_item(self, item: ArchiveItem) -> Obj:
        return {
            "pk": item.pk,
            "title": item.title,
            "archive": self.api(f"archives/{item.archive.pk}/"),
            "values": self.civs(item.values),
            "hanging_protocol": item.archive.hanging_protocol,
            "optional_hanging_protocols": list(item.archive.optional_hanging_protocols),
            "view_content": item.archive.view_content,
        }

    def generated_items_json(self, block: GeneratedItems, low: int, high: int) -> list[str]:
        """json_text(self.archive_item(block[i])) for i in [low, high), from a template made
        once per call: about 1 µs per item instead of the ~11 µs of building, serializing and
        encoding each (measured on a page of 1,000). Falls back to that when a slot shows up
        more than once in the template (an archive field holding a private-use character)."""
        if low >= high:
            return []
        template = self.archive_item(block.item(low))
        (civ,) = template["values"]
        template["pk"], template["title"] = _SLOTS[0], _SLOTS[1]
        civ["value"], civ["pk"] = _SLOTS[2], _SLOTS[3]
        text = json_text(template)
        quoted = [json_text(slot) for slot in _SLOTS]
        if any(text.count(q) != 1 for q in quoted):
            return [json_text(self.archive_item(block.item(i))) for i in range(low, high)]
        order = sorted(range(len(_SLOTS)), key=lambda n: text.index(quoted[n]))
        literals: list[str] = []
        rest = text
        for n in order:
            before, _, rest = rest.partition(quoted[n])
            literals.append(before)
        l0, l1, l2, l3 = literals
        o0, o1, o2, o3 = order
        head, title, value, base = block.pk_head, block.title_format, block.value, block.civ_base
        out = []
        for i in range(low, high):
            fills = (
                f'"{head}{i:012x}"',
                json_text(title.format(index=i)),
                _value_text(value(i)),
                str(base + i),
            )
            out.append(l0 + fills[o0] + l1 + fills[o1] + l2 + fills[o2] + l3 + fills[o3] + rest)
        return out

    def algorithm(self, a: Algorithm) -> Obj:
        return {
            "api_url": self.api(f"algorithms/{a.pk}/"),
            "url": self.site(f"algorithms/{a.slug}/"),
            "description": a.description,
            "pk": a.pk,
            "title": a.title,
            "logo": a.logo,
            "slug": a.slug,
            "average_duration": a.average_duration,
            "interfaces": [
                {
                    "inputs": [self.socket(s) for s in i.inputs],
                    "outputs": [self.socket(s) for s in i.outputs],
                }
                for i in a.interfaces
            ],
        }

    def algorithm_image(self, ai: AlgorithmImage) -> Obj:
        container = (
            self.site(f"media/docker/images/algorithms/algorithmimage/{ai.pk}/{ai.file_name}")
            if ai.file_name
            else None
        )
        return {
            "pk": ai.pk,
            "url": self.site(f"algorithms/{ai.algorithm.slug}/images/{ai.pk}/"),
            "api_url": self.api(f"algorithms/images/{ai.pk}/"),
            "algorithm": self.api(f"algorithms/{ai.algorithm.pk}/"),
            "created": iso_datetime(ai.created),
            "import_status": ai.import_status,
            "image": container,
        }

    def job(self, job: Job) -> Obj:
        algorithm = job.algorithm
        return {
            "pk": job.pk,
            "url": self.site(f"algorithms/{algorithm.slug}/jobs/{job.pk}/"),
            "api_url": self.api(f"algorithms/jobs/{job.pk}/"),
            "algorithm_image": self.api(f"algorithms/images/{job.algorithm_image.pk}/"),
            "inputs": self.civs(job.inputs),
            "outputs": self.civs(job.outputs),
            "status": job.status,
            "hanging_protocol": algorithm.hanging_protocol,
            "optional_hanging_protocols": list(algorithm.optional_hanging_protocols),
            "view_content": algorithm.view_content,
            "exec_duration": iso_duration(job.exec_duration),
            "invoke_duration": iso_duration(job.invoke_duration),
            "algorithm": self.api(f"algorithms/{algorithm.pk}/"),
        }

    def reader_study(self, rs: ReaderStudy) -> Obj:
        help_html = safe_html(rs.help_text)
        return {
            "api_url": self.api(f"reader-studies/{rs.pk}/"),
            "url": self.site(f"reader-studies/{rs.slug}/"),
            "slug": rs.slug,
            "logo": rs.logo,
            "description": rs.description,
            "help_text": help_html,
            "help_text_safe": help_html,
            "pk": rs.pk,
            # Nested questions are not permission-filtered (gc-api.md §3.7).
            "questions": [self.question(q) for q in rs.sorted_questions()],
            "title": rs.title,
            "title_safe": html.escape(rs.title, quote=False),
            "is_educational": rs.is_educational,
            "instant_verification": rs.instant_verification,
            "has_ground_truth": rs.has_ground_truth,
            "allow_answer_modification": rs.allow_answer_modification,
            "enable_autosaving": rs.enable_autosaving,
            "allow_case_navigation": rs.allow_case_navigation,
            "allow_show_all_annotations": rs.allow_show_all_annotations,
            "roll_over_answers_for_n_cases": rs.roll_over_answers_for_n_cases,
            "end_of_study_text_safe": safe_html(rs.end_of_study_text),
        }

    def question(self, q: Question) -> Obj:
        help_html = safe_html(q.help_text)
        text_safe = html.escape(q.question_text, quote=False)
        return {
            "answer_type": q.answer_type,
            "api_url": self.api(f"reader-studies/questions/{q.pk}/"),
            "form_direction": q.form_direction,
            "help_text": help_html,
            "help_text_safe": help_html,
            "image_port": q.image_port,
            "default_annotation_color": q.default_annotation_color,
            "pk": q.pk,
            "question_text": q.question_text,
            "question_text_safe": text_safe,
            "reader_study": self.api(f"reader-studies/{q.reader_study.pk}/"),
            "required": q.required,
            "options": [{"id": o.id, "title": o.title, "default": o.default} for o in q.options],
            "interface": self.socket(q.interface) if q.interface is not None else None,
            "overlay_segments": [],
            "look_up_table": None,
            "widget": q.widget,
            "answer_min_value": q.answer_min_value,
            "answer_max_value": q.answer_max_value,
            "answer_step_size": q.answer_step_size,
            "answer_min_length": q.answer_min_length,
            "answer_max_length": q.answer_max_length,
            "answer_match_pattern": q.answer_match_pattern,
            "empty_answer_confirmation": False,
            "empty_answer_confirmation_label": "",
            "empty_answer_confirmation_label_safe": "",
            "interactive_algorithms": [],
        }

    def display_set(self, ds: DisplaySet, index: int | None) -> Obj:
        rs = ds.reader_study
        return {
            "pk": ds.pk,
            "title": ds.title,
            "title_safe": html.escape(ds.title, quote=False),
            "reader_study": self.api(f"reader-studies/{rs.pk}/"),
            "values": self.civs(ds.values),
            "order": ds.order,
            "api_url": self.api(f"reader-studies/display-sets/{ds.pk}/"),
            "hanging_protocol": rs.hanging_protocol,
            "optional_hanging_protocols": list(rs.optional_hanging_protocols),
            "view_content": rs.view_content,
            "description": rs.case_text,
            "index": index,
        }

    def answer(self, a: Answer) -> Obj:
        ds = a.display_set
        return {
            "answer": a.answer,
            "api_url": self.api(f"reader-studies/answers/{a.pk}/"),
            "created": iso_datetime(a.created),
            "creator": a.creator,
            "display_set": self.api(f"reader-studies/display-sets/{ds.pk}/") if ds else None,
            "pk": a.pk,
            "question": self.api(f"reader-studies/questions/{a.question.pk}/"),
            "modified": iso_datetime(a.modified),
            "answer_image": self.image_url(a.answer_image) if a.answer_image else None,
            "last_edit_duration": django_duration(a.last_edit_duration),
            "total_edit_duration": django_duration(a.total_edit_duration),
            "is_ground_truth": a.is_ground_truth,
        }

    def image_file(self, f: ImageFile) -> Obj:
        return {
            "pk": f.pk,
            "image": f.image_pk,
            "file": self.site(f"media/images/{image_file_path(f)}"),
            "image_type": f.image_type,
        }

    def image(self, im: Image) -> Obj:
        # `shape` is left out when the colour space is unknown: the server's property raises
        # and DRF skips the field (the captured list has images with and without it).
        return {
            "pk": im.pk,
            "name": im.name,
            "files": [self.image_file(f) for f in im.files],
            "dicom_image_set": im.dicom_image_set,
            "width": im.width,
            "height": im.height,
            "depth": im.depth,
            "color_space": im.color_space,
            "modality": {"modality": im.modality} if im.modality is not None else None,
            "eye_choice": im.eye_choice,
            "stereoscopic_choice": im.stereoscopic_choice,
            "field_of_view": im.field_of_view,
            "shape_without_color": im.shape_without_color,
            **({"shape": im.shape} if im.shape is not None else {}),
            "voxel_width_mm": im.voxel_width_mm,
            "voxel_height_mm": im.voxel_height_mm,
            "voxel_depth_mm": im.voxel_depth_mm,
            "api_url": self.image_url(im),
            "patient_id": im.patient_id,
            "patient_name": im.patient_name,
            "patient_birth_date": im.patient_birth_date,
            "patient_age": im.patient_age,
            "patient_sex": im.patient_sex,
            "study_date": im.study_date,
            "study_instance_uid": im.study_instance_uid,
            "series_instance_uid": im.series_instance_uid,
            "study_description": im.study_description,
            "series_description": im.series_description,
            "window_center": im.window_center,
            "window_width": im.window_width,
            "segments": im.segments,
        }


def sort_civs(civs: list[ComponentInterfaceValue]) -> list[ComponentInterfaceValue]:
    """The server's sort_civs: by socket slug, grouped values, thumbnails, charts, files, images.

    Grouping goes by socket kind, so a JSON socket stored as a file still counts as a value; this
    is what reproduces the captured item (metadata-json-file before results-json-file).
    """
    groups: dict[str, list[ComponentInterfaceValue]] = {
        "values": [],
        "thumbnails": [],
        "charts": [],
        "files": [],
        "images": [],
    }
    for civ in sorted(civs, key=lambda c: c.interface.slug):
        ci = civ.interface
        if ci.is_json_kind:
            groups["charts" if ci.kind == "Chart" else "values"].append(civ)
        elif ci.super_kind == "File":
            groups["thumbnails" if ci.kind.startswith("Thumbnail") else "files"].append(civ)
        else:
            groups["images"].append(civ)
    return [civ for group in groups.values() for civ in group]


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
