"""The dataset layer: load, validate and clean a shop's dataset directory; split it for training.

Any shop can hand us a directory of CSV or Parquet files (see `docs/dataset-format.md`). The
rules are split in two on purpose: a value that is present but cannot be what the format says
(a timestamp of ``abc``, a negative price) means the file is broken and loading stops with a
`DatasetError` that points at the file, row and column, so the shop can fix its export; rows that
are merely incomplete or redundant (missing ids, unknown items, duplicates) are dropped and
counted in a `CleaningReport`, because real exports always contain some and refusing them would
make the loader useless.

Run ``python -m ltrec.datasets check DIR`` to validate a directory; the adapters that write
datasets in this format (MovieLens-1M, the photo shop) are `ltrec.datasets`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ltrec_core.contract import EVENT_TYPES
from ltrec_core.item_text import PRICE_BUCKETS, ItemFields, item_text

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "EVENT_TYPES",
    "CleaningReport",
    "Dataset",
    "DatasetError",
    "EventLog",
    "LeaveOneOut",
    "convert_dataset",
    "item_texts",
    "leave_one_out",
    "load_dataset",
    "price_buckets",
    "read_event_log",
    "write_dataset",
]

ITEM_COLUMNS: tuple[str, ...] = (
    "item_id",
    "title",
    "description",
    "category",
    "brand",
    "price",
    "image",
)
ITEM_REQUIRED: tuple[str, ...] = ("item_id", "title")
EVENT_COLUMNS: tuple[str, ...] = (
    "user_id",
    "item_id",
    "timestamp",
    "event_type",
    "device",
    "region",
    "rating",
)
EVENT_REQUIRED: tuple[str, ...] = ("user_id", "item_id", "timestamp", "event_type")
CONTEXT_COLUMNS: tuple[str, ...] = ("device", "region")
TABLE_FORMATS: tuple[str, ...] = ("csv", "parquet")

# Reasons a row can be dropped, in the order they are applied; every key is always present in
# `CleaningReport.dropped` so that reports of different datasets line up.
DROP_REASONS: tuple[str, ...] = (
    "items_missing_item_id",
    "items_missing_title",
    "items_duplicate_item_id",
    "events_missing_user_id",
    "events_missing_item_id",
    "events_missing_timestamp",
    "events_missing_event_type",
    "events_unknown_item",
    "events_duplicate",
    "users_missing_user_id",
    "users_duplicate_user_id",
)

# Row numbers are kept in this column while validating so messages can name the file row.
_ROW = "__row__"


class DatasetError(ValueError):
    """A dataset file that cannot be loaded as it is; the message names file, row and column."""


@dataclass
class CleaningReport:
    """What loading kept and dropped, so a shop can see how much of its export was usable."""

    items: int = 0
    events: int = 0
    users: int = 0
    user_profiles: int | None = None
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        profiles = "" if self.user_profiles is None else f", {self.user_profiles:,} user profiles"
        lines = [
            f"kept {self.items:,} items, {self.events:,} events, {self.users:,} users{profiles}"
        ]
        dropped = {reason: n for reason, n in self.dropped.items() if n}
        if dropped:
            lines.append(
                "dropped: " + ", ".join(f"{reason} {n:,}" for reason, n in dropped.items())
            )
        else:
            lines.append("dropped: nothing")
        for file_name, columns in self.ignored_columns.items():
            lines.append(f"ignored columns in {file_name}: {', '.join(columns)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Dataset:
    """A loaded, validated and cleaned dataset directory.

    `events` is sorted by user, users in the order of their first (kept) event in the file, then
    by timestamp ascending; a user's events with equal timestamps keep their file order (the sort
    is stable). Sequence models read a user's history in exactly this order, so it is part of the
    contract. `item_index` is 1 + the item's row in `items` (0 is padding) and `event_index` is
    1 + the position of `event_type` in `EVENT_TYPES`.
    """

    items: pd.DataFrame
    events: pd.DataFrame
    users: pd.DataFrame | None
    report: CleaningReport
    root: Path


@dataclass
class LeaveOneOut:
    """The standard sequential-recommendation split: each user's last event tests, the one
    before it validates, the rest trains."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


