"""Talking to a running daemon: `gcfs refresh` and `gcfs status` (stubs, filled in next)."""

from __future__ import annotations

from pathlib import Path


def refresh_command(path: Path, *, recursive: bool) -> int:
    """`gcfs refresh PATH [--recursive]`: forget what the daemon cached under PATH."""
    raise NotImplementedError


def status_command(mountpoint: Path, *, as_json: bool) -> int:
    """`gcfs status MOUNTPOINT [--json]`: print the daemon's status."""
    raise NotImplementedError
