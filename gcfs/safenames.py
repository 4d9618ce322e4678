"""Pure rules that turn names from the server into names a directory can hold.

Names in the tree come from server data: socket `relative_path` segments, file names (the
last segment of a file URL, percent-decoded), DICOM SOP Instance UIDs, slugs, pks. The server
is trusted for bytes but not for names: a broken or hostile one could send `/`, NUL, `.`,
`..`, empty names, names longer than Linux allows, or two files with the same name. The rule,
applied to every such name:

1. **Characters.** Every `/`, every control character (Unicode category Cc: U+0000-U+001F,
   U+007F-U+009F) and every surrogate code point (U+D800-U+DFFF, which JSON can carry as a
   lone `\\ud800` escape but UTF-8 cannot encode) becomes `_`. Everything else, including
   spaces, `%`, `\\`, `~`, non-ASCII letters and emoji, is kept as it is. `_` rather than
   percent-escaping: a name keeps its length and looks like itself, and an escape would be
   ambiguous anyway unless `%` were escaped too, which would change ordinary names such as
   `100%.json`; the collisions `_` can cause (`a/b` and `a_b`) are resolved by rule 4.
2. **Special names.** `""` becomes `_`, `.` becomes `_.`, `..` becomes `_..`. Any other name
   may start with a dot (`.zattrs` stays `.zattrs`, a hidden file, as on the platform).
3. **Length.** A name longer than 255 bytes in UTF-8 (Linux NAME_MAX) becomes
   `<prefix>~<hash><ext>`: `<ext>` is the name's extension, the last one or two dot-parts of
   1-16 ASCII letters or digits each (`.mha`, `.tif`, `.dcm`, `.nii.gz`); `<hash>` is the
   first 16 hex digits of the SHA-256 of the raw name (UTF-8, surrogates passed through), so
   distinct long names stay distinct; `<prefix>` is the start of the name after rules 1-2,
   cut at a character boundary so the whole is at most 255 bytes.
4. **Uniqueness.** In a directory, names are taken in the server's order: the first to ask
   for a name gets it; a later, different entry asking for a taken name gets the first free
   `numbered_name(name, n)` for n = 2, 3, ...: `<stem>~<n><ext>` (`scan.mha`, `scan~2.mha`,
   `scan~3.mha`; `<ext>` as in rule 3, `<stem>` shortened at a character boundary if the
   result would pass 255 bytes). An entry identical to the one already there (the same URL
   listed twice) is dropped, not numbered (layout.py).

Rules 1-3 are `safe_name`; `safe_name(safe_name(x)) == safe_name(x)`, and an ordinary name
(no `/`, no control character, not `""`/`.`/`..`, at most 255 bytes) is returned unchanged.
Rule 4 is `unique_names` for a list of names, and `numbered_name` for code that places
entries one at a time. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

# Linux NAME_MAX: the longest name a directory entry may have, in bytes.
NAME_MAX = 255

# One or two trailing dot-parts of ASCII letters and digits: `.mha`, `.tif`, `.nii.gz`.
_EXTENSION = re.compile(r"(?:\.[A-Za-z0-9]{1,16}){1,2}\Z")
_SPECIAL = {"": "_", ".": "_.", "..": "_.."}
_HASH_DIGITS = 16


def _bad(char: str) -> bool:
    code = ord(char)
    return char == "/" or code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _cut(text: str, limit: int) -> str:
    """The longest prefix of `text` that is at most `limit` bytes in UTF-8."""
    return text.encode("utf-8")[: max(limit, 0)].decode("utf-8", errors="ignore")


def split_extension(name: str) -> tuple[str, str]:
    """`(stem, ext)` with `ext` as in rule 3 (possibly ""); the stem is never empty unless
    the name is."""
    match = _EXTENSION.search(name, 1)
    if match is None:
        return name, ""
    return name[: match.start()], match.group()


def safe_name(raw: str) -> str:
    """`raw` made a valid single path component by rules 1-3 of the module docstring."""
    cleaned = "".join("_" if _bad(c) else c for c in raw)
    cleaned = _SPECIAL.get(cleaned, cleaned)
    if _utf8_len(cleaned) <= NAME_MAX:
        return cleaned
    digest = hashlib.sha256(raw.encode("utf-8", errors="surrogatepass")).hexdigest()
    stem, ext = split_extension(cleaned)
    tail = f"~{digest[:_HASH_DIGITS]}{ext}"
    return _cut(stem, NAME_MAX - _utf8_len(tail)) + tail


def numbered_name(name: str, n: int) -> str:
    """The n-th name for entries that all asked for the safe name `name` (rule 4):
    `name` itself for n = 1, else `<stem>~<n><ext>`, at most 255 bytes."""
    if n <= 1:
        return name
    stem, ext = split_extension(name)
    tail = f"~{n}{ext}"
    return _cut(stem, NAME_MAX - _utf8_len(tail)) + tail


def unique_names(raws: Iterable[str], *, reserved: Iterable[str] = ()) -> list[str]:
    """Safe names for `raws`, in order, unique among themselves and against `reserved`
    (rule 4): the first to ask for a name keeps it, later ones are numbered."""
    taken = set(reserved)
    names: list[str] = []
    for raw in raws:
        base = safe_name(raw)
        n = 1
        while (name := numbered_name(base, n)) in taken:
            n += 1
        taken.add(name)
        names.append(name)
    return names


def is_safe_name(name: str) -> bool:
    """True for a name `safe_name` could have produced: what the tree may hold."""
    return name not in _SPECIAL and not any(_bad(c) for c in name) and _utf8_len(name) <= NAME_MAX
