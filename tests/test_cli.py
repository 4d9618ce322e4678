"""The `gcfs` command as a user runs it: background mount, umount, demo, and clear failures."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

import gcfs
from gcfs import cli, mount_helper, runtime
from gcfs.errors import UserError
from gcfs.fakegc import DEMO_TOKEN, FakeGC, demo_world
from tests.conftest import poll, run_gcfs


@pytest.fixture
def mountpoint(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "gc"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gcfs: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_background_mount_then_umount(fake: FakeGC, token_file: Path, mountpoint: Path) -> None:
    """`gcfs mount` returns once the mount answers; `gcfs umount` unmounts and stops it."""
    result = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(token_file)
    )
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mountpoint)
    assert "archives" in os.listdir(mountpoint)
    pid = runtime.read_pid(mountpoint)
    assert pid is not None and runtime.is_alive(pid)
    # The token is not among the daemon's arguments.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert DEMO_TOKEN.encode() not in cmdline
    result = run_gcfs("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)
    assert not runtime.is_alive(pid)


def test_token_from_environment(fake: FakeGC, mountpoint: Path) -> None:
    """Without --token-file, GRAND_CHALLENGE_AUTHORIZATION is used, as gcapi does."""
    env = {**os.environ, "GRAND_CHALLENGE_AUTHORIZATION": f"Bearer {DEMO_TOKEN}"}
    result = run_gcfs("mount", str(mountpoint), "--base-url", fake.base_url, env=env)
    assert result.returncode == 0, result.stderr
    assert "Signed in as: demo" in (mountpoint / "README.md").read_text()
    assert run_gcfs("umount", str(mountpoint)).returncode == 0


def test_bad_token_fails_clearly(fake: FakeGC, tmp_path: Path, mountpoint: Path) -> None:
    """A rejected token ends the command with one line, and nothing stays mounted."""
    bad = tmp_path / "bad-token"
    bad.write_text("0" * 64)
    bad.chmod(0o600)
    result = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(bad)
    )
    assert_one_clear_line(result, "rejected the API token", "settings/api-tokens")
    assert "0" * 64 not in result.stderr
    assert not os.path.ismount(mountpoint)


def test_bad_token_fails_clearly_in_foreground(
    fake: FakeGC, tmp_path: Path, mountpoint: Path
) -> None:
    bad = tmp_path / "bad-token"
    bad.write_text("Bearer " + "1" * 64)
    bad.chmod(0o600)
    result = run_gcfs(
        "mount",
        str(mountpoint),
        "--foreground",
        "--base-url",
        fake.base_url,
        "--token-file",
        str(bad),
    )
    assert_one_clear_line(result, "rejected the API token")
    assert not os.path.ismount(mountpoint)


def test_unreachable_server_fails_clearly(token_file: Path, mountpoint: Path) -> None:
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_gcfs(
        "mount",
        str(mountpoint),
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--token-file",
        str(token_file),
    )
    assert_one_clear_line(result, "cannot reach")
    assert not os.path.ismount(mountpoint)


def test_bad_mountpoint_fails_clearly(fake: FakeGC, token_file: Path, tmp_path: Path) -> None:
    """A missing mount point gets the mkdir that creates it; a file gets no such advice
    (issue 14, #18: "create it with: mkdir -p FILE" would fail)."""
    missing = tmp_path / "missing"
    result = run_gcfs(
        "mount", str(missing), "--base-url", fake.base_url, "--token-file", str(token_file)
    )
    assert_one_clear_line(result, "does not exist", f"mkdir -p {missing}")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = run_gcfs(
        "mount", str(a_file), "--base-url", fake.base_url, "--token-file", str(token_file)
    )
    assert_one_clear_line(result, "is not a directory")
    assert "mkdir" not in result.stderr


def test_readable_token_file_is_refused(fake: FakeGC, token_file: Path, mountpoint: Path) -> None:
    """The advice names the option, not the path typed after it (#2: it may be the token)."""
    token_file.chmod(0o644)
    result = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(token_file)
    )
    assert_one_clear_line(result, "the token file given with --token-file", "chmod 600")
    assert str(token_file) not in result.stderr
    assert not os.path.ismount(mountpoint)


