"""One report from reports run in parts."""

from __future__ import annotations

from experiments.report.settings import (
    MODELS,
)

# What must agree for rows of separate runs to share one table.
_SAME_DATA = ("dir", "items", "users_evaluated", "users_sampled", "train_events", "test_events")


_NONE = float("-inf")


def _validation(row: dict, view: str | None = None) -> float:
    """A row's best validation NDCG@10 in its main-view training, or with `view` (a view that
    refits the row, such as "short_history") in that view's training; -inf when it has none (a
    non-neural row, a checkpoint's figures count: they are its training's)."""
    where = row if view is None else (row.get(view) or {})
    best = (where.get("fit") or {}).get("best") or {}
    value = best.get("ndcg@10") if isinstance(best, dict) else None
    return float(value) if value is not None else _NONE


# Views that refit every row on their own split: a row run in several parts takes each of these
# from the part whose refit has the best validation NDCG@10 in that view.
_REFIT_VIEWS = ("short_history", "cold_start")


def merge_reports(parts: list[dict]) -> dict:
    """One report from reports run in parts (`--models`) on the same data and split.

    Rows keep the order of MODELS; a row present in several parts keeps, per view (test figures,
    fit, cold start, short histories), what the first part that has it says, where the parts are
    taken, for a neural row trained in several of them, in order of its best validation NDCG@10
    (the run chosen on validation; `chosen_on_validation` names the part); a row loaded from a
    checkpoint (`fit.checkpoint`) is taken from the first part that loaded one, the served model
    the long-tail sweep measures, whatever the others' validation. The
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
    chosen: dict[str, int] = {}
    names = {name for part in parts for name in part["models"]}
    for name in names:
        # Per row, each view's figures from the first part that has them; a neural row trained
        # in several parts (different schedules) is taken first from the part whose run has the
        # best validation NDCG@10, as if its schedule were one more setting chosen on validation.
        having = [i for i, part in enumerate(parts) if name in part["models"]]
        loaded = [
            i for i in having if (parts[i]["models"][name].get("fit") or {}).get("checkpoint")
        ]
        if loaded:
            # A row loaded from a checkpoint is no schedule to choose on validation: the first
            # part that loaded one is the served model, whose long-tail sweep the report keeps.
            order = [loaded[0], *(i for i in having if i != loaded[0])]
        else:
            order = sorted(having, key=lambda i: -_validation(parts[i]["models"][name]))
            if len({_validation(parts[i]["models"][name]) for i in having} - {_NONE}) > 1:
                chosen[name] = order[0]
        merged_row = rows.setdefault(name, {})
        for i in order:
            for key, value in parts[i]["models"][name].items():
                merged_row.setdefault(key, value)
        for view in _REFIT_VIEWS:
            runs = [i for i in having if view in parts[i]["models"][name]]
            scores = {_validation(parts[i]["models"][name], view) for i in runs} - {_NONE}
            if len(scores) > 1:
                best = max(runs, key=lambda i: _validation(parts[i]["models"][name], view))
                merged_row[view] = parts[best]["models"][name][view]
                chosen[f"{name}.{view}"] = best
    data = dict(first["data"])
    for prefix in ("cold_", "short_"):  # a view's sizes, from the first part that ran it
        for part in parts:
            sizes = {k: v for k, v in part["data"].items() if k.startswith(prefix)}
            if sizes and not any(k.startswith(prefix) for k in data):
                data.update(sizes)
    return {
        **first,
        "data": data,
        # Rows trained differently in several parts: the index of the part each was taken from.
        "chosen_on_validation": chosen,
        "models": {name: rows[name] for name in MODELS if name in rows},
        "seconds": sum(part.get("seconds", 0.0) for part in parts),
        "parts": [
            {"created": part.get("created"), "models": list(part["models"])} for part in parts
        ],
    }
