"""One report from reports run in parts."""

from __future__ import annotations

from experiments.report.settings import (
    LONG_TAIL_KEYS,
    MODELS,
    TAIL_FIGURE,
    _is_setting,
    long_tail_choice,
)

# What must agree for rows of separate runs to share one table.
_SAME_DATA = ("dir", "items", "users_evaluated", "users_sampled", "train_events", "test_events")


_NONE = float("-inf")


def _validation(row: dict, view: str | None = None, figure: str = "ndcg@10") -> float:
    """A row's best validation NDCG@10 (or `figure` of its best epoch) in its main-view
    training, or with `view` (a view that refits the row, such as "short_history") in that
    view's training; -inf when it has none (a non-neural row, a checkpoint's figures count: they
    are its training's)."""
    where = row if view is None else (row.get(view) or {})
    best = (where.get("fit") or {}).get("best") or {}
    value = best.get(figure) if isinstance(best, dict) else None
    return float(value) if value is not None else _NONE


# Views that refit every row on their own split: a row run in several parts takes each of these
# from the part whose refit has the best validation NDCG@10 in that view.
_REFIT_VIEWS = ("short_history", "cold_start")


# A refit view's figures that several seeds of one setting average (`_refit_choice`).
_FIGURES = ("recall@10", "ndcg@10", "coverage@10", "tail", "head")


def _refit_choice(runs: list[tuple[int, dict]]) -> tuple[dict, int] | None:
    """A refit view's figures and the index of the part they come from, for a row run in
    several parts; None when there is nothing to choose (one run, or runs that validate alike).

    Runs whose settings (`fit.fixed_settings`) differ only in "seed" are one setting: its
    validation NDCG@10 is their mean, and its figures are their means (each seed's in "seeds").
    The setting with the best validation NDCG@10 is kept, then moved by `long_tail_choice` to
    the one with the most tail within 2% of it, where settings differ only in LONG_TAIL_KEYS
    (for example the teacher's debias). A run without fixed settings is a setting of its own."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    points: list[dict] = []
    for i, view in runs:
        fixed = (view.get("fit") or {}).get("fixed_settings")
        settings = {k: v for k, v in fixed.items() if k != "seed"} if fixed else {"part": float(i)}
        key = repr(sorted(settings.items()))
        if key not in groups:
            points.append(settings)
        groups.setdefault(key, []).append((i, view))
    members = list(groups.values())
    for point, group in zip(points, members, strict=True):
        point["ndcg@10"] = sum(_validation(view) for _, view in group) / len(group)
        tails = [_validation(view, figure=TAIL_FIGURE) for _, view in group]
        if _NONE not in tails:
            point[TAIL_FIGURE] = sum(tails) / len(tails)
    if len({point["ndcg@10"] for point in points} - {_NONE}) <= 1 and all(
        len(group) == 1 for group in members
    ):
        return None
    best = max(range(len(points)), key=lambda j: points[j]["ndcg@10"])
    kept = long_tail_choice(points, best)
    group = members[kept]
    first, view = min(group, key=lambda run: _seed(run[1]))
    merged = dict(view)
    merged["compared"] = _compared(points, members, best, kept)
    if len(group) == 1:
        return merged, first
    for figure in _FIGURES:
        if all(figure in other for _, other in group):
            merged[figure] = _mean([other[figure] for _, other in group])
    merged["seeds"] = [
        {"seed": _seed(other), "validation_ndcg@10": _validation(other)}
        | {figure: other[figure] for figure in _FIGURES if figure in other}
        for _, other in sorted(group, key=lambda run: _seed(run[1]))
    ]
    return merged, first


def _compared(
    points: list[dict], members: list[list[tuple[int, dict]]], best: int, kept: int
) -> list[dict]:
    """The settings a refit view chose between, for the report's table (an ablation of what
    the settings change): per setting, the settings that differ between them (or the part that
    screened its own), its seeds, its validation figures (what chose) and its test figures'
    means (for the record), best validation first."""
    fixed = [point for point in points if "part" not in point]
    names = sorted({k for point in fixed for k in point if _is_setting(k)})
    varying = [k for k in names if len({repr(point.get(k)) for point in fixed}) > 1]
    table = []
    for j, (point, group) in enumerate(zip(points, members, strict=True)):
        views = [view for _, view in group]
        table.append(
            {
                "settings": {
                    k: point.get(k, 0.0)  # a long-tail key left out is 0 (`long_tail_choice`)
                    for k in varying
                    if k in point or (k in LONG_TAIL_KEYS and "part" not in point)
                },
                "part": group[0][0] if "part" in point else None,
                "seeds": sorted(_seed(view) for view in views),
                "validation_ndcg@10": point["ndcg@10"] if point["ndcg@10"] != _NONE else None,
                "validation_tail_ndcg@10": point.get(TAIL_FIGURE),
                "ndcg@10": _mean_of(views, ("ndcg@10",)),
                "tail_ndcg@10": _mean_of(views, ("tail", "ndcg@10")),
                "coverage@10": _mean_of(views, ("coverage@10",)),
                "best_on_validation": j == best,
                "kept": j == kept,
            }
        )
    return sorted(table, key=lambda row: -(row["validation_ndcg@10"] or _NONE))


def _mean_of(views: list[dict], path: tuple[str, ...]) -> float | None:
    """The mean over views of the figure at `path` (keys in turn), None where one lacks it."""
    values = []
    for view in views:
        value: object = view
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, (int, float)):
            return None
        values.append(float(value))
    return sum(values) / len(values)


def _seed(view: dict) -> int:
    return int(((view.get("fit") or {}).get("fixed_settings") or {}).get("seed", 0))


def _mean(values: list) -> object:
    """The mean of numbers, or of dicts of numbers key by key (a figure's tail and head parts)."""
    if isinstance(values[0], dict):
        return {key: _mean([value[key] for value in values]) for key in values[0]}
    if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
        return sum(float(value) for value in values) / len(values)
    return values[0]


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
            picked = _refit_choice([(i, parts[i]["models"][name][view]) for i in runs])
            if picked is not None:
                merged_row[view], chosen[f"{name}.{view}"] = picked
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
