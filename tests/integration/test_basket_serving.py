"""SimilarItems' basket mode through the real stack: the gateway sends the basket as one
`query_items` row, tritonserver's `similar_items` ensemble pools it (item_lookup) and scores it
(scorer), every basket item masked.

The tiny model of `test_serving` on a slice of real MovieLens-1M; a basket is the last items of a
real user's history.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from ltrec.checkpoint import load_checkpoint
from ltrec.models import ItemLookup, Scorer
from server.gen.ltrec.v1 import recommender_pb2
from tests.support.stack import Stack, started_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PB = recommender_pb2
K = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path) -> Iterator[Stack]:
    with started_stack(tmp_path_factory.mktemp("basket"), triton_build_dir) as stack:
        yield stack


def answer(reply: PB.SimilarItemsResponse) -> list[tuple[str, float, str]]:
    return [(item.item_id, item.score, item.reason) for item in reply.items]


def test_a_basket_returns_k_items_none_of_the_basket_ranked_as_torch_ranks_them(
    stack: Stack,
) -> None:
    basket = stack.history[-3:]
    reply = stack.stub.SimilarItems(PB.SimilarItemsRequest(basket_item_ids=basket, k=K), timeout=10)
    assert len(reply.items) == K
    assert not {item.item_id for item in reply.items} & set(basket)
    titles = dict(zip(stack.catalogue["item_id"], stack.catalogue["title"], strict=True))
    assert {item.reason for item in reply.items} <= {f'Similar to "{titles[i]}"' for i in basket}

    # The same items, scores and reasons as torch's ItemLookup (the basket's mean vector) and
    # Scorer, at the served SimilarItems default.
    model, ckpt = load_checkpoint(stack.repo.parent / "artifacts" / "checkpoint.pt")
    index = {item_id: i + 1 for i, item_id in enumerate(ckpt.item_ids)}
    weight = stack.metadata["similar_items_default_long_tail_weight"]
    query = torch.tensor([[index[i] for i in basket]])
    with torch.no_grad():
        table = model.item_table()
        pooled = ItemLookup(table)(query)
        scorer = Scorer(table, torch.from_numpy(np.asarray(ckpt.long_tail_counts)))
        items, scores, reasons = scorer(
            pooled, query, torch.zeros(1, 1, dtype=torch.long), torch.tensor([[weight]]), K
        )
    assert [index[item.item_id] for item in reply.items] == items[0].tolist()
    np.testing.assert_allclose([i.score for i in reply.items], scores[0], atol=1e-4)
    assert [item.reason for item in reply.items] == [
        f'Similar to "{titles[basket[p]]}"' for p in reasons[0].tolist()
    ]
    assert len({item.reason for item in reply.items}) > 1  # not always the same basket item


def test_a_basket_of_one_answers_as_its_item_id(stack: Stack) -> None:
    for query in stack.history[-2:]:
        for extra in ({}, {"long_tail_weight": 0.5, "exclude_item_ids": stack.history[:3]}):
            one = stack.stub.SimilarItems(
                PB.SimilarItemsRequest(item_id=query, k=K, **extra), timeout=10
            )
            basket = stack.stub.SimilarItems(
                PB.SimilarItemsRequest(basket_item_ids=[query], k=K, **extra), timeout=10
            )
            assert len(one.items) == K
            assert answer(basket) == answer(one)


def test_a_basket_with_an_added_item_and_its_errors(stack: Stack) -> None:
    """An item added by UpsertItems (MiniLM in Triton) pools from the overlay beside trained
    items; an unknown id is NOT_FOUND and a duplicate INVALID_ARGUMENT, each naming it."""
    new = PB.Item(item_id="space-basket", title="Space Station (2031)", category="Sci-Fi")
    assert stack.stub.UpsertItems(PB.UpsertItemsRequest(items=[new]), timeout=120).upserted == 1
    basket = ["space-basket", *stack.history[-2:]]
    reply = stack.stub.SimilarItems(PB.SimilarItemsRequest(basket_item_ids=basket, k=K), timeout=10)
    assert len(reply.items) == K and not {i.item_id for i in reply.items} & set(basket)
    trained_only = stack.stub.SimilarItems(
        PB.SimilarItemsRequest(basket_item_ids=basket[1:], k=K), timeout=10
    )
    assert answer(reply) != answer(trained_only)  # the added item's vector moved the query

    for ids, code, message in (
        (["no such film (2099)", basket[1]], grpc.StatusCode.NOT_FOUND, "basket_item_ids[0]"),
        ([basket[1], basket[1]], grpc.StatusCode.INVALID_ARGUMENT, "basket_item_ids[1] repeats"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stack.stub.SimilarItems(PB.SimilarItemsRequest(basket_item_ids=ids, k=K), timeout=10)
        assert caught.value.code() == code
        assert message in caught.value.details()
