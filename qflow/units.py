"""Human-readable quantities for messages and tables.

    format_bytes(3 * 2**30)   # "3.0 GB"
    format_bytes(None)        # "?"
"""

from __future__ import annotations


def format_bytes(n: int | None) -> str:
    """``n`` bytes in MB below 1 GiB, else in GB (binary units); "?" when unknown."""
    if n is None:
        return "?"
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
