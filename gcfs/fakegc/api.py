"""Request handling for the fake server, independent of sockets: route, authenticate, answer.

`Site.handle(request)` maps one HTTP request to one `Reply`. It follows gc-api.md: Django's
APPEND_SLASH redirect, DRF token authentication with knox's `Bearer` keyword, object-permission
filtering (list omits, detail 404), django-filter validation of FK filters against *all* objects
(the 400-vs-empty-200 existence oracle), DRF's LimitOffsetPagination, and the website's slug
pages (302 to the permission-request page vs 404). `server.py` does the HTTP around it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from gcfs.fakegc.serializers import Obj, Serializer, json_text
from gcfs.fakegc.storage import (
    Signer,
    algorithm_image_key,
    civ_file_key,
    dicom_instance_path,
    object_for_key,
)
from gcfs.fakegc.world import (
    ArchiveItem,
    GeneratedItems,
    Image,
    ItemChain,
    Username,
    World,
)

MAX_LIMIT = 1000  # MaxLimit1000OffsetPagination
DEFAULT_LIMIT = 100  # REST_FRAMEWORK["PAGE_SIZE"]
JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
SLUG = r"[-a-zA-Z0-9_]+"  # Django's <slug:> converter
LOOKUP = r"[^/.]+"  # DRF router's default lookup_value_regex

READ_ONLY = "GET, HEAD, OPTIONS"
LIST_CREATE = "GET, POST, HEAD, OPTIONS"
DETAIL_UPDATE = "GET, PUT, PATCH, HEAD, OPTIONS"
INVALID_CHOICE = "Select a valid choice. That choice is not one of the available choices."
NOT_AUTHENTICATED = "Authentication credentials were not provided."


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # the request-target as sent: path plus optional ?query
    authorization: str | None = None


@dataclass
class Reply:
    status: int
    endpoint: str
    body: bytes = b""
    content_type: str | None = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    user: str | None = None
    results: int = 0  # serialized list results, for the per-item latency knob
    is_api: bool = False


class ServerError(Exception):
    """An unhandled exception in a view: Django answers 500 with its HTML error page."""


# What Django serves for an unhandled exception with DEBUG off (django.views.defaults.
# server_error without a 500.html template); the real site's page is as short.
SERVER_ERROR_PAGE = (
    b'\n<!doctype html>\n<html lang="en">\n<head>\n  <title>Server Error (500)</title>\n'
    b"</head>\n<body>\n  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n"
)


class ApiError(Exception):
    """A DRF-style JSON error; carries the status, the body and extra headers."""

    def __init__(self, status: int, body: Obj, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = list(headers)


def json_bytes(data: Any) -> bytes:
    """DRF's JSONRenderer: compact separators, UTF-8, non-ASCII kept as is."""
    return json_text(data).encode()


def not_authenticated(detail: str) -> ApiError:
    return ApiError(401, {"detail": detail}, [("WWW-Authenticate", "Bearer")])


# -- filters ----------------------------------------------------------------------------------


class FilterError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Filter(Protocol):
    @property
    def param(self) -> str:
        """The query parameter, also the key of its error in a 400 body."""

    def clean(self, world: World, values: list[str]) -> Any:
        """The cleaned value, or None when the filter does not apply; FilterError if invalid."""

    def keep(self, obj: Any, cleaned: Any) -> bool: ...


def parse_uuid(text: str) -> str:
    """Django's UUIDField.to_python; the error message has curly quotes, as the server's."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise FilterError(f"\u201c{text}\u201d is not a valid UUID.") from None


@dataclass(frozen=True)
class ExactFilter:
    """A plain CharFilter (`?slug=`, `?creator=`): no validation, hence no oracle."""

    param: str
    attr: Callable[[Any], Any]

    def clean(self, world: World, values: list[str]) -> Any:
        return values[-1] if values and values[-1] != "" else None

    def keep(self, obj: Any, cleaned: Any) -> bool:
        return bool(self.attr(obj) == cleaned)


@dataclass(frozen=True)
class BoolFilter:
    """django-filter's BooleanWidget: true/false/1/0 (any case); anything else is ignored."""

    param: str
    attr: Callable[[Any], bool]

    def clean(self, world: World, values: list[str]) -> Any:
        return {"true": True, "1": True, "false": False, "0": False}.get(
            values[-1].lower() if values else ""
        )

    def keep(self, obj: Any, cleaned: Any) -> bool:
        return self.attr(obj) is cleaned


