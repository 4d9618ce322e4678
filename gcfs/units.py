"""Sizes for people: one formatter, used wherever gcfs prints a number of bytes (prefetch,
snapshot, `gcfs cache`, `gcfs status`), so that one size reads the same everywhere."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB")


def format_size(n: float) -> str:
    """`n` bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `1.2 GiB`, `3.0 TiB`
    (whole bytes below 1 KiB). A float is accepted for rates (bytes per second)."""
    size = float(n)
    for unit in _UNITS:
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{size:.0f} B"
        size /= 1024
    return f"{size:.1f} TiB"


__all__ = ["format_size"]
