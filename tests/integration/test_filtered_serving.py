"""Business filters through the real stack: the gateway builds the mask, tritonserver's scorer (the
exported ONNX graph, in both ensembles) applies it before top-k.

The tiny model of `test_serving` on a slice of real MovieLens-1M (categories are genre lists,
"Animation|Children's|Comedy"); the gateway allows a k as large as the catalogue, so the
unfiltered ranking of every item is there to compare each filtered list with.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.gen.ltrec.v1 import recommender_pb2
from tests.support.stack import Stack, _request, started_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PB = recommender_pb2
K = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("filters")
    with started_stack(root, triton_build_dir, gateway_env={"LTREC_MAX_K": "100000"}) as stack:
        yield stack


def ranked(reply: PB.RecommendResponse | PB.SimilarItemsResponse) -> list[tuple[str, float]]:
    return [(item.item_id, item.score) for item in reply.items]


def restricted(full: list[tuple[str, float]], passes: set[str], k: int) -> list[tuple[str, float]]:
    return [(item_id, score) for item_id, score in full if item_id in passes][:k]


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-5)


def first_genres(stack: Stack) -> dict[str, set[str]]:
    """First genre of each item's category path -> the items whose path starts with it."""
    groups: dict[str, set[str]] = {}
    columns = (stack.catalogue["item_id"], stack.catalogue["category"])
    for item_id, category in zip(*columns, strict=True):
        if category:
            groups.setdefault(category.split("|")[0], set()).add(item_id)
    return groups


def test_a_restrictive_filter_returns_k_items_in_the_unfiltered_order(stack: Stack) -> None:
    full = ranked(stack.stub.Recommend(_request(stack.history, k=100_000), timeout=30))
    assert len(full) == len(stack.catalogue) - len(set(stack.history))
    # The rarest first genre that still has enough items for a k beyond what the unfiltered top
    # k holds of it.
    groups = first_genres(stack)
    genre, passes = min(
        ((g, items) for g, items in groups.items() if len(items) >= 3 * K),
        key=lambda pair: len(pair[1]),
    )
    print(f"\nfilter: category {genre!r}, {len(passes)} of {len(full)} items")
    top = {item_id for item_id, _ in full[:K]}
    assert len(top & passes) < K  # a post-filter of the unfiltered top k would be short

    request = _request(stack.history, k=K, filter=PB.ItemFilter(categories=[genre]))
    got = ranked(stack.stub.Recommend(request, timeout=10))
    assert len(got) == K
    assert_same_ranking(got, restricted(full, passes, K))

    # Two fields at once (AND), one of them a list of values (OR); and the deny list.
    other = sorted(groups, key=lambda g: -len(groups[g]))[0]
    denied = [i for i, _ in restricted(full, passes | groups[other], 2)]
    request.filter.CopyFrom(PB.ItemFilter(categories=[genre, other.upper()], deny_item_ids=denied))
    got = ranked(stack.stub.Recommend(request, timeout=10))
    assert len(got) == K
    assert_same_ranking(got, restricted(full, (passes | groups[other]) - set(denied), K))


def test_fewer_items_passing_than_k_returns_those(stack: Stack) -> None:
    full = ranked(stack.stub.Recommend(_request(stack.history, k=100_000), timeout=30))
    allowed = [full[-1][0], full[len(full) // 2][0], stack.history[-1]]  # the history never
    request = _request(stack.history, k=K, filter=PB.ItemFilter(allow_item_ids=allowed))
    got = ranked(stack.stub.Recommend(request, timeout=10))
    assert_same_ranking(got, restricted(full, set(allowed), K))
    assert len(got) == 2


def test_similar_items_take_the_filter_inside_the_scorer_too(stack: Stack) -> None:
    query = stack.history[-1]
    full = ranked(stack.stub.SimilarItems(PB.SimilarItemsRequest(item_id=query, k=100_000)))
    groups = first_genres(stack)
    genre = min((g for g in groups if len(groups[g]) >= 2 * K), key=lambda g: len(groups[g]))
    request = PB.SimilarItemsRequest(item_id=query, k=K, filter=PB.ItemFilter(categories=[genre]))
    got = ranked(stack.stub.SimilarItems(request, timeout=10))
    assert len(got) == K
    assert_same_ranking(got, restricted(full, groups[genre] - {query}, K))


def test_unknown_values_are_invalid_arguments_naming_them(stack: Stack) -> None:
    cases = {
        "filter.brands[0] 'Acme' is not the brand of any item in the catalogue": PB.ItemFilter(
            brands=["Acme"]  # ML-1M has no brands
        ),
        "filter.categories[0] 'Comedy|Nothing' is not the category": PB.ItemFilter(
            categories=["Comedy|Nothing"]
        ),
        "filter.allow_item_ids[0] 'no-such-film' is not in the catalogue": PB.ItemFilter(
            allow_item_ids=["no-such-film"]
        ),
        "filter.price_buckets[0] must be PRICE_BUCKET_BUDGET": PB.ItemFilter(price_buckets=[0]),
    }
    for message, item_filter in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            stack.stub.Recommend(_request(stack.history, filter=item_filter), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()


def test_available_only_leaves_out_items_upserted_as_unavailable(stack: Stack) -> None:
    """UpsertItems (MiniLM in Triton) with `available`; the new items' category is filterable."""
    items = [
        PB.Item(item_id="space-1", title="Space Station (2031)", category="Sci-Fi|Space"),
        PB.Item(
            item_id="space-2",
            title="Space Station 2 (2032)",
            category="Sci-Fi|Space",
            available=False,
        ),
    ]
    reply = stack.stub.UpsertItems(PB.UpsertItemsRequest(items=items), timeout=120)
    assert reply.upserted == 2
    space = PB.ItemFilter(categories=["sci-fi|space"])
    request = _request(stack.history, k=K, filter=space)
    assert sorted(i for i, _ in ranked(stack.stub.Recommend(request, timeout=10))) == [
        "space-1",
        "space-2",
    ]
    request.filter.available_only = True
    assert [i for i, _ in ranked(stack.stub.Recommend(request, timeout=10))] == ["space-1"]
    # Over the whole catalogue: every item but the unavailable one, in the unfiltered order.
    full = ranked(stack.stub.Recommend(_request(stack.history, k=100_000), timeout=30))
    available = PB.ItemFilter(available_only=True)
    got = ranked(
        stack.stub.Recommend(_request(stack.history, k=100_000, filter=available), timeout=30)
    )
    assert_same_ranking(got, [(i, s) for i, s in full if i != "space-2"])