@dataclass(frozen=True)
class ModelFilter:
    """A ModelChoiceFilter over every object of a model, visible or not: the existence oracle."""

    param: str
    table: Callable[[World], Mapping[str, Any]]
    attr: Callable[[Any], Any]

    def clean(self, world: World, values: list[str]) -> Any:
        if not values or values[-1] == "":
            return None
        target = self.table(world).get(parse_uuid(values[-1]))
        if target is None:
            raise FilterError(INVALID_CHOICE)
        return target

    def keep(self, obj: Any, cleaned: Any) -> bool:
        return self.attr(obj) is cleaned


@dataclass(frozen=True)
class ModelMultipleFilter:
    """A ModelMultipleChoiceFilter (OR of the given pks), validated against every object."""

    param: str
    table: Callable[[World], Mapping[str, Any]]
    related: Callable[[Any], Iterable[Any]]

    def clean(self, world: World, values: list[str]) -> Any:
        values = [v for v in values if v != ""]
        if not values:
            return None
        for value in values:
            parse_uuid(value)
        table = self.table(world)
        targets = []
        for value in values:
            # Django compares the raw string with str(pk), so only canonical UUIDs match.
            if value not in table:
                raise FilterError(
                    f"Select a valid choice. {value} is not one of the available choices."
                )
            targets.append(table[value])
        return targets

    def keep(self, obj: Any, cleaned: Any) -> bool:
        related = self.related(obj)
        return any(any(t is r for r in related) for t in cleaned)


# -- resources ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One DRF viewset: where its objects live, how they sort, filter and serialize."""

    name: str  # endpoint names are f"{name}-list" and f"{name}-detail"
    model: str  # for "No <model> matches the given query."
    table: Callable[[World], Mapping[Any, Any]]
    ordered: Callable[[list[Any]], list[Any]]  # Meta.ordering
    serialize: Callable[[Serializer, Any], Obj]
    filters: tuple[Filter, ...] = ()
    allow_list: str = READ_ONLY
    allow_detail: str = READ_ONLY
    int_pk: bool = False
    authenticated_only: bool = False  # components/interfaces: IsAuthenticated, no object perms
    scope: Callable[[Any, Username], bool] | None = None  # extra restriction (answers/mine)
    has_detail: bool = True
    # The detail lookup by canonical pk, when `table` does not hold every object.
    lookup: Callable[[World, Any], Any] | None = None
    # The visible, filtered, ordered objects for a list, given the cleaned filters, when the
    # resource can answer without a scan of `table` (archive items: generated ones by index).
    rows: Callable[[World, Username, list[Any]], Sequence[Any]] | None = None
    # JSON texts of objs[start:stop], when that beats serializing objects one by one.
    render: Callable[[Serializer, Sequence[Any], int, int], list[str]] | None = None

    def visible(self, obj: Any, user: Username) -> bool:
        if self.authenticated_only:
            return True
        return bool(obj.visible_to(user))

    def parse_pk(self, text: str) -> Any:
        """The lookup value, or None when it cannot be a pk (→ 404 "Not found.")."""
        if self.int_pk:
            return int(text) if text.isdigit() else None
        try:
            return str(uuid.UUID(text))
        except ValueError:
            return None


def _by_seq(objs: list[Any]) -> list[Any]:
    return sorted(objs, key=lambda o: o.seq)


def _by_order(objs: list[Any]) -> list[Any]:
    return sorted(objs, key=lambda o: (o.order, o.seq))


def _display_set(ser: Serializer, ds: Any) -> Obj:
    return ser.display_set(ds, ser.display_set_index(ds))


def _job_images(kind: str) -> Callable[[Any], list[Any]]:
    return lambda job: [c.image for c in getattr(job, kind) if c.image is not None]


ARCHIVES = Resource(
    "archives",
    "Archive",
    lambda w: w.archives,
    _by_seq,
    Serializer.archive,
    (ExactFilter("slug", lambda a: a.slug),),
)


