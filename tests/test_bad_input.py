"""Issue 14, bad input: no option's value is ever repeated (#2), and every command answers a
bad path with one line and a non-zero status, never a traceback (#17, #18, #19)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gcfs import cli
from tests.conftest import Mount, run_gcfs

SENTINEL = "S3nt1nel-q7Zx"
WORKTREE = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(WORKTREE)}  # this gcfs, whatever the cwd
    return run_gcfs(*args, cwd=cwd, env=env, timeout=60)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def all_parsers(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*words, name))


def files_holding(root: Path, text: str) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if text.encode() in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def test_every_parser_refuses_abbreviations() -> None:
    parsers = list(all_parsers(cli.build_parser()))
    assert len(parsers) > 10
    assert [words for words, p in parsers if p.allow_abbrev] == []


def option_forms(parser: argparse.ArgumentParser) -> Iterator[list[str]]:
    """The sentinel after every option of `parser` and every abbreviation of it, as a
    separate word, after `=`, and glued to a short option."""
    for action in parser._actions:
        for name in action.option_strings:
            if name.startswith("--"):
                for end in range(3, len(name) + 1):
                    yield [name[:end], SENTINEL]
                    yield [f"{name[:end]}={SENTINEL}"]
            else:
                yield [name, SENTINEL]
                yield [f"{name}{SENTINEL}"]
    yield ["--token", SENTINEL]


def positionals(words: tuple[str, ...], tmp: Path, mountpoint: Path, token: Path) -> list[str]:
    """Valid arguments for the command `words`, so that the option under test is what fails."""
    command = words[0] if words else ""
    if command in ("mount", "demo"):
        extra = ["--token-file", str(token)] if command == "mount" else []
        return [str(mountpoint), *extra]
    if command in ("umount", "status"):
        return [str(mountpoint)]
    if command in ("refresh", "prefetch"):
        return [str(tmp)]
    if command == "path":
        return ["lidc"]
    if command == "snapshot":
        return [str(tmp), "--to", str(tmp / "to")]
    if words == ("cache", "prune"):
        return ["1G"]
    return []


def test_no_option_value_is_ever_repeated(
    tmp_path: Path,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """#2: the sentinel, given to every option and every abbreviation of every command
    (generated from the parser), is in no output and no file written (in-process; mounts
    are dry runs: everything is checked, nothing mounted)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    runs = 0
    for words, parser in all_parsers(cli.build_parser()):
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions) and words:
            continue  # `gcfs cache` alone: its actions are covered below
        for form in option_forms(parser):
            argv = [*words, *positionals(words, tmp_path, mountpoint, token_file), *form]
            cli.main(argv, dry_run=True)
            out, err = capfd.readouterr()
            assert SENTINEL not in out + err, (argv, out, err)
            runs += 1
    assert runs > 300
    assert files_holding(tmp_path, SENTINEL) == []


MOUNT_VALUE_OPTIONS = [
    "--token-file",
    "--base-url",
    "--offline",
    "--cache-dir",
    "--cache-size",
    "--log-file",
    "--log-level",
    "--config",
    "--ttl",
    "--timeout",
]


@pytest.mark.parametrize("option", MOUNT_VALUE_OPTIONS)
def test_no_option_value_in_a_real_mount_attempt(
    tmp_path: Path, token_file: Path, option: str
) -> None:
    """#2, through the real background path (fork, daemon, log file): the sentinel given to
    each option of `gcfs mount` is in neither output nor any log (the server is a closed
    port, so every attempt fails)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    base = ["--base-url", f"http://127.0.0.1:{closed_port()}", "--timeout", "0.5"]
    base += ["--token-file", str(token_file)]
    result = run("mount", str(mountpoint), *base, option, SENTINEL, cwd=tmp_path)
    assert result.returncode in (1, 2), result
    assert SENTINEL not in result.stdout + result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert files_holding(tmp_path, SENTINEL) == []
    assert not os.path.ismount(mountpoint)


def test_the_token_after_a_wrong_flag_is_not_shown(tmp_path: Path) -> None:
    """The issue's example: `gcfs mount ~/gc --token SECRET`."""
    (tmp_path / "gc").mkdir()
    result = run("mount", str(tmp_path / "gc"), "--token", SENTINEL, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gcfs: unrecognized arguments: --token (and 1 more word) (see gcfs --help)"
    ]


