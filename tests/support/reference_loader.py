"""The whole-file event loader as it was before events were read in chunks, frozen here as the
reference the chunked loader must match frame for frame (`tests/unit/test_data_chunked.py`).

Copied verbatim from `ltrec/data.py` (commit e350dd0); only its imports changed. Do not "fix" it:
its job is to stay what the project shipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ltrec.data import (
    _ROW,
    CONTEXT_COLUMNS,
    EVENT_COLUMNS,
    EVENT_REQUIRED,
    EVENT_TYPES,
    CleaningReport,
    Dataset,
    DatasetError,
    _check_columns,
    _clean_text,
    _find_table,
    _load_items,
    _load_users,
    _number,
    _raise_first,
    _to_object,
)


def _read_table(path: Path) -> pd.DataFrame:
    """Everything is read as text (ids must keep leading zeros); columns are parsed afterwards."""
    try:
        if path.suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        else:
            frame = pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DatasetError(f"{path.name}: cannot read file: {exc}") from exc
    if path.suffix == ".csv" and not isinstance(frame.index, pd.RangeIndex):
        # pandas silently turns surplus leading fields into an index, shifting every column.
        raise DatasetError(
            f"{path.name}: cannot read file: data rows have more fields than the header"
        )
    frame.columns = [str(column).strip() for column in frame.columns]
    frame = frame.reset_index(drop=True)
    frame[_ROW] = np.arange(1, len(frame) + 1, dtype=np.int64)
    return frame


def _load_events(path: Path, items: pd.DataFrame, report: CleaningReport) -> pd.DataFrame:
    raw = _read_table(path)
    name = path.name
    _check_columns(raw, name, EVENT_REQUIRED, EVENT_COLUMNS, report)

    events = pd.DataFrame({_ROW: raw[_ROW]})
    events["user_id"] = _clean_text(raw["user_id"])
    events["item_id"] = _clean_text(raw["item_id"])

    timestamp, ts_unparseable = _number(raw["timestamp"])
    ts_bad = ts_unparseable | (
        timestamp.notna() & ((timestamp < 0) | (timestamp != np.floor(timestamp)))
    )
    event_type = _clean_text(raw["event_type"]).str.lower()
    type_bad = event_type.notna() & ~event_type.isin(EVENT_TYPES)
    checks: list[tuple[str, pd.Series, Callable[[str], str]]] = [
        ("timestamp", ts_bad, lambda v: f"expected integer seconds >= 0, got {v!r}"),
        (
            "event_type",
            type_bad,
            lambda v: f"expected one of {', '.join(EVENT_TYPES)} (any case), got {v!r}",
        ),
    ]
    rating: pd.Series | None = None
    if "rating" in raw:
        rating, rating_bad = _number(raw["rating"])
        checks.append(("rating", rating_bad, lambda v: f"expected a number, got {v!r}"))
    _raise_first(raw, name, checks)

    events["timestamp"] = timestamp
    events["event_type"] = event_type
    for column in CONTEXT_COLUMNS:
        events[column] = _clean_text(raw[column]) if column in raw else pd.NA
    if rating is not None:
        events["rating"] = rating

    # A row missing several required values is counted once, under the first of them.
    keep = pd.Series(True, index=events.index)
    for column in EVENT_REQUIRED:
        missing = keep & events[column].isna()
        report.dropped[f"events_missing_{column}"] += int(missing.sum())
        keep &= ~missing
    events = events[keep]
    unknown = ~events["item_id"].isin(items["item_id"])
    report.dropped["events_unknown_item"] += int(unknown.sum())
    events = events[~unknown]
    duplicate = events.duplicated(["user_id", "item_id", "timestamp", "event_type"], keep="first")
    report.dropped["events_duplicate"] += int(duplicate.sum())
    events = events[~duplicate]

    # np.lexsort is stable, so equal (user, timestamp) pairs keep their file order.
    user_order, _ = pd.factorize(events["user_id"])
    order = np.lexsort((events["timestamp"].to_numpy(), user_order))
    events = events.iloc[order].reset_index(drop=True)

    columns = ["user_id", "item_id", "timestamp", "event_type", *CONTEXT_COLUMNS]
    if rating is not None:
        columns.append("rating")
    result = events[columns].copy()
    result["timestamp"] = result["timestamp"].astype("int64")
    for column in ("user_id", "item_id", "event_type"):
        result[column] = result[column].astype("str")
    for column in CONTEXT_COLUMNS:
        result[column] = _to_object(result[column])
    result["item_index"] = (
        pd.Index(items["item_id"]).get_indexer(result["item_id"]).astype("int64") + 1
    )
    result["event_index"] = (
        pd.Index(EVENT_TYPES).get_indexer(result["event_type"]).astype("int64") + 1
    )
    return result


def reference_load_dataset(path: str | Path) -> Dataset:
    """`ltrec.data.load_dataset` as it was, events read whole."""
    root = Path(path)
    report = CleaningReport()
    items_path = _find_table(root, "items", required=True)
    events_path = _find_table(root, "events", required=True)
    users_path = _find_table(root, "users", required=False)
    assert items_path is not None and events_path is not None
    items = _load_items(items_path, root, report)
    events = _load_events(events_path, items, report)
    users = _load_users(users_path, report) if users_path is not None else None
    report.items = len(items)
    report.events = len(events)
    report.users = int(events["user_id"].nunique())
    report.user_profiles = None if users is None else len(users)
    return Dataset(items=items, events=events, users=users, report=report, root=root)
