"""Pure layout rules: values as an algorithm's /input, metadata renaming, answers.csv."""

from __future__ import annotations

import csv
import io
import json
import logging
from typing import Any

import pytest

from gcfs import layout
from gcfs.answers_csv import COLUMNS, render_answers_csv

IMAGE_PK = "9a6b3c2d-1e0f-4a5b-8c7d-6e5f4a3b2c1d"


def socket(slug: str, super_kind: str, relative_path: str) -> dict[str, Any]:
    return {"slug": slug, "super_kind": super_kind, "relative_path": relative_path}


def image(files: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "pk": IMAGE_PK,
        "files": [
            {"file": f"https://gc.test/media/images/9a/6b/{IMAGE_PK}/f/{name}", "image_type": kind}
            for name, kind in files
        ],
    }


def test_value_socket_is_compact_json() -> None:
    """A Value socket holds json.dumps(value): compact, no trailing newline; false/0 kept."""
    values = [
        {"interface": socket("age", "Value", "patient-age.json"), "value": 63},
        {"interface": socket("flag", "Value", "flag.json"), "value": False},
        {"interface": socket("res", "Value", "nested/results.json"), "value": {"a": [1, 2]}},
    ]
    tree = layout.lay_out_values(values, {}, {})
    assert tree.entries["patient-age.json"] == layout.InlineFile(b"63")
    assert tree.entries["flag.json"] == layout.InlineFile(b"false")
    nested = tree.entries["nested"]
    assert isinstance(nested, layout.Directory)
    assert nested.entries["results.json"] == layout.InlineFile(b'{"a": [1, 2]}')


def test_socket_field_wins_over_interface() -> None:
    """The live API's `socket` is read when present (gc-api.md §9)."""
    value = {
        "interface": socket("old", "Value", "old.json"),
        "socket": socket("new", "Value", "new.json"),
        "value": 1,
    }
    assert list(layout.lay_out_values([value], {}, {}).entries) == ["new.json"]


def test_image_socket_directory_and_dzi_left_out() -> None:
    value = {
        "interface": socket("ct", "Image", "images/ct-image"),
        "image": f"https://gc.test/api/v1/cases/images/{IMAGE_PK}/",
    }
    files = image([("scan.mha", "MHD"), ("scan.dzi", "DZI"), ("slide%20one.tif", "TIFF")])
    tree = layout.lay_out_values([value], {IMAGE_PK: files}, {})
    images = tree.entries["images"]
    assert isinstance(images, layout.Directory)
    ct = images.entries["ct-image"]
    assert isinstance(ct, layout.Directory)
    assert sorted(ct.entries) == ["scan.mha", "slide one.tif"]


def test_empty_relative_path_puts_files_in_the_item() -> None:
    """generic-medical-image has an empty relative_path: its files sit beside item.json."""
    value = {
        "interface": socket("generic-medical-image", "Image", ""),
        "image": f"https://gc.test/api/v1/cases/images/{IMAGE_PK}/",
    }
    files = image([("a.mhd", "MHD"), ("a.zraw", "MHD")])
    tree = layout.lay_out_values([value], {IMAGE_PK: files}, {})
    assert sorted(tree.entries) == ["a.mhd", "a.zraw"]


def test_unreadable_image_is_marked() -> None:
    value = {
        "interface": socket("ct", "Image", "images/ct"),
        "image": f"https://gc.test/api/v1/cases/images/{IMAGE_PK}/",
    }
    tree = layout.lay_out_values([value], {}, {})
    images = tree.entries["images"]
    assert isinstance(images, layout.Directory)
    assert isinstance(images.entries["ct"], layout.Unreadable)


