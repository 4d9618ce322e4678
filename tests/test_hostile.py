"""Issue 14, "Done when": hostile members of a group cache and of a group snapshot directory.

Member A's daemon fills a group cache; member B (another uid in group gcfslab, tests/users.py)
plants symlinks, hard links, FIFOs and hostile index records in it, by replacing A's files
where the directory's modes let B, and by creating the names A's next daemon is about to use
where they do not. Then a daemon (as A, and as root: the worst case for a planted link) mounts
the cache and reads. What must hold: no file outside the cache (the canaries, owned by root or
by A) changes content, mode or owner; every byte read is the server's or the read fails with
EIO/EACCES within its deadline; the daemon keeps answering (a listing of the root and a read of
an untouched file, promptly), stays alive, and logs no traceback.

Trust model (decided): a group cache trusts its members with the integrity of the bytes: a
member may write well-formed records with a right crc32 for forged data and others serve them
(the README says so), so no test forges; everything else is tested here. Every FUSE read runs in
a thread with a deadline (users.within) and every daemon is unmounted, aborted and killed if
needed at teardown: a hang fails its test, never the suite.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gcfs import marker
from gcfs.blockindex import KIND_BLOCK, KIND_SIZE, RECORD_SIZE, record
from gcfs.blockstore import DEFAULT_BLOCK_SIZE, STORE_DIR, key_digest
from gcfs.fakegc import DEMO_B_TOKEN, DEMO_TOKEN, FakeGC
from gcfs.fakegc.serializers import image_file_path
from tests.users import (
    MEMBER_PYTHON,
    Canaries,
    Daemon,
    Lab,
    as_member,
    ensure_lab,
    group_directory,
    in_namespace_of,
    scratch,
    start_daemon,
    stuck_tasks,
    within,
)

MiB = 1 << 20
BS = DEFAULT_BLOCK_SIZE
ANSWER_DEADLINE = 10.0  # a listing or a read of an untouched, cached file
READ_DEADLINE = 30.0  # a read of a file someone planted something for (op timeout 15 s + slack)
OP_TIMEOUT = "15"  # --timeout of the daemons here: their deadline for one operation
WRITE_DEADLINE = 30.0
SNAPSHOT_DEADLINE = 60.0
CLEAN_ERRORS = (errno.EIO, errno.EACCES)


@dataclass
class File:
    name: str
    data: bytes
    key: str
    pk: str  # the image's

    @property
    def digest(self) -> str:
        return key_digest(self.key)


@dataclass
class Scene:
    """One test's world: scratch directory, canaries, daemons (users.py)."""

    base: Path
    lab: Lab
    fake: FakeGC
    world: Any
    canaries: Canaries
    daemons: list[Daemon] = field(default_factory=list)

    def archive(self, slug: str, sizes: list[int], viewers: set[str] | None = None) -> list[File]:
        socket_ = self.world.add_socket(f"{slug}-ct", kind="Image", relative_path="images/ct")
        archive = self.world.add_archive(slug, slug, viewers=viewers or {"demo"})
        files = []
        for n, size in enumerate(sizes):
            name = f"{slug}-{n:02d}.mha"
            data = random.Random(f"{slug}{n}").randbytes(size)
            image = self.world.add_image(name, [(name, data)])
            self.world.add_archive_item(archive, [self.world.add_value(socket_, image=image)])
            key = f"{self.fake.base_url}/media/images/{image_file_path(image.files[0])}"
            files.append(File(name, data, key, image.pk))
        return files

    def cache(self, mode: int, name: str = "cache") -> Path:
        return group_directory(self.base / name, mode, self.lab.gid)

    def daemon(self, who: str, *args: str, token: str = DEMO_TOKEN) -> Daemon:
        uid = {"root": None, "a": self.lab.a, "b": self.lab.b}[who]
        return start_daemon(
            self.base,
            self.lab,
            [
                "--base-url",
                self.fake.base_url,
                "--log-level",
                "DEBUG",
                "--timeout",
                OP_TIMEOUT,
                *args,
            ],
            uid=uid,
            name=f"{who}{len(self.daemons)}",
            token=token,
            daemons=self.daemons,
        )

    def plant(self, ops: list[list[str]]) -> list[str]:
        """Member B's operations (users.as_member)."""
        return as_member(self.lab, self.lab.b, ops)

    def stop(self, daemon: Daemon) -> None:
        daemon.unmount()


