"""Configuration of one mount: flags, environment and token file, validated without network.

The token is wrapped in `Secret` as soon as it is read, so it cannot reach a log line, an error
message or a repr by accident; only `Secret.reveal()` gives it out, and only the HTTP client
calls it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://grand-challenge.org"
TOKEN_ENV = "GRAND_CHALLENGE_AUTHORIZATION"  # the variable the official client (gcapi) reads

# How long listings and objects are trusted before they are fetched again. Grand Challenge has
# no ETags or conditional GETs (gc-api.md §1), so the only choices are a TTL or a request per
# stat. Archives, algorithms and reader studies change on the scale of hours (uploads, new
# permissions); 60 s makes a second `ls` or a script's repeated `stat` free while an upload
# shows up within a minute. The kernel's entry/attr caches use the same number.
DEFAULT_TTL = 60.0
# Deadline of one filesystem operation. pyfuse3 handlers cannot be interrupted from outside, so
# without it a stuck server would hang the reader forever. 60 s is gcapi's default timeout.
DEFAULT_OP_TIMEOUT = 60.0
# Deadline of one HTTP request; below the operation's deadline so a listing that needs a
# couple of requests in a row can still report a proper error in time.
DEFAULT_HTTP_TIMEOUT = 30.0
# The on-disk block cache keeps what was read for later reads and later mounts. 10 GiB holds a
# few whole-slide images or a few hundred CT volumes; least recently used blocks go first.
DEFAULT_CACHE_SIZE = 10 * 2**30


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/gcfs`, i.e. `~/.cache/gcfs` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gcfs"


def parse_size(text: str, what: str | None = None) -> int:
    """`10G`, `512M`, `1.5T` or plain bytes; binary units (1G = 2**30 bytes). `what` names
    the value in the error instead of repeating it (an option's value is never echoed)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in units:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        value = -1
    if value < 0:
        shown = what or repr(text)
        raise UserError(f"{shown} is not a size (examples: 10G, 512M)")
    return value


class Secret:
    """A string that never shows itself in repr, str or format."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class TokenSource:
    """The token in use, and where a new one comes from when the server rejects it.

    A token revoked while mounted gives 401; if the token file now holds another token, we
    switch to it without a remount. `headers` is a live mapping: whoever holds it (the API
    client, the content store) always sends the current token.
    """

    def __init__(self, token: Secret | None, path: Path | None = None) -> None:
        self.token = token
        self.path = path
        self.headers: Mapping[str, str] = _AuthHeaders(self)

    def reload(self) -> bool:
        """Read the token file again; True when it holds a different token than before."""
        if self.path is None:
            return False
        try:
            fresh = read_token_file(self.path)
        except UserError as exc:
            log.warning("cannot reload the token: %s", exc)
            return False
        if fresh == self.token:
            return False
        self.token = fresh
        log.warning("using the new token from %s", self.path)
        return True


class _AuthHeaders(Mapping[str, str]):
    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def _current(self) -> dict[str, str]:
        token = self._source.token
        return {"Authorization": f"Bearer {token.reveal()}"} if token is not None else {}

    def __getitem__(self, key: str) -> str:
        return self._current()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __repr__(self) -> str:
        return "AuthHeaders(***)"


@dataclass(frozen=True, slots=True)
class Config:
    mountpoint: Path
    base_url: str  # site root without trailing slash, e.g. https://grand-challenge.org
    token: Secret | None
    token_file: Path | None = None  # read again when the server rejects the token
    ttl: float = DEFAULT_TTL
    op_timeout: float = DEFAULT_OP_TIMEOUT
    http_timeout: float = DEFAULT_HTTP_TIMEOUT
    foreground: bool = False
    log_level: str = "INFO"
    cache_dir: Path | None = None  # None: default_cache_dir()
    cache_size: int = DEFAULT_CACHE_SIZE
    # The metadata store's directory (metastore.py); None: $XDG_CACHE_HOME/gcfs-metadata.
    metadata_dir: Path | None = None
    # Let other users (and root) into the mount; non-root users need `user_allow_other` in
    # /etc/fuse.conf for it. The kernel still applies the 0555/0444 modes.
    allow_other: bool = False
    # Serve the snapshot in this directory (gcfs snapshot) instead of the server: no token,
    # no network; base_url is then the snapshot's server, for show.
    offline: Path | None = None
    # How messages name cache_dir when --cache-dir gave it (never by the value typed).
    cache_dir_label: str | None = None
    # Where the daemon logs (the default log in the background, or --log-file); None: stderr.
    # Only shown (gcfs status): the command sets logging up before the daemon runs.
    log_file: Path | None = None

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v1/"

    @property
    def request_timeout(self) -> float:
        """One HTTP attempt: at most half the operation deadline, so a retry fits."""
        return min(self.http_timeout, self.op_timeout / 2)

    @property
    def retry_budget(self) -> float:
        """All attempts of one request: 3/4 of the operation deadline, leaving the rest for
        the other steps of the operation and for answering the kernel in time."""
        return self.op_timeout * 0.75


def mount_options(cfg: Config, base: Iterable[str] = ()) -> set[str]:
    """The FUSE mount options for `cfg`: `base` (the daemon's fixed set) plus what the user
    chose, e.g. `mount_options(cfg, MOUNT_OPTIONS)` -> {..., "allow_other"}."""
    options = set(base)
    if cfg.allow_other:
        options.add("allow_other")
    return options


def parse_token(text: str, source: str) -> Secret:
    """Accept `<token>` or `<keyword> <token>` (e.g. `Bearer <token>`), as gcapi does."""
    words = text.split()
    if len(words) == 1:
        return Secret(words[0])
    if len(words) == 2:
        return Secret(words[1])
    if not words:
        raise UserError(f"{source} is empty: put your Grand Challenge API token in it")
    raise UserError(f"{source} does not hold a token: expected '<token>' or 'Bearer <token>'")


def read_token_file(path: Path, label: str | None = None) -> Secret:
    """Read a token file, refusing one that other users could read and anything that is not
    a regular file (a directory, /dev/null, a FIFO that would block). `label` names the file
    in messages: "the token file given with --token-file", never the value the user typed
    (which may be the token itself, put after the wrong flag). Without `label` the path is
    shown: one that did not come from an option (the config file's token_file)."""
    shown = label or f"token file {path}"
    fix = f"chmod 600 {path}" if label is None else "chmod 600"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot read {shown}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{shown} is not a regular file; give the file holding the token")
        if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
            raise UserError(f"{shown} is readable by other users; fix it with: {fix}")
        with os.fdopen(os.dup(fd), "rb") as stream:
            text = stream.read(1 << 16).decode("utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {shown}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{shown} is not text") from None
    finally:
        os.close(fd)
    return parse_token(text, shown)


def find_token(
    token_file: Path | None, environ: Mapping[str, str], label: str | None = None
) -> Secret:
    """The token from `token_file` (--token-file, or the config file's token_file when the
    environment has no token), else from GRAND_CHALLENGE_AUTHORIZATION."""
    if token_file is not None:
        return read_token_file(token_file, label)
    value = environ.get(TOKEN_ENV)
    if value:
        return parse_token(value, TOKEN_ENV)
    raise UserError(
        f"no API token: use --token-file FILE, set {TOKEN_ENV} or token_file in the config file "
        "(create a token at https://grand-challenge.org/settings/api-tokens/)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_base_url(url: str) -> str:
    """The site root without trailing slash; `.../api/v1/` is accepted and stripped.

    Plain http is allowed only on loopback (the demo and the tests): anywhere else it would send
    the token in clear text.
    """
    try:
        parts = urlsplit(url.strip())
        hostname = parts.hostname
    except ValueError:  # a malformed IPv6 address, a port that is not a number
        raise UserError("--base-url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise UserError("--base-url is not an http(s) URL")
    if parts.scheme == "http" and not _is_loopback(hostname):
        raise UserError("--base-url must use https (the token would travel in clear)")
    if parts.query or parts.fragment:
        raise UserError("--base-url must not have a query or fragment")
    path = parts.path.rstrip("/")
    if path.endswith("/api/v1"):
        path = path[: -len("/api/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def check_mountpoint(path: Path) -> Path:
    """An existing, empty directory we may use; resolved to an absolute path.

    A mount point left behind by a daemon that was killed ("Transport endpoint is not
    connected") is unmounted first, so that `gcfs mount` just works again.
    """
    resolved = path.expanduser().absolute()
    if is_stale_mount(resolved):
        clear_stale_mount(resolved)
    if not resolved.exists():
        raise UserError(f"mount point {path} does not exist (create it with: mkdir -p {path})")
    if not resolved.is_dir():
        raise UserError(f"mount point {path} is not a directory; mount on an empty directory")
    if os.path.ismount(resolved):
        raise UserError(f"{path} is already a mount point (unmount it with: gcfs umount {path})")
    try:
        if any(resolved.iterdir()):
            raise UserError(f"mount point {path} is not empty")
    except PermissionError:
        raise UserError(f"cannot read mount point {path}") from None
    return resolved


def is_stale_mount(path: Path) -> bool:
    """True for a FUSE mount whose daemon is gone (ENOTCONN). statvfs, because the kernel
    may answer stat from its attribute cache without asking the dead daemon."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def clear_stale_mount(path: Path) -> None:
    """Lazily unmount a stale mount, or say exactly which command does it."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [fusermount or "fusermount3", "-u", "-z", str(path)]
    if fusermount is not None:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0 and not is_stale_mount(path):
            log.warning("%s was left mounted by a daemon that died; unmounted it", path)
            return
    raise UserError(
        f"{path} is a stale mount of a daemon that died; unmount it with: {' '.join(command)}"
    )
