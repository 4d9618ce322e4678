"""Sizes as people read them: one formatter wherever gcfs prints a number of bytes (prefetch,
snapshot, `gcfs cache`, `gcfs status`, the daemon's log), so a size reads the same
everywhere; the JSON forms (`--json`, `.gcfs/status.json`) keep exact bytes for scripts."""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: float) -> str:
    """`512 B`, `1.0 KiB`, `1.2 GiB`: binary units (what `ls -lh`, `du -h` and the cache's
    `10G` mean), one decimal from KiB up, whole bytes below. A float is accepted for rates
    (bytes per second)."""
    if n < 1024:
        return f"{n:.0f} B"
    value = float(n)
    unit = "B"
    for unit in _UNITS:
        value /= 1024
        # Rounded to one decimal, 1023.96 KiB would print as "1024.0 KiB": move on instead.
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


__all__ = ["format_size"]