@pytest.fixture(scope="session")
def lab() -> Lab:
    return ensure_lab()


@pytest.fixture
def scene(lab: Lab, fake: FakeGC, world: Any) -> Iterator[Scene]:
    base = scratch()
    canaries = base / "canaries"
    canaries.mkdir(mode=0o755)
    here = Scene(base, lab, fake, world, Canaries(canaries, lab))
    try:
        yield here
    finally:
        problems = []
        for daemon in here.daemons:
            daemon.unmount()
            problems += daemon.problems(DEMO_TOKEN) + daemon.problems(DEMO_B_TOKEN)
        if not os.environ.get("GCFS_HOSTILE_KEEP"):  # keep the scene to look at it
            shutil.rmtree(base, ignore_errors=True)
    if problems:
        pytest.fail("daemon log problems:\n" + "\n".join(problems))


# -- helpers ---------------------------------------------------------------------------------


def store_paths(cache: Path, f: File) -> tuple[Path, Path, Path]:
    """(store/<hh>, <digest>.data, <digest>.index) of a file in `cache`."""
    hh = cache / STORE_DIR / f.digest[:2]
    return hh, hh / f"{f.digest}.data", hh / f"{f.digest}.index"


def files_in(daemon: Daemon, slug: str) -> dict[str, Path]:
    found = within(
        ANSWER_DEADLINE,
        f"a walk of archives/{slug}",
        lambda: {p.name: p for p in (daemon.path / "archives" / slug).rglob("*.mha")},
    )
    assert isinstance(found, dict), found
    return found


def read(path: Path, limit: int, deadline: float = READ_DEADLINE) -> bytes | OSError:
    """At most `limit` bytes of `path` (a hostile size must not make the test allocate it)."""

    def call() -> bytes:
        with open(path, "rb", buffering=0) as handle:
            chunks, total = [], 0
            while total < limit:
                chunk = handle.read(min(4 * MiB, limit - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            return b"".join(chunks)

    return within(deadline, f"a read of {path.name}", call)  # type: ignore[no-any-return]


def right_or_clean_error(path: Path, f: File, why: str) -> str | None:
    """None if a read of `path` gives `f`'s bytes or fails with EIO/EACCES in time; else what
    went wrong."""
    got = read(path, len(f.data) + 1)
    if isinstance(got, OSError):
        return None if got.errno in CLEAN_ERRORS else f"{f.name} ({why}): {got!r}"
    if got != f.data:
        pairs = zip(got, f.data, strict=False)
        first = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(got), len(f.data)))
        return (
            f"{f.name} ({why}): wrong bytes ({len(got)} read, {len(f.data)} expected, "
            f"first difference at {first})"
        )
    return None


def exactly_right(path: Path, f: File, why: str) -> str | None:
    got = read(path, len(f.data) + 1)
    if isinstance(got, OSError):
        return f"{f.name} ({why}): {got!r} instead of the server's bytes"
    if got != f.data:
        return f"{f.name} ({why}): wrong bytes ({len(got)} read, {len(f.data)} expected)"
    return None


def status(daemon: Daemon) -> dict[str, Any]:
    raw = within(ANSWER_DEADLINE, "status.json", (daemon.path / ".gcfs" / "status.json").read_bytes)
    assert isinstance(raw, bytes), raw
    return dict(json.loads(raw))


def writes_done(daemon: Daemon) -> None:
    end = time.monotonic() + WRITE_DEADLINE
    while status(daemon)["content"]["pending_writes"] != 0:
        assert time.monotonic() < end, f"the block writes of {daemon.path} did not end"
        time.sleep(0.05)


def start_reads(
    found: dict[str, Path], files: list[File], planted: str
) -> tuple[list[threading.Thread], dict[str, str | None]]:
    """Read each of `files` in a thread of its own (a read may hang: that is what is tested);
    returns once every read is under way, with the threads and where their outcomes go
    (None: right bytes or a clean error; else what went wrong)."""
    outcomes: dict[str, str | None] = {}
    started = threading.Semaphore(0)

    def attempt(f: File) -> None:
        started.release()
        try:
            outcomes[f.name] = right_or_clean_error(found[f.name], f, planted)
        except AssertionError as exc:
            outcomes[f.name] = str(exc)

    threads = [threading.Thread(target=attempt, args=(f,), daemon=True) for f in files]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert started.acquire(timeout=ANSWER_DEADLINE), "a read did not start"
    return threads, outcomes