def _archive_item_rows(world: World, user: Username, cleaned: list[Any]) -> Sequence[ArchiveItem]:
    """The items a list shows, in build order (ArchiveItem has no Meta.ordering): with
    ?archive= that archive's built items then its generated blocks, else every visible built
    item then the generated blocks of the archives whose items the user sees. Generated items
    are only made for the page asked for, so a page costs O(limit) whatever the count."""
    (archive,) = cleaned  # the one filter, `archive`
    if archive is not None:
        return archive.all_items() if archive.items_visible_to(user) else []
    built = [i for i in world.archive_items.values() if i.visible_to(user)]
    blocks = [g for a in world.archives.values() if a.items_visible_to(user) for g in a.generated]
    return ItemChain([built, *blocks])


def _render_archive_items(
    ser: Serializer, objs: Sequence[ArchiveItem], start: int, stop: int
) -> list[str]:
    """A page of items as JSON texts: generated blocks from their template (a page of 1,000
    generated items then costs ~2 ms of CPU, not ~11), built items one by one."""
    parts = objs.segments(start, stop) if isinstance(objs, ItemChain) else [(objs, start, stop)]
    texts: list[str] = []
    for part, low, high in parts:
        if isinstance(part, GeneratedItems):
            texts += ser.generated_items_json(part, low, high)
        else:
            texts += [json_text(ser.archive_item(item)) for item in part[low:high]]
    return texts


ARCHIVE_ITEMS = Resource(
    "archives-items",
    "ArchiveItem",
    lambda w: w.archive_items,
    lambda objs: objs,  # ArchiveItem has no Meta.ordering; build order is stable enough
    Serializer.archive_item,
    (ModelFilter("archive", lambda w: w.archives, lambda i: i.archive),),
    allow_list=LIST_CREATE,
    allow_detail=DETAIL_UPDATE,
    lookup=lambda w, pk: w.archive_item(pk),
    rows=_archive_item_rows,
    render=_render_archive_items,
)
ALGORITHMS = Resource(
    "algorithms",
    "Algorithm",
    lambda w: w.algorithms,
    _by_seq,
    Serializer.algorithm,
    (ExactFilter("slug", lambda a: a.slug),),
)
ALGORITHM_IMAGES = Resource(
    "algorithms-images",
    "AlgorithmImage",
    lambda w: w.algorithm_images,
    _by_seq,
    Serializer.algorithm_image,
    (ModelFilter("algorithm", lambda w: w.algorithms, lambda ai: ai.algorithm),),
)
JOBS = Resource(
    "algorithms-jobs",
    "Job",
    lambda w: w.jobs,
    _by_seq,
    Serializer.job,
    (
        ModelFilter("algorithm_image__algorithm", lambda w: w.algorithms, lambda j: j.algorithm),
        ModelMultipleFilter("input_image", lambda w: w.images, _job_images("inputs")),
        ModelMultipleFilter("output_image", lambda w: w.images, _job_images("outputs")),
    ),
    allow_list=LIST_CREATE,
)
READER_STUDIES = Resource(
    "reader-studies",
    "ReaderStudy",
    lambda w: w.reader_studies,
    _by_seq,
    Serializer.reader_study,
    (ExactFilter("slug", lambda r: r.slug),),
)
DISPLAY_SETS = Resource(
    "display-sets",
    "DisplaySet",
    lambda w: w.display_sets,
    _by_order,
    _display_set,
    (ModelFilter("reader_study", lambda w: w.reader_studies, lambda d: d.reader_study),),
    allow_list=LIST_CREATE,
    allow_detail=DETAIL_UPDATE,
)
QUESTIONS = Resource(
    "questions",
    "Question",
    lambda w: w.questions,
    _by_order,
    Serializer.question,
    (ModelFilter("reader_study", lambda w: w.reader_studies, lambda q: q.reader_study),),
)
_ANSWER_FILTERS: tuple[Filter, ...] = (
    ExactFilter("creator", lambda a: a.creator),
    ModelFilter(
        "question__reader_study", lambda w: w.reader_studies, lambda a: a.question.reader_study
    ),
    ModelFilter("display_set", lambda w: w.display_sets, lambda a: a.display_set),
    BoolFilter("is_ground_truth", lambda a: a.is_ground_truth),
)
ANSWERS = Resource(
    "answers",
    "Answer",
    lambda w: w.answers,
    _by_seq,
    Serializer.answer,
    _ANSWER_FILTERS,
    allow_list=LIST_CREATE,
    allow_detail=DETAIL_UPDATE,
)
ANSWERS_MINE = Resource(
    "answers-mine",
    "Answer",
    lambda w: w.answers,
    _by_seq,
    Serializer.answer,
    _ANSWER_FILTERS,
    scope=lambda a, user: a.creator == user and not a.is_ground_truth,
    has_detail=False,
)
IMAGES = Resource(
    "cases-images",
    "Image",
    lambda w: w.images,
    lambda objs: sorted(objs, key=lambda im: (im.name, im.seq)),
    Serializer.image,
    (
        ModelMultipleFilter("archive", lambda w: w.archives, lambda im: im.archives),
        ModelMultipleFilter(
            "reader_study", lambda w: w.reader_studies, lambda im: im.reader_studies
        ),
        ModelMultipleFilter("job_input", lambda w: w.jobs, lambda im: im.job_inputs),
        ModelMultipleFilter("job_output", lambda w: w.jobs, lambda im: im.job_outputs),
    ),
)
SOCKETS = Resource(
    "components-interfaces",
    "ComponentInterface",
    lambda w: w.sockets,
    lambda objs: sorted(objs, key=lambda s: s.pk),
    Serializer.socket,
    (ExactFilter("slug", lambda s: s.slug),),
    int_pk=True,
    authenticated_only=True,
)