def test_imageless_value_is_said_once_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """An image socket with `"image": null` (the real server has them) shows nothing and is
    logged once per value pk at DEBUG, however often it is laid out; memory stays bounded."""
    caplog.set_level(logging.DEBUG, logger="gcfs.layout")
    layout._imageless_said.clear()
    empty = {"interface": socket("broken-image-ci", "Image", "images/ci"), "image": None}
    for _ in range(3):  # three relistings
        assert layout.lay_out_values([{**empty, "pk": 6}], {}, {}).entries == {}
    said = [r for r in caplog.records if "holds no image" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    layout.lay_out_values([{**empty, "pk": 7}], {}, {})  # another value is said too
    assert len([r for r in caplog.records if "holds no image" in r.getMessage()]) == 2
    for pk in range(10_000, 10_000 + 2 * layout.IMAGELESS_REMEMBERED):
        layout.lay_out_values([{**empty, "pk": pk}], {}, {})
    assert len(layout._imageless_said) == layout.IMAGELESS_REMEMBERED
    # An image URL without a pk is still malformed: a warning, as before.
    caplog.clear()
    layout.lay_out_values([{**empty, "pk": 8, "image": "https://gc.test/nope/"}], {}, {})
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_unsafe_segments_are_dropped() -> None:
    value = {"interface": socket("x", "Value", "../../etc/./passwd"), "value": 1}
    tree = layout.lay_out_values([value], {}, {})
    etc = tree.entries["etc"]
    assert isinstance(etc, layout.Directory)
    assert list(etc.entries) == ["passwd"]


def test_metadata_renamed_when_a_value_takes_its_name() -> None:
    assert layout.metadata_name("item.json", {"a.json": 1}) == "item.json"
    assert layout.metadata_name("item.json", {"item.json": 1}) == "_item.json"
    assert layout.metadata_name("item.json", {"item.json": 1, "_item.json": 2}) == "__item.json"


def test_answers_csv_turns_choices_into_titles() -> None:
    """Every answer cell is JSON: choice ids become option titles (a string, or a list for
    several), and a Text answer "true" stays a string, told apart from a Bool true."""
    questions = [
        {
            "pk": "q1",
            "question_text": "Nodule?",
            "answer_type": "Choice",
            "options": [{"id": 1, "title": "Yes"}, {"id": 2, "title": "No"}],
        },
        {
            "pk": "q2",
            "question_text": "Where?",
            "answer_type": "Multiple choice",
            "options": [{"id": 3, "title": "Left, upper"}, {"id": 4, "title": "Right"}],
        },
        {"pk": "q3", "question_text": "Size", "answer_type": "Number", "options": []},
        {"pk": "q4", "question_text": "Comment", "answer_type": "Text", "options": []},
        {"pk": "q5", "question_text": "Nodule seen?", "answer_type": "Bool", "options": []},
    ]
    api = "https://gc.test/api/v1/reader-studies"
    ds = "e7f8a9b0-c1d2-4e3f-8a4b-5c6d7e8f9a0b"
    q = {n: f"00000000-0000-4000-8000-00000000000{n}" for n in (1, 2, 3, 4, 5)}
    for question, n in zip(questions, (1, 2, 3, 4, 5), strict=True):
        question["pk"] = q[n]
    answers = [
        {
            "pk": "a1",
            "answer": 1,
            "question": f"{api}/questions/{q[1]}/",
            "display_set": f"{api}/display-sets/{ds}/",
            "creator": "reader01",
            "is_ground_truth": False,
            "answer_image": None,
        },
        {
            "pk": "a2",
            "answer": [3, 4],
            "question": f"{api}/questions/{q[2]}/",
            "display_set": None,
            "creator": "reader02",
            "is_ground_truth": True,
        },
        {
            "pk": "a3",
            "answer": 12.5,
            "question": f"{api}/questions/{q[3]}/",
            "display_set": f"{api}/display-sets/{ds}/",
            "creator": "reader01",
        },
        {"pk": "a4", "answer": "true", "question": f"{api}/questions/{q[4]}/"},
        {"pk": "a5", "answer": True, "question": f"{api}/questions/{q[5]}/"},
        {"pk": "a6", "answer": [3, 9], "question": f"{api}/questions/{q[2]}/"},  # 9: no option
    ]
    data = render_answers_csv(answers, questions, [{"pk": ds, "title_safe": "case 1"}])
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    assert list(rows[0]) == list(COLUMNS)
    cells = [r["answer"] for r in rows]
    assert cells == [
        '"Yes"',
        '["Left, upper", "Right"]',
        "12.5",
        '"true"',
        "true",
        '["Left, upper", 9]',
    ]
    assert [json.loads(c) for c in cells] == [
        "Yes",
        ["Left, upper", "Right"],
        12.5,
        "true",
        True,
        ["Left, upper", 9],
    ]
    assert rows[0]["display_set_title"] == "case 1"
    assert rows[0]["question_text"] == "Nodule?"
    assert rows[1]["display_set_pk"] == ""
    assert json.loads(rows[2]["answer"]) == 12.5