def join_reads(threads: list[threading.Thread]) -> None:
    """Wait for the reads of `start_reads` up to the daemon's deadline (and a margin)."""
    end = time.monotonic() + READ_DEADLINE + 2
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))


def still_answers(daemon: Daemon, untouched: Path, f: File) -> None:
    """The mount answers promptly after the attack: a listing of its root, a read of an
    untouched file; the daemon is alive."""
    assert daemon.alive(), f"the daemon died:\n{daemon.log_text()[-3000:]}"
    listing = within(
        ANSWER_DEADLINE, "a listing of the mount's root", lambda: os.listdir(daemon.path)
    )
    assert isinstance(listing, list) and "archives" in listing, listing
    got = read(untouched, len(f.data) + 1, ANSWER_DEADLINE)
    assert got == f.data, f"the untouched file {f.name}: {got!r:.200}"
    assert daemon.alive(), f"the daemon died:\n{daemon.log_text()[-3000:]}"


def fill(scene: Scene, cache: Path, files: list[File], slug: str) -> None:
    """Member A's daemon reads `files` fully into `cache`, then unmounts."""
    first = scene.daemon("a", "--cache-dir", str(cache))
    found = files_in(first, slug)
    for f in files:
        assert read(found[f.name], len(f.data) + 1) == f.data, f.name
    writes_done(first)
    scene.stop(first)
    for f in files:
        _, data, index = store_paths(cache, f)
        assert data.is_file() and index.is_file(), f"{f.name} not cached where expected: {data}"


def fresh_bucket(cache: Path, taken: list[File], candidates: list[File]) -> File | None:
    """A file whose store/<hh> does not exist yet and is shared with no other file here."""
    used = {f.digest[:2] for f in taken}
    for f in candidates:
        hh = f.digest[:2]
        others = [g for g in candidates if g is not f and g.digest[:2] == hh]
        if hh not in used and not others and not (cache / STORE_DIR / hh).exists():
            return f
    return None


def ensure_bucket(scene: Scene, cache: Path, f: File) -> None:
    """Member B makes store/ and store/<hh> for `f` if they are missing (B may: the cache is
    group-writable), so that B can create names in it."""
    hh, _, _ = store_paths(cache, f)
    ops = [["mkdir", str(p)] for p in (hh.parent, hh) if not p.exists()]
    if ops:
        scene.plant(ops)


# -- 1: links planted in a group cache ---------------------------------------------------------

LINK_CASES = [
    pytest.param("symlink", 0o2770, "root", id="symlink-2770-root"),
    pytest.param("symlink", 0o2770, "a", id="symlink-2770-member"),
    pytest.param("symlink", 0o3770, "root", id="symlink-3770-root"),
    pytest.param("symlink", 0o3770, "a", id="symlink-3770-member"),
    pytest.param("hardlink", 0o2770, "root", id="hardlink-2770-root"),
    pytest.param("hardlink", 0o2770, "a", id="hardlink-2770-member"),
]


