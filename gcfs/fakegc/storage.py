"""The fake object store behind `/media/`: signed URLs, key lookup, Range, S3-style errors.

The site's `/media/` views answer 302 to a presigned URL on the storage origin (gc-api.md §3.12):

    {storage_url}/grand-challenge-protected/<key>?X-Amz-Algorithm=AWS4-HMAC-SHA256
        &X-Amz-Credential=...&X-Amz-Date=YYYYmmddTHHMMSSZ&X-Amz-Expires=<s>
        &X-Amz-SignedHeaders=host&X-Amz-Signature=<hex>

where the signature is an HMAC-SHA256, with a per-server secret, over the method, the path, the
date and the lifetime (`Signer.signature`). DICOM instances come from a second route shaped like
AWS HealthImaging's DICOMweb GetDICOMInstance, authenticated by signed *headers* instead
(`X-Amz-Date` plus `Authorization: AWS4-HMAC-SHA256 Credential=..., Signature=...`), as the real
server's `dicom/instances/` action hands them out:

    {storage_url}/datastore/<id>/studies/<study>/series/<series>/instances/<sop>?imageSetId=<id>

For benchmarks only, and only while `FakeGC.plain_storage_view` is on, the store also shows its
image files unsigned under `/plain/`, with HTML directory indexes, so that a generic HTTP client
such as rclone's http remote can mount the same bytes from the same server (`plain_listing`,
`plain_object`). Grand Challenge has nothing like it: off, `/plain/` is an unknown key (404).

Nothing here knows about sockets; `server.py` streams the bodies.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import html
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from gcfs.fakegc.world import Content, World, content_size

BUCKET = "grand-challenge-protected"
DATASTORE_ID = "0123456789abcdef0123456789abcdef"
REGION = "eu-central-1"
ACCESS_KEY = "gcfs-fake"
AMZ_DATE = "%Y%m%dT%H%M%SZ"
PLAIN_PREFIX = "/plain/"  # the benchmark-only unsigned view (FakeGC.plain_storage_view)
HTML_TYPE = "text/html; charset=utf-8"
XML_TYPE = "application/xml"
OCTET_STREAM = "application/octet-stream"

_IMAGE_KEY = re.compile(r"images/(?:[0-9a-fA-F]{2}/[0-9a-fA-F]{2}/)?([^/]+)/([^/]+)/([^/]+)")
_CIV_KEY = re.compile(
    r"components/componentinterfacevalue/[0-9a-fA-F]{2}/[0-9a-fA-F]{2}/(\d+)/(.+)"
)
_ALGORITHM_IMAGE_KEY = re.compile(r"docker/images/algorithms/algorithmimage/([^/]+)/(.+)")
DICOM_PATH = re.compile(
    r"/datastore/([0-9a-f]+)/studies/([0-9.]+)/series/([0-9.]+)/instances/([0-9.]+)"
)


def amz_date(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime(AMZ_DATE)


def parse_amz_date(text: str) -> float | None:
    try:
        return dt.datetime.strptime(text, AMZ_DATE).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


class Signer:
    """Presigns storage URLs and checks them. `lifetime` and `clock` are read at each use."""

    def __init__(
        self,
        storage_url: str,
        *,
        lifetime: Callable[[], int],
        clock: Callable[[], float] = time.time,
        secret: bytes | None = None,
    ) -> None:
        self.storage_url = storage_url
        self.lifetime = lifetime
        self.clock = clock
        self.secret = secret if secret is not None else secrets.token_bytes(32)

    def signature(self, method: str, path: str, date: str, expires: str) -> str:
        message = "\n".join((method, path, date, expires)).encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def presign(
        self, key: str, *, signed_at: float | None = None, lifetime: int | None = None
    ) -> str:
        """A presigned GET URL for object `key` (the path after the bucket, unquoted)."""
        when = self.clock() if signed_at is None else signed_at
        expires = str(self.lifetime() if lifetime is None else lifetime)
        date = amz_date(when)
        path = f"/{BUCKET}/{key}"
        credential = f"{ACCESS_KEY}/{date[:8]}/{REGION}/s3/aws4_request"
        query = urlencode(
            [
                ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
                ("X-Amz-Credential", credential),
                ("X-Amz-Date", date),
                ("X-Amz-Expires", expires),
                ("X-Amz-SignedHeaders", "host"),
                ("X-Amz-Signature", self.signature("GET", path, date, expires)),
            ]
        )
        return f"{self.storage_url}{quote(path)}?{query}"

    def check_query(self, method: str, path: str, query: dict[str, str]) -> StorageError | None:
        """None if the presigned request is valid now, else the error S3 would answer."""
        date, expires = query.get("X-Amz-Date", ""), query.get("X-Amz-Expires", "")
        given = query.get("X-Amz-Signature")
        if given is None or query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
            return StorageError(403, "AccessDenied", "Access Denied")
        signed_at = parse_amz_date(date)
        if signed_at is None or not expires.isdigit():
            return StorageError(400, "AuthorizationQueryParametersError", "Invalid X-Amz-Date")
        if signed_at + int(expires) < self.clock():
            return StorageError(403, "AccessDenied", "Request has expired")
        if not hmac.compare_digest(given, self.signature(method, path, date, expires)):
            return SIGNATURE_MISMATCH
        return None

    # -- header-signed requests (DICOM instances) ---------------------------------------------

    def sign_headers(self, method: str, path: str, accept: str) -> dict[str, str]:
        """Accept, X-Amz-Date and Authorization, in botocore SigV4Auth.add_auth's order."""
        date = amz_date(self.clock())
        credential = f"{ACCESS_KEY}/{date[:8]}/{REGION}/medical-imaging/aws4_request"
        signature = self.signature(method, path, date, accept)
        return {
            "Accept": accept,
            "X-Amz-Date": date,
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={credential}, "
                f"SignedHeaders=accept;host;x-amz-date, Signature={signature}"
            ),
        }

    def check_headers(
        self, method: str, path: str, authorization: str | None, date: str, accept: str
    ) -> StorageError | None:
        if authorization is None:
            return StorageError(403, "AccessDenied", "Missing Authentication Token")
        m = re.fullmatch(
            r"AWS4-HMAC-SHA256 Credential=\S+, SignedHeaders=\S+, Signature=(\w+)", authorization
        )
        if m is None:
            return StorageError(403, "IncompleteSignature", "Authorization header is invalid")
        signed_at = parse_amz_date(date)
        if signed_at is None or signed_at + self.lifetime() < self.clock():
            return StorageError(403, "AccessDenied", "Signature expired")
        if not hmac.compare_digest(m.group(1), self.signature(method, path, date, accept)):
            return SIGNATURE_MISMATCH
        return None


