"""Human-readable byte counts for tables and messages (decimal units, as disks and specs use)."""

from __future__ import annotations


def fmt_bytes(n: float | None) -> str:
    """`1.23 MB`-style text for a byte count; '–' for an unknown one."""
    if n is None:
        return "–"
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