@pytest.mark.parametrize(("kind", "mode", "who"), LINK_CASES)
def test_planted_links_are_never_followed(scene: Scene, kind: str, mode: int, who: str) -> None:
    """Member A's daemon fills a group cache. B replaces A's data and index files with links
    to canaries (where the modes let B: without the sticky bit), and creates links under the
    names of files not read yet (a data file, an index file and, for symlinks, a whole
    store/<hh> directory), some of them dangling into a canary directory. A daemon (as A or as
    root) then reads every file: no canary changes, every byte is right or the read fails
    cleanly, the mount keeps answering."""
    # With fs.protected_hardlinks (1 here), B may hard link only files B can read and write:
    # the canaries are then group-writable files of root and of A.
    protected = Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "0"
    shared = kind == "hardlink" and protected
    # Files A never lists are in an archive of their own: listing probes sizes, and a size is
    # recorded in the cache (size-only records), which would create their names.
    filled = scene.archive("links", [2 * MiB + 1234, 300_000, 200_000])
    later = scene.archive("links-later", [150_000, 90_000, 70_000, 50_000, 30_000])
    files = filled + later
    untouched, replaced_data, replaced_index = filled
    cache = scene.cache(mode)
    if mode & stat.S_ISVTX == 0:
        # gcfs makes its subdirectories sticky; B makes them first, so that B owns them and
        # may replace A's files in them (the sticky bit protects only in others' directories).
        for f in (replaced_data, replaced_index):
            ensure_bucket(scene, cache, f)
    fill(scene, cache, [untouched, replaced_data, replaced_index], "links")
    owner = "root" if who == "root" else "a"
    c = scene.canaries
    file = functools.partial(c.file, shared=shared)
    replace = "replace_symlink" if kind == "symlink" else "replace_link"
    create = "symlink" if kind == "symlink" else "link"
    planned: list[tuple[list[str], str]] = [
        (
            [
                replace,
                str(file(owner, "replaced data")),
                str(store_paths(cache, replaced_data)[1]),
            ],
            "replace",
        ),
        (
            [
                replace,
                str(file("root", "replaced index")),
                str(store_paths(cache, replaced_index)[2]),
            ],
            "replace",
        ),
    ]
    pending = list(later)
    bucket = (
        fresh_bucket(cache, [untouched, replaced_data, replaced_index], pending)
        if kind == "symlink"
        else None
    )
    if bucket is not None:
        pending.remove(bucket)
        target = c.directory(
            owner, f"store/{bucket.digest[:2]} planted before {bucket.name} was read"
        )
        planned.append((["symlink", str(target), str(store_paths(cache, bucket)[0])], "create"))
    data_first, index_first, both, *_ = pending
    for f in (data_first, index_first, both):
        ensure_bucket(scene, cache, f)
    planned += [
        (
            [
                create,
                str(file(owner, f"data of {data_first.name}, planted before it was read")),
                str(store_paths(cache, data_first)[1]),
            ],
            "create",
        ),
        (
            [
                create,
                str(file("a", f"index of {index_first.name}, planted before")),
                str(store_paths(cache, index_first)[2]),
            ],
            "create",
        ),
        (
            [create, str(file("root", f"data of {both.name}")), str(store_paths(cache, both)[1])],
            "create",
        ),
    ]
    if kind == "symlink":
        planned.append(
            (
                [
                    "symlink",
                    str(c.missing(owner, f"index of {both.name} (dangling)")),
                    str(store_paths(cache, both)[2]),
                ],
                "create",
            )
        )
    else:
        planned.append(
            (
                [
                    "link",
                    str(file(owner, f"index of {both.name}")),
                    str(store_paths(cache, both)[2]),
                ],
                "create",
            )
        )
    results = scene.plant([op for op, _ in planned])
    for (op, how), result in zip(planned, results, strict=True):
        if how == "create":
            assert result == "ok", f"B could not plant {op}: {result}"
        else:
            assert result in ("ok", "EPERM", "EACCES"), f"{op}: {result}"
    if mode & stat.S_ISVTX == 0:
        assert results[0] == "ok", "without the sticky bit, B replaces A's files"

    daemon = scene.daemon(who, "--cache-dir", str(cache))
    found = files_in(daemon, "links") | files_in(daemon, "links-later")
    wrong = [right_or_clean_error(found[f.name], f, "planted") for f in files[1:]]
    still_answers(daemon, found[untouched.name], untouched)
    writes_done(daemon)
    scene.stop(daemon)
    problems = [w for w in wrong if w] + c.check()
    assert not problems, f"plants {results}:\n" + "\n".join(problems)


# -- 2: FIFOs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["root", "a"], ids=["root", "member"])
def test_planted_fifos_never_hang_the_mount(scene: Scene, who: str) -> None:
    """FIFOs in place of an index (replacing A's, in a cache without the sticky bit) and
    under the names of a data and an index file not read yet: reads of those files end (right
    bytes or EIO) within the daemon's deadline, meanwhile other paths answer promptly, and no
    thread is left in uninterruptible sleep."""
    filled = scene.archive("fifos", [300_000, 2 * MiB + 77])
    later = scene.archive("fifos-later", [120_000, 100_000, 80_000])
    files = filled + later
    untouched, replaced_index = filled
    cache = scene.cache(0o2770)
    ensure_bucket(scene, cache, replaced_index)  # B's directory: B may replace A's index in it
    fill(scene, cache, [untouched, replaced_index], "fifos")
    data_fifo, index_fifo, both = later
    for f in later:
        ensure_bucket(scene, cache, f)
    results = scene.plant(
        [
            ["replace_fifo", str(store_paths(cache, replaced_index)[2])],
            ["fifo", str(store_paths(cache, data_fifo)[1])],
            ["fifo", str(store_paths(cache, index_fifo)[2])],
            ["fifo", str(store_paths(cache, both)[1])],
            ["fifo", str(store_paths(cache, both)[2])],
        ]
    )
    assert results == ["ok"] * 5, results
    daemon = scene.daemon(who, "--cache-dir", str(cache))
    found = files_in(daemon, "fifos") | files_in(daemon, "fifos-later")
    threads, outcomes = start_reads(found, files[1:], "FIFO planted")
    still_answers(daemon, found[untouched.name], untouched)
    join_reads(threads)
    assert all(not t.is_alive() for t in threads), "reads of files with a planted FIFO never ended"
    problems = [f"{name}: {what}" for name, what in outcomes.items() if what]
    stuck = stuck_tasks([os.getpid(), daemon.process.pid])
    assert not problems and not stuck, "\n".join(problems + stuck)
    still_answers(daemon, found[untouched.name], untouched)


