"""One report from reports run in parts."""

from __future__ import annotations

from experiments.report.settings import (
    MODELS,
)

# What must agree for rows of separate runs to share one table.
_SAME_DATA = ("dir", "items", "users_evaluated", "users_sampled", "train_events", "test_events")


def merge_reports(parts: list[dict]) -> dict:
    """One report from reports run in parts (`--models`) on the same data and split.

    Rows keep the order of MODELS; a row present in several parts keeps, per view (test figures,
    fit, cold start, short histories), what the first part that has it says. The
    first part's long-tail sweep and default stay (every part measures the same "ours" when they
    share a checkpoint); a view's sizes (cold start, short histories) come from the first part
    that ran it.
    """
    if not parts:
        raise ValueError("no reports to merge")
    first = parts[0]
    for part in parts[1:]:
        for key in _SAME_DATA:
            if part["data"].get(key) != first["data"].get(key):
                raise ValueError(
                    f"the reports were not run on the same data: data.{key} is "
                    f"{first['data'].get(key)!r} in the first and {part['data'].get(key)!r} in "
                    "another"
                )
    rows: dict[str, dict] = {}
    for part in parts:  # per row, each view's figures from the first part that has them
        for name, row in part["models"].items():
            merged_row = rows.setdefault(name, {})
            for key, value in row.items():
                merged_row.setdefault(key, value)
    data = dict(first["data"])
    for prefix in ("cold_", "short_"):  # a view's sizes, from the first part that ran it
        for part in parts:
            sizes = {k: v for k, v in part["data"].items() if k.startswith(prefix)}
            if sizes and not any(k.startswith(prefix) for k in data):
                data.update(sizes)
    return {
        **first,
        "data": data,
        "models": {name: rows[name] for name in MODELS if name in rows},
        "seconds": sum(part.get("seconds", 0.0) for part in parts),
        "parts": [
            {"created": part.get("created"), "models": list(part["models"])} for part in parts
        ],
    }
