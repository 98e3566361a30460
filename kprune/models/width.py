"""Width multipliers: filter counts scaled and rounded the way every kprune builder does it."""

from __future__ import annotations


def round_filters(filters: int, width: float, multiple: int = 8) -> int:
    """Scale a filter count by ``width`` and round it to the nearest multiple (at least one multiple)."""
    return max(multiple, int(filters * width / multiple + 0.5) * multiple)