# -- 3: hostile index records ------------------------------------------------------------------


@pytest.mark.parametrize("who", ["root", "a"], ids=["root", "member"])
def test_hostile_index_records_are_misses(scene: Scene, who: str) -> None:
    """Records a member wrote that disagree with the file: a size of 2**62 appended to a
    filled file's index, block records whose length disagrees with the real size, records of
    another size than the one the daemon learned from the server (crcs right), 8 MiB of garbage
    full of magics, torn records. The daemon keeps answering and serves the server's bytes (a
    record inconsistent with what it knows is a miss: it fetches). Not tested: a member's
    well-formed records of a size no daemon has learned (a forgery the trust model accepts)."""
    filled = scene.archive("records", [2 * MiB + 4321, 200_000, 300_000])
    later = scene.archive("records-later", [250_000, 180_000, 90_000])
    files = filled + later
    untouched, huge_size, long_block = filled
    other_size, garbage, torn = later
    cache = scene.cache(0o2770)
    fill(scene, cache, [untouched, huge_size, long_block], "records")
    for f in (other_size, garbage, torn):
        ensure_bucket(scene, cache, f)

    def rec(f: File, kind: int, index: int, length: int, crc: int, size: int) -> bytes:
        return record(kind, BS, index, length, crc, size, f.digest)

    size = len(long_block.data)
    zeros = bytes(BS)
    appended_long = rec(long_block, KIND_BLOCK, 0, BS, zlib.crc32(zeros), size) + rec(
        long_block, KIND_BLOCK, 7, 4096, zlib.crc32(zeros[:4096]), size
    )
    fake_size = len(other_size.data) + 4096
    noise = bytearray(random.Random(2).randbytes(8 * MiB))
    for at in range(0, len(noise) - 4, 97):
        noise[at : at + 4] = b"GCI1"
    good_size = rec(torn, KIND_SIZE, 0, 0, 0, len(torn.data))
    torn_records = good_size + rec(torn, KIND_BLOCK, 0, len(torn.data), 0, len(torn.data))[:30]
    results = scene.plant(
        [
            [
                "append",
                str(store_paths(cache, huge_size)[2]),
                rec(huge_size, KIND_SIZE, 0, 0, 0, 2**62).hex(),
            ],
            ["append", str(store_paths(cache, long_block)[2]), appended_long.hex()],
            ["create", str(store_paths(cache, garbage)[2]), bytes(noise).hex()],
            [
                "create",
                str(store_paths(cache, torn)[1]),
                random.Random(3).randbytes(len(torn.data)).hex(),
            ],
            ["create", str(store_paths(cache, torn)[2]), torn_records.hex()],
        ]
    )
    assert results == ["ok"] * 5, results
    assert len(torn_records) % RECORD_SIZE != 0
    daemon = scene.daemon(who, "--cache-dir", str(cache))
    found = files_in(daemon, "records") | files_in(daemon, "records-later")
    # The daemon learns other_size's size from the server (its listing probes it and records
    # it in the cache); then B appends records of another size (crcs right for the zeros of
    # the data file's hole): they disagree with what the daemon learned, a miss.
    learned = within(ANSWER_DEADLINE, "stat", lambda: os.stat(found[other_size.name]).st_size)
    assert learned == len(other_size.data), learned
    writes_done(daemon)  # the size record reaches the index behind (when it is recorded)
    index = store_paths(cache, other_size)[2]
    hole = bytes(fake_size)
    disagreeing = rec(other_size, KIND_SIZE, 0, 0, 0, fake_size) + rec(
        other_size, KIND_BLOCK, 0, fake_size, zlib.crc32(hole), fake_size
    )
    how = "append" if index.is_file() else "create"  # the daemon may keep the size in memory only
    appended = scene.plant([[how, str(index), disagreeing.hex()]])
    assert appended == ["ok"], appended
    # The 2**62 file last: on the current code it stalls the store and the daemon then calls
    # storage failing for every read after it.
    problems = [
        exactly_right(found[long_block.name], long_block, "block records longer than the file"),
        exactly_right(found[other_size.name], other_size, "records of another size appended"),
        exactly_right(found[garbage.name], garbage, "8 MiB of garbage index"),
        exactly_right(found[torn.name], torn, "a torn record"),
        exactly_right(found[huge_size.name], huge_size, "a size record of 2**62 appended"),
    ]
    still_answers(daemon, found[untouched.name], untouched)
    sizes = {}
    for f in files:
        info = within(ANSWER_DEADLINE, f"stat {f.name}", lambda f=f: os.stat(found[f.name]))
        sizes[f.name] = info if isinstance(info, OSError) else info.st_size
    shown = [
        f"{n}: st_size {s}"
        for n, s in sizes.items()
        if s not in (len(next(f for f in files if f.name == n).data),)
    ]
    assert not [p for p in problems if p], (
        "\n".join(p for p in problems if p) + "\n" + "\n".join(shown)
    )
    still_answers(daemon, found[untouched.name], untouched)


