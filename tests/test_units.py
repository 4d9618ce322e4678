"""Pure parts without a mount: name rules, token and URL handling, the metadata cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from gcfs import render
from gcfs.cache import MetadataCache
from gcfs.config import Secret, find_token, normalize_base_url, parse_token, read_token_file
from gcfs.daemon import mount_device
from gcfs.errors import UserError
from gcfs.names import could_be_identifier, is_uuid, slug_from_url
from gcfs.nodes import InodeTable, Node, inode_for


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lidc-lung-ct", True),
        ("corads_ai", True),
        ("519c79bf-183a-47df-bd09-da9947e15ff9", True),
        (".git", False),
        ("desktop.ini", False),
        ("Foo", False),
        ("has space", False),
        ("-leading-hyphen", False),
        ("519C79BF-183A-47DF-BD09-DA9947E15FF9", False),
        ("", False),
    ],
)
def test_could_be_identifier(name: str, expected: bool) -> None:
    """Only slug- or UUID-shaped names can ever need a request."""
    assert could_be_identifier(name) is expected


def test_slug_from_url() -> None:
    """Archives carry no slug field; it comes from the website URL."""
    assert slug_from_url("http://127.0.0.1:18000/archives/archive-b/", "archives") == "archive-b"
    assert slug_from_url("http://h/algorithms/x/", "archives") is None
    assert slug_from_url("http://h/archives/", "archives") is None


def test_is_uuid() -> None:
    assert is_uuid("519c79bf-183a-47df-bd09-da9947e15ff9")
    assert not is_uuid("519c79bf183a47dfbd09da9947e15ff9")


@pytest.mark.parametrize(
    ("text", "token"),
    [("abc123\n", "abc123"), ("Bearer abc123", "abc123"), ("  BEARER   abc123 \n", "abc123")],
)
def test_parse_token(text: str, token: str) -> None:
    """A bare token or `<keyword> <token>`, whitespace ignored (as gcapi accepts)."""
    assert parse_token(text, "t").reveal() == token


def test_parse_token_rejects_three_words() -> None:
    with pytest.raises(UserError, match="does not hold a token"):
        parse_token("a b c", "t")


def test_secret_never_shows_itself() -> None:
    secret = Secret("s3cr3t-value")
    assert "s3cr3t" not in repr(secret)
    assert "s3cr3t" not in str(secret)
    assert "s3cr3t" not in f"{secret}"


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A token file others can read is refused with the command that fixes it."""
    path = tmp_path / "token"
    path.write_text("abc")
    path.chmod(0o644)
    with pytest.raises(UserError, match=f"chmod 600 {path}"):
        read_token_file(path)
    path.chmod(0o600)
    assert read_token_file(path).reveal() == "abc"


def test_token_from_environment() -> None:
    assert find_token(None, {"GRAND_CHALLENGE_AUTHORIZATION": "Bearer xyz"}).reveal() == "xyz"
    with pytest.raises(UserError, match="no API token"):
        find_token(None, {})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://grand-challenge.org", "https://grand-challenge.org"),
        ("https://grand-challenge.org/", "https://grand-challenge.org"),
        ("https://grand-challenge.org/api/v1/", "https://grand-challenge.org"),
        ("http://127.0.0.1:8000/api/v1", "http://127.0.0.1:8000"),
    ],
)
def test_normalize_base_url(url: str, expected: str) -> None:
    assert normalize_base_url(url) == expected


def test_plain_http_refused_off_loopback() -> None:
    """The token would travel in clear text."""
    with pytest.raises(UserError, match="https"):
        normalize_base_url("http://grand-challenge.org")


def test_metadata_json_format() -> None:
    """Pretty-printed with 2 spaces, UTF-8 (not escaped), key order kept, trailing newline."""
    obj = {"z": 1, "a": "Zürich", "n": None}
    data = render.metadata_json(obj)
    assert data.endswith(b"}\n")
    assert "Zürich".encode() in data
    assert list(json.loads(data)) == ["z", "a", "n"]
    assert data == (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def test_inodes_are_stable_and_distinct() -> None:
    assert inode_for("archive:x") == inode_for("archive:x")
    assert inode_for("archive:x") != inode_for("archive:y")
    table = InodeTable()
    first = table.add(Node("archive:x", "x"))
    assert table.get(first.inode) is None  # numbered, but the kernel has not seen it yet
    table.remember(first)
    again = table.add(Node("archive:x", "x"))  # a rebuilt listing: the newest node wins
    assert first.inode == again.inode > 1
    assert table.get(first.inode) is again


def test_inode_table_follows_the_kernels_lookup_counts() -> None:
    """A node stays while the kernel holds references, and leaves when it forgot them all."""
    table = InodeTable()
    node = table.add(Node("item:1", "1"))
    table.remember(node)  # lookup
    table.remember(node)  # a READDIRPLUS entry
    assert not table.forget(node.inode, 1)
    assert table.get(node.inode) is node
    assert table.forget(node.inode, 1)
    assert table.get(node.inode) is None and len(table) == 0
    assert not table.forget(node.inode, 1)  # unknown inodes are ignored
    table.remember(table.add(Node("item:1", "1")))
    assert table.get(node.inode) is not None  # the same number again


async def test_cache_single_flight(autojump_clock: trio.testing.MockClock) -> None:
    """Concurrent askers share one fetch; the value is kept for the TTL, then fetched again."""
    cache = MetadataCache(ttl=60, timer=trio.current_time)
    calls = 0

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        return f"value{calls}"

    results: list[str] = []

    async def ask() -> None:
        results.append(await cache.get("k", fetch))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)
    assert results == ["value1"] * 10
    assert calls == 1
    assert await cache.get("k", fetch) == "value1"
    await trio.sleep(61)
    assert await cache.get("k", fetch) == "value2"
    assert cache.statistics().shared == 9


async def test_cache_shares_failures_but_does_not_keep_them() -> None:
    """Followers get the leader's error; the next asker tries again."""
    cache = MetadataCache(ttl=60)
    attempts = 0

    async def failing() -> str:
        nonlocal attempts
        attempts += 1
        await trio.lowlevel.checkpoint()
        raise UserError("boom")

    async def ask() -> None:
        with pytest.raises(UserError):
            await cache.get("k", failing)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
    assert attempts == 1

    async def working() -> str:
        return "ok"

    assert await cache.get("k", working) == "ok"


def test_mount_device_from_mountinfo() -> None:
    """The device of the newest mount on a path, with mountinfo's octal escapes undone."""
    text = (
        "36 35 0:52 / /home/me/gc ro,nosuid - fuse.gcfs gcfs ro\n"
        "40 35 0:60 / /home/me/my\\040gc rw - fuse.gcfs gcfs rw\n"
        "41 35 0:61 / /home/me/gc rw - fuse.gcfs gcfs rw\n"
    )
    assert mount_device(text, "/home/me/gc") == "0:61"
    assert mount_device(text, "/home/me/my gc") == "0:60"
    assert mount_device(text, "/home/me") is None