# -- every command against bad paths ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    argv: list[str]
    status: int = 1


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A read-only filesystem (as root, a 0500 directory is writable) holding a file and a
    directory."""
    path = tmp_path / "ro"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        (path / "file").write_text("x")
        (path / "dir").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def bad_paths(tmp: Path, ro: Path, *, directory: bool) -> dict[str, str]:
    """Paths that are wrong for an argument wanting a directory (or a file)."""
    a_file, a_dir = tmp / "a-file", tmp / "a-dir"
    return {
        "missing": str(tmp / "missing" / "x"),
        "read-only": str(ro / "new") if directory else str(ro / "file"),
        "proc": "/proc/gcfs-bad-input",
        "dev-null": "/dev/null",
        "wrong-kind": str(a_file) if directory else str(a_dir),
    }


def test_every_command_answers_bad_paths_with_one_line(
    tmp_path: Path,
    read_only: Path,
    token_file: Path,
    mount_gcfs: Callable[..., Mount],
) -> None:
    """#17, #18, #19: every command, each path-taking argument given a missing, read-only,
    special (/proc, /dev/null) and wrong-kind path: exit 1 (or the documented status), one
    line on stderr, no traceback. Mounts fail fast against a closed port (--timeout 0.5)."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    online = mount_gcfs("--cache-dir", str(tmp_path / "cache"))
    inside = str(online.path / "archives" / "lidc-lung-ct")
    empty = tmp_path / "empty-mnt"
    empty.mkdir()
    server = ["--base-url", f"http://127.0.0.1:{closed_port()}", "--timeout", "0.5"]
    token = ["--token-file", str(token_file)]
    rows: list[Row] = []
    for kind, path in bad_paths(tmp_path, read_only, directory=True).items():
        rows += [
            Row(["mount", path, *server, *token]),
            Row(["demo", path]),
            Row(["mount", str(empty), *server, *token, "--cache-dir", path]),
            Row(["mount", str(empty), "--offline", path]),
            Row(["umount", path]),
            Row(["umount", "--lazy", path]),
            Row(["status", path]),
            Row(["refresh", path]),
            Row(["prefetch", path]),
            Row(["path", "lidc-lung-ct", path]),
            Row(["snapshot", path, "--to", str(tmp_path / "shot")]),
            Row(["snapshot", inside, "--to", path]),
            *(Row(["cache", *a, "--cache-dir", path]) for a in (["status"], ["verify"])),
            *(Row(["cache", *a, "--cache-dir", path]) for a in (["clear"], ["prune", "1G"])),
        ]
        if kind == "missing":  # inside the mount, a name it does not show (#18, #19)
            rows += [
                Row(["refresh", f"{online.path}/algorithms/typo"]),
                Row(["prefetch", f"{online.path}/algorithms/typo"]),
                Row(["snapshot", f"{online.path}/algorithms/typo", "--to", str(tmp_path / "s")]),
            ]
    for kind, path in bad_paths(tmp_path, read_only, directory=False).items():
        config_ok = kind == "dev-null"  # an empty config file: documented, fine
        rows += [
            Row(["mount", str(empty), *server, "--token-file", path]),
            Row(["mount", str(empty), *server, *token, "--log-file", path]),
            Row(["mount", str(empty), *server, *token, "--config", path]),
            Row(["demo", str(empty), "--config", path, "--log-file", str(read_only / "x")]),
            Row(["cache", "status", "--config", path], status=0 if config_ok else 1),
            Row(["cache", "clear", "--config", path], status=0 if config_ok else 1),
        ]
    failures = []
    for row in rows:
        result = run(*row.argv, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        wanted_lines = 0 if row.status == 0 else 1
        ok = (
            result.returncode == row.status
            and len(lines) == wanted_lines
            and "Traceback" not in result.stdout + result.stderr
            and all(line.startswith("gcfs") for line in lines)
        )
        if not ok:
            failures.append(f"{row.argv}: {result.returncode} {result.stderr!r}")
        assert not os.path.ismount(empty), row.argv
    assert failures == [], "\n".join(failures)
    assert len(rows) > 100
    assert os.path.ismount(online.path)