# -- 4: the sticky bit ---------------------------------------------------------------------------


def sticky_warnings(daemon: Daemon) -> list[str]:
    return [
        line for line in daemon.log_text().splitlines() if " WARNING " in line and "sticky" in line
    ]


@pytest.mark.parametrize("mode", [0o2770, 0o3770], ids=["2770", "3770"])
def test_a_group_cache_without_the_sticky_bit_is_reported_once(scene: Scene, mode: int) -> None:
    """A daemon on a group cache without the sticky bit logs one WARNING naming it (members
    can remove each other's files there); with it, none."""
    files = scene.archive("sticky", [100_000, 200_000])
    cache = scene.cache(mode)
    daemon = scene.daemon("root", "--cache-dir", str(cache))
    for f in files:
        assert read(files_in(daemon, "sticky")[f.name], len(f.data) + 1) == f.data
    writes_done(daemon)
    scene.stop(daemon)
    warnings = sticky_warnings(daemon)
    if mode & stat.S_ISVTX:
        assert warnings == [], warnings
    else:
        assert len(warnings) == 1, f"expected one WARNING about the sticky bit, got {warnings}"


def test_in_a_sticky_group_cache_members_cannot_remove_each_others_files(scene: Scene) -> None:
    """In a 3770 cache, what A's daemon created (store/, store/<hh>, data and index files)
    cannot be unlinked, renamed or replaced by B: the directories gcfs makes carry the sticky
    bit too, and nothing is writable by others."""
    files = scene.archive("removal", [150_000])
    cache = scene.cache(0o3770)
    fill(scene, cache, files, "removal")
    hh, data, index = store_paths(cache, files[0])
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (cache / STORE_DIR, hh)}
    results = scene.plant(
        [
            ["unlink", str(data)],
            ["rename", str(index), str(index) + ".moved"],
            ["replace_symlink", "/etc/hostname", str(data)],
            ["rename", str(hh), str(hh) + ".moved"],
        ]
    )
    refused = all(r in ("EPERM", "EACCES") for r in results)
    assert refused, f"B's unlink/rename/replace of A's files: {results}; directory modes " + str(
        {str(p): oct(m) for p, m in modes.items()}
    )
    assert all(m & stat.S_ISVTX and m & 0o007 == 0 for m in modes.values()), modes


# -- 5: snapshots --------------------------------------------------------------------------------


def snapshot_as(
    scene: Scene, who: str, online: Daemon, subtree: str, to: Path
) -> subprocess.CompletedProcess[str]:
    """`gcfs snapshot MOUNT/subtree --to DIR` as root or as A, as pid 1 of a new pid namespace:
    its temporary names (`.tmp-<host>-<pid>-...`) are then known in advance."""
    path = str(online.mountpoint / subtree)
    home = scene.base / f"home-{online.mountpoint.name.removeprefix('mnt-')}"
    if who == "root":
        argv = [
            "unshare",
            "-p",
            "-f",
            sys.executable,
            "-m",
            "gcfs",
            "snapshot",
            path,
            "--to",
            str(to),
        ]
        env = dict(os.environ, XDG_RUNTIME_DIR=str(home / "run"))
    else:
        gcfs = [MEMBER_PYTHON, "-m", "gcfs", "snapshot", path, "--to", str(to)]
        argv = in_namespace_of(
            online, ["unshare", "-p", "-f", *scene.lab.as_user(scene.lab.a, gcfs)]
        )
        env = scene.lab.member_env(home)
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=SNAPSHOT_DEADLINE,
        check=False,
        env=env,
        cwd=os.getcwd(),
    )


