"""`gcfs snapshot --verify` without a mount: a snapshot written with the block store directly
(the files `gcfs snapshot` writes), for what a mount cannot easily make: empty files, an index
that states two sizes, a tree that records no key, a name with a line break in it."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from gcfs.blockindex import KIND_SIZE, record
from gcfs.blockstore import NO_LIMIT, BlockStore
from gcfs.marker import SNAPSHOT
from gcfs.snapshot import FORMAT
from gcfs.snapshotverify import verify_command
from tests.conftest import run_gcfs

MiB = 1 << 20


def make_snapshot(directory: Path, files: dict[str, bytes | None]) -> dict[str, Any]:
    """A snapshot of `files` ({name: bytes}; None: recorded in the tree with no key)."""
    store = BlockStore(directory, NO_LIMIT, kind=SNAPSHOT)
    entries: dict[str, Any] = {}
    for name, data in files.items():
        if data is None:
            entries[name] = {"type": "file", "size": 1, "xattrs": {}}
            continue
        key = f"https://storage.test/{hashlib.sha256(name.encode()).hexdigest()}"
        if data:
            store.write(key, 0, memoryview(data), len(data))
        else:
            store.put_size(key, 0)
        entries[name] = {"type": "file", "size": len(data), "key": key, "xattrs": {}}
    store.sync()
    store.close()
    tree = {
        "format": FORMAT,
        "manifest": {"format": FORMAT},
        "root": {"type": "dir", "entries": {"d": {"type": "dir", "entries": entries}}},
    }
    (directory / "tree.json").write_text(json.dumps(tree))
    return entries


def verified(directory: Path) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = verify_command(directory, out=out)
    return status, out.getvalue().splitlines()


def test_empty_files_other_sizes_keyless_entries_and_odd_names(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot"
    entries = make_snapshot(
        snapshot,
        {"empty": b"", "two-sizes": b"x" * (MiB + 1), "no-key": None, "a\nb": b"y" * 1000},
    )
    status, lines = verified(snapshot)
    # Before the damage: the keyless entry is the one problem; the empty file needs no block.
    assert status == 1
    assert lines[:-1] == ["d/no-key: the tree.json records no store key for it"]
    assert lines[-1].startswith("snapshot damaged: 1 of 4 files"), lines
    digest = hashlib.sha256(entries["two-sizes"]["key"].encode()).hexdigest()
    index = snapshot / "store" / digest[:2] / f"{digest}.index"
    with open(index, "ab") as handle:  # an intact record stating another size
        handle.write(record(KIND_SIZE, MiB, 0, 0, 0, 5, digest))
    status, lines = verified(snapshot)
    assert status == 1
    assert (
        "d/two-sizes: its index states another size too (5 bytes; the tree: 1048577), so an "
        "offline mount cannot open it"
    ) in lines
    assert not any(line.startswith(("d/empty", "d/a")) for line in lines), lines


def test_an_intact_snapshot_of_empty_and_one_block_files(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot"
    make_snapshot(snapshot, {"empty": b"", "small": b"z" * 1000, "two": b"w" * (MiB + 7)})
    status, lines = verified(snapshot)
    assert status == 0
    assert len(lines) == 1 and lines[0].startswith("snapshot intact: 3 files, 3 blocks"), lines


def test_a_damaged_file_with_a_control_character_in_its_name_is_one_line(
    tmp_path: Path,
) -> None:
    snapshot = tmp_path / "snapshot"
    entries = make_snapshot(snapshot, {"a\nb": b"y" * 1000})
    digest = hashlib.sha256(entries["a\nb"]["key"].encode()).hexdigest()
    data = snapshot / "store" / digest[:2] / f"{digest}.data"
    data.write_bytes(b"n" + data.read_bytes()[1:])
    status, lines = verified(snapshot)
    assert status == 1
    assert lines[0] == "d/a\\nb: block 0 damaged"


def nested_dirs(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {"type": "dir", "entries": {}}
    here = root
    for _ in range(depth):
        child: dict[str, Any] = {"type": "dir", "entries": {}}
        here["entries"]["d"] = child
        here = child
    here["entries"]["f"] = {"type": "file", "size": 1, "key": "k", "xattrs": {}}
    return root


@pytest.mark.parametrize(
    "how",
    ["JSON nested 100,000 deep", "directories nested 200 deep", "entries that are not records"],
)
def test_a_hostile_tree_json_is_one_line_for_verify_and_offline_mount(
    tmp_path: Path, how: str
) -> None:
    """A tree.json in a shared snapshot is anybody's: one too deep for Python's recursion
    limit (the decoder's at 100,000 levels; walking it at 200 directories, which decode),
    or with junk where records belong, is refused (or passed over) in one line by both
    commands that read it; never a RecursionError or another traceback."""
    snapshot = tmp_path / "snapshot"
    make_snapshot(snapshot, {"a": b"x" * 10})
    tree = json.loads((snapshot / "tree.json").read_text())
    (snapshot / "manifest.json").write_text(json.dumps(tree["manifest"]))
    if how == "JSON nested 100,000 deep":
        text = json.dumps(tree)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif how == "directories nested 200 deep":
        text = json.dumps({**tree, "root": nested_dirs(200)})
    else:
        tree["root"]["entries"].update(
            {"n": 5, "s": "x", "l": [], "e": {"type": "dir", "entries": 7}}
        )
        text = json.dumps(tree)
    (snapshot / "tree.json").write_text(text)

    checked = run_gcfs("snapshot", "--verify", str(snapshot), timeout=60)
    assert "Traceback" not in checked.stderr and "RecursionError" not in checked.stderr
    mountpoint = tmp_path / "gc"
    mountpoint.mkdir()
    mounting = run_gcfs("mount", str(mountpoint), "--offline", str(snapshot), timeout=60)
    try:
        assert "Traceback" not in mounting.stderr, mounting.stderr
        if how == "entries that are not records":
            # Junk beside the real records is passed over: the one file is verified and served.
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert "snapshot intact: 1 files" in checked.stdout
            assert mounting.returncode == 0, mounting.stderr
            assert sorted(os.listdir(mountpoint)) == [".gcfs", "README.md", "d", "e"]
            assert os.listdir(mountpoint / "e") == []
            assert (mountpoint / "d" / "a").read_bytes() == b"x" * 10
            return
        for refused in (checked, mounting):
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode == 1 and len(lines) == 1, refused.stderr
            assert "tree.json" in lines[0] and ("not JSON" in lines[0] or "deeper" in lines[0])
        assert not os.path.ismount(mountpoint)
    finally:
        if os.path.ismount(mountpoint):
            run_gcfs("umount", str(mountpoint))
