"""Property tests: layout.py and answers_csv.py take any JSON a server could send.

The strategies build values, images and answers shaped like the API's, with every field now
and then replaced by hostile or wrong-typed JSON. The properties: nothing but BadResponse is
raised, every name in the tree is safe (safenames.py), nothing escapes the object's directory,
different entries are never silently dropped, Value sockets hold `json.dumps(value)`, DZI
files never appear, and answers.csv always parses with one row per answer object.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcfs import layout
from gcfs.answers_csv import CHOICE_TYPES, COLUMNS, render_answers_csv
from gcfs.errors import BadResponse
from gcfs.safenames import NAME_MAX, is_safe_name

PKS = [
    "9a6b3c2d-1e0f-4a5b-8c7d-6e5f4a3b2c1d",
    "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e",
    "e7f8a9b0-c1d2-4e3f-8a4b-5c6d7e8f9a0b",
]
# URL path markers: which kind of generated URL a RemoteFile came from.
SHOWN, HIDDEN, FILES, DICOM = "/shown-image-file/", "/dzi-or-other/", "/file-socket/", "/dicom/"

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
hostile_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", ".", "..", "/", "\0", "..\0", "a/../b", "../../etc/passwd", "x" * 300]),
    st.text(st.sampled_from("/.\0a~_%"), max_size=12),
    st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=3), st.integers(80, 300)),
)
common_paths = st.sampled_from(["images/ct", "images/ct/meta.json", "result.json", "images", ""])
relative_paths = st.one_of(
    common_paths,  # twice: values that share a path are the interesting case
    common_paths,
    hostile_text,
    st.lists(hostile_text, max_size=4).map("/".join),
    json_values,
)
# Last URL segments: raw text percent-encoded, plus hand-made hostile escapes.
segments = st.one_of(
    st.text(max_size=30).map(lambda s: quote(s, safe="")),
    st.sampled_from(["%2F", "%00", "a%2F..%2Fb", "..", ".", "%2E%2E", "%ff%fe", "scan.mha", ""]),
    st.builds(lambda n: "y" * n + ".mha", st.integers(200, 300)),
)
malformed_urls = st.sampled_from(["", "http://[", "javascript:alert(1)", "/relative", "ftp://x/y"])


def urls(marker: str) -> st.SearchStrategy[Any]:
    good = st.builds(lambda s: f"https://gc.test/media{marker}{s}", segments)
    return st.one_of(good, good, malformed_urls, json_values)


image_urls = st.one_of(
    st.sampled_from(PKS).map(lambda pk: f"https://gc.test/api/v1/cases/images/{pk}/"),
    st.sampled_from(["https://gc.test/api/v1/cases/images/not-a-pk/", "http://[", ""]),
    json_values,
)
sockets = st.fixed_dictionaries(
    {},
    optional={
        "slug": st.one_of(hostile_text, json_values),
        "super_kind": st.one_of(
            st.sampled_from(["Value", "File", "Image", "Unknown"]), json_values
        ),
        "relative_path": relative_paths,
    },
)
value_dicts = st.fixed_dictionaries(
    {},
    optional={
        "socket": st.one_of(sockets, json_values),
        "interface": st.one_of(sockets, json_values),
        "value": json_values,
        "file": urls(FILES),
        "image": image_urls,
        "pk": json_values,
    },
)
# Well-formed values on a few shared paths: collisions are frequent, so dropping is caught.
clean_values = st.one_of(
    st.builds(
        lambda path, data: {
            "socket": {"super_kind": "Value", "relative_path": path},
            "value": data,
        },
        common_paths,
        json_values,
    ),
    st.builds(
        lambda path, seg: {
            "socket": {"super_kind": "File", "relative_path": path},
            "file": f"https://gc.test/media{FILES}{seg}",
        },
        common_paths,
        st.sampled_from(["a", "b", "c"]),
    ),
    st.builds(
        lambda path, pk: {
            "interface": {"super_kind": "Image", "relative_path": path},
            "image": f"https://gc.test/api/v1/cases/images/{pk}/",
        },
        common_paths,
        st.sampled_from(PKS),
    ),
)
image_file_dicts = st.one_of(
    st.fixed_dictionaries({"file": urls(SHOWN), "image_type": st.sampled_from(["MHD", "TIFF"])}),
    st.fixed_dictionaries(
        {
            "file": urls(HIDDEN),
            "image_type": st.one_of(st.sampled_from(["DZI", "mhd"]), json_values),
        }
    ),
    json_values,
)
image_dicts = st.fixed_dictionaries(
    {"files": st.one_of(st.lists(image_file_dicts, max_size=5), json_values)},
    optional={"pk": json_values},
)
uids = st.one_of(
    st.text(st.sampled_from("0123456789."), min_size=1, max_size=70), st.text(max_size=10)
)
raw_instances = st.one_of(
    st.fixed_dictionaries(
        {
            "sop_instance_uid": uids,
            "get_instance": st.fixed_dictionaries(
                {"url": urls(DICOM)},
                optional={
                    "headers": st.dictionaries(st.text(max_size=8), json_scalars, max_size=2)
                },
            ),
        }
    ),
    json_values,
)


def walk(directory: layout.Directory) -> Iterator[tuple[list[str], layout.Entry]]:
    """Every entry below `directory` with its path, iteratively (paths can be deep)."""
    stack: list[tuple[list[str], layout.Directory]] = [([], directory)]
    while stack:
        path, current = stack.pop()
        for name, entry in current.entries.items():
            yield [*path, name], entry
            if isinstance(entry, layout.Directory):
                stack.append(([*path, name], entry))


def is_image_value(value: Mapping[str, Any]) -> bool:
    return layout.socket_of(value).get("super_kind") == "Image" or value.get("image") is not None


def usable_segments(value: Mapping[str, Any]) -> list[str]:
    relative = layout.socket_of(value).get("relative_path")
    return layout.path_segments(relative) if isinstance(relative, str) else []


def is_fetchable(url: object) -> bool:
    return isinstance(url, str) and url.startswith("https://gc.test/media/")


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.one_of(clean_values, value_dicts, value_dicts, json_values), max_size=8),
    images=st.dictionaries(st.sampled_from(PKS), st.one_of(image_dicts, image_dicts, json_values)),
    dicom_raw=st.dictionaries(st.sampled_from(PKS), st.lists(raw_instances, max_size=4)),
)
def test_lay_out_values_takes_any_json(
    values: list[Any], images: dict[str, Any], dicom_raw: dict[str, list[Any]]
) -> None:
    dicom = {pk: layout.dicom_instances(raw) for pk, raw in dicom_raw.items()}
    try:
        tree = layout.lay_out_values(values, images, dicom)
    except BadResponse:
        # A list of values is never wholly unusable: each bad one is skipped on its own.
        pytest.fail("a list of values raised BadResponse")
    entries = list(walk(tree))

    # Every name is safe; nothing escapes; no empty directory name; the tree is well-typed.
    for path, entry in entries:
        name = path[-1]
        assert is_safe_name(name), path
        assert name not in ("", ".", "..") and "/" not in name and "\0" not in name
        assert len(name.encode("utf-8")) <= NAME_MAX
        assert isinstance(
            entry, layout.InlineFile | layout.RemoteFile | layout.Unreadable | layout.Directory
        )
    remote = {e.url for _, e in entries if isinstance(e, layout.RemoteFile)}
    inline = {e.data for _, e in entries if isinstance(e, layout.InlineFile)}

    # No DZI (or unknown type) image file is shown; every URL shown is one we generated.
    assert not any(HIDDEN in url for url in remote)
    assert all(is_fetchable(url) for url in remote)

    dicts = [v for v in values if isinstance(v, dict)]
    for value in dicts:
        segments = usable_segments(value)
        if is_image_value(value):
            continue
        if value.get("file") is not None:
            # A usable File socket is never silently dropped, even when its name collides.
            if is_fetchable(value["file"]) and segments:
                assert value["file"] in remote
        elif segments:
            # A Value socket holds json.dumps(value), whatever else is in the directory.
            assert json.dumps(value.get("value")).encode() in inline

    # Every MHD/TIFF file of a readable image in use is shown (numbered if its name collides).
    used = {layout.image_pk_of(v) for v in dicts if is_image_value(v)}
    for pk in used:
        image = images.get(pk) if pk else None
        if not isinstance(image, dict) or not isinstance(image.get("files"), list):
            continue
        for image_file in image["files"]:
            if (
                isinstance(image_file, dict)
                and image_file.get("image_type") in ("MHD", "TIFF")
                and is_fetchable(image_file.get("file"))
            ):
                assert image_file["file"] in remote
        for instance in dicom.get(pk, []) if pk else []:
            assert instance.url in remote


@settings(max_examples=100, deadline=None)
@given(
    path=relative_paths.filter(lambda p: isinstance(p, str)),
    data=json_values,
    rest=st.lists(value_dicts, max_size=4),
)
def test_first_value_lands_at_its_path(path: str, data: Any, rest: list[Any]) -> None:
    """The first value placed has the whole tree to itself: it is exactly at its safe path."""
    first = {"socket": {"super_kind": "Value", "relative_path": path}, "value": data}
    tree = layout.lay_out_values([first, *rest], {}, {})
    segments = layout.path_segments(path)
    assert all(s not in ("", ".", "..") and is_safe_name(s) for s in segments)
    if not segments:
        return
    entry: layout.Entry = tree
    for segment in segments:
        assert isinstance(entry, layout.Directory)
        entry = entry.entries[segment]
    assert entry == layout.InlineFile(json.dumps(data).encode("utf-8"))


@settings(max_examples=100, deadline=None)
@given(image=st.one_of(image_dicts, json_values), raw=st.lists(raw_instances, max_size=5))
def test_image_files_takes_any_json(image: Any, raw: list[Any]) -> None:
    instances = layout.dicom_instances(raw)
    for instance in instances:
        assert instance.sop_instance_uid.replace(".", "").isascii()
        assert all("\n" not in k + v and "\r" not in k + v for k, v in instance.headers)
    try:
        files = layout.image_files(image, instances)
    except BadResponse:
        assert not isinstance(image, dict)
        return
    assert isinstance(image, dict)
    for name, entry in files.items():
        assert is_safe_name(name)
        assert isinstance(entry, layout.RemoteFile)
        assert HIDDEN not in entry.url
    # Each distinct (name, file) asked for is shown exactly once: the same URL listed twice
    # is shown once, different files that want one name are all shown (numbered).
    listed = image["files"] if isinstance(image.get("files"), list) else []
    asked = {
        (layout.file_name_of(f["file"]), layout.RemoteFile(f["file"]))
        for f in listed
        if isinstance(f, dict)
        and f.get("image_type") in ("MHD", "TIFF")
        and is_fetchable(f["file"])
    }
    asked |= {(f"{i.sop_instance_uid}.dcm", layout.RemoteFile(i.url, i.headers)) for i in instances}
    assert len(files) == len(asked)
    assert set(files.values()) == {entry for _, entry in asked}


def test_non_list_values_are_a_bad_response() -> None:
    for values in ({"a": 1}, "values", 3, None):
        with pytest.raises(BadResponse):
            layout.lay_out_values(values, {}, {})  # type: ignore[arg-type]


def test_two_different_files_with_one_name_are_both_shown() -> None:
    pk = PKS[0]
    value = {
        "socket": {"super_kind": "Image", "relative_path": "images/ct"},
        "image": f"https://gc.test/api/v1/cases/images/{pk}/",
    }
    image = {
        "files": [
            {"file": "https://gc.test/media/a/scan.mha", "image_type": "MHD"},
            {"file": "https://gc.test/media/b/scan.mha", "image_type": "MHD"},
            {"file": "https://gc.test/media/a/scan.mha", "image_type": "MHD"},  # listed twice
            {"file": "https://gc.test/media/c/x%2F..%2Fy%00.mha", "image_type": "TIFF"},
        ]
    }
    tree = layout.lay_out_values([value], {pk: image}, {})
    images = tree.entries["images"]
    assert isinstance(images, layout.Directory)
    ct = images.entries["ct"]
    assert isinstance(ct, layout.Directory)
    assert ct.entries == {
        "scan.mha": layout.RemoteFile("https://gc.test/media/a/scan.mha"),
        "scan~2.mha": layout.RemoteFile("https://gc.test/media/b/scan.mha"),
        "x_.._y_.mha": layout.RemoteFile("https://gc.test/media/c/x%2F..%2Fy%00.mha"),
    }


def test_colliding_values_are_numbered_and_directories_merge() -> None:
    def value(path: str, data: Any) -> dict[str, Any]:
        return {"socket": {"super_kind": "Value", "relative_path": path}, "value": data}

    media = "https://gc.test/media/files"
    values = [
        value("a.json", 1),
        value("a.json", 1),  # the same bytes at the same path: shown once
        value("a.json", 2),
        value("a\0.json", 3),
        value("a.json/inner.json", 4),  # a.json is a file: the directory is numbered
        value("d/x.json", 5),
        value("d/y.json", 6),
        value("./../d/" + "z" * 300 + ".json", 7),  # .. is dropped, not followed
        "not a value",
        {"socket": "garbage", "value": 8},
        {"socket": {"super_kind": "File", "relative_path": "f.bin"}, "file": f"{media}/1/f"},
        {"socket": {"super_kind": "File", "relative_path": "f.bin"}, "file": f"{media}/2/f"},
        {"socket": {"super_kind": "File", "relative_path": "f.bin"}, "file": f"{media}/1/f"},
        {"socket": {"super_kind": "File", "relative_path": "g.bin"}, "file": "http://["},
    ]
    tree = layout.lay_out_values(values, {}, {})
    assert sorted(tree.entries) == [
        "a.json",
        "a_.json",
        "a~2.json",
        "a~3.json",
        "d",
        "f.bin",
        "f~2.bin",
    ]
    assert tree.entries["f.bin"] == layout.RemoteFile(f"{media}/1/f")
    assert tree.entries["f~2.bin"] == layout.RemoteFile(f"{media}/2/f")
    assert tree.entries["a.json"] == layout.InlineFile(b"1")
    assert tree.entries["a~2.json"] == layout.InlineFile(b"2")
    numbered = tree.entries["a~3.json"]
    assert isinstance(numbered, layout.Directory)
    assert numbered.entries == {"inner.json": layout.InlineFile(b"4")}
    d = tree.entries["d"]
    assert isinstance(d, layout.Directory)
    assert len(d.entries) == 3
    assert all(len(name.encode()) <= NAME_MAX for name in d.entries)
    assert next(n for n in d.entries if n.startswith("zzz")).endswith(".json")


def test_metadata_name_never_passes_name_max() -> None:
    taken = {"_" * k + "item.json": 1 for k in range(300)}
    name = layout.metadata_name("item.json", taken)
    assert name == "item~2.json"


# -- answers.csv -----------------------------------------------------------------------------

API = "https://gc.test/api/v1/reader-studies"
pk_refs = st.one_of(
    st.sampled_from(PKS).map(lambda pk: f"{API}/questions/{pk}/"), st.just("http://["), json_values
)
questions = st.fixed_dictionaries(
    {},
    optional={
        "pk": st.one_of(st.sampled_from(PKS), json_values),
        "question_text": json_values,
        "answer_type": st.one_of(
            st.sampled_from(["Choice", "Multiple choice", "Number", "Text"]), json_values
        ),
        "options": st.one_of(
            st.lists(
                st.one_of(
                    st.fixed_dictionaries(
                        {"id": st.one_of(st.integers(0, 3), json_values)},
                        optional={"title": json_values},
                    ),
                    json_values,
                ),
                max_size=4,
            ),
            json_values,
        ),
    },
)
display_sets = st.fixed_dictionaries(
    {},
    optional={
        "pk": st.one_of(st.sampled_from(PKS), json_values),
        "title": json_values,
        "title_safe": json_values,
    },
)
answers = st.fixed_dictionaries(
    {},
    optional={
        "pk": st.one_of(st.text(st.characters(codec="utf-8")), json_values),
        "answer": st.one_of(st.integers(0, 4), st.lists(st.integers(0, 4)), json_values),
        "question": pk_refs,
        "display_set": pk_refs.map(
            lambda u: u.replace("/questions/", "/display-sets/") if isinstance(u, str) else u
        ),
        "answer_image": json_values,
        "creator": json_values,
        "created": json_values,
        "is_ground_truth": json_values,
    },
)


@settings(max_examples=150, deadline=None)
@given(
    answer_list=st.lists(st.one_of(answers, answers, json_values), max_size=6),
    question_list=st.lists(st.one_of(questions, json_values), max_size=4),
    display_set_list=st.lists(st.one_of(display_sets, json_values), max_size=3),
)
def test_answers_csv_takes_any_json(
    answer_list: list[Any], question_list: list[Any], display_set_list: list[Any]
) -> None:
    data = render_answers_csv(answer_list, question_list, display_set_list)
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert rows[0] == list(COLUMNS)
    objects = [a for a in answer_list if isinstance(a, dict)]
    assert len(rows) == 1 + len(objects)
    for row, answer in zip(rows[1:], objects, strict=True):
        assert len(row) == len(COLUMNS)
        if isinstance(answer.get("pk"), str):
            assert row[0] == answer["pk"]
        # One rule for the answer column: every cell is JSON; outside choice questions it is
        # the answer itself (a text "true" stays a string, never a Bool).
        cell = json.loads(row[COLUMNS.index("answer")])
        if row[COLUMNS.index("answer_type")] not in CHOICE_TYPES:
            assert json.dumps(cell, ensure_ascii=False) == _as_written(answer.get("answer"))


def _as_written(value: Any) -> str:
    """`value` as JSON text the way a UTF-8 file can hold it (a lone surrogate becomes
    U+FFFD); compared as text because NaN is not equal to itself."""
    text = json.dumps(value, ensure_ascii=False)
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def test_answers_csv_rejects_only_non_lists() -> None:
    with pytest.raises(BadResponse):
        render_answers_csv({"results": []}, [], [])  # type: ignore[arg-type]
    data = render_answers_csv([{"pk": "\ud800", "answer": ["\udfff"]}], [], [])
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert rows[1][0] == "\ufffd"
    assert json.loads(rows[1][COLUMNS.index("answer")]) == ["\ufffd"]
