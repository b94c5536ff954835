"""N-dimensional Pareto sets with strict dominance (docs/METHODS.md §9, erratum 10).

A point A **dominates** B iff A is no worse than B in every objective and
strictly better in at least one (per-objective direction ``min`` or ``max``).
The Pareto set keeps every point no other point dominates; exact duplicates
(equal in every objective) collapse to the first one; points tied in some
objectives but not dominated are all kept.

Example::

    pts = [{"bpw": 4.25, "kl": 0.01}, {"bpw": 3.25, "kl": 0.05}, {"bpw": 4.25, "kl": 0.02}]
    pareto_front(pts, {"bpw": "min", "kl": "min"})   # [0, 1]
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

Directions = Mapping[str, str]


def _vector(point: Mapping[str, Any], objectives: Directions) -> tuple[float, ...] | None:
    """Objective values as a 'smaller is better' tuple; None when one is missing or NaN."""
    out = []
    for name, direction in objectives.items():
        value = point.get(name)
        if value is None:
            return None
        value = float(value)
        if math.isnan(value):
            return None
        out.append(value if direction == "min" else -value)
    return tuple(out)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` strictly dominates ``b`` (both 'smaller is better' vectors)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def check_objectives(objectives: Directions) -> None:
    if not objectives:
        raise ValueError("at least one objective is needed")
    for name, direction in objectives.items():
        if direction not in ("min", "max"):
            raise ValueError(f"objective {name!r}: direction must be 'min' or 'max', got {direction!r}")


def pareto_front(points: Sequence[Mapping[str, Any]], objectives: Directions) -> list[int]:
    """Indices (ascending) of the Pareto set of ``points`` under ``objectives`` ({name: "min"|"max"}).

    Points lacking an objective (or holding NaN) take no part. O(n² · d), fine for
    the hundreds of runs a report covers.
    """
    check_objectives(objectives)
    vectors = [(i, v) for i, p in enumerate(points) if (v := _vector(p, objectives)) is not None]
    kept: list[int] = []
    seen: set[tuple[float, ...]] = set()
    for i, v in vectors:
        if v in seen:                       # an exact duplicate of a point already kept
            continue
        if any(dominates(w, v) for _, w in vectors):
            continue
        seen.add(v)
        kept.append(i)
    return kept


def parse_objectives(text: str) -> dict[str, str]:
    """``"bpw_quantized:min,kl_mean:min"`` -> ``{"bpw_quantized": "min", "kl_mean": "min"}``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, direction = part.rpartition(":")
        if not name:
            name, direction = direction, "min"
        out[name.strip()] = direction.strip().lower()
    check_objectives(out)
    return out
