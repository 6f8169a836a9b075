"""Business filters (ItemFilter): the eligibility mask, its errors, and the ranking it gives.

The mask is built by `server.item_filter` from the catalogue file's fields and the item store's
availability; the gateway runs in-process against `ScorerGraphs`, which runs the export's own
scorer graph, so "k items whenever k pass, in the unfiltered order" is checked on the real mask
semantics. `tests/integration/test_filtered_serving.py` does the same through tritonserver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from ltrec_core import contract
from ltrec_core.records import item_record_from_json
from server.catalogue import load_model_repository
from server.errors import InvalidArgument
from server.gen.ltrec.v1 import recommender_pb2
from server.item_filter import NO_FILTER, eligibility
from tests.support.gateway import ITEMS, run_async, running_gateway, write_repository
from tests.support.scorer import ScorerGraphs

N = len(ITEMS)
PB = recommender_pb2
BUDGET, MID, PREMIUM = (
    PB.PRICE_BUCKET_BUDGET,
    PB.PRICE_BUCKET_MID_RANGE,
    PB.PRICE_BUCKET_PREMIUM,
)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "model_repository")


def passing(item_filter: PB.ItemFilter, repository: Path) -> set[int]:
    _, catalogue = load_model_repository(repository)
    mask = eligibility(item_filter, catalogue)
    assert mask.dtype == np.bool_ and mask.shape == (1, N + 1)
    assert not mask[0, contract.PADDING_INDEX]
    return set(np.flatnonzero(mask[0]).tolist())


# The catalogue's fields (tests.support.gateway.ITEM_FIELDS):
#   i1 Films|Animation|Children's  Pixar      budget
#   i2 Films|Action|Crime          Warner     premium
#   i3 Films|Crime|Drama           Universal  mid-range
#   i4 Films|Comedy|Romance        Paramount  budget
#   i5 Films|Drama                 -          -
#   i6 Films|Animation|Children's  Universal  premium
FILTERS: dict[str, tuple[dict[str, Any], set[int]]] = {
    "category prefix": ({"categories": ["Films|Animation"]}, {1, 6}),
    "whole path, any case and spacing": (
        {"categories": [" films | ANIMATION|children's "]},
        {1, 6},
    ),
    "the root": ({"categories": ["Films"]}, {1, 2, 3, 4, 5, 6}),
    # A prefix, not a part anywhere: i2's "Films|Action|Crime" is not under "Films|Crime".
    "any of two categories": ({"categories": ["Films|Crime", "Films|Drama"]}, {3, 5}),
    "brand": ({"brands": ["universal"]}, {3, 6}),
    "price bucket": ({"price_buckets": [BUDGET]}, {1, 4}),
    "any of two price buckets": ({"price_buckets": [BUDGET, PREMIUM]}, {1, 2, 4, 6}),
    "every field must hold": (
        {"categories": ["Films|Animation"], "brands": ["Universal"]},
        {6},
    ),
    "allow list": ({"allow_item_ids": ["i2", "i5"]}, {2, 5}),
    "deny list": ({"deny_item_ids": ["i1"]}, {2, 3, 4, 5, 6}),
    "deny wins over allow": ({"allow_item_ids": ["i1", "i2"], "deny_item_ids": ["i2"]}, {1}),
    "available: every trained item": ({"available_only": True}, {1, 2, 3, 4, 5, 6}),
    "nothing passes": ({"brands": ["Pixar"], "price_buckets": [PREMIUM]}, set()),
}


@pytest.mark.parametrize("case", FILTERS.values(), ids=FILTERS.keys())
def test_each_filter_field_lets_its_items_pass(
    repository: Path, case: tuple[dict[str, Any], set[int]]
) -> None:
    fields, expected = case
    assert passing(PB.ItemFilter(**fields), repository) == expected


def test_an_empty_filter_sends_one_true_that_the_scorer_broadcasts(repository: Path) -> None:
    _, catalogue = load_model_repository(repository)
    mask = eligibility(PB.ItemFilter(), catalogue)
    assert mask is NO_FILTER and mask.tolist() == [[True]]


UNKNOWN_VALUES = {
    "category": (
        {"categories": ["Films|Anim"]},
        "filter.categories[0] 'Films|Anim' is not the category of any item in the catalogue, "
        "nor the start of one",
    ),
    "category deeper than any": (
        {"categories": ["Films", "Films|Drama|Noir"]},
        "filter.categories[1] 'Films|Drama|Noir' is not the category",
    ),
    "brand": (
        {"brands": ["Universal", "Acme"]},
        "filter.brands[1] 'Acme' is not the brand of any item in the catalogue",
    ),
    "allowed id": (
        {"allow_item_ids": ["i1", "nope"]},
        "filter.allow_item_ids[1] 'nope' is not in the catalogue",
    ),
    "denied id": ({"deny_item_ids": ["gone"]}, "filter.deny_item_ids[0] 'gone' is not in"),
}


@pytest.mark.parametrize("case", UNKNOWN_VALUES.values(), ids=UNKNOWN_VALUES.keys())
def test_a_value_no_item_has_is_an_invalid_argument_naming_it(
    repository: Path, case: tuple[dict[str, Any], str]
) -> None:
    fields, message = case
    with pytest.raises(InvalidArgument) as caught:
        passing(PB.ItemFilter(**fields), repository)
    assert message in str(caught.value)


# --- through the gateway and the real scorer graph -----------------------------------------------


def recommend(k: int, item_filter: PB.ItemFilter | None = None) -> PB.RecommendRequest:
    """A Recommend with i5 in the history (never returned)."""
    return PB.RecommendRequest(
        k=k,
        history=[PB.HistoryEvent(item_id="i5", event_type=PB.EVENT_TYPE_VIEW)],
        long_tail_weight=0.1,
        filter=item_filter,
    )


def ids(reply: PB.RecommendResponse | PB.SimilarItemsResponse) -> list[str]:
    return [item.item_id for item in reply.items]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"ltrec_gateway_{name}", labels) or 0.0


ORDER_FILTERS = [
    PB.ItemFilter(brands=["Universal", "Warner"]),
    PB.ItemFilter(price_buckets=[BUDGET, MID]),
    PB.ItemFilter(categories=["Films|Animation", "Films|Comedy"]),
    PB.ItemFilter(deny_item_ids=["i2", "i4"]),
    PB.ItemFilter(allow_item_ids=["i6", "i4", "i1"]),
]


@run_async
async def test_a_filtered_recommend_is_the_unfiltered_ranking_restricted(
    repository: Path,
) -> None:
    """k items whenever k pass, in the order (and with the scores) of the unfiltered ranking,
    where a post-filter of the unfiltered top k would have returned fewer."""
    item_id_of = {index: row[0] for index, row in enumerate(ITEMS, start=1)}
    async with running_gateway(repository, ScorerGraphs()) as gw:
        full = await gw.stub.Recommend(recommend(N), timeout=5)
        assert sorted(ids(full)) == ["i1", "i2", "i3", "i4", "i6"]  # all but the history
        score = {item.item_id: item.score for item in full.items}
        post_filter_short = 0
        for item_filter in ORDER_FILTERS:
            allowed = {item_id_of[i] for i in passing(item_filter, repository)}
            expected = [i for i in ids(full) if i in allowed]
            k = len(expected)
            assert k >= 2, item_filter
            reply = await gw.stub.Recommend(recommend(k, item_filter), timeout=5)
            assert ids(reply) == expected, item_filter
            assert [i.score for i in reply.items] == [score[i] for i in expected]
            post_filter_short += len([i for i in ids(full)[:k] if i in allowed]) < k
        assert post_filter_short >= 2  # the filters above are not all satisfied by the top k


@run_async
async def test_fewer_than_k_passing_returns_those_and_is_counted(repository: Path) -> None:
    short_before = metric("filter_short_results_total", method="Recommend")
    allow_before = metric("filtered_requests_total", method="Recommend", field="allow")
    brand_before = metric("filtered_requests_total", method="Recommend", field="brand")
    async with running_gateway(repository, ScorerGraphs()) as gw:
        reply = await gw.stub.Recommend(
            recommend(5, PB.ItemFilter(allow_item_ids=["i2", "i5"])), timeout=5
        )
        # i5 passes the filter but is the history: only i2 is left.
        assert ids(reply) == ["i2"]
        mask = gw.fake.ranking_calls()[-1].inputs[contract.ITEM_ELIGIBLE]
        assert mask.dtype == np.bool_ and np.flatnonzero(mask[0]).tolist() == [2, 5]
        unfiltered = await gw.stub.Recommend(recommend(5), timeout=5)
        assert len(unfiltered.items) == 5
    assert metric("filter_short_results_total", method="Recommend") == short_before + 1
    assert metric("filtered_requests_total", method="Recommend", field="allow") == allow_before + 1
    assert metric("filtered_requests_total", method="Recommend", field="brand") == brand_before


@run_async
async def test_similar_items_take_the_same_filter(repository: Path) -> None:
    async with running_gateway(repository, ScorerGraphs()) as gw:
        request = PB.SimilarItemsRequest(item_id="i1", k=N)
        full = ids(await gw.stub.SimilarItems(request, timeout=5))
        assert sorted(full) == ["i2", "i3", "i4", "i5", "i6"]  # never the query
        request.filter.price_buckets[:] = [BUDGET, PREMIUM]  # i1 (the query), i2, i4, i6
        request.k = 3
        reply = await gw.stub.SimilarItems(request, timeout=5)
        assert ids(reply) == [i for i in full if i in {"i2", "i4", "i6"}]
        sent = gw.fake.ranking_calls(contract.SIMILAR_ITEMS_MODEL)[-1].inputs
        assert np.flatnonzero(sent[contract.ITEM_ELIGIBLE][0]).tolist() == [1, 2, 4, 6]
        request.filter.brands[:] = ["Nobody"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.SimilarItems(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (
            "filter.brands[0] 'Nobody' is not the brand of any item in the catalogue"
        )


# --- availability (UpsertItems) ------------------------------------------------------------------


def new_item(item_id: str, **fields: Any) -> PB.Item:
    return PB.Item(item_id=item_id, title=f"Film {item_id}", category="Films|Space", **fields)


@run_async
async def test_available_only_leaves_out_items_upserted_as_unavailable_and_it_persists(
    repository: Path,
) -> None:
    available = PB.ItemFilter(available_only=True)
    async with running_gateway(repository, ScorerGraphs()) as gw:
        await gw.stub.UpsertItems(
            PB.UpsertItemsRequest(
                items=[
                    new_item("out-of-stock", available=False),
                    new_item("in-stock"),  # unset: available
                    new_item("i3", brand="Universal", available=False),  # a trained item
                ]
            ),
            timeout=5,
        )
        everything = ids(await gw.stub.Recommend(recommend(20), timeout=5))
        assert {"out-of-stock", "in-stock", "i3"} <= set(everything)
        reply = await gw.stub.Recommend(recommend(20, available), timeout=5)
        assert ids(reply) == [i for i in everything if i not in {"out-of-stock", "i3"}]
        # The new items' fields are filterable too.
        space = PB.ItemFilter(categories=["films|space"], available_only=True)
        assert ids(await gw.stub.Recommend(recommend(20, space), timeout=5)) == ["in-stock"]

    # A restarted gateway reads availability back from the item store.
    async with running_gateway(repository, ScorerGraphs()) as gw:
        assert ids(await gw.stub.Recommend(recommend(20, available), timeout=5)) == ids(reply)
        # Upserted again as available (or with it unset): back.
        await gw.stub.UpsertItems(
            PB.UpsertItemsRequest(items=[new_item("out-of-stock", available=True)]), timeout=5
        )
        again = ids(await gw.stub.Recommend(recommend(20, available), timeout=5))
        assert "out-of-stock" in again and "i3" not in again

    records = [
        json.loads(line)
        for segment in (repository.parent / "items").glob("items-*.jsonl")
        for line in segment.read_text().splitlines()
    ]
    records.sort(key=lambda r: (r["ts"], r["segment"], r["line"]))
    assert [(r["item_id"], r["available"]) for r in records] == [
        ("out-of-stock", False),
        ("in-stock", True),
        ("i3", False),
        ("out-of-stock", True),
    ]


@run_async
async def test_an_added_item_since_deleted_is_known_to_filters_and_passes_none(
    repository: Path,
) -> None:
    """Allow and deny lists written before a deletion still work; a never-seen id does not."""
    async with running_gateway(repository, ScorerGraphs()) as gw:
        await gw.stub.UpsertItems(PB.UpsertItemsRequest(items=[new_item("gone")]), timeout=5)
        await gw.stub.DeleteItems(PB.DeleteItemsRequest(item_ids=["gone", "i4"]), timeout=5)
        allow = PB.ItemFilter(allow_item_ids=["gone", "i4", "i2"])  # i4: trained, deleted
        assert ids(await gw.stub.Recommend(recommend(5, allow), timeout=5)) == ["i2"]
        deny = PB.ItemFilter(deny_item_ids=["gone", "i4"])
        assert len((await gw.stub.Recommend(recommend(5, deny), timeout=5)).items) == 4
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(
                recommend(5, PB.ItemFilter(deny_item_ids=["gone", "never"])), timeout=5
            )
        assert caught.value.details() == "filter.deny_item_ids[1] 'never' is not in the catalogue"


def test_an_item_record_written_before_availability_reads_as_available() -> None:
    line = {
        "kind": "item_upsert",
        "item_id": "old",
        "title": "Old",
        "ts": 1.0,
        "replica": "a",
        "segment": 1,
        "line": 1,
    }
    assert item_record_from_json(line).available is True  # type: ignore[union-attr]
    assert item_record_from_json({**line, "available": False}).available is False  # type: ignore[union-attr]


# --- bounds ----------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def with_unknown_field(field_number: int) -> PB.ItemFilter:
    """A filter as a newer client would send it: a field this gateway's proto does not have
    (here a varint field holding 1)."""
    item_filter = PB.ItemFilter(brands=["Universal"])
    item_filter.MergeFromString(varint(field_number << 3) + varint(1))
    return item_filter


BAD_FILTERS: dict[str, tuple[PB.ItemFilter, str]] = {
    "too many categories": (
        PB.ItemFilter(categories=["Films"] * 65),
        "filter.categories must have at most 64 values, got 65",
    ),
    "a category too long": (
        PB.ItemFilter(categories=["Films", "x" * 513]),
        "filter.categories[1] must be at most 512 characters, got 513",
    ),
    "an empty category path": (
        PB.ItemFilter(categories=[" | "]),
        "filter.categories[0] must be non-empty (not only spaces or '|')",
    ),
    "too many brands": (
        PB.ItemFilter(brands=["b"] * 65),
        "filter.brands must have at most 64 values, got 65",
    ),
    "a blank brand": (PB.ItemFilter(brands=["  "]), "filter.brands[0] must be non-empty"),
    "unspecified price bucket": (
        PB.ItemFilter(price_buckets=[PB.PRICE_BUCKET_UNSPECIFIED]),
        "filter.price_buckets[0] must be PRICE_BUCKET_BUDGET, PRICE_BUCKET_MID_RANGE or "
        "PRICE_BUCKET_PREMIUM, got 0",
    ),
    "undefined price bucket": (
        PB.ItemFilter(price_buckets=[BUDGET, 7]),  # type: ignore[list-item]
        "filter.price_buckets[1] must be PRICE_BUCKET_BUDGET",
    ),
    "too many price buckets": (
        PB.ItemFilter(price_buckets=[BUDGET, MID, PREMIUM, BUDGET]),
        "filter.price_buckets must have at most 3 values, got 4",
    ),
    "too many allowed ids": (
        PB.ItemFilter(allow_item_ids=["i1", "i2", "i3", "i4"]),
        "filter.allow_item_ids must have at most 3 ids, got 4",
    ),
    "an empty denied id": (
        PB.ItemFilter(deny_item_ids=["i1", ""]),
        "filter.deny_item_ids[1] must be non-empty",
    ),
    "a field this gateway does not know": (
        with_unknown_field(99),
        "filter has fields this gateway does not know (field numbers 99)",
    ),
}


@run_async
async def test_a_filter_out_of_bounds_is_an_invalid_argument_naming_the_field(
    repository: Path,
) -> None:
    fake = ScorerGraphs()
    async with running_gateway(repository, fake, max_filter_item_ids=3) as gw:
        for case, (item_filter, message) in BAD_FILTERS.items():
            for call in (
                gw.stub.Recommend(recommend(2, item_filter), timeout=5),
                gw.stub.SimilarItems(
                    PB.SimilarItemsRequest(item_id="i1", k=2, filter=item_filter), timeout=5
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
                assert message in caught.value.details(), (case, caught.value.details())
        assert not fake.calls  # nothing reached Triton
