"""Latency summaries and the Markdown tables the benchmarks print and write."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Summary:
    """One load run: latencies of the measured requests and the wall time they took together."""

    requests: int
    concurrency: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    throughput_rps: float
    errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (a latency that was actually observed, never interpolated)."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def summarize(
    latencies_s: Sequence[float], wall_s: float, concurrency: int, errors: int = 0
) -> Summary:
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    ms = [v * 1e3 for v in latencies_s]
    return Summary(
        requests=len(ms),
        concurrency=concurrency,
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        mean_ms=float(np.mean(ms)),
        max_ms=float(max(ms)),
        throughput_rps=len(ms) / wall_s,
        errors=errors,
    )


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0 or not math.isfinite(reference):
        return None
    return value / reference


def fmt(value: object, digits: int = 2) -> str:
    """Table cell: numbers rounded, thousands separated, missing values as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], digits: int = 2
) -> str:
    """`columns` are (key, header) pairs; text columns are left-aligned, numbers right-aligned."""
    if not rows:
        raise ValueError("no rows")

    def is_number(value: object) -> bool:
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))

    numeric = {key: all(is_number(r.get(key)) for r in rows) for key, _ in columns}
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---:" if numeric[key] else "---" for key, _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(key), digits) for key, _ in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body])
