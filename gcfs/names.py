"""Pure rules for the names users type and the identifiers the API uses.

Shells, file managers and editors probe names that can never exist on Grand Challenge
(`.git`, `desktop.ini`, `Thumbs.db`, `Foo`). Those must fail with ENOENT before any request is
made, so the rules here decide from the name alone whether it could be a slug or a pk.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

# Django's slugify gives lower-case ASCII letters, digits, hyphens and underscores; Grand
# Challenge slugs never start with a hyphen or underscore. Slug fields hold at most 50 characters
# in Django by default; we allow up to 255 (a name's limit) so a longer slug is never hidden.
_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,254}")
# Primary keys of archives, algorithms, reader studies, items, images, jobs... are UUIDs, which
# DRF renders in lower-case canonical form.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_uuid(name: str) -> bool:
    """True for a canonical lower-case UUID, the form the API gives every pk."""
    return _UUID.fullmatch(name) is not None


def is_slug(name: str) -> bool:
    """True for a name that Grand Challenge could have given an object as its slug."""
    return _SLUG.fullmatch(name) is not None


def could_be_identifier(name: str) -> bool:
    """True if the name could be a slug or a pk; anything else is ENOENT without a request."""
    return is_uuid(name) or is_slug(name)


def slug_from_url(url: str, collection: str) -> str | None:
    """The slug in a website URL such as `https://grand-challenge.org/archives/<slug>/`.

    Archives carry no `slug` field in the API (gc-api.md §3.1), so their directory names come
    from `url`. Returns None when the URL does not have the expected shape.
    """
    try:
        path = urlsplit(url).path
    except ValueError:  # e.g. "http://[" from a broken server
        return None
    parts = [unquote(p) for p in path.split("/") if p]
    if len(parts) >= 2 and parts[-2] == collection and is_slug(parts[-1]):
        return parts[-1]
    return None


# The directory of the API's URLs as paths (apitree.py): looked up at the root, never listed.
API_DIR = "api"