def temporary(to: Path, name: str) -> Path:
    return to / f".tmp-{socket.gethostname()}-1-{name}"


@pytest.mark.parametrize("who", ["root", "a"], ids=["root", "member"])
def test_snapshot_runs_never_follow_planted_links(scene: Scene, who: str) -> None:
    """A snapshot directory made for the group (3770). Before the first run and again before
    a refresh, B plants symlinks under the lock file's and the temporary files' names (and the
    store/ directory's, before the first run) pointing at canaries. `gcfs snapshot` as root or
    as A then succeeds or refuses with one line; no canary changes."""
    files = scene.archive("snap", [120_000, 80_000])
    online = scene.daemon(who)
    for f in files:
        assert read(files_in(online, "snap")[f.name], len(f.data) + 1) == f.data
    to = scene.cache(0o3770, "snapshot")
    owner = "root" if who == "root" else "a"
    c = scene.canaries

    def plant_names(first: bool) -> list[str]:
        ops = [
            [
                "symlink",
                str(c.file(owner, "tree.json's temporary")),
                str(temporary(to, "tree.json")),
            ],
            [
                "symlink",
                str(c.missing(owner, "manifest.json's temporary")),
                str(temporary(to, "manifest.json")),
            ],
        ]
        if first:
            ops += [
                ["symlink", str(c.file(owner, ".snapshot.lock")), str(to / ".snapshot.lock")],
                ["symlink", str(c.directory(owner, "store/")), str(to / STORE_DIR)],
            ]
        return scene.plant(ops)

    runs, failures = [], []
    for first in (True, False):
        planted = plant_names(first)
        assert all(r in ("ok", "EEXIST") for r in planted), planted
        taken = snapshot_as(scene, who, online, "archives/snap", to)
        runs.append(f"planted {planted}: exit {taken.returncode}: {taken.stderr.strip()[-1500:]}")
        one_line = len(taken.stderr.strip().splitlines()) <= 1
        if not (taken.returncode == 0 or (taken.returncode == 1 and one_line)):
            failures.append(f"run {len(runs)}: not a success nor a one-line refusal")
        if "Traceback" in taken.stderr:
            failures.append(f"run {len(runs)}: a traceback")
    failures += scene.canaries.check()
    assert not failures, "\n".join(failures) + "\n-- the runs:\n" + "\n".join(runs)
    still_answers(online, files_in(online, "snap")[files[0].name], files[0])


