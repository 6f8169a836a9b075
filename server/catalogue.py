"""The model repository files the gateway reads once at start: metadata and item catalogue.

Both are written by the export next to the Triton models, so that the ids the gateway maps and the
indices the models were trained on come from the same export. Anything missing or malformed fails
start-up with the file named, never a request later.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server import contract
from server.errors import StartupError

CATALOGUE_HEADER = ("index", "item_id", "title", "popularity", "long_tail")


class ModelRepositoryError(StartupError):
    """A model repository file the gateway needs is missing or malformed."""


@dataclass(frozen=True)
class ModelMetadata:
    model_version: str
    max_history: int
    default_long_tail_weight: float
    long_tail_weight_max: float
    event_types: tuple[str, ...]
    # Normalised label -> bucket (1 + position in the exported vocabulary); 0 means unknown.
    device_buckets: dict[str, int]
    region_buckets: dict[str, int]


@dataclass(frozen=True)
class Catalogue:
    """Items by catalogue index; position 0 is the padding index and holds no item."""

    item_ids: list[str]
    titles: list[str]
    popularity: npt.NDArray[np.int64]
    long_tail: npt.NDArray[np.bool_]
    index_of: dict[str, int]

    @property
    def size(self) -> int:
        """N, the number of real items (indices 1..N)."""
        return len(self.item_ids) - 1


def load_model_repository(directory: Path) -> tuple[ModelMetadata, Catalogue]:
    return (
        load_metadata(directory / contract.METADATA_FILE),
        load_catalogue(directory / contract.CATALOGUE_FILE),
    )


def load_metadata(path: Path) -> ModelMetadata:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelRepositoryError(f"{path}: file not found (run the export first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelRepositoryError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelRepositoryError(f"{path}: expected a JSON object")

    def fail(message: str) -> ModelRepositoryError:
        return ModelRepositoryError(f"{path}: {message}")

    def number(key: str) -> float:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise fail(f"{key} must be finite, got {value!r}")
        return float(value)

    model_version = raw.get("model_version")
    if not isinstance(model_version, str) or not model_version:
        raise fail(f"model_version must be a non-empty string, got {model_version!r}")
    max_history = raw.get("max_history")
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise fail(f"max_history must be an integer >= 1, got {max_history!r}")
    default_weight = number("default_long_tail_weight")
    weight_max = number("long_tail_weight_max")
    if not 0 <= default_weight <= weight_max:
        raise fail(
            f"default_long_tail_weight must be in [0, long_tail_weight_max={weight_max:g}], "
            f"got {default_weight:g}"
        )
    vocabularies = raw.get("vocabularies")
    if not isinstance(vocabularies, dict):
        raise fail("vocabularies must be an object with event_types, device and region")

    def vocabulary(name: str) -> list[str]:
        values = vocabularies.get(name)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise fail(f"vocabularies.{name} must be a list of strings, got {values!r}")
        return values

    event_types = tuple(vocabulary("event_types"))
    if event_types != contract.EVENT_TYPES:
        raise fail(
            f"vocabularies.event_types must be {list(contract.EVENT_TYPES)} "
            f"(server/contract.py), got {list(event_types)}"
        )
    return ModelMetadata(
        model_version=model_version,
        max_history=max_history,
        default_long_tail_weight=default_weight,
        long_tail_weight_max=weight_max,
        event_types=event_types,
        device_buckets=_buckets(vocabulary("device")),
        region_buckets=_buckets(vocabulary("region")),
    )


def _buckets(vocabulary: list[str]) -> dict[str, int]:
    # The first occurrence wins should the export ever repeat a label.
    buckets: dict[str, int] = {}
    for position, label in enumerate(vocabulary):
        buckets.setdefault(label, position + 1)
    return buckets


def load_catalogue(path: Path) -> Catalogue:
    """Parses `index,item_id,title,popularity,long_tail` rows (index 1..N, in order)."""
    item_ids = [""]
    titles = [""]
    popularity = [0]
    long_tail = [False]
    index_of: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != CATALOGUE_HEADER:
                raise ModelRepositoryError(
                    f"{path}: header must be {','.join(CATALOGUE_HEADER)}, got {header!r}"
                )
            for expected, row in enumerate(reader, start=1):
                where = f"{path}: line {reader.line_num}"
                if len(row) != 5:
                    raise ModelRepositoryError(f"{where}: expected 5 fields, got {len(row)}")
                index, item_id, title, pop, flag = row
                try:
                    if int(index) != expected:
                        raise ModelRepositoryError(
                            f"{where}: index must be {expected} (1..N in order), got {index!r}"
                        )
                    popularity.append(int(pop))
                except ValueError:
                    raise ModelRepositoryError(
                        f"{where}: index and popularity must be integers, got {index!r}, {pop!r}"
                    ) from None
                if flag not in ("0", "1"):
                    raise ModelRepositoryError(f"{where}: long_tail must be 0 or 1, got {flag!r}")
                if not item_id:
                    raise ModelRepositoryError(f"{where}: item_id must be non-empty")
                if item_id in index_of:
                    raise ModelRepositoryError(f"{where}: duplicate item_id {item_id!r}")
                index_of[item_id] = expected
                item_ids.append(item_id)
                titles.append(title)
                long_tail.append(flag == "1")
    except FileNotFoundError:
        raise ModelRepositoryError(f"{path}: file not found (run the export first)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ModelRepositoryError(f"{path}: cannot read CSV: {exc}") from None
    if len(item_ids) == 1:
        raise ModelRepositoryError(f"{path}: no items")
    return Catalogue(
        item_ids=item_ids,
        titles=titles,
        popularity=np.asarray(popularity, dtype=np.int64),
        long_tail=np.asarray(long_tail, dtype=np.bool_),
        index_of=index_of,
    )


def describe(metadata: ModelMetadata, catalogue: Catalogue) -> dict[str, Any]:
    """What start-up logs about the repository it loaded (no item ids)."""
    return {
        "model_version": metadata.model_version,
        "items": catalogue.size,
        "long_tail_items": int(catalogue.long_tail.sum()),
        "max_history": metadata.max_history,
    }
