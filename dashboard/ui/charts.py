"""Server-rendered SVG line charts: no chart library, no JavaScript."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LineChart:
    points: str
    peak: int
    width: int
    height: int
    empty: bool


def line_chart(values: list[int | float], *, width: int = 480, height: int = 80) -> LineChart:
    """Polyline points scaled into width x height (y grows downward in SVG)."""
    if not values:
        return LineChart("", 0, width, height, True)
    peak = max(values) or 1
    step = width / max(1, len(values) - 1)
    coords = [
        f"{i * step:.1f},{height - (v / peak) * (height - 4) - 2:.1f}" for i, v in enumerate(values)
    ]
    return LineChart(" ".join(coords), int(max(values)), width, height, False)