def test_an_offline_mount_of_a_snapshot_with_planted_fifos_and_links_keeps_answering(
    scene: Scene, mount_offline: Any
) -> None:
    """A snapshot in a group directory without the sticky bit (2770), whose files B replaced
    with a FIFO (an index, a data file) and symlinks to canaries (a data file, an index): the
    offline mount serves right bytes or EIO within its deadline, other paths answer, no canary
    changes."""
    files = scene.archive("offsnap", [150_000, 2 * MiB + 11, 120_000, 100_000, 90_000])
    untouched, linked_data, fifo_index, fifo_data, linked_index = files
    online = scene.daemon("root")
    to = scene.cache(0o2770, "snapshot")
    # Marked as gcfs marks a new snapshot directory; then B makes store/ and its
    # subdirectories first, so that B owns them and may replace the snapshot's files there.
    marked = os.open(to, os.O_RDONLY | os.O_DIRECTORY)
    try:
        marker.write(marked, marker.SNAPSHOT, 0o660)
    finally:
        os.close(marked)
    for f in files[1:]:
        ensure_bucket(scene, to, f)
    taken = snapshot_as(scene, "root", online, "archives/offsnap", to)
    assert taken.returncode == 0, taken.stderr
    scene.stop(online)
    c = scene.canaries
    results = scene.plant(
        [
            [
                "replace_symlink",
                str(c.file("root", "data of the snapshot")),
                str(store_paths(to, linked_data)[1]),
            ],
            ["replace_fifo", str(store_paths(to, fifo_index)[2])],
            ["replace_fifo", str(store_paths(to, fifo_data)[1])],
            [
                "replace_symlink",
                str(c.file("a", "index of the snapshot")),
                str(store_paths(to, linked_index)[2]),
            ],
        ]
    )
    assert results == ["ok"] * 4, results
    offline = mount_offline(to, "--timeout", OP_TIMEOUT)
    offline.allowed_errors.append("not in the snapshot")
    found = within(
        ANSWER_DEADLINE,
        "a walk of the snapshot",
        lambda: {p.name: p for p in (offline.path / "archives" / "offsnap").rglob("*.mha")},
    )
    assert isinstance(found, dict), found
    threads, outcomes = start_reads(found, files[1:], "planted in the snapshot")
    listing = within(
        ANSWER_DEADLINE, "a listing of the offline root", lambda: os.listdir(offline.path)
    )
    assert isinstance(listing, list), listing
    assert read(found[untouched.name], len(untouched.data) + 1, ANSWER_DEADLINE) == untouched.data
    join_reads(threads)
    hung = [t.name for t in threads if t.is_alive()]
    problems = [f"{n}: {w}" for n, w in outcomes.items() if w] + c.check()
    assert not hung and not problems, f"reads never ended: {hung}\n" + "\n".join(problems)
    assert offline.process is not None and offline.process.poll() is None, offline.log_text()[
        -3000:
    ]
    assert stuck_tasks([os.getpid(), offline.process.pid]) == []


# -- 6: two tokens on one group cache ------------------------------------------------------------


def reachable_bytes(root: Path, deadline: float = ANSWER_DEADLINE) -> dict[str, bytes | str]:
    """Every file under `root` (a path in a mount), read in full, or the error met."""
    out: dict[str, bytes | str] = {}

    def walk(path: Path) -> None:
        try:
            if path.is_symlink():
                return
            if path.is_dir():
                for child in sorted(os.listdir(path)):
                    walk(path / child)
            else:
                out[str(path)] = path.read_bytes()
        except OSError as exc:
            out[str(path)] = errno.errorcode.get(exc.errno or 0, str(exc))

    result = within(deadline, f"a walk of {root}", lambda: walk(root))
    assert not isinstance(result, OSError) or True
    return out


def test_a_second_token_never_reaches_bytes_the_first_cached(scene: Scene) -> None:
    """A (token demo) and B (token demo-b, who may not see archive `secret`) mount one 3770
    group cache, each as their own uid. A reads the secret image fully. Through B's mount no
    path gives its bytes: A's path is absent, `images/<pk>` and `api/v1/cases/images/<pk>`
    answer a stub or an error, and every /media/ request made with B's token was answered
    403. Documented, not a failure: B's uid reads the cached file directly in the cache."""
    [secret] = scene.archive("secret", [300_000])
    shared = scene.archive("shared", [60_000], viewers={"demo", "demo-b"})[0]
    cache = scene.cache(0o3770)
    a = scene.daemon("a", "--cache-dir", str(cache))
    assert read(files_in(a, "secret")[secret.name], len(secret.data) + 1) == secret.data
    writes_done(a)
    relative = files_in(a, "secret")[secret.name].relative_to(a.path)
    b = scene.daemon("b", "--cache-dir", str(cache), token=DEMO_B_TOKEN)
    marker = secret.data[1000:1064]
    leaks = []
    for where in (
        relative,
        Path("archives") / "secret",
        Path("images") / secret.pk,
        Path("api/v1/cases/images") / secret.pk,
    ):
        for path, got in reachable_bytes(b.path / where).items():
            if isinstance(got, bytes) and marker in got:
                leaks.append(f"{path}: the secret bytes, through B's mount")
    media = [
        r for r in scene.fake.requests if r.endpoint == "media-image-file" and r.user == "demo-b"
    ]
    answered = [(r.path, r.status) for r in media if r.status != 403]
    assert not leaks and not answered, "\n".join(leaks) + f"\n/media/ with B's token: {answered}"
    found_b = files_in(b, "shared")
    still_answers(b, found_b[shared.name], shared)
    # Documented (README): a member's uid reads every cached file directly.
    [direct] = as_member(scene.lab, scene.lab.b, [["read", str(store_paths(cache, secret)[1])]])
    assert bytes.fromhex(direct) == secret.data