# --- Reading ------------------------------------------------------------------------------------


def _find_table(root: Path, stem: str, required: bool) -> Path | None:
    """Exactly one format per table, because silently preferring one would hide a stale file."""
    found = [root / f"{stem}.{fmt}" for fmt in TABLE_FORMATS if (root / f"{stem}.{fmt}").is_file()]
    if len(found) > 1:
        raise DatasetError(
            f"{root}: both {stem}.csv and {stem}.parquet exist; keep exactly one of them"
        )
    if not found:
        if required:
            raise DatasetError(f"{root}: no {stem}.csv or {stem}.parquet found")
        return None
    return found[0]


def _as_text(values: pd.Series) -> pd.Series:
    """Strings with missing values kept missing; whole-number floats lose their ``.0``.

    Parquet writers turn an integer id column with a gap into floats, and ``7.0`` must still
    match the ``7`` of the other table.
    """
    if pd.api.types.is_float_dtype(values.dtype):
        present = values.dropna()
        if np.isfinite(present).all() and (present == np.floor(present)).all():
            values = values.astype("Int64")
    if pd.api.types.is_string_dtype(values.dtype) and not pd.api.types.is_object_dtype(
        values.dtype
    ):
        return values
    return values.astype("str")


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


def _check_columns(
    frame: pd.DataFrame,
    file_name: str,
    required: Sequence[str],
    known: Sequence[str] | None,
    report: CleaningReport,
) -> None:
    for column in required:
        if column not in frame.columns:
            raise DatasetError(f"{file_name}, column {column}: required column is missing")
    if known is not None:
        extra = [c for c in frame.columns if c not in known and c != _ROW]
        if extra:
            report.ignored_columns[file_name] = extra


def _clean_text(values: pd.Series) -> pd.Series:
    """Stripped text; blank counts as missing."""
    text = _as_text(values).str.strip()
    return text.mask(text == "")


def _to_object(values: pd.Series) -> pd.Series:
    """Object column with None for missing, the representation the optional text columns use."""
    return values.astype(object).where(values.notna(), None)


def _raise_first(
    frame: pd.DataFrame,
    file_name: str,
    checks: Sequence[tuple[str, pd.Series, Callable[[str], str]]],
) -> None:
    """Raise for the first file row that fails any check (columns checked in the given order)."""
    first: tuple[int, str, str, Callable[[str], str]] | None = None
    for column, bad, describe in checks:
        if not bad.any():
            continue
        position = int(np.flatnonzero(bad.to_numpy())[0])
        row = int(frame[_ROW].iloc[position])
        if first is None or row < first[0]:
            first = (row, column, str(frame[column].iloc[position]), describe)
    if first is not None:
        row, column, raw, describe = first
        raise DatasetError(f"{file_name} row {row}, column {column}: {describe(raw)}")


