"""The model repository files the gateway reads once at start: metadata and item catalogue.

Both are written by the export next to the Triton models, so that the ids the gateway maps and the
indices the models were trained on come from the same export. Anything missing or malformed fails
start-up with the file named, never a request later. Items added after training (the item
overlay of `server.stores.items`) extend a `Catalogue` with `Catalogue.with_overlay`. The
catalogue's category, brand and price bucket columns, with each item's availability, are what the
business filters compare (`server.item_filter.ItemFacets`).
"""

from __future__ import annotations

import csv
import dataclasses
from collections import ChainMap
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ltrec_core import contract
from ltrec_core.artifacts import ArtifactError, RepositoryMetadata, read_repository_metadata
from ltrec_core.context import vocabulary_buckets
from ltrec_core.item_text import PRICE_BUCKETS
from server.errors import StartupError
from server.item_filter import FacetRow, ItemFacets

CATALOGUE_HEADER = contract.CATALOGUE_COLUMNS


class ModelRepositoryError(StartupError):
    """A model repository file the gateway needs is missing or malformed."""


@dataclass(frozen=True)
class ModelMetadata:
    model_version: str
    max_history: int
    # The weight a request without one gets: Recommend's and SimilarItems' scores differ in scale
    # (user-item vs item-item dot products), so each has its own, chosen on validation.
    default_long_tail_weight: float
    similar_items_default_long_tail_weight: float
    long_tail_weight_max: float
    event_types: tuple[str, ...]
    # Normalised label -> bucket (1 + position in the exported vocabulary); 0 means unknown.
    device_buckets: dict[str, int]
    region_buckets: dict[str, int]
    embedding_dim: int = 64
    # Tokens of item text the item text encoder reads (the training setting).
    text_max_tokens: int = 64
    # The item lookup pools a basket (SimilarItems' basket_item_ids); False for a repository
    # exported before it, whose basket requests are refused.
    basket_lookup: bool = False
    # The repository has the audience ensemble (Audience, ForecastDemand).
    audience: bool = False
    # The most rows one Recommend or SimilarItems ensemble call takes: the coalescer's bound.
    max_batch_rows: int = contract.MAX_BATCH_SIZE
    # The hash of the repository's files (`ltrec_core.artifacts.content_hash`); "" when exported
    # before it. With the version, what Triton must serve for this gateway to be SERVING.
    content_hash: str = ""

    @classmethod
    def from_repository(cls, metadata: RepositoryMetadata) -> ModelMetadata:
        """What the gateway serves with, from the repository's metadata file."""
        vocabularies = metadata.vocabularies
        return cls(
            model_version=metadata.model_version,
            max_history=metadata.max_history,
            default_long_tail_weight=metadata.default_long_tail_weight,
            similar_items_default_long_tail_weight=metadata.similar_items_default_long_tail_weight,
            long_tail_weight_max=metadata.long_tail_weight_max,
            event_types=tuple(vocabularies.event_types),
            device_buckets=vocabulary_buckets(vocabularies.device),
            region_buckets=vocabulary_buckets(vocabularies.region),
            embedding_dim=metadata.embedding_dim,
            text_max_tokens=metadata.text_max_tokens,
            basket_lookup=metadata.basket_lookup,
            audience=metadata.audience,
            max_batch_rows=metadata.max_batch_rows,
            content_hash=metadata.content_hash,
        )


def _no_vectors() -> npt.NDArray[np.float32]:
    return np.zeros((0, 0), dtype=np.float32)