@pytest.mark.parametrize("kind", ["directory", "/dev/null"])
def test_a_token_file_that_is_no_file_is_not_told_to_chmod(
    fake: FakeGC, tmp_path: Path, mountpoint: Path, kind: str
) -> None:
    """#18: a directory or /dev/null given as the token file is "not a regular file", not
    "readable by other users; fix it with: chmod 600"."""
    if kind == "directory":
        given = tmp_path / "tokens"
        given.mkdir(mode=0o755)
    else:
        given = Path(kind)
    result = run_gcfs(
        "mount", str(mountpoint), "--base-url", fake.base_url, "--token-file", str(given)
    )
    assert_one_clear_line(result, "not a regular file")
    assert "chmod" not in result.stderr


def test_plain_http_elsewhere_is_refused(token_file: Path, mountpoint: Path) -> None:
    result = run_gcfs(
        "mount",
        str(mountpoint),
        "--base-url",
        "http://grand-challenge.org",
        "--token-file",
        str(token_file),
    )
    assert_one_clear_line(result, "https")


def test_umount_of_something_not_mounted(mountpoint: Path) -> None:
    assert_one_clear_line(run_gcfs("umount", str(mountpoint)), "not mounted")


def test_demo_then_umount(mountpoint: Path) -> None:
    """The newcomer's first command: the demo server and the mount, stopped by umount."""
    result = run_gcfs("demo", str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        archives = os.listdir(mountpoint / "archives")
        assert archives
        obj = json.loads((mountpoint / "archives" / archives[0] / "archive.json").read_text())
        assert obj["url"].endswith(f"/archives/{archives[0]}/")
        hidden = next(a for a in demo_world().algorithms.values() if not a.visible_to("demo"))
        stub = mountpoint / "algorithms" / hidden.slug
        assert os.listdir(stub) == ["README.md"]
        assert "permission-requests/create/" in (stub / "README.md").read_text()
        assert os.listdir(mountpoint / "reader-studies")
        pid = runtime.read_pid(mountpoint)
        assert pid is not None
    finally:
        result = run_gcfs("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)
    poll(lambda: not runtime.is_alive(pid), 10, "the demo daemon to exit")


# -- help, version and the commands that talk to a daemon ---------------------------------


def test_help_reads_like_a_man_page() -> None:
    result = run_gcfs("--help")
    assert result.returncode == 0
    for needle in ("examples:", "GRAND_CHALLENGE_AUTHORIZATION", "exit status:", "fstab:"):
        assert needle in result.stdout, needle
    for command in ("mount", "demo", "umount", "refresh", "status", "mounts", "prefetch"):
        sub = run_gcfs(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "exit status:" in sub.stdout and "example" in sub.stdout, command
    mount_help = run_gcfs("mount", "--help").stdout
    for flag in ("--token-file", "--allow-other", "--config", "user_allow_other", "config.toml"):
        assert flag in mount_help, flag


def test_version() -> None:
    result = run_gcfs("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"gcfs {gcfs.__version__}")


@pytest.mark.parametrize(
    ("argv", "module", "function", "expected"),
    [
        (
            ["refresh", "/x/y"],
            "control",
            "refresh_command",
            ((Path("/x/y"),), {"recursive": False}),
        ),
        (
            ["refresh", "-r", "/x"],
            "control",
            "refresh_command",
            ((Path("/x"),), {"recursive": True}),
        ),
        (["status", "/m"], "control", "status_command", ((Path("/m"),), {"as_json": False})),
        (
            ["status", "/m", "--json"],
            "control",
            "status_command",
            ((Path("/m"),), {"as_json": True}),
        ),
        (["mounts"], "mounts", "mounts_command", ((), {"as_json": False})),
        (["mounts", "--json"], "mounts", "mounts_command", ((), {"as_json": True})),
        (["prefetch", "/m/a"], "prefetch", "prefetch_command", ((Path("/m/a"),), {"parallel": 8})),
        (
            ["prefetch", "/m/a", "--jobs", "16"],
            "prefetch",
            "prefetch_command",
            ((Path("/m/a"),), {"parallel": 16}),
        ),
        (
            ["snapshot", "/m/a", "/m/b", "--to", "/s"],
            "snapshot",
            "snapshot_command",
            (([Path("/m/a"), Path("/m/b")], Path("/s")), {"jobs": 8}),
        ),
        (
            ["snapshot", "--verify", "/s", "--jobs", "2"],
            "snapshotverify",
            "verify_command",
            ((Path("/s"),), {"jobs": 2}),
        ),
    ],
)
def test_daemon_commands_call_their_module(
    monkeypatch: pytest.MonkeyPatch, argv, module, function, expected
) -> None:
    calls = []

    def fake(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((args, kwargs))
        return 3

    monkeypatch.setattr(f"gcfs.{module}.{function}", fake)
    assert cli.main(argv) == 3  # their exit status is the command's
    assert calls == [expected]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["snapshot", "/m/a"], "--to DIR"),
        (["snapshot", "--to", "/s"], "--to DIR"),
        (["snapshot", "--verify", "/s", "/m/a"], "takes no PATH"),
        (["snapshot", "--verify", "/s", "--to", "/t"], "takes no PATH and no --to"),
    ],
)
def test_snapshot_records_or_verifies(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """PATH... --to DIR, or --verify DIR alone: anything else is wrong usage (2)."""
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


# -- -o mount options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "flags"),
    [
        ("token_file=/t", ["--token-file", "/t"]),
        ("base_url=https://gc.example", ["--base-url", "https://gc.example"]),
        ("ttl=5", ["--ttl", "5"]),
        ("ttl=0.5", ["--ttl", "0.5"]),
        ("timeout=30", ["--timeout", "30"]),
        ("cache_dir=/c", ["--cache-dir", "/c"]),
        ("cache_size=20G", ["--cache-size", "20G"]),
        ("cache_size=0", ["--cache-size", "0"]),
        ("log_level=debug", ["--log-level", "debug"]),
        ("log_file=/l", ["--log-file", "/l"]),
        ("config=/etc/gcfs.toml", ["--config", "/etc/gcfs.toml"]),
        ("offline=/shared/snapshot", ["--offline", "/shared/snapshot"]),
        ("foreground", ["--foreground"]),
        ("allow_other", ["--allow-other"]),
    ],
)
def test_every_mount_flag_has_an_o_option(option: str, flags: list[str]) -> None:
    assert mount_helper.options_to_flags(option) == flags
    # ... and the flags it gives are ones `gcfs mount` accepts.
    args = cli.build_parser().parse_args(["mount", "/mnt", *flags])
    assert args.command == "mount"


def test_every_mount_flag_is_covered_by_o_options() -> None:
    parser = cli.build_parser()
    mount = parser._subparsers._group_actions[0].choices["mount"]  # type: ignore[union-attr]
    flags = {
        action.option_strings[0]
        for action in mount._actions
        if action.option_strings and action.option_strings[0] != "-h"
    }
    covered = set(mount_helper.VALUE_OPTIONS.values()) | set(mount_helper.FLAG_OPTIONS.values())
    assert flags == covered


def test_generic_mount_options_are_ignored() -> None:
    generic = (
        "defaults,noauto,auto,user,users,nouser,_netdev,nofail,rw,ro,exec,noexec,suid,nosuid,"
        "dev,nodev,x-systemd.automount,x-systemd.idle-timeout=60,x-gvfs-show,"
        "comment=systemd.automount,user=me"
    )
    assert mount_helper.options_to_flags(generic) == []
    assert mount_helper.options_to_flags(f"{generic},ttl=5") == ["--ttl", "5"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("tll=5", "unknown mount option 'tll=5'"),
        ("bogus", "unknown mount option 'bogus'"),
        ("token=abc", "unknown mount option 'token=abc'"),
        ("ttl", "mount option ttl needs a value"),
        ("ttl=", "mount option ttl needs a value"),
        ("ttl=soon", "mount option ttl=soon: 'soon' is not a number"),
        ("timeout=-1", "mount option timeout=-1: '-1' must be greater than 0"),
        ("cache_size=lots", "mount option cache_size=lots"),
        ("log_level=loud", "mount option log_level=loud"),
        ("foreground=yes", "mount option foreground takes no value"),
        ("allow_other=1", "mount option allow_other takes no value"),
    ],
)
def test_bad_o_options_are_errors_naming_them(option: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        mount_helper.options_to_flags(f"noauto,{option},user")


def test_sloppy_skips_unknown_options() -> None:
    assert mount_helper.options_to_flags("bogus,ttl=5", sloppy=True) == ["--ttl", "5"]


def test_fuse_form_is_told_apart_from_subcommands() -> None:
    split = mount_helper.split_fuse_form
    assert split(["gcfs", "/m", "-o", "ttl=5,dev,suid"]) == ("gcfs", "/m", ["ttl=5,dev,suid"])
    assert split(["/m", "-o", "ttl=5"]) == (None, "/m", ["ttl=5"])  # empty source
    assert split(["https://gc.example", "/m"]) == ("https://gc.example", "/m", [])
    assert split(["gcfs", "/m"]) == ("gcfs", "/m", [])  # nodev,nosuid: mount.fuse3 adds no -o
    assert split(["mount", "/m", "-o", "x"]) is None  # a subcommand
    assert split(["mout", "/m"]) is None  # a typo stays a usage error
    assert split(["--help"]) is None
    assert mount_helper.mount_argv("https://gc.example/", "/m", ["ttl=5"]) == [
        "mount",
        "/m",
        "--ttl",
        "5",
        "--base-url",
        "https://gc.example/",
    ]
    with pytest.raises(UserError, match="disagree"):
        mount_helper.mount_argv("https://a.example", "/m", ["base_url=https://b.example"])


# -- the config file ----------------------------------------------------------------------


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "xdg-config"
    (home / "gcfs").mkdir(parents=True)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv("GRAND_CHALLENGE_AUTHORIZATION", raising=False)
    return home


def plan(*argv: str) -> cli.MountPlan:
    args = cli.build_parser().parse_args(list(argv))
    return cli.resolve_config(args, os.environ)


def test_config_file_precedence(config_home: Path, token_file: Path, mountpoint: Path) -> None:
    """Built-in defaults < the config file < flags."""
    base = ["mount", str(mountpoint), "--token-file", str(token_file)]
    cfg = plan(*base).cfg
    assert (cfg.ttl, cfg.op_timeout, cfg.allow_other, cfg.log_level) == (60, 60, False, "INFO")
    assert cfg.base_url == "https://grand-challenge.org"
    (config_home / "gcfs" / "config.toml").write_text(
        'ttl = 5\ntimeout = 30\ncache_size = "1G"\nallow_other = true\nlog_level = "debug"\n'
        'base_url = "https://gc.example"\ncache_dir = "cache"\nlog_file = "~/gcfs.log"\n'
    )
    cfg = plan(*base).cfg
    assert (cfg.ttl, cfg.op_timeout, cfg.cache_size, cfg.allow_other) == (5, 30, 2**30, True)
    assert (cfg.log_level, cfg.base_url) == ("DEBUG", "https://gc.example")
    assert cfg.cache_dir == config_home / "gcfs" / "cache"  # relative to the file
    assert plan(*base).log_file == Path("~/gcfs.log").expanduser()
    flags = ["--ttl", "7", "--cache-size", "2G", "--no-allow-other", "--base-url", "https://x.org"]
    cfg = plan(*base, *flags).cfg
    assert (cfg.ttl, cfg.op_timeout, cfg.cache_size, cfg.allow_other) == (7, 30, 2 * 2**30, False)
    assert cfg.base_url == "https://x.org"


def test_config_file_token_file_and_environment(
    config_home: Path, token_file: Path, mountpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--token-file, then $GRAND_CHALLENGE_AUTHORIZATION, then token_file from the file."""
    (config_home / "gcfs" / "config.toml").write_text(f'token_file = "{token_file}"\n')
    assert plan("mount", str(mountpoint)).cfg.token_file == token_file
    monkeypatch.setenv("GRAND_CHALLENGE_AUTHORIZATION", "Bearer from-env")
    cfg = plan("mount", str(mountpoint)).cfg
    assert cfg.token_file is None and cfg.token is not None
    assert cfg.token.reveal() == "from-env"


def test_explicit_config_path(
    tmp_path: Path, config_home: Path, mountpoint: Path, token_file: Path
) -> None:
    other = tmp_path / "other.toml"
    other.write_text("ttl = 9\n")
    (config_home / "gcfs" / "config.toml").write_text("ttl = 5\n")
    base = ["mount", str(mountpoint), "--token-file", str(token_file)]
    assert plan(*base, "--config", str(other)).cfg.ttl == 9
    with pytest.raises(UserError, match=r"the config file given with --config does not exist"):
        plan(*base, "--config", str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("tll = 5\n", ["unknown key 'tll'", "did you mean 'ttl'"]),
        ("cache-size = '1G'\n", ["unknown key 'cache-size'", "did you mean 'cache_size'"]),
        ("[mount]\nttl = 5\n", ["unknown key 'mount'"]),
        ("ttl = '5'\n", ["key 'ttl' must be a number of seconds", "not a string"]),
        ("ttl = true\n", ["key 'ttl' must be a number", "not a boolean"]),
        ("ttl = 0\n", ["key 'ttl' must be greater than 0"]),
        ("allow_other = 'yes'\n", ["key 'allow_other' must be true or false"]),
        ("cache_size = 1.5\n", ["key 'cache_size' must be a size"]),
        ("log_level = 'loud'\n", ["key 'log_level' must be one of"]),
        ("token_file = 5\n", ["key 'token_file' must be a string"]),
        ("token = 'abc'\n", ["key 'token' is not allowed", "token_file"]),
        ("foreground = true\n", ["key 'foreground' is not allowed"]),
        ("ttl = \n", ["is not valid TOML"]),
    ],
)
def test_config_file_errors_name_the_key_and_file(
    config_home: Path, mountpoint: Path, token_file: Path, text: str, needles: list[str]
) -> None:
    path = config_home / "gcfs" / "config.toml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        plan("mount", str(mountpoint), "--token-file", str(token_file))
    message = str(caught.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    assert "abc" not in message or "token" not in text


def test_config_file_error_is_one_clear_line(
    tmp_path: Path, mountpoint: Path, token_file: Path
) -> None:
    config = tmp_path / "gcfs.toml"
    config.write_text("ttl = 5\nttll = 6\n")
    result = run_gcfs(
        "mount", str(mountpoint), "--token-file", str(token_file), "--config", str(config)
    )
    assert_one_clear_line(result, "unknown key 'ttll'", "the config file given with --config")
    assert str(config) not in result.stderr  # an option's value is never repeated (#2)
    assert not os.path.ismount(mountpoint)


def test_mount_from_the_config_file_alone(
    fake: FakeGC, token_file: Path, tmp_path: Path, mountpoint: Path
) -> None:
    """A real mount whose server, token file and TTL all come from the config file."""
    config_home = tmp_path / "xdg"
    (config_home / "gcfs").mkdir(parents=True)
    (config_home / "gcfs" / "config.toml").write_text(
        f'base_url = "{fake.base_url}"\ntoken_file = "{token_file}"\nttl = 300\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "GRAND_CHALLENGE_AUTHORIZATION"}
    env["XDG_CONFIG_HOME"] = str(config_home)
    result = run_gcfs("mount", str(mountpoint), env=env)
    assert result.returncode == 0, result.stderr
    assert "Signed in as: demo" in (mountpoint / "README.md").read_text()
    assert run_gcfs("umount", str(mountpoint), env=env).returncode == 0


README = Path(__file__).parents[1] / "README.md"


def _options_table() -> list[tuple[str, str]]:
    """(flag column, -o column) of each row of the README's table of `gcfs mount` options."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`--"):
            rows.append((cells[0], cells[1]))
    return rows


def test_the_readme_options_table_agrees_with_the_flags_o_options_and_config_keys() -> None:
    """Every `gcfs mount` flag is a row of the README's table, with its `-o` spelling; every
    `-o` option is a config-file key except foreground and config (refused there, with a
    reason); and the README's list of config keys names them all."""
    from gcfs import configfile

    rows = _options_table()
    flags = {re.findall(r"`(--[a-z-]+)", flag)[0] for flag, _ in rows}
    spelled = {re.findall(r"`([a-z_]+)", o)[0]: re.findall(r"`(--[a-z-]+)", f)[0] for f, o in rows}
    parser = cli.build_parser()
    mount = parser._subparsers._group_actions[0].choices["mount"]  # type: ignore[union-attr]
    parser_flags = {
        action.option_strings[0]
        for action in mount._actions
        if action.option_strings and action.option_strings[0] != "-h"
    }
    assert flags == parser_flags
    options = {**mount_helper.VALUE_OPTIONS, **mount_helper.FLAG_OPTIONS}
    assert spelled == options
    assert set(configfile.KEYS) == set(options) - {"foreground", "config"}
    assert {"foreground", "config"} <= set(configfile.REFUSED)
    listed = README.read_text(encoding="utf-8").split("keys: ", 1)[1].split(". Flags win", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == set(configfile.KEYS)


def test_offline_is_a_config_file_key(tmp_path: Path) -> None:
    from gcfs import configfile

    path = tmp_path / "config.toml"
    path.write_text('offline = "snapshots/lidc"\n')
    assert configfile.load(path, explicit=True).get("offline") == tmp_path / "snapshots/lidc"
