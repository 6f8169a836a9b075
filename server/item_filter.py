"""Business filters: an `ItemFilter` becomes the scorer's eligibility mask (`item_eligible`).

The mask is applied inside Triton's scorer, before top-k, rather than to the k items it returns:
a post-filter would return short lists whenever the best k items happen not to pass, while a
mask returns k items whenever k pass, and leaves the scores, hence the order, of the items that
pass untouched. The gateway computes it because only the gateway knows the items added after
training (the overlay) and their availability; a filter on one of the catalogue's fields costs one
lookup table and one gather over the N + M items.

`ItemFacets` holds what filters compare, per catalogue index: category path, brand, price bucket
(as codes) and availability; the catalogue snapshot of a request carries them
(`server.catalogue.Catalogue.facets`). Values compare as `ltrec_core.item_attributes` normalises
them (case-insensitive, whitespace collapsed). A value no item has is InvalidArgument naming it:
a caller's typo must not read as "nothing matches".
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from ltrec_core.item_attributes import category_path, label
from ltrec_core.item_text import PRICE_BUCKETS
from server.errors import InvalidArgument
from server.gen.ltrec.v1 import recommender_pb2
from server.metrics import FILTER_FIELDS

# PriceBucket enum value -> price code (1 + position in PRICE_BUCKETS); 0 is "no price".
PRICE_CODES = {
    recommender_pb2.PRICE_BUCKET_BUDGET: 1,
    recommender_pb2.PRICE_BUCKET_MID_RANGE: 2,
    recommender_pb2.PRICE_BUCKET_PREMIUM: 3,
}
_PRICE_CODE_OF_NAME = {name: 1 + position for position, name in enumerate(PRICE_BUCKETS)}
# Every item passes: [1, 1], broadcast by the scorer over the catalogue.
NO_FILTER: npt.NDArray[np.bool_] = np.ones((1, 1), dtype=np.bool_)
NO_FILTER.setflags(write=False)
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True)
class FacetRow:
    """The fields of one item that filters compare, as stored ("" where missing)."""

    category: str = ""
    brand: str = ""
    price_bucket: str = ""  # one of PRICE_BUCKETS, or ""
    available: bool = True


@dataclass(frozen=True)
class ItemFacets:
    """Per catalogue index 0..N+M (0 is padding: no fields, not available): codes of the item's
    category path and brand (0: none), its price code (0: none) and availability; with the
    vocabularies requests are resolved against. Immutable: `extend` returns a new one that
    shares this one's vocabularies."""

    category_codes: npt.NDArray[np.int32]
    brand_codes: npt.NDArray[np.int32]
    price_codes: npt.NDArray[np.int8]
    available: npt.NDArray[np.bool_]
    # A full category path -> its code (1..n_paths).
    path_codes: Mapping[tuple[str, ...], int]
    # Every prefix of a known path -> the codes of the paths it starts.
    prefix_codes: Mapping[tuple[str, ...], tuple[int, ...]]
    # A brand label -> its code (1..n_brands).
    brand_code_of: Mapping[str, int]
    n_paths: int = 0
    n_brands: int = 0

    @classmethod
    def empty(cls) -> ItemFacets:
        """Only the padding row."""
        return cls(
            category_codes=np.zeros(1, dtype=np.int32),
            brand_codes=np.zeros(1, dtype=np.int32),
            price_codes=np.zeros(1, dtype=np.int8),
            available=np.zeros(1, dtype=np.bool_),
            path_codes={},
            prefix_codes={},
            brand_code_of={},
        )

    @classmethod
    def of(cls, rows: Sequence[FacetRow]) -> ItemFacets:
        """Indices 1..len(rows), in order."""
        return cls.empty().extend(rows)

    @property
    def size(self) -> int:
        """Rows, padding included (N + M + 1)."""
        return len(self.available)

    def extend(self, rows: Sequence[FacetRow]) -> ItemFacets:
        """These rows appended (the item overlay); vocabularies grow by what is new in them,
        without copying this one's (new entries in front of a ChainMap)."""
        new_paths: dict[tuple[str, ...], int] = {}
        new_prefixes: dict[tuple[str, ...], list[int]] = {}
        new_brands: dict[str, int] = {}
        categories = np.zeros(len(rows), dtype=np.int32)
        brands = np.zeros(len(rows), dtype=np.int32)
        prices = np.zeros(len(rows), dtype=np.int8)
        for j, row in enumerate(rows):
            path = category_path(row.category)
            if path:
                code = self.path_codes.get(path) or new_paths.get(path)
                if code is None:
                    code = new_paths[path] = self.n_paths + len(new_paths) + 1
                    for depth in range(1, len(path) + 1):
                        prefix = path[:depth]
                        if prefix not in new_prefixes:
                            new_prefixes[prefix] = list(self.prefix_codes.get(prefix, ()))
                        new_prefixes[prefix].append(code)
                categories[j] = code
            brand = label(row.brand)
            if brand:
                code = self.brand_code_of.get(brand) or new_brands.get(brand)
                if code is None:
                    code = new_brands[brand] = self.n_brands + len(new_brands) + 1
                brands[j] = code
            prices[j] = _PRICE_CODE_OF_NAME.get(row.price_bucket, 0)
        return ItemFacets(
            category_codes=np.concatenate([self.category_codes, categories]),
            brand_codes=np.concatenate([self.brand_codes, brands]),
            price_codes=np.concatenate([self.price_codes, prices]),
            available=np.concatenate(
                [self.available, np.asarray([row.available for row in rows], dtype=np.bool_)]
            ),
            path_codes=_layered(new_paths, self.path_codes),
            prefix_codes=_layered(
                {prefix: tuple(codes) for prefix, codes in new_prefixes.items()},
                self.prefix_codes,
            ),
            brand_code_of=_layered(new_brands, self.brand_code_of),
            n_paths=self.n_paths + len(new_paths),
            n_brands=self.n_brands + len(new_brands),
        )


