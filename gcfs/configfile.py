"""The config file: defaults for `gcfs mount` and `gcfs demo`, in TOML.

`$XDG_CONFIG_HOME/gcfs/config.toml` (i.e. `~/.config/gcfs/config.toml`), or the file given
with `--config PATH` / `-o config=PATH`. Flat `key = value` lines, keys spelled as the `-o`
mount options:

    base_url = "https://grand-challenge.org"
    token_file = "~/.gctoken"
    ttl = 120
    cache_size = "20G"

Precedence: command-line flags (and `-o` options) win over the file, the file wins over the
built-in defaults. An unknown key or a value of the wrong type is an error naming the key and
the file, never silently ignored. The token itself is refused: a config file is the kind of
file people copy around and share; the token belongs in a 0600 file named by `token_file`.
"""

from __future__ import annotations

import difflib
import errno
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gcfs" / "config.toml"


@dataclass(frozen=True)
class FileDefaults:
    """The settings a config file gave; keys are `-o` names, values already checked."""

    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.values.get(key)


def _number(key: str, value: Any) -> float:
    # bool is an int in Python, but `ttl = true` is a mistake, not 1 second.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a number of seconds, e.g. 60")
    if value <= 0:
        raise ValueError("must be greater than 0")
    return float(value)


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _size(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError('a size such as "10G", "512M" or a number of bytes')
    return str(value)


def _log_level(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value.upper()


# key -> (checker, is a path). Keys are the `-o` option names.
KEYS: dict[str, tuple[Callable[[str, Any], Any], bool]] = {
    "token_file": (_string, True),
    "base_url": (_string, False),
    "ttl": (_number, False),
    "timeout": (_number, False),
    "cache_dir": (_string, True),
    "cache_size": (_size, False),
    "log_level": (_log_level, False),
    "log_file": (_string, True),
    "allow_other": (_boolean, False),
    "offline": (_string, True),
}

# Keys people will try, with the reason they are refused.
REFUSED = {
    "token": "the token does not belong in a config file; put it in a file only you can read "
    "(chmod 600) and set token_file",
    "foreground": "foreground is not a default (it would make every mount, including "
    "mount(8) and fstab, wait forever); pass --foreground or -o foreground",
    "config": "a config file cannot name another config file",
}


def load(path: Path | None, *, explicit: bool, label: str | None = None) -> FileDefaults:
    """Read and check a config file. A missing default file is fine; a missing --config not.
    `label` names the file in messages instead of its path ("the config file given with
    --config": an option's value is never repeated)."""
    if path is None:
        return FileDefaults()
    path = path.expanduser()
    shown = label or f"config file {path}"
    try:
        data = tomllib.loads(_read_bounded(path).decode("utf-8"))
    except FileNotFoundError:
        if explicit:
            raise UserError(f"{shown} does not exist") from None
        return FileDefaults()
    except IsADirectoryError:
        raise UserError(f"{shown} is a directory") from None
    except OSError as exc:
        raise UserError(f"cannot read {shown}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{shown} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{shown} is not UTF-8 text") from None
    return FileDefaults(path, check(data, path, shown))


# A config file is a few hundred bytes; a larger one is a mistake (or /dev/zero).
MAX_CONFIG = 1 << 20


def _read_bounded(path: Path) -> bytes:
    """The file's bytes: a FIFO refused without blocking, at most MAX_CONFIG read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = os.read(fd, MAX_CONFIG + 1)
        if len(data) > MAX_CONFIG:
            raise OSError(errno.EFBIG, "larger than 1 MiB: not a config file")
        return data
    finally:
        os.close(fd)


def check(data: Mapping[str, Any], path: Path, shown: str | None = None) -> dict[str, Any]:
    shown = shown or f"config file {path}"
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in REFUSED:
            raise UserError(f"{shown}: key {key!r} is not allowed: {REFUSED[key]}")
        if key not in KEYS:
            spelled = key.replace("-", "_")
            close = [spelled] if spelled in KEYS else difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{shown}: unknown key {key!r}{hint}; known keys: {', '.join(KEYS)}")
        checker, is_path = KEYS[key]
        try:
            checked = checker(key, value)
        except TypeError as exc:
            raise UserError(
                f"{shown}: key {key!r} must be {exc}, not {_toml_type(value)}"
            ) from None
        except ValueError as exc:
            raise UserError(f"{shown}: key {key!r} {exc}") from None
        if is_path:
            resolved = Path(checked).expanduser()
            checked = resolved if resolved.is_absolute() else path.parent / resolved
        values[key] = checked
    return values


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"
