"""Pure text and bytes of the files gcfs generates: metadata JSON, the root README, stubs."""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

from . import __version__


def metadata_json(obj: Any) -> bytes:
    """An API object exactly as served: same keys in the same order, 2-space indent, UTF-8,
    trailing newline (layout.md, "Metadata files")."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON may carry "\ud800", UTF-8 cannot): keep the data exactly,
        # as JSON escapes, rather than fail the file or alter a value.
        return (json.dumps(obj, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def root_readme(
    *,
    base_url: str,
    username: str,
    ttl: float,
    token_rejected: bool = False,
    offline_since: float | None = None,
) -> bytes:
    """`offline_since`: when the server stopped answering (epoch seconds), while it is down."""
    warning = ""
    if offline_since is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(offline_since))
        warning += f"""
WARNING: {base_url} is offline since {since}. What you have seen is shown as it was
last fetched, however old; anything else fails with "Input/output error". gcfs asks the
server again in the background and says in its log when it is back.
"""
    if token_rejected:
        warning += f"""
WARNING: {base_url} now rejects the API token (revoked or expired). Reads that need the
server fail with "Permission denied"; what was seen before is still shown. Create a new
token at {base_url}/settings/api-tokens/ and put it in the token file: gcfs picks it up
without a remount.
"""
    text = f"""# Grand Challenge, mounted by gcfs {__version__}
{warning}
Server: {base_url}
Signed in as: {username}

This is a read-only view of what your API token can see on {base_url}.
Nothing is downloaded until you look at it; what you look at is trusted for {ttl:g} s,
then fetched again. That includes access to file bytes already in the block cache: they
open without asking the server while the listing that showed them is that young.

    archives/<slug>/archive.json                an archive, as the API serves it
    archives/<slug>/items/<pk>/                 item.json + its values, laid out like an
                                                algorithm's /input
    algorithms/<slug>/algorithm.json            an algorithm, with its input and output sockets
    algorithms/<slug>/jobs/<pk>/                job.json, inputs/, outputs/
    algorithms/<slug>/images/<pk>.json          container images (editors only)
    reader-studies/<slug>/reader-study.json     a reader study
    reader-studies/<slug>/questions.json        its questions, in order
    reader-studies/<slug>/display-sets/<pk>/    display-set.json + its values
    reader-studies/<slug>/answers.json|.csv     every answer you may see
    images/<pk>/                                any image by pk: image.json + its files
    api/v1/<API path>                           any object by its API URL: swap the site
                                                ({base_url}/) for this directory

Directories are named by slug; a pk (UUID) also works and is a symlink to the slug.
`gcfs path <pk, slug or URL>` prints where an object is.
An object you may not see shows as a directory holding only README.md, which says how to
request access. Every write fails with "Read-only file system".
"""
    return text.encode("utf-8")


# The website's words for each collection; the request-access page lives under the same path.
_KIND_NOUN = {"archives": "archive", "algorithms": "algorithm", "reader-studies": "reader study"}


def refresh_command(mountpoint: str, relative: str) -> str:
    """The `gcfs refresh` line a stub README prints, quoted for a shell: the mount point
    is only known once mounted (GcFilesystem.mountpoint), so README texts that name it are
    made when read; until then (never while mounted) it is named in words."""
    if not mountpoint:
        return f"gcfs refresh <mount point>/{relative}"
    path = mountpoint.rstrip("/") + "/" + relative
    return f"gcfs refresh {shlex.quote(path)}"


def stub_readme(
    *,
    collection: str,
    name: str,
    base_url: str,
    username: str,
    ttl: float,
    certain: bool,
    mountpoint: str = "",
) -> bytes:
    """The README that stands in for an object the token may not see (layout.md).

    `certain` says whether the server confirmed that the object exists; for archive slugs it
    cannot (gc-api.md §4), and the text says so plainly. It is reached as
    `<collection>/<name>`, and also as `api/v1/<collection>/<pk>` (and, for an archive item
    of an archive we may not see, `api/v1/archives/items/<item pk>`): the text names the
    object by `name`, never as "this directory".
    """
    noun = _KIND_NOUN[collection]
    by_pk = "-" in name and len(name) == 36
    if certain:
        status = f"The {noun} `{name}` exists, but your account ({username}) lacks access to it."
    else:
        status = (
            f"The {noun} `{name}` is not visible to you: it does not exist, or your account "
            f"({username}) lacks access. Grand Challenge does not tell the two apart for "
            f"{collection}."
        )
    if by_pk:
        pages = (
            f"`{name}` is the {noun}'s primary key; its page is found by slug. Ask the owner\n"
            f"for the slug, then request access on\n"
            f"  {base_url}/{collection}/<slug>/permission-requests/create/"
        )
    else:
        pages = (
            f"Its page:            {base_url}/{collection}/{name}/\n"
            f"Request access here: {base_url}/{collection}/{name}/permission-requests/create/"
        )
    text = f"""# {name}: no access

{status}

{pages}

The {noun}'s editors approve requests by hand, so it can take a couple of hours.
Once access is granted, show it at {collection}/{name} at once with

    {refresh_command(mountpoint, collection)}

(or wait {ttl:g} s, the time gcfs trusts what it has seen; other paths that lead to it,
under api/, follow within that time).
"""
    return text.encode("utf-8")


def unreadable_readme(what: str, url: str, *, username: str, ttl: float) -> bytes:
    """The README standing in for an image or file that a visible object (an archive item, a
    display set, a job's inputs or outputs) references but the token may not read."""
    text = f"""# No access to {what}

An object you can see refers to {what}, but your account ({username}) may not read it:
  {url}

Access to images and files follows the archive, reader study or algorithm job they belong
to. Ask the owner of that object for access; once it is granted, `gcfs refresh` on the
archive item, display set or job directory that holds this shows the real files at once
(or wait {ttl:g} s).
"""
    return text.encode("utf-8")


def hidden_image_readme(
    pk: str, url: str, *, username: str, ttl: float, mountpoint: str = ""
) -> bytes:
    """The README standing in for `images/<pk>` (or `api/v1/cases/images/<pk>`) of an image
    that exists but the token may not read. Nothing visible led here: the pk was typed in,
    so the text claims no referring object (the server confirmed only that the image exists,
    through the jobs' `input_image` filter)."""
    text = f"""# No access to image {pk}

The image {pk} exists, but your account ({username}) may not read it:
  {url}

Access to an image follows the archive, reader study or algorithm job it belongs to. Ask
the owner of that object for access; once it is granted,

    {refresh_command(mountpoint, "images")}

shows it at images/{pk} at once (or wait {ttl:g} s, the time gcfs trusts what it has seen;
other paths that lead to it, under api/, follow within that time).
"""
    return text.encode("utf-8")


def api_stub_readme(noun: str, api_url: str, *, username: str, ttl: float, certain: bool) -> bytes:
    """The README standing in for an object looked up by API URL (`api/v1/...`) that the token
    may not see; `certain` when the server confirmed that it exists."""
    if certain:
        status = f"This {noun} exists, but your account ({username}) may not see it."
    else:
        status = (
            f"This {noun} is not visible to you: it does not exist, or your account ({username})\n"
            f"lacks access. Grand Challenge does not tell the two apart for this kind of object."
        )
    text = f"""# No access to {noun} {api_url.rstrip("/").rsplit("/", 1)[-1]}

{status}
  {api_url}

Access follows the archive, reader study or algorithm the object belongs to: ask its owner
for access. Once it is granted, `gcfs refresh` on the directory above this one shows the
object at once (or wait {ttl:g} s).
"""
    return text.encode("utf-8")