@dataclass(frozen=True)
class Catalogue:
    """Items by catalogue index; position 0 is the padding index and holds no item.

    Indices 1..N are the trained catalogue (`trained_size` N); N+1..N+M are items added after
    training, whose vectors (`extra_vectors`, [M, D]) and popularity go to Triton with every
    request (`extra_popularity`: their interaction counts, for the long-tail term). `hidden`
    holds indices never to return (deleted, or replaced by an added item). `facets` are the
    fields business filters compare, for every index 0..N+M; `unserved_ids` the ids of added
    items the item store knows but does not serve now (deleted, or waiting to be re-encoded),
    which filters accept and no item passes.
    """

    item_ids: list[str]
    titles: list[str]
    popularity: npt.NDArray[np.int64]
    long_tail: npt.NDArray[np.bool_]
    index_of: Mapping[str, int]
    trained_size: int = -1
    extra_vectors: npt.NDArray[np.float32] = field(default_factory=_no_vectors)
    extra_popularity: npt.NDArray[np.float32] = field(
        default_factory=lambda: np.zeros(0, dtype=np.float32)
    )
    hidden: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    facets: ItemFacets = field(default_factory=ItemFacets.empty)
    unserved_ids: Set[str] = frozenset()

    @property
    def size(self) -> int:
        """N + M, the number of real items (indices 1..N+M)."""
        return len(self.item_ids) - 1

    def is_hidden(self, index: int) -> bool:
        return bool(self.hidden.size) and bool(np.isin(index, self.hidden))

    def with_overlay(
        self,
        item_ids: list[str],
        titles: list[str],
        vectors: npt.NDArray[np.float32],
        popularity: npt.NDArray[np.int64],
        long_tail: npt.NDArray[np.bool_],
        hidden: npt.NDArray[np.int64],
        facets: Sequence[FacetRow] = (),
        unserved_ids: Iterable[str] = (),
    ) -> Catalogue:
        """This trained catalogue plus added items as indices N+1..N+M; an added id shadows a
        trained one (whose index should then be hidden). `facets`: the added items' fields
        (default: none, available)."""
        n = self.trained_size
        if self.size != n:
            raise ValueError("with_overlay extends the trained catalogue, not an overlay")
        rows = list(facets) or [FacetRow()] * len(item_ids)
        if len(rows) != len(item_ids):
            raise ValueError(f"{len(rows)} facet rows for {len(item_ids)} added items")
        base = slice(0, n + 1)
        return Catalogue(
            item_ids=self.item_ids[base] + item_ids,
            titles=self.titles[base] + titles,
            popularity=np.concatenate([self.popularity[base], popularity.astype(np.int64)]),
            long_tail=np.concatenate([self.long_tail[base], long_tail.astype(np.bool_)]),
            index_of=ChainMap(
                {item_id: n + 1 + j for j, item_id in enumerate(item_ids)},
                self.index_of,  # type: ignore[arg-type]
            ),
            trained_size=n,
            extra_vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            extra_popularity=popularity.astype(np.float32),
            hidden=np.unique(hidden.astype(np.int64)),
            facets=self.facets.extend(rows),
            unserved_ids=frozenset(unserved_ids),
        )


def load_model_repository(directory: Path) -> tuple[ModelMetadata, Catalogue]:
    metadata = load_metadata(directory / contract.METADATA_FILE)
    catalogue = load_catalogue(directory / contract.CATALOGUE_FILE)
    # No items added yet: an empty overlay of the model's width ([0, D] on the wire).
    empty = np.zeros((0, metadata.embedding_dim), dtype=np.float32)
    return metadata, dataclasses.replace(catalogue, extra_vectors=empty)


def load_metadata(path: Path) -> ModelMetadata:
    try:
        return ModelMetadata.from_repository(read_repository_metadata(path))
    except ArtifactError as exc:
        raise ModelRepositoryError(str(exc)) from None


def load_catalogue(path: Path) -> Catalogue:
    """Parses `contract.CATALOGUE_COLUMNS` rows (index 1..N, in order)."""
    item_ids = [""]
    titles = [""]
    popularity = [0]
    long_tail = [False]
    rows: list[FacetRow] = []
    index_of: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != CATALOGUE_HEADER:
                raise ModelRepositoryError(
                    f"{path}: header must be {','.join(CATALOGUE_HEADER)}, got {header!r} "
                    "(exported before the item fields were: re-run the export)"
                )
            for expected, row in enumerate(reader, start=1):
                where = f"{path}: line {reader.line_num}"
                if len(row) != len(CATALOGUE_HEADER):
                    raise ModelRepositoryError(
                        f"{where}: expected {len(CATALOGUE_HEADER)} fields, got {len(row)}"
                    )
                index, item_id, title, pop, flag, category, brand, price = row
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
                if price and price not in PRICE_BUCKETS:
                    raise ModelRepositoryError(
                        f"{where}: price_bucket must be empty or one of "
                        f"{', '.join(PRICE_BUCKETS)}, got {price!r}"
                    )
                if not item_id:
                    raise ModelRepositoryError(f"{where}: item_id must be non-empty")
                if item_id in index_of:
                    raise ModelRepositoryError(f"{where}: duplicate item_id {item_id!r}")
                index_of[item_id] = expected
                item_ids.append(item_id)
                titles.append(title)
                long_tail.append(flag == "1")
                rows.append(FacetRow(category=category, brand=brand, price_bucket=price))
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
        trained_size=len(item_ids) - 1,
        facets=ItemFacets.of(rows),
    )


def describe(metadata: ModelMetadata, catalogue: Catalogue) -> dict[str, Any]:
    """What start-up logs about the repository it loaded (no item ids)."""
    return {
        "model_version": metadata.model_version,
        "items": catalogue.size,
        "long_tail_items": int(catalogue.long_tail.sum()),
        "max_history": metadata.max_history,
        "default_long_tail_weight": metadata.default_long_tail_weight,
        "similar_items_default_long_tail_weight": metadata.similar_items_default_long_tail_weight,
    }
