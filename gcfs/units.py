"""Sizes as people read them: `gcfs status` and the daemon's log say `1.2 GiB`, while the JSON
forms (`--json`, `.gcfs/status.json`) keep exact bytes for scripts."""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: int) -> str:
    """`512 B`, `1.0 KiB`, `1.2 GiB`: binary units (what `ls -lh`, `du -h` and the cache's
    `10G` mean), one decimal from KiB up, so a size reads the same in every line."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    unit = "B"
    for unit in _UNITS:
        value /= 1024
        # Rounded to one decimal, 1023.96 KiB would print as "1024.0 KiB": move on instead.
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"