class Filterable(Protocol):
    """What a filter is resolved against: a catalogue snapshot (`server.catalogue.Catalogue`)."""

    @property
    def facets(self) -> ItemFacets: ...

    @property
    def index_of(self) -> Mapping[str, int]: ...

    # Ids the item store knows that the snapshot does not serve (added, then deleted; or waiting
    # to be re-encoded after a rollout): known to filters, passing none.
    @property
    def unserved_ids(self) -> Set[str]: ...


def _layered(new: dict[_K, _V], old: Mapping[_K, _V]) -> Mapping[_K, _V]:
    """`new` in front of `old`, which is not copied (a ChainMap's bool() is any() of its maps)."""
    if not new:
        return old
    if not old:
        return new
    return ChainMap(new, *(old.maps if isinstance(old, ChainMap) else [old]))


def filter_fields(item_filter: recommender_pb2.ItemFilter) -> tuple[str, ...]:
    """The FILTER_FIELDS a (validated) filter sets; empty: it lets every item pass."""
    used = (
        bool(item_filter.categories),
        bool(item_filter.brands),
        bool(item_filter.price_buckets),
        item_filter.available_only,
        bool(item_filter.allow_item_ids),
        bool(item_filter.deny_item_ids),
    )
    return tuple(name for name, on in zip(FILTER_FIELDS, used, strict=True) if on)


def eligibility(
    item_filter: recommender_pb2.ItemFilter, catalogue: Filterable, field: str = "filter"
) -> npt.NDArray[np.bool_]:
    """The scorer's `item_eligible` for a validated filter: [1, N+M+1], True where the item
    passes, or `NO_FILTER` ([1, 1]) for an empty one. InvalidArgument names the first value no
    item has, e.g. `filter.brands[1]`."""
    if not filter_fields(item_filter):
        return NO_FILTER
    facets = catalogue.facets
    eligible = np.ones(facets.size, dtype=np.bool_)
    eligible[0] = False  # padding
    if item_filter.categories:
        wanted = np.zeros(facets.n_paths + 1, dtype=np.bool_)
        for position, category in enumerate(item_filter.categories):
            codes = facets.prefix_codes.get(category_path(category))
            if codes is None:
                raise InvalidArgument(
                    f"{field}.categories[{position}] {category!r} is not the category of any "
                    "item in the catalogue, nor the start of one"
                )
            wanted[list(codes)] = True
        eligible &= wanted[facets.category_codes]
    if item_filter.brands:
        wanted = np.zeros(facets.n_brands + 1, dtype=np.bool_)
        for position, brand in enumerate(item_filter.brands):
            code = facets.brand_code_of.get(label(brand))
            if code is None:
                raise InvalidArgument(
                    f"{field}.brands[{position}] {brand!r} is not the brand of any item in the "
                    "catalogue"
                )
            wanted[code] = True
        eligible &= wanted[facets.brand_codes]
    if item_filter.price_buckets:
        wanted = np.zeros(len(PRICE_BUCKETS) + 1, dtype=np.bool_)
        wanted[[PRICE_CODES[bucket] for bucket in item_filter.price_buckets]] = True
        eligible &= wanted[facets.price_codes]
    if item_filter.available_only:
        eligible &= facets.available
    if item_filter.allow_item_ids:
        allowed = np.zeros(facets.size, dtype=np.bool_)
        allowed[_indices(item_filter.allow_item_ids, catalogue, f"{field}.allow_item_ids")] = True
        eligible &= allowed
    if item_filter.deny_item_ids:
        eligible[_indices(item_filter.deny_item_ids, catalogue, f"{field}.deny_item_ids")] = False
    return eligible.reshape(1, -1)


def _indices(item_ids: Sequence[str], catalogue: Filterable, field: str) -> list[int]:
    """The served items' indices; an id the item store knows but the snapshot does not serve
    has none."""
    indices = []
    for position, item_id in enumerate(item_ids):
        index = catalogue.index_of.get(item_id)
        if index is not None:
            indices.append(index)
        elif item_id not in catalogue.unserved_ids:
            raise InvalidArgument(f"{field}[{position}] {item_id!r} is not in the catalogue")
    return indices