@dataclass(frozen=True)
class StorageError:
    """An S3-style XML error answer."""

    status: int
    code: str
    message: str

    def body(self, resource: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        parts = [f"<Code>{self.code}</Code>", f"<Message>{_xml(self.message)}</Message>"]
        parts += [f"<{name}>{_xml(value)}</{name}>" for name, value in extra]
        parts += [f"<Resource>{_xml(resource)}</Resource>", "<RequestId>FAKEGC</RequestId>"]
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>' + "".join(parts) + "</Error>"
        ).encode()


SIGNATURE_MISMATCH = StorageError(
    403,
    "SignatureDoesNotMatch",
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method.",
)
TWO_AUTH_MECHANISMS = StorageError(
    400,
    "InvalidArgument",
    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature "
    "query string parameter or the Authorization header should be specified",
)
NO_SUCH_KEY = StorageError(404, "NoSuchKey", "The specified key does not exist.")
INVALID_RANGE = StorageError(416, "InvalidRange", "The requested range is not satisfiable")


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- objects -------------------------------------------------------------------------------------


def object_for_key(world: World, key: str) -> Content | None:
    """The content stored under `key` (a path below the bucket), None if there is none."""
    if m := _IMAGE_KEY.fullmatch(key):
        image = world.images.get(m.group(1))
        if image is None:
            return None
        for f in image.files:
            if (
                f.pk == m.group(2)
                and f.name == m.group(3)
                and key == image_file_key(f.image_pk, f.pk, f.name)
            ):
                return f.content
        return None
    if m := _CIV_KEY.fullmatch(key):
        civ = world.civs.get(int(m.group(1)))
        if civ is None or civ.file_name is None or key != civ_file_key(civ.pk, civ.file_name):
            return None
        return civ.content
    if m := _ALGORITHM_IMAGE_KEY.fullmatch(key):
        ai = world.algorithm_images.get(m.group(1))
        if ai is None or ai.file_name is None or m.group(2) != ai.file_name:
            return None
        return ai.content
    return None