# Order matters: the fixed sub-paths (archives/items/) come before the <pk> detail routes.
RESOURCES: tuple[tuple[str, Resource], ...] = (
    ("archives/items", ARCHIVE_ITEMS),
    ("archives", ARCHIVES),
    ("algorithms/images", ALGORITHM_IMAGES),
    ("algorithms/jobs", JOBS),
    ("algorithms", ALGORITHMS),
    ("reader-studies/display-sets", DISPLAY_SETS),
    ("reader-studies/questions", QUESTIONS),
    ("reader-studies/answers/mine", ANSWERS_MINE),
    ("reader-studies/answers", ANSWERS),
    ("reader-studies", READER_STUDIES),
    ("cases/images", IMAGES),
    ("components/interfaces", SOCKETS),
)


# -- pagination ---------------------------------------------------------------------------------


def _positive_int(text: str, *, strict: bool = False, cutoff: int | None = None) -> int:
    value = int(text)  # ValueError on garbage, as in DRF
    if value < 0 or (value == 0 and strict):
        raise ValueError(text)
    return min(value, cutoff) if cutoff else value


def page_params(query: Mapping[str, list[str]]) -> tuple[int, int]:
    """(limit, offset) as LimitOffsetPagination reads them (last value of each param wins)."""
    try:
        limit = _positive_int(query["limit"][-1], strict=True, cutoff=MAX_LIMIT)
    except (KeyError, ValueError):
        limit = DEFAULT_LIMIT
    try:
        offset = _positive_int(query["offset"][-1])
    except (KeyError, ValueError):
        offset = 0
    return limit, offset


def _with_query(url: str, key: str, value: int | None) -> str:
    """DRF's replace_query_param / remove_query_param (value None): params come out sorted."""
    scheme, netloc, path, query, fragment = urlsplit(url)
    params = parse_qs(query, keep_blank_values=True)
    if value is None:
        params.pop(key, None)
    else:
        params[key] = [str(value)]
    return urlunsplit(
        (scheme, netloc, path, urlencode(sorted(params.items()), doseq=True), fragment)
    )


def page_links(url: str, count: int, limit: int, offset: int) -> tuple[str | None, str | None]:
    nxt = None
    if offset + limit < count:
        nxt = _with_query(_with_query(url, "limit", limit), "offset", offset + limit)
    prev = None
    if offset > 0:
        prev = _with_query(url, "limit", limit)
        # DRF drops offset from `previous` when that page starts at 0.
        prev = _with_query(prev, "offset", None if offset - limit <= 0 else offset - limit)
    return nxt, prev


View = Callable[[Username, dict[str, list[str]], str, Serializer], tuple[Any, int]]


# -- the site -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DjangoJson:
    """A body rendered by Django's JsonResponse (default separators), not DRF's renderer."""

    data: Any


@dataclass(frozen=True)
class RenderedJson:
    """A body already rendered as DRF's renderer would (Resource.render's pages)."""

    text: str


def _render(body: Any) -> bytes:
    if isinstance(body, DjangoJson):
        return json.dumps(body.data).encode()
    if isinstance(body, RenderedJson):
        return body.text.encode()
    return json_bytes(body)


