"""MetadataStore: the API's answers on disk, one SQLite file per server and user.

What is kept: listings (one row per listed object, in the server's order, written page by page
as the pages arrive), single answers (an object by its API path, a DICOM instance list) and
when each was fetched (wall clock, so that the TTL means the same after a restart). Memory then
holds only what the kernel holds and a bounded cache of parsed objects: a listing of 200,000
items is ~260 MB of JSON, which as Python objects was 1.1 GiB of daemon memory.

Where: `$XDG_CACHE_HOME/gcfs-metadata/` (`~/.cache/gcfs-metadata`, beside the default block
cache), a 0700 directory of 0600 files, also when the block cache is a group cache: a listing
says what one token may see, so it is never shared. The file name is a hash of the server and
the user; the token is kept only as a salted hash (`token_matches`), so that a daemon started
while the server is down can tell that the store holds what this token was shown.

Trust: a file that is not a gcfs store of this format (damaged, another version, something
else) is set aside (renamed `*.set-aside`, the previous set-aside one removed) and a new store
is made; an error while the daemon runs (a disk fault, a file damaged under us) disables the
store for the rest of the run (`broken`), and gcfs asks the server as it would without one.
A listing is visible only once its last page was stored (`complete`); a daemon killed in the
middle of a listing leaves an incomplete one that the next start deletes.

Threads: one connection for writes (pages, answers), guarded by a lock, used from worker
threads for pages (a page of 1,000 objects takes ~5-10 ms) and from the trio thread for single
answers; one connection for reads on the trio thread (point queries by pk take ~20-50 us). In
WAL mode readers never wait for the writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bumped when the schema or the meaning of a column changes; another number is set aside.
FORMAT = 1
# "gcfs" in ASCII: what PRAGMA application_id says of our files.
APPLICATION_ID = 0x67636673
SUFFIX = ".sqlite"
SET_ASIDE = ".set-aside"

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE listings (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    started_at REAL NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    count INTEGER
);
CREATE INDEX listings_by_key ON listings (key, complete);
CREATE TABLE entries (
    listing INTEGER NOT NULL,
    position INTEGER NOT NULL,
    pk TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (listing, position)
) WITHOUT ROWID;
CREATE UNIQUE INDEX entries_by_pk ON entries (listing, pk);
CREATE TABLE answers (key TEXT PRIMARY KEY, fetched_at REAL NOT NULL, body TEXT NOT NULL);
"""


class StoreError(Exception):
    """The store cannot be used (the caller goes on without it)."""


class StoreBusy(StoreError):
    """Another daemon owns the store: not damaged, not set aside."""


@dataclass(frozen=True, slots=True)
class ListingRecord:
    generation: int
    started_at: float  # wall clock: when its first page was asked for
    complete: bool
    count: int | None


def default_directory() -> Path:
    """`$XDG_CACHE_HOME/gcfs-metadata`, i.e. `~/.cache/gcfs-metadata` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gcfs-metadata"


def server_prefix(base_url: str) -> str:
    """The part of a store's file name that names the server."""
    return hashlib.sha256(base_url.encode()).hexdigest()[:16]


def store_path(directory: Path, base_url: str, username: str) -> Path:
    user = hashlib.sha256(username.encode()).hexdigest()[:16]
    return directory / f"{server_prefix(base_url)}-{user}{SUFFIX}"


def key_text(key: object) -> str:
    """A cache key (nested tuples of strings) as the store's key column."""
    return json.dumps(key, separators=(",", ":"))