def _number(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Parsed floats and the mask of values that were present but are not finite numbers."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        parsed = values.astype("float64")
        present = values.notna()
    else:
        text = _clean_text(values)
        parsed = pd.to_numeric(text, errors="coerce").astype("float64")
        present = text.notna()
    bad = present & ~np.isfinite(parsed.fillna(np.inf))
    return parsed, bad


# --- Tables -------------------------------------------------------------------------------------


def _load_items(path: Path, root: Path, report: CleaningReport) -> pd.DataFrame:
    raw = _read_table(path)
    name = path.name
    _check_columns(raw, name, ITEM_REQUIRED, ITEM_COLUMNS, report)

    items = pd.DataFrame({_ROW: raw[_ROW]})
    items["item_id"] = _clean_text(raw["item_id"])
    items["title"] = _clean_text(raw["title"])
    for column in ("description", "category", "brand", "image"):
        items[column] = _clean_text(raw[column]) if column in raw else pd.NA
    if "price" in raw:
        price, unparseable = _number(raw["price"])
        _raise_first(
            raw,
            name,
            [("price", unparseable | (price < 0), lambda v: f"expected a price >= 0, got {v!r}")],
        )
        items["price"] = price
    else:
        items["price"] = np.nan

    missing_id = items["item_id"].isna()
    report.dropped["items_missing_item_id"] += int(missing_id.sum())
    items = items[~missing_id]
    missing_title = items["title"].isna()
    report.dropped["items_missing_title"] += int(missing_title.sum())
    items = items[~missing_title]
    duplicate = items["item_id"].duplicated(keep="first")
    report.dropped["items_duplicate_item_id"] += int(duplicate.sum())
    items = items[~duplicate]

    # Relative image paths are resolved here so consumers need not carry the dataset root around.
    images = items["image"]
    items["image"] = images.map(
        lambda p: p if pd.isna(p) or Path(p).is_absolute() else str(root / p)
    )
    items = items[list(ITEM_COLUMNS)].reset_index(drop=True)
    for column in ("description", "category", "brand", "image"):
        items[column] = _to_object(items[column])
    items["item_id"] = items["item_id"].astype("str")
    items["title"] = items["title"].astype("str")
    return items


DEFAULT_CHUNK_ROWS = 1_000_000
"""Events read per chunk: a chunk's raw text columns take a few hundred MB at most, whatever
the size of the log."""

# Codes of a text value that is missing (absent or blank) and, for item ids, of one that is
# present but not in the catalogue.
_MISSING = -1
_UNKNOWN = -2


@dataclass
class EventLog:
    """A cleaned event log held as compact arrays, in the `Dataset.events` order.

    A 100M-event log as object strings would not fit in memory; as codes it takes about 33 bytes
    an event. `user` indexes `users` (ids in the order of their first kept event), `item` is the
    item's row in the catalogue (`item_index` - 1), `event` the position in `EVENT_TYPES`;
    `context[column]` is (codes, values) with -1 for missing.
    """

    user: np.ndarray  # int32
    users: pa.Array  # string
    item: np.ndarray  # int32
    timestamp: np.ndarray  # int64
    event: np.ndarray  # int8
    context: dict[str, tuple[np.ndarray, pa.Array]]  # int32 codes, string values
    rating: np.ndarray | None  # float64

    def __len__(self) -> int:
        return len(self.user)

    def frame(self, items: pd.DataFrame, compact: bool = False) -> pd.DataFrame:
        """The `Dataset.events` frame; `compact` keeps ids as categoricals and small integers
        (what a log too large for string columns is handled as), otherwise the dtypes
        `load_dataset` has always returned."""
        user = pd.Categorical.from_codes(self.user, categories=_str_index(self.users))
        item = pd.Categorical.from_codes(self.item, categories=pd.Index(items["item_id"]))
        event = pd.Categorical.from_codes(self.event, categories=pd.Index(EVENT_TYPES, dtype="str"))
        columns: dict[str, object] = {
            "user_id": user,
            "item_id": item,
            "timestamp": self.timestamp,
            "event_type": event,
        }
        for column in CONTEXT_COLUMNS:
            codes, values = self.context[column]
            columns[column] = pd.Categorical.from_codes(codes, categories=_str_index(values))
        if self.rating is not None:
            columns["rating"] = self.rating
        result = pd.DataFrame(columns)
        if compact:
            result["item_index"] = self.item + np.int32(1)
            result["event_index"] = self.event + np.int8(1)
            return result
        for column in ("user_id", "item_id", "event_type"):
            result[column] = result[column].astype("str")
        for column in CONTEXT_COLUMNS:
            result[column] = _to_object(result[column].astype(object))
        result["item_index"] = self.item.astype(np.int64) + 1
        result["event_index"] = self.event.astype(np.int64) + 1
        return result


def _str_index(values: pa.Array) -> pd.Index:
    return pd.Index(values.to_numpy(zero_copy_only=False), dtype="str")


class _Vocabulary:
    """Codes for text values in order of first sight, across chunks."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def encode(self, values: pd.Series) -> np.ndarray:
        """Codes of `values` (cleaned uniques; missing → -1)."""
        codes = self.codes
        return np.fromiter(
            (_MISSING if pd.isna(v) else codes.setdefault(v, len(codes)) for v in values),
            dtype=np.int32,
            count=len(values),
        )

    def values(self) -> pa.Array:
        return pa.array(list(self.codes), type=pa.string())


def _event_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The file in chunks of at most `chunk_rows` rows, read as `_read_table` reads it whole
    (CSV through the same pandas parser, so quoting and short rows behave alike; Parquet by
    record batches), with `_ROW` numbering rows across chunks. Always yields at least one
    (possibly empty) chunk, so the columns are known."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    offset = 0
    try:
        if path.suffix == ".csv":
            with pd.read_csv(
                path, dtype=str, keep_default_na=False, na_values=[""], chunksize=chunk_rows
            ) as reader:
                for frame in reader:
                    yield _numbered(frame, path, offset)
                    offset += len(frame)
            if offset == 0:
                yield _numbered(pd.read_csv(path, dtype=str, nrows=0), path, 0)
        else:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            for batch in parquet.iter_batches(batch_size=chunk_rows):
                frame = pa.Table.from_batches([batch], schema=schema).to_pandas()
                yield _numbered(frame, path, offset)
                offset += len(frame)
            if offset == 0:
                yield _numbered(schema.empty_table().to_pandas(), path, 0)
    except DatasetError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DatasetError(f"{path.name}: cannot read file: {exc}") from exc


def _numbered(frame: pd.DataFrame, path: Path, offset: int) -> pd.DataFrame:
    if path.suffix == ".csv" and not isinstance(frame.index, pd.RangeIndex):
        # pandas silently turns surplus leading fields into an index, shifting every column.
        raise DatasetError(
            f"{path.name}: cannot read file: data rows have more fields than the header"
        )
    frame.columns = [str(column).strip() for column in frame.columns]
    frame = frame.reset_index(drop=True)
    frame[_ROW] = np.arange(offset + 1, offset + len(frame) + 1, dtype=np.int64)
    return frame


def _whole_float_columns(path: Path, columns: Sequence[str]) -> set[str]:
    """Float Parquet columns among `columns` whose present values are all whole numbers.

    `_as_text` decides ``7.0`` → ``"7"`` on the whole column, so a chunked read must decide it
    on the whole column too (one streaming pass over just those columns)."""
    if path.suffix != ".parquet":
        return set()
    parquet = pq.ParquetFile(path)
    floats = [
        f.name for f in parquet.schema_arrow if f.name in columns and pa.types.is_floating(f.type)
    ]
    whole = set(floats)
    for batch in parquet.iter_batches(columns=floats) if floats else ():
        for name in list(whole):
            present = batch.column(name).to_numpy(zero_copy_only=False)
            present = present[~np.isnan(present)]
            if not (np.isfinite(present).all() and (present == np.floor(present)).all()):
                whole.discard(name)
    return whole


def _unique_text(values: pd.Series, whole_floats: bool) -> tuple[np.ndarray, pd.Series]:
    """Row codes into the cleaned unique values (`_clean_text` applied once per distinct value,
    not once per row); a missing raw value has code -1."""
    codes, uniques = pd.factorize(values)
    text = pd.Series(uniques)
    if pd.api.types.is_float_dtype(text.dtype):
        # Decided on the whole column (`_whole_float_columns`), not on this chunk's values.
        text = text.astype("Int64" if whole_floats else "str")
    return codes, _clean_text(text)


def _gather(codes: np.ndarray, table: np.ndarray, missing: float) -> np.ndarray:
    """`table[codes]` with -1 codes mapped to `missing`."""
    padded = np.append(table, np.asarray([missing], dtype=table.dtype))
    return padded[codes]


def _unique_number(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """`_number`, parsing each distinct text once."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        return _number(values)
    codes, uniques = pd.factorize(values)
    parsed, bad = _number(pd.Series(uniques, dtype=values.dtype))
    return (
        pd.Series(_gather(codes, parsed.to_numpy(), np.nan), index=values.index),
        pd.Series(_gather(codes, bad.to_numpy(), False), index=values.index),
    )


def read_event_log(
    path: Path,
    items: pd.DataFrame,
    report: CleaningReport,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> EventLog:
    """Validate and clean an events file chunk by chunk into an `EventLog`.

    The rules are `load_dataset`'s, applied per chunk except the two that need the whole log:
    duplicates are found after all chunks (by a stable sort of the codes), and users are ordered
    by their first kept event. The first broken row raises as a whole-file read would, because
    chunks are checked in file order.
    """
    name = path.name
    item_ids = pd.Index(items["item_id"])
    users = _Vocabulary()
    contexts = {column: _Vocabulary() for column in CONTEXT_COLUMNS}
    parts: dict[str, list[np.ndarray]] = {
        key: [] for key in ("user", "item", "timestamp", "event", "rating", *CONTEXT_COLUMNS)
    }
    has_rating = False
    whole: set[str] = set()
    event_types = pd.Index(EVENT_TYPES)
    for number, raw in enumerate(_event_chunks(path, chunk_rows)):
        if number == 0:
            _check_columns(raw, name, EVENT_REQUIRED, EVENT_COLUMNS, report)
            has_rating = "rating" in raw
            whole = _whole_float_columns(
                path, ["user_id", "item_id", "event_type", *CONTEXT_COLUMNS]
            )

        codes, text = _unique_text(raw["user_id"], "user_id" in whole)
        user = _gather(codes, users.encode(text), _MISSING)
        codes, text = _unique_text(raw["item_id"], "item_id" in whole)
        position = item_ids.get_indexer(text.fillna(""))
        position = np.where(position == -1, _UNKNOWN, position)
        item = _gather(codes, np.where(text.isna(), _MISSING, position).astype(np.int32), _MISSING)

        timestamp, ts_unparseable = _unique_number(raw["timestamp"])
        ts_bad = ts_unparseable | (
            timestamp.notna() & ((timestamp < 0) | (timestamp != np.floor(timestamp)))
        )
        codes, text = _unique_text(raw["event_type"], "event_type" in whole)
        text = text.str.lower()
        type_codes = np.where(text.isna(), _MISSING, event_types.get_indexer(text.fillna("")))
        event = _gather(codes, type_codes.astype(np.int8), _MISSING)
        type_bad = pd.Series(_gather(codes, (text.notna() & (type_codes == -1)).to_numpy(), False))
        checks: list[tuple[str, pd.Series, Callable[[str], str]]] = [
            ("timestamp", ts_bad, lambda v: f"expected integer seconds >= 0, got {v!r}"),
            (
                "event_type",
                type_bad,
                lambda v: f"expected one of {', '.join(EVENT_TYPES)} (any case), got {v!r}",
            ),
        ]
        if has_rating:
            rating, rating_bad = _unique_number(raw["rating"])
            checks.append(("rating", rating_bad, lambda v: f"expected a number, got {v!r}"))
        _raise_first(raw, name, checks)

        # A row missing several required values is counted once, under the first of them.
        keep = np.ones(len(raw), dtype=bool)
        for column, missing in (
            ("user_id", user == _MISSING),
            ("item_id", item == _MISSING),
            ("timestamp", timestamp.isna().to_numpy()),
            ("event_type", event == _MISSING),
        ):
            missing = missing & keep
            report.dropped[f"events_missing_{column}"] += int(missing.sum())
            keep &= ~missing
        unknown = keep & (item == _UNKNOWN)
        report.dropped["events_unknown_item"] += int(unknown.sum())
        keep &= ~unknown

        parts["user"].append(user[keep])
        parts["item"].append(item[keep])
        parts["timestamp"].append(timestamp.to_numpy()[keep].astype(np.int64))
        parts["event"].append(event[keep])
        for column in CONTEXT_COLUMNS:
            if column in raw:
                codes, text = _unique_text(raw[column], column in whole)
                context = _gather(codes, contexts[column].encode(text), _MISSING)
            else:
                context = np.full(len(raw), _MISSING, dtype=np.int32)
            parts[column].append(context[keep])
        if has_rating:
            parts["rating"].append(rating.to_numpy()[keep])

    def joined(key: str, dtype: type) -> np.ndarray:
        chunks = parts.pop(key)
        return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.empty(0, dtype)

    columns = {
        "user": joined("user", np.int32),
        "item": joined("item", np.int32),
        "timestamp": joined("timestamp", np.int64),
        "event": joined("event", np.int8),
        **{column: joined(column, np.int32) for column in CONTEXT_COLUMNS},
    }
    if has_rating:
        columns["rating"] = joined("rating", np.float64)

    # Duplicates: equal (user, item, timestamp, event type); the stable sort keeps file order
    # within a group, so the first in the file survives.
    pair = (columns["user"].astype(np.int64) << 32) | columns["item"].astype(np.int64)
    order = np.lexsort((columns["event"], columns["timestamp"], pair))
    same = pair[order[1:]] == pair[order[:-1]]
    del pair
    for key in ("timestamp", "event"):
        ordered = columns[key][order]
        same &= ordered[1:] == ordered[:-1]
    duplicate = np.zeros(len(order), dtype=bool)
    duplicate[order[1:][same]] = True
    del order, same
    report.dropped["events_duplicate"] += int(duplicate.sum())
    if duplicate.any():
        columns = {key: values[~duplicate] for key, values in columns.items()}
    del duplicate

    # Users in order of their first kept event, then by timestamp; np.lexsort is stable, so
    # equal (user, timestamp) pairs keep their file order.
    rank, first = pd.factorize(columns["user"])
    user_values = users.values().take(pa.array(np.asarray(first, dtype=np.int64)))
    columns["user"] = rank.astype(np.int32)
    order = np.lexsort((columns["timestamp"], columns["user"]))
    columns = {key: values[order] for key, values in columns.items()}
    del order
    return EventLog(
        user=columns["user"],
        users=user_values,
        item=columns["item"],
        timestamp=columns["timestamp"],
        event=columns["event"],
        context={
            column: (columns[column], contexts[column].values()) for column in CONTEXT_COLUMNS
        },
        rating=columns.get("rating"),
    )


def _load_users(path: Path, report: CleaningReport) -> pd.DataFrame:
    raw = _read_table(path)
    _check_columns(raw, path.name, ("user_id",), None, report)
    users = raw.drop(columns=[_ROW])
    for column in users.columns:
        users[column] = _clean_text(users[column])
    missing = users["user_id"].isna()
    report.dropped["users_missing_user_id"] += int(missing.sum())
    users = users[~missing]
    duplicate = users["user_id"].duplicated(keep="first")
    report.dropped["users_duplicate_user_id"] += int(duplicate.sum())
    users = users[~duplicate].reset_index(drop=True)
    for column in users.columns:
        users[column] = _to_object(users[column])
    users["user_id"] = users["user_id"].astype("str")
    return users


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (datasets and models are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_dataset(
    path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS, compact: bool = False
) -> Dataset:
    """Load a dataset directory (format in `docs/dataset-format.md`).

    Raises `DatasetError` for a broken file (the first offending row is named) and drops, counting
    them in `Dataset.report`, rows that are only incomplete or redundant. See `Dataset` for the
    order of `events`. Events are read `chunk_rows` at a time (the result does not depend on it);
    `compact` returns them with categorical ids (`EventLog.frame`), for logs too large for
    string columns.
    """
    root = Path(path)
    items, log, users, report = _load(root, chunk_rows)
    events = log.frame(items, compact=compact)
    return Dataset(items=items, events=events, users=users, report=report, root=root)


def _load(
    root: Path, chunk_rows: int
) -> tuple[pd.DataFrame, EventLog, pd.DataFrame | None, CleaningReport]:
    if not root.is_dir():
        raise DatasetError(f"{root}: not a dataset directory")
    report = CleaningReport()
    items_path = _find_table(root, "items", required=True)
    events_path = _find_table(root, "events", required=True)
    users_path = _find_table(root, "users", required=False)
    assert items_path is not None and events_path is not None

    items = _load_items(items_path, root, report)
    log = read_event_log(events_path, items, report, chunk_rows)
    users = _load_users(users_path, report) if users_path is not None else None

    report.items = len(items)
    report.events = len(log)
    report.users = len(log.users)
    report.user_profiles = None if users is None else len(users)
    return items, log, users, report


# --- Derived views ------------------------------------------------------------------------------


def price_buckets(prices: pd.Series) -> list[str | None]:
    """Budget / mid-range / premium by the catalogue's own price terciles.

    A text encoder cannot compare raw numbers across catalogues, but "premium" means the same in
    every shop. Ties never straddle a boundary (thresholds, not ranks); a catalogue with a single
    price is all mid-range; missing prices give None.
    """
    values = pd.to_numeric(prices, errors="coerce").astype("float64")
    present = values.dropna()
    if present.empty:
        return [None] * len(values)
    if present.min() == present.max():
        return [None if pd.isna(v) else PRICE_BUCKETS[1] for v in values]
    low, high = present.quantile([1 / 3, 2 / 3]).tolist()
    buckets: list[str | None] = []
    for value in values:
        if pd.isna(value):
            buckets.append(None)
        elif value <= low:
            buckets.append(PRICE_BUCKETS[0])
        elif value <= high:
            buckets.append(PRICE_BUCKETS[1])
        else:
            buckets.append(PRICE_BUCKETS[2])
    return buckets


def item_texts(items: pd.DataFrame) -> list[str]:
    """The text the item encoder reads, one per row of `items`, in order.

    Each row is rendered by `ltrec_core.item_text.item_text`, the one rendering the gateway
    uses for items added after training; missing values become empty fields.
    """
    n = len(items)

    def column(name: str) -> list[str]:
        if name not in items.columns:
            return [""] * n
        return ["" if pd.isna(v) else str(v) for v in items[name].tolist()]

    prices = price_buckets(items["price"]) if "price" in items.columns else [None] * n
    return [
        item_text(
            ItemFields(
                title=title,
                description=description,
                category=category,
                brand=brand,
                price_bucket=price or "",
            )
        )
        for title, category, brand, price, description in zip(
            column("title"),
            column("category"),
            column("brand"),
            prices,
            column("description"),
            strict=True,
        )
    ]


def leave_one_out(events: pd.DataFrame) -> LeaveOneOut:
    """Split each user's sequence as ordered in `events` (the `Dataset.events` order).

    Users with fewer than 3 events have nothing left to train on once two are held out, so all
    their events go to train and they are not evaluated. Each part keeps the input order.
    """
    by_user = events.groupby("user_id", sort=False)
    from_end = by_user.cumcount(ascending=False).to_numpy()
    eligible = by_user["user_id"].transform("size").to_numpy() >= 3
    return LeaveOneOut(
        train=events[~eligible | (from_end >= 2)].reset_index(drop=True),
        valid=events[eligible & (from_end == 1)].reset_index(drop=True),
        test=events[eligible & (from_end == 0)].reset_index(drop=True),
    )


# --- Writing ------------------------------------------------------------------------------------


def _write_table(frame: pd.DataFrame, out_dir: Path, stem: str, fmt: str) -> None:
    # A stale file of the other format would make the directory unloadable (exactly one allowed).
    for other in TABLE_FORMATS:
        if other != fmt:
            (out_dir / f"{stem}.{other}").unlink(missing_ok=True)
    path = out_dir / f"{stem}.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def write_dataset(
    items: pd.DataFrame,
    events: pd.DataFrame,
    out_dir: Path,
    fmt: str = "parquet",
    users: pd.DataFrame | None = None,
) -> None:
    """Write frames in the dataset-directory format.

    Only the format's own columns are written (derived ones such as `item_index` are recomputed
    on load), so `write_dataset(ds.items, ds.events, d)` round-trips a loaded `Dataset`.
    """
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(TABLE_FORMATS)}, got {fmt!r}")
    for frame, stem, required in (
        (items, "items", ITEM_REQUIRED),
        (events, "events", EVENT_REQUIRED),
    ):
        for column in required:
            if column not in frame.columns:
                raise DatasetError(f"{stem}, column {column}: required column is missing")
    if users is not None and "user_id" not in users.columns:
        raise DatasetError("users, column user_id: required column is missing")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_table(items[[c for c in ITEM_COLUMNS if c in items.columns]], out_dir, "items", fmt)
    _write_table(events[[c for c in EVENT_COLUMNS if c in events.columns]], out_dir, "events", fmt)
    if users is not None:
        _write_table(users, out_dir, "users", fmt)


def convert_dataset(
    source: str | Path, out_dir: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> CleaningReport:
    """Write the cleaned form of the dataset directory `source` as Parquet in `out_dir`.

    Events are read and written `chunk_rows` at a time and held in between as an `EventLog`
    (about 33 bytes an event), so a 100M-event log converts within a few GB. The result loads
    to the same frames as `source` does, with nothing left to drop, already in `Dataset.events`
    order. Returns the cleaning report of `source`.
    """
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.resolve() == source.resolve():
        raise ValueError(f"out_dir must differ from the source directory, got {out_dir}")
    items, log, users, report = _load(source, chunk_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_table(items, out_dir, "items", "parquet")
    if users is not None:
        _write_table(users, out_dir, "users", "parquet")
    for other in TABLE_FORMATS:
        (out_dir / f"events.{other}").unlink(missing_ok=True)
    columns: list[tuple[str, pa.DataType]] = [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("event_type", pa.string()),
        *((column, pa.string()) for column in CONTEXT_COLUMNS),
    ]
    if log.rating is not None:
        columns.append(("rating", pa.float64()))
    schema = pa.schema(columns)
    item_ids = pa.array(items["item_id"].tolist(), type=pa.string())
    event_types = pa.array(EVENT_TYPES, type=pa.string())

    def codes(values: np.ndarray) -> pa.Array:
        return pa.array(values.astype(np.int64), mask=values < 0)

    with pq.ParquetWriter(out_dir / "events.parquet", schema) as writer:
        for start in range(0, max(len(log), 1), chunk_rows):
            rows = slice(start, start + chunk_rows)
            arrays = [
                log.users.take(codes(log.user[rows])),
                item_ids.take(codes(log.item[rows])),
                pa.array(log.timestamp[rows]),
                event_types.take(codes(log.event[rows])),
                *(
                    values.take(codes(context[rows]))
                    for context, values in (log.context[c] for c in CONTEXT_COLUMNS)
                ),
            ]
            if log.rating is not None:
                arrays.append(pa.array(log.rating[rows]))
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    return report