class Site:
    """Answers requests from one World, with URLs rooted at `base_url`.

    `signer` presigns the storage URLs that `/media/` redirects to and that DICOM instance
    requests point at; without one, `/media/` is not served (404) as before. `revoked(token)`
    says whether a token was revoked: it then answers 401 "Invalid token." like an unknown one.
    """

    def __init__(
        self,
        world: World,
        base_url: str,
        signer: Signer | None = None,
        revoked: Callable[[str], bool] | None = None,
    ) -> None:
        self.world = world
        self.base_url = base_url
        self.signer = signer
        # Tokens that now authenticate nobody (FakeGC.faults.revoked_tokens), as if unknown.
        self.revoked = revoked
        self._job_filters_fixed = False  # set per request by handle(), under the world lock

    def handle(
        self, request: Request, *, socket_field: bool = False, job_filters_fixed: bool = False
    ) -> Reply:
        """One request's reply. `job_filters_fixed` makes `cases/images/?job_input=` and
        `?job_output=` work; by default they fail with 500 as on the real server (gc-api.md
        §3.11: the filter names a relation that does not exist)."""
        raw_path, _, query_string = request.target.partition("?")
        path = unquote(raw_path)
        if not path.endswith("/") and not path.startswith("/media/"):
            return self._append_slash(raw_path, query_string)
        if path.startswith("/api/"):
            ser = Serializer(self.base_url, socket_field)
            with self.world.lock:
                try:
                    self._job_filters_fixed = job_filters_fixed
                    return self._api(request, path[len("/api/") :], query_string, ser)
                except ServerError:
                    return Reply(500, self._route_name(path), SERVER_ERROR_PAGE, HTML_TYPE)
        with self.world.lock:
            return self._website(path, request)

    # -- Django middleware and website -------------------------------------------------------

    @staticmethod
    def _append_slash(raw_path: str, query_string: str) -> Reply:
        location = raw_path + "/" + (f"?{query_string}" if query_string else "")
        return Reply(
            301, "redirect-slash", content_type=HTML_TYPE, headers=[("Location", location)]
        )

    def _website(self, path: str, request: Request | None = None) -> Reply:
        if path.startswith("/media/") and self.signer is not None and request is not None:
            reply = self._media(path[len("/media/") :], request)
            if reply is not None:
                return reply
        # Website views never see the API token: they always behave as for an anonymous visitor.
        if m := re.fullmatch(f"/(algorithms|reader-studies)/({SLUG})/", path):
            kind, slug = m.group(1), m.group(2)
            table = self.world.algorithms if kind == "algorithms" else self.world.reader_studies
            endpoint = "website-algorithm" if kind == "algorithms" else "website-reader-study"
            obj = self.world.find_by_slug(table.values(), slug)
            if obj is None:
                return self._html_404(path, endpoint)
            if obj.public:
                return self._html(200, endpoint, f"<h1>{obj.title}</h1>")
            location = f"{self.base_url}/{kind}/{slug}/permission-requests/create/"
            return Reply(302, endpoint, content_type=HTML_TYPE, headers=[("Location", location)])
        if m := re.fullmatch(f"/archives/({SLUG})/", path):
            # LoginRequiredMixin runs before the object lookup: existence does not matter.
            location = f"/accounts/login/?next=/archives/{m.group(1)}/"
            return Reply(
                302, "website-archive", content_type=HTML_TYPE, headers=[("Location", location)]
            )
        return self._html_404(path, "not-found")

    # -- /media/ (serving/urls.py, serving/views.py) -----------------------------------------------

    def _media_user(self, header: str | None) -> Username:
        """TokenAuthentication().authenticate(request) or the anonymous user: never a 401."""
        try:
            return self._authenticate(header)
        except ApiError:
            return None

    def _media(self, rest: str, request: Request) -> Reply | None:
        """A /media/ route's reply, or None when no route matches (→ the HTML 404)."""
        if request.method != "GET":
            # Django function views answer any method; the fake serves GET only.
            return None
        if m := re.fullmatch(r"images/(?:([0-9a-fA-F]{2})/([0-9a-fA-F]{2})/)?([^/]+)/(.+)", rest):
            return self._media_image(rest, m.group(3), request)
        if m := re.fullmatch(
            r"components/componentinterfacevalue/[0-9a-fA-F]{2}/[0-9a-fA-F]{2}/(\d+)/.+", rest
        ):
            return self._media_civ(int(m.group(1)), request)
        if m := re.fullmatch(r"docker/images/algorithms/algorithmimage/([^/]+)/.+", rest):
            return self._media_algorithm_image(m.group(1), request)
        return None

    def _media_image(self, key: str, raw_pk: str, request: Request) -> Reply | None:
        endpoint = "media-image-file"
        try:
            pk = str(uuid.UUID(raw_pk))
        except ValueError:
            return None  # the <uuid:pk> converter does not match: no route
        if raw_pk != pk:
            return None
        user = self._media_user(request.authorization)
        image = self.world.images.get(pk)
        if image is None:
            return self._media_error(404, endpoint, "Image not found.", user)
        if not image.visible_to(user):
            return self._media_error(403, endpoint, "Forbidden", user)
        return self._redirect_to_storage(key, endpoint, user)

    def _media_civ(self, civ_pk: int, request: Request) -> Reply:
        endpoint = "media-civ-file"
        user = self._media_user(request.authorization)
        civ = self.world.civs.get(civ_pk)
        generated = None if civ is not None else self.world.generated_civ(civ_pk)
        if generated is not None:
            civ, item = generated
            if not item.visible_to(user):
                civ = None
        elif civ is not None and not self._civ_visible(civ_pk, user):
            civ = None
        if civ is None:
            return self._media_error(404, endpoint, "Not Found", user)
        if civ.file_name is None:
            return self._media_error(404, endpoint, "File not found.", user)
        return self._redirect_to_storage(civ_file_key(civ.pk, civ.file_name), endpoint, user)

    def _civ_visible(self, civ_pk: int, user: Username) -> bool:
        """get_component_interface_values_for_user: an item, display set or job holding it."""
        w = self.world
        holders: list[tuple[Any, list[Any]]] = [
            *((i, i.values) for i in w.archive_items.values()),
            *((d, d.values) for d in w.display_sets.values()),
            *((j, [*j.inputs, *j.outputs]) for j in w.jobs.values()),
        ]
        return any(
            any(c.pk == civ_pk for c in values) and obj.visible_to(user) for obj, values in holders
        )

    def _media_algorithm_image(self, raw_pk: str, request: Request) -> Reply | None:
        endpoint = "media-algorithm-image"
        try:
            pk = str(uuid.UUID(raw_pk))
        except ValueError:
            return None
        if raw_pk != pk:
            return None
        user = self._media_user(request.authorization)
        ai = self.world.algorithm_images.get(pk)
        if ai is None:
            return self._media_error(404, endpoint, "Algorithm image not found.", user)
        if not ai.visible_to(user):
            return self._media_error(403, endpoint, "Forbidden", user)
        if ai.file_name is None:
            return self._media_error(404, endpoint, "File not found.", user)
        return self._redirect_to_storage(algorithm_image_key(ai.pk, ai.file_name), endpoint, user)

    def _redirect_to_storage(self, key: str, endpoint: str, user: Username) -> Reply:
        """protected_storage_redirect: 404 "File not found." unless the key exists, else 302."""
        assert self.signer is not None
        if object_for_key(self.world, key) is None:
            return self._media_error(404, endpoint, "File not found.", user)
        location = self.signer.presign(key)
        return Reply(
            302, endpoint, content_type=HTML_TYPE, headers=[("Location", location)], user=user
        )

    def _media_error(self, status: int, endpoint: str, message: str, user: Username) -> Reply:
        title = {403: "Permission Denied", 404: "Page Not Found"}[status]
        reply = self._html(status, endpoint, f"<h1>{title}</h1><p>{message}</p>")
        reply.user = user
        return reply

    @staticmethod
    def _html(status: int, endpoint: str, body: str) -> Reply:
        page = f'<!DOCTYPE html>\n<html lang="en"><body>{body}</body></html>\n'
        return Reply(status, endpoint, page.encode(), HTML_TYPE)

    def _html_404(self, path: str, endpoint: str) -> Reply:
        return self._html(404, endpoint, f"<h1>Not Found</h1><p>{path}</p>")

    # -- DRF ----------------------------------------------------------------------------------

    def _api(self, request: Request, path: str, query_string: str, ser: Serializer) -> Reply:
        route = self._route(path)
        if route is None:
            return self._html_404(f"/api/{path}", "not-found")
        endpoint, allow, view = route
        user: Username = None
        try:
            user = self._authenticate(request.authorization)
            if request.method not in ("GET", "HEAD"):
                raise ApiError(405, {"detail": f'Method "{request.method}" not allowed.'})
            query: dict[str, list[str]] = {}
            for key, value in parse_qsl(query_string, keep_blank_values=True):
                query.setdefault(key, []).append(value)
            url = f"{self.base_url}/api/{path}" + (f"?{query_string}" if query_string else "")
            body, results = view(user, query, url, ser)
            status, headers = 200, []
        except ApiError as err:
            body, results, status, headers = err.body, 0, err.status, err.headers
        return Reply(
            status,
            endpoint,
            _render(body),
            JSON_TYPE,
            [("Allow", allow), *headers],
            user,
            results,
            is_api=True,
        )

    def _route(self, path: str) -> tuple[str, str, View] | None:
        if path == "v1/":
            return "api-root", READ_ONLY, self._api_root
        if path == "v1/profiles/users/self/":
            return "profiles-self", READ_ONLY, self._profile
        if m := re.fullmatch(f"v1/cases/images/({LOOKUP})/dicom/instances/", path):
            return "cases-images-dicom-instances", READ_ONLY, self._dicom_instances(m.group(1))
        for prefix, res in RESOURCES:
            if path == f"v1/{prefix}/":
                name = f"{res.name}-list" if res.has_detail else res.name
                return name, res.allow_list, self._lister(res)
            if res.has_detail and (m := re.fullmatch(f"v1/{re.escape(prefix)}/({LOOKUP})/", path)):
                return f"{res.name}-detail", res.allow_detail, self._detailer(res, m.group(1))
        return None

    def _authenticate(self, header: str | None) -> Username:
        """knox TokenAuthentication (keyword Bearer); other schemes fall through to anonymous."""
        parts = (header or "").split()
        if not parts or parts[0].lower() != "bearer":
            return None
        if len(parts) == 1:
            raise not_authenticated("Invalid token header. No credentials provided.")
        if len(parts) > 2:
            raise not_authenticated("Invalid token header. Token string should not contain spaces.")
        user = self.world.users_by_token.get(parts[1])
        if (self.revoked is not None and self.revoked(parts[1])) or user is None:
            raise not_authenticated("Invalid token.")
        return user.username

    def _api_root(self, user: Username, query: Any, url: str, ser: Serializer) -> tuple[Any, int]:
        if user is None:
            raise not_authenticated(NOT_AUTHENTICATED)
        if not self.world.users[user].is_staff:
            raise ApiError(403, {"detail": "You do not have permission to perform this action."})
        return {prefix: ser.api(f"{prefix}/") for prefix, _ in RESOURCES}, 0

    def _profile(self, user: Username, query: Any, url: str, ser: Serializer) -> tuple[Any, int]:
        if user is None:
            raise not_authenticated(NOT_AUTHENTICATED)
        return ser.profile(self.world.users[user]), 0

    def _check_access(self, res: Resource, user: Username) -> None:
        if res.authenticated_only and user is None:
            raise not_authenticated(NOT_AUTHENTICATED)

    def _clean_filters(self, res: Resource, query: Mapping[str, list[str]]) -> list[Any]:
        """Validate every filter first, as a django-filter form does, then report all errors."""
        cleaned, errors = [], {}
        for f in res.filters:
            try:
                cleaned.append(f.clean(self.world, query.get(f.param, [])))
            except FilterError as err:
                errors[f.param] = [err.message]
        if errors:
            raise ApiError(400, errors)
        return cleaned

    def _job_filter_bug(self, res: Resource, cleaned: list[Any]) -> None:
        """cases/filters.py filters on `componentinterfacevalue__algorithm_jobs_as_input`
        (and `..._as_output`), a relation that does not exist: Django raises FieldError once
        the form has validated the pk, so an unknown pk still gets its 400 first."""
        if res is not IMAGES or self._job_filters_fixed:
            return
        for f, value in zip(res.filters, cleaned, strict=True):
            if f.param in ("job_input", "job_output") and value is not None:
                raise ServerError(f"FieldError: cannot resolve {f.param}")

    def _route_name(self, path: str) -> str:
        route = self._route(path[len("/api/") :])
        return route[0] if route is not None else "server-error"

    def _matches(self, res: Resource, obj: Any, user: Username, cleaned: list[Any]) -> bool:
        if not res.visible(obj, user):
            return False
        if res.scope is not None and not res.scope(obj, user):
            return False
        return all(c is None or f.keep(obj, c) for f, c in zip(res.filters, cleaned, strict=True))

    def _lister(self, res: Resource) -> View:
        def view(
            user: Username, query: dict[str, list[str]], url: str, ser: Serializer
        ) -> tuple[Any, int]:
            self._check_access(res, user)
            cleaned = self._clean_filters(res, query)
            self._job_filter_bug(res, cleaned)
            objs: Sequence[Any]
            if res.rows is not None:
                objs = res.rows(self.world, user, cleaned)
            else:
                objs = res.ordered(
                    [
                        o
                        for o in res.table(self.world).values()
                        if self._matches(res, o, user, cleaned)
                    ]
                )
            limit, offset = page_params(query)
            count = len(objs)
            nxt, prev = page_links(url, count, limit, offset)
            if res.render is not None:
                stop = min(count, offset + limit)
                texts = res.render(ser, objs, offset, stop) if offset < stop else []
                head = json_text({"count": count, "next": nxt, "previous": prev})
                body = head[:-1] + ',"results":[' + ",".join(texts) + "]}"
                return RenderedJson(body), len(texts)
            page = [] if count == 0 or offset > count else objs[offset : offset + limit]
            results = [res.serialize(ser, o) for o in page]
            return {"count": count, "next": nxt, "previous": prev, "results": results}, len(page)

        return view

    def _detailer(self, res: Resource, raw_pk: str) -> View:
        def view(
            user: Username, query: dict[str, list[str]], url: str, ser: Serializer
        ) -> tuple[Any, int]:
            self._check_access(res, user)
            # DRF's get_object filters the queryset first, so filter errors win over a bad pk.
            cleaned = self._clean_filters(res, query)
            pk = res.parse_pk(raw_pk)
            if pk is None:
                raise ApiError(404, {"detail": "Not found."})
            obj = res.lookup(self.world, pk) if res.lookup else res.table(self.world).get(pk)
            if obj is None or not self._matches(res, obj, user, cleaned):
                raise ApiError(404, {"detail": f"No {res.model} matches the given query."})
            return res.serialize(ser, obj), 0

        return view

    def _dicom_instances(self, raw_pk: str) -> View:
        """ImageViewSet.dicom_instances (cases/views.py): get_object, then signed requests."""
        detail = self._detailer(IMAGES, raw_pk)

        def view(
            user: Username, query: dict[str, list[str]], url: str, ser: Serializer
        ) -> tuple[Any, int]:
            detail(user, query, url, ser)  # the same 404s as the detail view
            image: Image = self.world.images[str(uuid.UUID(raw_pk))]
            if not image.dicom_image_set:
                raise ApiError(404, {"detail": "This image does not have a DICOM Image Set."})
            image_set_id = image.dicom_image_set["image_set_id"]
            instances = []
            for instance in image.dicom_instances:
                path = dicom_instance_path(
                    instance.study_instance_uid,
                    instance.series_instance_uid,
                    instance.sop_instance_uid,
                )
                accept = f"application/dicom; transfer-syntax={instance.transfer_syntax_uid}"
                headers = (
                    self.signer.sign_headers("GET", path, accept)
                    if self.signer is not None
                    else {"Accept": accept}
                )
                storage = self.signer.storage_url if self.signer is not None else ""
                instances.append(
                    {
                        "sop_instance_uid": instance.sop_instance_uid,
                        "get_instance": {
                            "url": f"{storage}{path}?imageSetId={image_set_id}",
                            "method": "GET",
                            "data": None,
                            "headers": headers,
                        },
                    }
                )
            return DjangoJson({"image_set_id": image_set_id, "instances": instances}), 0

        return view


ENDPOINTS: tuple[str, ...] = (
    "api-root",
    "profiles-self",
    *(
        f"{res.name}-{kind}"
        for _, res in RESOURCES
        if res.has_detail
        for kind in ("list", "detail")
    ),
    "answers-mine",
    "cases-images-dicom-instances",
    "media-image-file",
    "media-civ-file",
    "media-algorithm-image",
    "storage-get",
    "storage-rejected",
    "website-algorithm",
    "website-reader-study",
    "website-archive",
    "redirect-slash",
    "not-found",
    "server-error",
)