def encode(obj: object) -> str:
    """An API object as stored: JSON that parses back to the same keys in the same order, so
    a metadata file rendered from it is byte for byte the one rendered from the answer."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def private_directory(directory: Path) -> Path:
    """Make (0700) or check the store's directory: ours, a directory (not a link), and closed
    to others; a directory that fails this is refused, never chmodded or replaced."""
    with contextlib.suppress(FileExistsError):
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise StoreError(f"{directory} belongs to another user")
    if info.st_mode & 0o077:
        raise StoreError(f"{directory} is open to other users (chmod 700 it)")
    return directory


class MetadataStore:
    """Listings and answers of one user on one server (see the module docstring)."""

    def __init__(self, path: Path | None) -> None:
        """`path` None: a store in memory (no directory for one, or it was unusable), with
        the same behaviour for one run."""
        self.path = path or Path(":memory:")
        self.broken = False
        self._lock = threading.RLock()
        self._read_lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        self._hold = -1  # the lock file's descriptor (_take_lock)
        if path is None:
            self._writer = self._reader = self._in_memory()
            self._read_lock = self._lock  # one connection: reads wait for writes
        else:
            self._writer, self._reader = self._open()

    @staticmethod
    def _in_memory() -> sqlite3.Connection:
        connection = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        connection.executescript(_SCHEMA)
        connection.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT),))
        connection.execute("INSERT INTO meta VALUES ('salt', ?)", (secrets.token_hex(16),))
        return connection

    @property
    def persistent(self) -> bool:
        return str(self.path) != ":memory:"

    # -- opening ------------------------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        private_directory(self.path.parent)
        self._hold = self._take_lock()
        try:
            for attempt in range(2):
                try:
                    return self._connect()
                except (sqlite3.DatabaseError, StoreError) as exc:
                    if attempt:
                        raise StoreError(f"{self.path}: {exc}") from exc
                    self._set_aside(str(exc))
            raise AssertionError("unreachable")
        except BaseException:
            os.close(self._hold)
            self._hold = -1
            raise

    def _take_lock(self) -> int:
        """One daemon at a time owns a store: it deletes half listings at start and old
        generations as it goes, which would pull rows from under another daemon still
        filling or reading them. The lock (flock on `<store>.lock`, held until the daemon
        exits) makes a second mount of the same user and server keep its metadata in memory."""
        lock_path = f"{self.path}.lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(lock_path, flags, 0o600)
        except OSError as exc:
            raise StoreBusy(f"cannot open its lock file ({exc.strerror})") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise StoreBusy("its lock file is not a regular file of ours")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusy("another gcfs daemon of this user and server uses it") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _connect(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        created = self._create_file()
        writer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            writer.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit is durable at the next checkpoint; losing the last seconds of
            # answers in a power cut costs a refetch, never a wrong answer (listings are only
            # visible once complete, in one transaction).
            writer.execute("PRAGMA synchronous=NORMAL")
            if created:
                writer.executescript(_SCHEMA)
                writer.execute(f"PRAGMA application_id={APPLICATION_ID}")
                writer.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT),))
                writer.execute("INSERT INTO meta VALUES ('salt', ?)", (secrets.token_hex(16),))
            self._check(writer)
            # Half listings of a daemon that died in the middle of one: never complete.
            writer.execute("BEGIN")
            writer.execute(
                "DELETE FROM entries WHERE listing IN (SELECT id FROM listings WHERE complete=0)"
            )
            writer.execute("DELETE FROM listings WHERE complete=0")
            # Superseded generations (kept while a directory handle read them).
            writer.execute(
                "DELETE FROM entries WHERE listing IN (SELECT id FROM listings l WHERE "
                "EXISTS (SELECT 1 FROM listings n WHERE n.key=l.key AND n.id>l.id))"
            )
            writer.execute(
                "DELETE FROM listings WHERE EXISTS "
                "(SELECT 1 FROM listings n WHERE n.key=listings.key AND n.id>listings.id)"
            )
            writer.execute("COMMIT")
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except BaseException:
            writer.close()
            raise
        return writer, reader

    def _create_file(self) -> bool:
        """Create the file 0600 if it is missing (True); refuse what is not a regular file of
        ours. sqlite opens by name, so the checks come first and O_NOFOLLOW guards the race."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, flags)
            except OSError as exc:
                raise StoreError(f"cannot open it ({exc.strerror})") from exc
            created = False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise StoreError("not a regular file")
            if info.st_uid != os.getuid():
                raise StoreError("belongs to another user")
            if created:
                os.fchmod(fd, 0o600)
            elif info.st_size == 0:
                created = True  # made but never written (a crash right after creating it)
        finally:
            os.close(fd)
        return created

    @staticmethod
    def _check(connection: sqlite3.Connection) -> None:
        (application,) = connection.execute("PRAGMA application_id").fetchone()
        if application != APPLICATION_ID:
            raise StoreError("not a gcfs metadata store")
        row = connection.execute("SELECT value FROM meta WHERE name='format'").fetchone()
        if row is None or row[0] != str(FORMAT):
            raise StoreError(f"format {row[0] if row else '?'}, this gcfs writes {FORMAT}")

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + SET_ASIDE)
        log.warning("%s: %s; set aside as %s, starting a new store", self.path, why, aside.name)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)  # one set-aside file per store is enough to look at
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, aside)

    def close(self) -> None:
        with self._lock:
            for connection in (self._reader, self._writer):
                with contextlib.suppress(sqlite3.Error):
                    connection.close()
            if self._hold >= 0:
                os.close(self._hold)  # releases the flock
                self._hold = -1

    def _failed(self, exc: Exception) -> StoreError:
        """The file failed under us (a disk fault, damage): the rest of this run keeps its
        answers in memory; the next start sets the file aside if it is still damaged."""
        with self._lock:
            if not self.broken:
                self.broken = True
                log.warning(
                    "%s failed (%s); keeping metadata in memory until restarted", self.path, exc
                )
                for connection in {self._reader, self._writer}:
                    with contextlib.suppress(sqlite3.Error):
                        connection.close()
                self._writer = self._reader = self._in_memory()
                self._read_lock = self._lock
        return StoreError(str(exc))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._writer
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    if self._writer.in_transaction:
                        self._writer.execute("ROLLBACK")
                raise self._failed(exc) from exc

    def _read(self, sql: str, args: Sequence[object]) -> list[Any]:
        try:
            with self._read_lock:
                return self._reader.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc

    # -- the token ------------------------------------------------------------------------------

    def _token_hash(self, token: str) -> str:
        (salt,) = self._read("SELECT value FROM meta WHERE name='salt'", ())[0]
        return hmac.new(salt.encode(), token.encode(), hashlib.sha256).hexdigest()

    def remember_token(self, token: str, username: str) -> None:
        """The server accepted `token` as `username`: keep its salted hash (never the token)."""
        digest = self._token_hash(token)
        with self._writing() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('token', ?)", (digest,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('user', ?)", (username,))

    def token_matches(self, token: str) -> str | None:
        """The user this store was filled for, if `token` is the token it was filled with."""
        rows = dict(self._read("SELECT name, value FROM meta", ()))
        if "token" not in rows or "user" not in rows:
            return None
        return rows["user"] if hmac.compare_digest(rows["token"], self._token_hash(token)) else None

    def newest_answer(self) -> float | None:
        """When the most recent answer or listing kept here was fetched (wall clock)."""
        rows = self._read(
            "SELECT max(t) FROM (SELECT max(fetched_at) AS t FROM answers UNION ALL "
            "SELECT max(started_at) FROM listings WHERE complete=1)",
            (),
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    # -- answers --------------------------------------------------------------------------------

    def put_answer(self, key: str, body: str, fetched_at: float) -> None:
        with self._writing() as db:
            db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, fetched_at, body))

    def get_answer(self, key: str) -> tuple[str, float] | None:
        rows = self._read("SELECT body, fetched_at FROM answers WHERE key=?", (key,))
        return (rows[0][0], rows[0][1]) if rows else None

    def forget_answer(self, key: str) -> None:
        """`gcfs refresh`: no longer an answer within the TTL, still the last good one."""
        with self._writing() as db:
            db.execute("UPDATE answers SET fetched_at=0 WHERE key=?", (key,))

    # -- listings -------------------------------------------------------------------------------

    def begin_listing(self, key: str, started_at: float) -> int:
        with self._writing() as db:
            cursor = db.execute(
                "INSERT INTO listings (key, started_at) VALUES (?, ?)", (key, started_at)
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def add_page(self, generation: int, offset: int, objects: Iterable[tuple[str, str]]) -> None:
        """Store one page: (pk, body) pairs at positions offset, offset + 1, ... A pk that an
        earlier page already listed (offset pages of an unordered listing can overlap) is
        left out, leaving a gap in the positions."""
        rows = [(generation, offset + n, pk, body) for n, (pk, body) in enumerate(objects)]
        with self._writing() as db:
            db.execute("BEGIN")
            db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?)", rows)
            db.execute("COMMIT")

    def complete_listing(self, generation: int, count: int, keep: Iterable[int] = ()) -> None:
        """The last page is stored: the listing becomes the key's answer, and the key's older
        generations go, except those in `keep` (directory handles still read them)."""
        kept = sorted(set(keep))
        with self._writing() as db:
            db.execute("BEGIN")
            db.execute("UPDATE listings SET complete=1, count=? WHERE id=?", (count, generation))
            (key,) = db.execute("SELECT key FROM listings WHERE id=?", (generation,)).fetchone()
            old = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM listings WHERE key=? AND id<?", (key, generation)
                )
                if row[0] not in kept
            ]
            self._delete(db, old)
            db.execute("COMMIT")

    def drop_listing(self, generation: int) -> None:
        """A listing that failed half way, or a superseded one no handle reads any more."""
        with self._writing() as db:
            db.execute("BEGIN")
            self._delete(db, [generation])
            db.execute("COMMIT")

    @staticmethod
    def _delete(db: sqlite3.Connection, generations: Sequence[int]) -> None:
        for generation in generations:
            db.execute("DELETE FROM entries WHERE listing=?", (generation,))
            db.execute("DELETE FROM listings WHERE id=?", (generation,))

    def forget_listing(self, key: str) -> None:
        """`gcfs refresh`: the key's complete listings are no longer an answer."""
        with self._writing() as db:
            db.execute("UPDATE listings SET started_at=0 WHERE key=?", (key,))

    def make_everything_stale(self) -> None:
        """SIGHUP: nothing kept is an answer within the TTL any more (all stay last good)."""
        with self._writing() as db:
            db.execute("UPDATE answers SET fetched_at=0")
            db.execute("UPDATE listings SET started_at=0")

    def latest_listing(self, key: str) -> ListingRecord | None:
        """The key's newest complete listing."""
        rows = self._read(
            "SELECT id, started_at, count FROM listings WHERE key=? AND complete=1 "
            "ORDER BY id DESC LIMIT 1",
            (key,),
        )
        if not rows:
            return None
        generation, started_at, count = rows[0]
        return ListingRecord(generation, started_at, True, count)

    def positions(
        self, generation: int, start: int, limit: int, end: int | None = None
    ) -> list[tuple[int, str]]:
        """(position, pk) of up to `limit` entries at positions in [start, end), in order."""
        return self._read(
            "SELECT position, pk FROM entries WHERE listing=? AND position>=? AND position<? "
            "ORDER BY position LIMIT ?",
            (generation, start, 2**62 if end is None else end, limit),
        )

    def bodies(self, generation: int, start: int, limit: int) -> list[tuple[int, str]]:
        """(position, body) of up to `limit` entries at positions >= start, in order."""
        return self._read(
            "SELECT position, body FROM entries WHERE listing=? AND position>=? "
            "ORDER BY position LIMIT ?",
            (generation, start, limit),
        )

    def find(self, generation: int, pk: str) -> str | None:
        rows = self._read("SELECT body FROM entries WHERE listing=? AND pk=?", (generation, pk))
        return rows[0][0] if rows else None

    def find_many(self, generation: int, pks: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        # SQLite allows 32,766 variables per statement; 500 at a time stays far from it.
        for start in range(0, len(pks), 500):
            chunk = pks[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT pk, body FROM entries WHERE listing=? AND pk IN ({marks})",
                (generation, *chunk),
            )
            found.update(rows)
        return found

    def entry_count(self, generation: int) -> int:
        rows = self._read("SELECT count(*) FROM entries WHERE listing=?", (generation,))
        return int(rows[0][0])


def open_store(directory: Path, base_url: str, username: str) -> MetadataStore:
    """The user's store for `base_url`; one in memory (logged) when it cannot be had."""
    path = store_path(directory, base_url, username)
    try:
        return MetadataStore(path)
    except (OSError, StoreError, sqlite3.Error) as exc:
        log.warning(
            "metadata store %s unusable (%s); keeping metadata for this run only", path, exc
        )
        return MetadataStore(None)


def find_store_for_token(
    directory: Path, base_url: str, token: str
) -> tuple[MetadataStore, str] | None:
    """A store of `base_url` filled with `token` and the user it was filled for: what a daemon
    started while the server is down serves."""
    prefix = server_prefix(base_url) + "-"
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    for name in names:
        if not (name.startswith(prefix) and name.endswith(SUFFIX)):
            continue
        try:
            store = MetadataStore(directory / name)
        except (OSError, StoreError, sqlite3.Error):
            continue
        try:
            user = store.token_matches(token)
        except StoreError:
            user = None
        if user is not None and store.path == store_path(directory, base_url, user):
            return store, user
        store.close()
    return None


def now() -> float:
    """The store's clock: wall time, so ages survive restarts."""
    return time.time()
