"""`gcfs prefetch PATH`: warm the block cache for a subtree (stub, filled in next)."""

from __future__ import annotations

from pathlib import Path


def prefetch_command(path: Path) -> int:
    raise NotImplementedError
