"""`api/v1/`: the platform's API URLs as paths, by a plain prefix swap.

Grand Challenge names objects by API URL all over its answers (an answer names its display
set, a value its image, an item its archive), and its own getting-started guide identifies
objects by pk, slug or API URL. Swapping `https://grand-challenge.org/` for the mount point
turns a detail URL into a path:

    api/v1/archives/<pk>                     -> ../../../archives/<slug>
    api/v1/archives/items/<pk>               -> ../../../../archives/<slug>/items/<pk>
    api/v1/algorithms/<pk>                   -> ../../../algorithms/<slug>
    api/v1/algorithms/images/<pk>            -> ../../../../algorithms/<slug>/images/<pk>.json
    api/v1/algorithms/jobs/<pk>              -> ../../../../algorithms/<slug>/jobs/<pk>
    api/v1/reader-studies/<pk>               -> ../../../reader-studies/<slug>
    api/v1/reader-studies/display-sets/<pk>  -> ../../../../reader-studies/<slug>/display-sets/<pk>
    api/v1/reader-studies/questions/<pk>     a file: the question as the API serves it
    api/v1/reader-studies/answers/<pk>       a file: the answer as the API serves it
    api/v1/cases/images/<pk>                 -> ../../../../images/<pk>

The symlinks are relative, so they work wherever the tree is mounted. `api/` is not listed at
the root, and pks are not listed in its directories (like `archives/<pk>`): only looked up.
The directories of kinds (`v1/`, `archives/`, `items/`, ...) are listed.

Costs: a collection object needs the collection's listing (cached, shared with the tree); a
nested object one detail request for its parent's pk, then the parent's listing. Lookups are
cached for the TTL like any other.

An object the token may not see answers as it does elsewhere in the tree: where the platform
can tell that it exists (the filter oracles of gc-api.md §4: archives, algorithms, reader
studies, images, jobs through `cases/images/?job_input=`, display sets through
`reader-studies/answers/?display_set=`), a README stub; where it can tell that it does not,
ENOENT; where it cannot tell (archive items, algorithm images, questions and answers have no
oracle), a stub that says so. A job the token may see whose algorithm it may not (a public job
of a private algorithm) is shown right here, as a directory, since no link could reach it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import render
from .api import Existence
from .errors import NotFound, Unavailable
from .names import API_DIR, is_uuid
from .nodes import (
    DirNode,
    FileNode,
    GeneratedFileNode,
    Node,
    StaticDir,
    SymlinkNode,
    describe,
    stub_dir,
)
from .toplevel import ObjectDir
from .tree import ImageDir, job_dir

if TYPE_CHECKING:
    from .fs import GcFilesystem

log = logging.getLogger(__name__)


Resolve = Callable[["GcFilesystem", "LookupDir", str], Awaitable[Node]]


class LookupDir(DirNode):
    """A directory of fixed subdirectories (listed) and of objects looked up by pk (not
    listed), each answered by `resolve` and cached for the TTL."""

    __slots__ = ("depth", "fixed", "resolve")

    def __init__(
        self,
        identity: str,
        name: str,
        fixed: dict[str, Node],
        resolve: Resolve | None = None,
        *,
        depth: int = 0,
        api_url: str = "",
    ) -> None:
        super().__init__(identity, name)
        self.fixed = fixed
        self.resolve = resolve
        self.depth = depth  # how many `..` lead from here to the mount's root
        describe(self, "api", api_url=api_url)

    async def build(self, fs: GcFilesystem) -> dict[str, Node]:
        return dict(self.fixed)

    async def find(self, fs: GcFilesystem, name: str) -> Node:
        if name in self.fixed:
            return self.fixed[name]
        if self.resolve is None or not is_uuid(name) or fs.is_known_absent(self, name):
            raise NotFound(f"{self.identity}/{name}: not an object's pk here")
        resolve = self.resolve
        node: Node = await fs.cache.get(
            ("api-lookup", self.identity, name), lambda: resolve(fs, self, name)
        )
        return node

    def forget_lookups(self, fs: GcFilesystem, name: str | None = None) -> None:
        fs.forget_lookups_of(self, "api-lookup", name)

    def link(self, fs: GcFilesystem, pk: str, target: str) -> Node:
        """A symlink `pk` -> `target` (relative to the mount's root)."""
        up = "../" * self.depth
        node = SymlinkNode(f"{self.identity}/{pk}", pk, target=up + target)
        return fs.inodes.add(describe(node, "link"))

    def absent(self, fs: GcFilesystem, pk: str) -> NotFound:
        fs.remember_absent(self, pk)
        return NotFound(f"{self.identity}/{pk}: does not exist")


def api_root(api_url: str) -> LookupDir:
    """`api/` with everything below it (see the module docstring)."""

    def lookup(path: str, resolve: Resolve | None, depth: int, **fixed: Node) -> LookupDir:
        name = path.rsplit("/", 1)[-1]
        sub = path.removeprefix(f"{API_DIR}/v1/").removeprefix(f"{API_DIR}/v1")
        url = f"{api_url}{sub}/" if sub else api_url
        return LookupDir(f"{path}", name, fixed, resolve, depth=depth, api_url=url)

    v1 = f"{API_DIR}/v1"
    archives = lookup(
        f"{v1}/archives",
        _collection_object("archives"),
        3,
        items=lookup(f"{v1}/archives/items", _archive_item, 4),
    )
    algorithms = lookup(
        f"{v1}/algorithms",
        _collection_object("algorithms"),
        3,
        images=lookup(f"{v1}/algorithms/images", _algorithm_image, 4),
        jobs=lookup(f"{v1}/algorithms/jobs", _job, 4),
    )
    reader_studies = lookup(
        f"{v1}/reader-studies",
        _collection_object("reader-studies"),
        3,
        **{
            "display-sets": lookup(f"{v1}/reader-studies/display-sets", _display_set, 4),
            "questions": lookup(f"{v1}/reader-studies/questions", _detail_file("question"), 4),
            "answers": lookup(f"{v1}/reader-studies/answers", _detail_file("answer"), 4),
        },
    )
    cases = lookup(f"{v1}/cases", None, 3, images=lookup(f"{v1}/cases/images", _image, 4))
    version = lookup(
        v1,
        None,
        2,
        archives=archives,
        algorithms=algorithms,
        cases=cases,
        **{"reader-studies": reader_studies},
    )
    return LookupDir(API_DIR, API_DIR, {"v1": version}, depth=1, api_url=api_url)


# -- resolvers ----------------------------------------------------------------------------


async def _collection(fs: GcFilesystem, name: str) -> DirNode:
    node = await fs.root.find(fs, name)
    assert isinstance(node, DirNode)
    return node


def _collection_object(collection: str) -> Resolve:
    """`archives/<pk>` and the like: a link to the slug directory, or the collection's stub."""

    async def resolve(fs: GcFilesystem, here: LookupDir, pk: str) -> Node:
        return await _object_in(fs, here, pk, collection, pk)

    return resolve


async def _object_in(
    fs: GcFilesystem, here: LookupDir, name: str, collection: str, parent_pk: str, rest: str = ""
) -> Node:
    """`name`: a link to `<collection>/<slug of parent_pk><rest>`; for a parent we may not
    see, the collection's stub (under our own identity); ENOENT when it does not exist."""
    directory = await _collection(fs, collection)
    try:
        found = await directory.find(fs, parent_pk)
    except NotFound:
        raise here.absent(fs, name) from None
    if isinstance(found, SymlinkNode):  # a pk, listed: the link to its slug directory
        return here.link(fs, name, f"{collection}/{found.target}{rest}")
    if isinstance(found, ObjectDir):  # an object without a slug is named by its pk
        return here.link(fs, name, f"{collection}/{found.name}{rest}")
    return _restub(fs, here, name, found)


def _restub(fs: GcFilesystem, here: LookupDir, name: str, stub: Node) -> Node:
    """The stub another directory answered, as a node of our own (a directory must not have
    two parents in the kernel's cache)."""
    if not isinstance(stub, StaticDir) or "README.md" not in stub.entries:
        raise NotFound(f"{here.identity}/{name}: not an object we can show")
    readme = stub.entries["README.md"]
    assert isinstance(readme, FileNode | GeneratedFileNode)
    # A text made when read (it names the mount point) stays so in the copy.
    text = readme.produce if isinstance(readme, GeneratedFileNode) else readme.data
    copy = stub_dir(f"{here.identity}/{name}", name, text, exists=None)
    for node in (copy, *copy.entries.values()):
        node.xattrs = dict(stub.xattrs or {})
    return fs.inodes.add(copy)


def _stub(fs: GcFilesystem, here: LookupDir, pk: str, noun: str, *, certain: bool) -> Node:
    """A stub for an object we may not see: `certain` when the API confirmed it exists, else
    it says that the API cannot tell hidden from absent for this kind of object."""
    api_url = (here.xattrs or {}).get("user.gc.api_url", "")
    readme = render.api_stub_readme(
        noun, f"{api_url}{pk}/", username=fs.username, ttl=fs.ttl, certain=certain
    )
    return fs.inodes.add(stub_dir(f"{here.identity}/{pk}", pk, readme, exists=certain))


async def _detail(fs: GcFilesystem, path: str) -> dict[str, Any] | None:
    """The object at an API path, or None when the API says 404 (hidden or absent)."""
    try:
        obj = await fs.api_object(path)
    except NotFound:
        return None
    return obj if isinstance(obj, dict) else None


def _pk_in(url: object) -> str | None:
    """The pk at the end of an API URL (`.../algorithms/<pk>/`)."""
    if not isinstance(url, str):
        return None
    last = url.rstrip("/").rsplit("/", 1)[-1]
    return last if is_uuid(last) else None


async def _archive_item(fs: GcFilesystem, here: LookupDir, pk: str) -> Node:
    item = await _detail(fs, f"archives/items/{pk}/")
    archive = _pk_in(item.get("archive")) if item is not None else None
    if archive is None:  # no filter validates item pks: the API cannot tell
        return _stub(fs, here, pk, "archive item", certain=False)
    return await _object_in(fs, here, pk, "archives", archive, f"/items/{pk}")


async def _algorithm_image(fs: GcFilesystem, here: LookupDir, pk: str) -> Node:
    image = await _detail(fs, f"algorithms/images/{pk}/")
    algorithm = _pk_in(image.get("algorithm")) if image is not None else None
    if algorithm is None:  # only an algorithm's editors see its container images
        return _stub(fs, here, pk, "algorithm container image", certain=False)
    return await _object_in(fs, here, pk, "algorithms", algorithm, f"/images/{pk}.json")


async def _job(fs: GcFilesystem, here: LookupDir, pk: str) -> Node:
    job = await _detail(fs, f"algorithms/jobs/{pk}/")
    if job is None:
        try:
            existence = await fs.api.filter_oracle("cases/images/", "job_input", pk)
        except Unavailable as exc:
            # The job filters fail with 500 (gc-api.md §3.11), but only after the form has
            # validated the pk: a 500 says the job exists; an unknown pk still gets 400.
            if exc.status != 500:
                raise
            existence = Existence.HIDDEN
        if existence is Existence.ABSENT:
            raise here.absent(fs, pk)
        return _stub(fs, here, pk, "algorithm job", certain=True)
    algorithm = _pk_in(job.get("algorithm"))
    if algorithm is not None:
        link = await _object_in(fs, here, pk, "algorithms", algorithm, f"/jobs/{pk}")
        if isinstance(link, SymlinkNode):
            return link
    # A job we may see of an algorithm we may not: no link reaches it, so it is shown here.
    fetched_at = fs.cache.fetched_at(("object", f"algorithms/jobs/{pk}/"))  # of `job`
    return fs.inodes.add(job_dir(f"{here.identity}/{pk}", pk, job, fetched_at=fetched_at))


async def _display_set(fs: GcFilesystem, here: LookupDir, pk: str) -> Node:
    display_set = await _detail(fs, f"reader-studies/display-sets/{pk}/")
    study = _pk_in(display_set.get("reader_study")) if display_set is not None else None
    if study is None:
        existence = await fs.api.filter_oracle("reader-studies/answers/", "display_set", pk)
        if existence is Existence.ABSENT:
            raise here.absent(fs, pk)
        return _stub(fs, here, pk, "display set", certain=True)
    return await _object_in(fs, here, pk, "reader-studies", study, f"/display-sets/{pk}")


def _detail_file(kind: str) -> Resolve:
    """Questions and answers have no place of their own in the tree: the object itself, as
    the API serves it, is a file."""

    async def resolve(fs: GcFilesystem, here: LookupDir, pk: str) -> Node:
        obj = await _detail(fs, f"reader-studies/{kind}s/{pk}/")
        if obj is None:
            return _stub(fs, here, pk, f"reader-study {kind}", certain=False)
        node = FileNode(f"{here.identity}/{pk}", pk, data=render.metadata_json(obj))
        return fs.inodes.add(describe(node, kind, obj))

    return resolve


async def _image(fs: GcFilesystem, here: LookupDir, pk: str) -> Node:
    images = await _collection(fs, "images")
    try:
        found = await images.find(fs, pk)
    except NotFound:
        raise here.absent(fs, pk) from None
    if isinstance(found, ImageDir):
        return here.link(fs, pk, f"images/{pk}")
    return _restub(fs, here, pk, found)