def plain_listing(world: World, path: str) -> bytes | None:
    """The HTML index of a directory of the plain view (`path` ends with "/"), None if there is
    no such directory: `/plain/` lists one `<image pk>/` per image with files, and
    `/plain/<image pk>/` lists that image's files by name. rclone's http remote takes every
    `<a href>` that stays below the directory as an entry, a trailing "/" marking a directory,
    and learns each file's size from a HEAD (backend/http/http.go: parse, Object.head)."""
    parts = path[len(PLAIN_PREFIX) :].split("/")
    if parts == [""]:
        names = [f"{pk}/" for pk, image in world.images.items() if image.files]
    elif len(parts) == 2 and parts[1] == "" and parts[0] in world.images:
        names = [f.name for f in world.images[parts[0]].files]
    else:
        return None
    links = "".join(f'<a href="{quote(n)}">{html.escape(n)}</a>\n' for n in names)
    return (
        f"<!DOCTYPE html>\n<html><head><title>Index of {html.escape(path)}</title></head>\n"
        f"<body>\n{links}</body></html>\n"
    ).encode()


def plain_object(world: World, path: str) -> Content | None:
    """The content at `/plain/<image pk>/<file name>` (unquoted), None if there is none."""
    image_pk, _, name = path[len(PLAIN_PREFIX) :].partition("/")
    image = world.images.get(image_pk)
    if image is None:
        return None
    return next((f.content for f in image.files if f.name == name), None)


def dicom_object(world: World, path: str, image_set_id: str | None) -> Content | None:
    m = DICOM_PATH.fullmatch(path)
    if m is None or m.group(1) != DATASTORE_ID:
        return None
    found = world.dicom_instances.get(m.group(4))
    if found is None:
        return None
    image, instance = found
    if (m.group(2), m.group(3)) != (instance.study_instance_uid, instance.series_instance_uid):
        return None
    if image.dicom_image_set is None or image.dicom_image_set.get("image_set_id") != image_set_id:
        return None
    return instance.content


def image_file_key(image_pk: str, file_pk: str, name: str) -> str:
    """cases/models.py image_file_path, below the bucket."""
    return f"images/{image_pk[0:2]}/{image_pk[2:4]}/{image_pk}/{file_pk}/{name}"


def civ_file_key(civ_pk: int, name: str) -> str:
    """components/models.py: `<hh>/<hh>/<pk>/<name>`, hh from the last 4 hex digits of pk."""
    tail = f"{civ_pk:04x}"[-4:]
    return f"components/componentinterfacevalue/{tail[:2]}/{tail[2:]}/{civ_pk}/{name}"


def algorithm_image_key(ai_pk: str, name: str) -> str:
    return f"docker/images/algorithms/algorithmimage/{ai_pk}/{name}"


def dicom_instance_path(study: str, series: str, sop: str) -> str:
    return f"/datastore/{DATASTORE_ID}/studies/{study}/series/{series}/instances/{sop}"


# -- Range ---------------------------------------------------------------------------------------


def parse_range(header: str | None, total: int) -> tuple[int, int] | StorageError | None:
    """(start, end exclusive) for a single satisfiable byte range; None to send the whole
    object (no header, or one S3 ignores: bad syntax, several ranges); INVALID_RANGE if
    unsatisfiable. Forms: `bytes=a-b`, `bytes=a-`, `bytes=-n`.
    """
    if header is None:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None or (m.group(1) == "" and m.group(2) == ""):
        return None
    first, last = m.group(1), m.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or total == 0:
            return INVALID_RANGE
        return max(0, total - suffix), total
    start = int(first)
    if last != "" and int(last) < start:
        return None  # syntactically invalid: ignored, as RFC 9110 says
    if start >= total:
        return INVALID_RANGE
    end = total if last == "" else min(total, int(last) + 1)
    return start, end


def object_size(content: Content) -> int:
    return content_size(content)
