"""The rule for names that come from the server (gcfs/safenames.py): examples and properties."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from gcfs.safenames import NAME_MAX, is_safe_name, numbered_name, safe_name, unique_names

# Any code point, surrogates included: JSON can carry a lone `\ud800`.
ANY_CHAR = st.one_of(st.characters(), st.characters(categories=["Cs"]))
HOSTILE = st.sampled_from(["", ".", "..", "/", "\0", "a/b", "a\0b", "\x7f", "\x9b", "\ud800"])


def long_text(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Strings around and far past 255 bytes: a short piece repeated."""
    return st.builds(
        lambda piece, n: piece * n, st.text(alphabet, min_size=1, max_size=4), st.integers(1, 400)
    )


RAW_NAMES = st.one_of(
    st.text(),
    st.text(ANY_CHAR),
    HOSTILE,
    st.text(st.sampled_from("/.\0a~_")),
    long_text(ANY_CHAR),
    st.builds(
        lambda stem, ext: stem + ext,
        long_text(st.characters()),
        st.sampled_from([".mha", ".tif", ".dcm", ".nii.gz", ""]),
    ),
)
ORDINARY = st.text(
    st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="/"), min_size=1, max_size=80
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= NAME_MAX)


def utf8_len(name: str) -> int:
    return len(name.encode("utf-8"))


def assert_safe(name: str) -> None:
    assert name not in ("", ".", "..")
    assert "/" not in name
    assert "\0" not in name
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name)
    assert utf8_len(name) <= NAME_MAX  # also proves it encodes: no lone surrogate
    assert is_safe_name(name)


def test_examples() -> None:
    assert safe_name("") == "_"
    assert safe_name(".") == "_."
    assert safe_name("..") == "_.."
    assert safe_name("...") == "..."
    assert safe_name(".zattrs") == ".zattrs"
    assert safe_name("a/b") == "a_b"
    assert safe_name("a\0b\nc\x7f") == "a_b_c_"
    assert safe_name("100% sure.json") == "100% sure.json"
    assert safe_name("slide one.tif") == "slide one.tif"
    assert safe_name("\ud800.mha") == "_.mha"


def test_long_names_keep_their_extension_and_a_hash() -> None:
    raw = "x" * 300 + ".nii.gz"
    name = safe_name(raw)
    digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
    assert utf8_len(name) == NAME_MAX
    assert name.endswith(f"~{digest}.nii.gz")
    assert name.startswith("x" * 200)
    # Two-byte characters: the cut never splits one (the result decodes and is a prefix).
    wide = safe_name("é" * 200 + ".mha")
    assert wide.endswith(".mha")
    assert utf8_len(wide) <= NAME_MAX
    assert "é" * 100 in wide
    assert safe_name("a" * 255) == "a" * 255
    assert safe_name("a" * 256) != "a" * 255


def test_unique_names_examples() -> None:
    assert unique_names(["scan.mha", "scan.mha", "scan.mha"]) == [
        "scan.mha",
        "scan~2.mha",
        "scan~3.mha",
    ]
    assert unique_names(["a/b", "a_b"]) == ["a_b", "a_b~2"]
    assert unique_names(["item.json"], reserved=["item.json"]) == ["item~2.json"]
    assert unique_names(["x.nii.gz", "x.nii.gz"]) == ["x.nii.gz", "x~2.nii.gz"]
    assert unique_names(["", "", ".."]) == ["_", "_~2", "_.."]
    # The first to ask keeps a name; a later raw name equal to a numbered one is numbered.
    assert unique_names(["a", "a", "a~2"]) == ["a", "a~2", "a~2~2"]


def test_numbered_name_stays_short() -> None:
    name = numbered_name("y" * 251 + ".mha", 1234)
    assert name.endswith("~1234.mha")
    assert utf8_len(name) == NAME_MAX
    assert numbered_name("scan.mha", 1) == "scan.mha"


@settings(max_examples=300, deadline=None)
@given(RAW_NAMES)
def test_safe_name_is_always_safe_and_deterministic(raw: str) -> None:
    name = safe_name(raw)
    assert_safe(name)
    assert safe_name(raw) == name
    assert safe_name(name) == name  # idempotent: a safe name is an ordinary name


@settings(max_examples=200, deadline=None)
@given(ORDINARY)
def test_ordinary_names_are_unchanged(raw: str) -> None:
    assert safe_name(raw) == raw


@settings(max_examples=200, deadline=None)
@given(st.text(ANY_CHAR, min_size=1, max_size=3), st.integers(256, 400), st.text(ANY_CHAR))
def test_distinct_long_names_stay_distinct(piece: str, n: int, other: str) -> None:
    """Long names that differ anywhere (also only in characters rule 1 turns into `_`) get
    different names: the hash is of the raw name."""
    a = piece * n + ".mha"
    b = piece * n + other + ".mha"
    if a != b:
        assert safe_name(a) != safe_name(b)
        assert safe_name(a).endswith(".mha") and safe_name(b).endswith(".mha")


@settings(max_examples=200, deadline=None)
@given(st.lists(RAW_NAMES, max_size=12), st.lists(RAW_NAMES, max_size=4))
def test_unique_names(raws: list[str], reserved: list[str]) -> None:
    names = unique_names(raws, reserved=reserved)
    assert len(names) == len(raws)
    assert len(set(names)) == len(names)
    assert not set(names) & set(reserved)
    for name in names:
        assert_safe(name)
    assert unique_names(raws, reserved=reserved) == names
    # The first occurrence of a safe name keeps it, if it was free.
    for index, raw in enumerate(raws):
        plain = safe_name(raw)
        earlier = {safe_name(r) for r in raws[:index]} | set(names[:index]) | set(reserved)
        if plain not in earlier:
            assert names[index] == plain


@settings(max_examples=200, deadline=None)
@given(RAW_NAMES, st.integers(1, 10**6))
def test_numbered_names_are_safe(raw: str, n: int) -> None:
    name = numbered_name(safe_name(raw), n)
    assert_safe(name)
    if n > 1:
        assert f"~{n}" in name
