"""The towers: padding never leaks into the user embedding, the scorer's masks and order hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltrec.evaluation import long_tail_mask
from ltrec.models import ContextWeighting, ModelConfig, Recommender, Scorer, UserTower
from ltrec_core import contract

CFG = ModelConfig(
    n_items=12,
    n_devices=3,
    n_regions=4,
    text_dim=8,
    embedding_dim=16,
    projection_hidden=16,
    n_layers=1,
    n_heads=2,
    max_history=10,
    context_dim=4,
)
ATOL = 1e-5


@pytest.fixture(scope="module")
def tower() -> UserTower:
    torch.manual_seed(0)
    tower = UserTower(CFG).eval()
    # Unit-scale event embeddings (trained ones grow from std 0.02), so that an event type that
    # leaked from a padding position would be visible well above the tolerance.
    torch.nn.init.normal_(tower.event_embedding.weight, std=1.0)
    return tower


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    torch.manual_seed(1)
    t = torch.randn(CFG.n_items + 1, CFG.embedding_dim)
    t[contract.PADDING_INDEX] = 0.0
    return t


def embed(
    tower: UserTower, table: torch.Tensor, items: list[list[int]], types: list[list[int]]
) -> torch.Tensor:
    hist = torch.tensor(items, dtype=torch.long)
    with torch.no_grad():
        return tower(F.embedding(hist, table), hist, torch.tensor(types, dtype=torch.long))


ITEMS = [5, 2, 9]
TYPES = [1, 3, 2]


def test_padding_on_either_side_gives_the_same_embedding(
    tower: UserTower, table: torch.Tensor
) -> None:
    bare = embed(tower, table, [ITEMS], [TYPES])
    left = embed(tower, table, [[0, 0, 0, *ITEMS]], [[0, 0, 0, *TYPES]])
    right = embed(tower, table, [[*ITEMS, 0, 0]], [[*TYPES, 0, 0]])
    # Both sides in one batch too: batching must not mix rows.
    both = embed(tower, table, [[0, 0, *ITEMS], [*ITEMS, 0, 0]], [[0, 0, *TYPES], [*TYPES, 0, 0]])
    assert bare.shape == (1, CFG.embedding_dim)
    torch.testing.assert_close(left, bare, atol=ATOL, rtol=0)
    torch.testing.assert_close(right, bare, atol=ATOL, rtol=0)
    torch.testing.assert_close(both, bare.expand(2, -1), atol=ATOL, rtol=0)


def test_all_padding_history_is_the_begin_state(tower: UserTower, table: torch.Tensor) -> None:
    empty = embed(tower, table, [[0, 0, 0, 0]], [[0, 0, 0, 0]])
    assert torch.isfinite(empty).all()
    # The begin vector sits at position 0 and attends only to itself (causal), so its state
    # is the same whatever history follows it.
    hist = torch.tensor([ITEMS])
    with torch.no_grad():
        states, _ = tower.states(F.embedding(hist, table), hist, torch.tensor([TYPES]))
    torch.testing.assert_close(empty, states[:, 0], atol=ATOL, rtol=0)
    assert not torch.allclose(empty, embed(tower, table, [ITEMS], [TYPES]), atol=1e-3)


def test_earlier_items_matter_and_padding_does_not(tower: UserTower, table: torch.Tensor) -> None:
    items, types = [0, 0, *ITEMS], [0, 0, *TYPES]
    base = embed(tower, table, [items], [types])

    changed_item = embed(tower, table, [[0, 0, 7, 2, 9]], [types])  # first real item 5 -> 7
    assert not torch.allclose(changed_item, base, atol=1e-4)
    changed_type = embed(tower, table, [items], [[0, 0, 1, 4, 2]])  # middle event type
    assert not torch.allclose(changed_type, base, atol=1e-4)

    # Garbage vectors and event types at the padding positions must not reach the embedding.
    hist = torch.tensor([items])
    vectors = F.embedding(hist, table)
    noisy = vectors.clone()
    noisy[0, :2] = torch.randn(2, CFG.embedding_dim, generator=torch.Generator().manual_seed(3))
    noisy_types = torch.tensor([[4, 3, *TYPES]])
    with torch.no_grad():
        got = tower(noisy, hist, noisy_types)
        also = tower(vectors, hist, noisy_types)
    torch.testing.assert_close(got, base, atol=ATOL, rtol=0)
    torch.testing.assert_close(also, base, atol=ATOL, rtol=0)


def test_context_weighting_starts_as_the_identity() -> None:
    torch.manual_seed(0)
    module = ContextWeighting(CFG).eval()
    context = torch.tensor([[1, 2, 0, 1], [24, 7, 2, 3], [0, 0, 0, 0]])
    user = torch.randn(3, CFG.embedding_dim)
    with torch.no_grad():
        assert torch.equal(module.weights(context), torch.ones(3, CFG.embedding_dim))
        assert torch.equal(module(user, context), user)

        torch.nn.init.normal_(module.mlp[-1].weight, std=1.0)
        weights = module.weights(context)
    assert not torch.allclose(weights, torch.ones_like(weights))
    assert ((weights > 0) & (weights < 2)).all()
    assert not torch.allclose(weights[0], weights[1])  # different contexts, different weights


# --- Scorer ------------------------------------------------------------------------------------
# Hand-built 2-d catalogue; the user points along +x, so item scores are the x coordinates.
# Every real item scores below zero except 1..3, so an unmasked padding row (score 0) would
# outrank most of the catalogue.
HAND_TABLE = torch.tensor(
    [
        [0.0, 0.0],  # 0 padding
        [3.0, 0.0],  # 1
        [2.0, 1.0],  # 2
        [1.0, -1.0],  # 3
        [-0.5, 1.0],  # 4
        [-1.0, 0.0],  # 5
        [-2.0, 2.0],  # 6
        [-3.0, 0.5],  # 7
    ]
)
USER = torch.tensor([[1.0, 0.0]])


def score(
    scorer: Scorer, hist: list[int], excl: list[int], weight: float, k: int
) -> tuple[list[int], list[float], list[int]]:
    with torch.no_grad():
        items, scores, reasons = scorer(
            USER,
            torch.tensor([hist]),
            torch.tensor([excl]),
            torch.tensor([[weight]]),
            k,
        )
    return items[0].tolist(), scores[0].tolist(), reasons[0].tolist()


def test_scorer_masks_padding_history_and_exclusions() -> None:
    scorer = Scorer(HAND_TABLE, torch.zeros(8)).eval()
    items, scores, _ = score(scorer, [0, 1], [0], 0.0, 7)
    assert items[:6] == [2, 3, 4, 5, 6, 7]
    assert scores[:6] == [2.0, 1.0, -0.5, -1.0, -2.0, -3.0]
    # Only 6 eligible items: the 7th slot is -inf, whichever index it carries.
    assert len(items) == 7 and scores[6] == float("-inf")

    items, scores, _ = score(scorer, [2, 1], [3, 5], 0.0, 3)
    assert items == [4, 6, 7]
    assert scores == sorted(scores, reverse=True)
    assert contract.PADDING_INDEX not in items


@pytest.mark.parametrize("k", [1, 2, 5])
def test_scorer_respects_k_and_sorts(k: int) -> None:
    scorer = Scorer(HAND_TABLE, torch.tensor([0, 9, 3, 0, 50, 1, 0, 2])).eval()
    items, scores, reasons = score(scorer, [0, 0, 6], [0], 0.3, k)
    assert len(items) == len(scores) == len(reasons) == k
    assert scores == sorted(scores, reverse=True)
    assert len(set(items)) == k and not {0, 6} & set(items)


def test_long_tail_weight_promotes_unpopular_items() -> None:
    popularity = torch.tensor([0, 1000, 0, 0, 0, 0, 0, 0])
    scorer = Scorer(HAND_TABLE, popularity).eval()
    items, scores, _ = score(scorer, [0], [0], 0.0, 2)
    assert items == [1, 2]
    # With w = 0.5, item 1 scores 3 - 0.5 * log(1001) = -0.454, below item 2's 2.0 (and 3's 1.0).
    items, scores, _ = score(scorer, [0], [0], 0.5, 3)
    assert items == [2, 3, 1]
    assert scores[2] == pytest.approx(3.0 - 0.5 * math.log(1001.0), abs=1e-5)


def test_reason_is_the_most_similar_history_item_by_cosine() -> None:
    table = torch.tensor(
        [
            [0.0, 0.0],  # 0 padding
            [1.0, 0.0],  # 1 the recommendation
            [10.0, 10.0],  # 2 cos 0.707 but the largest dot product
            [1.0, 0.1],  # 3 cos 0.995
            [-1.0, 0.2],  # 4 cos -0.98
            [-1.0, 1.0],  # 5 cos -0.707
        ]
    )
    scorer = Scorer(table, torch.zeros(6)).eval()
    items, _, reasons = score(scorer, [0, 2, 3, 4], [0], 0.0, 1)
    assert items == [1] and reasons == [2]  # position of item 3, not of item 2
    # All similarities negative: the padding position (cosine 0) must still never be chosen.
    items, _, reasons = score(scorer, [4, 0, 5, 0], [2, 3], 0.0, 1)
    assert items == [1] and reasons == [2]


def test_item_table_row_zero_is_padding() -> None:
    torch.manual_seed(0)
    text = torch.randn(CFG.n_items + 1, CFG.text_dim)
    model = Recommender(CFG, text).eval()
    assert model.item_ids is not None
    torch.nn.init.normal_(model.item_ids.weight)
    with torch.no_grad():
        table = model.item_table()
        expected = model.fusion.text(text) + model.item_ids.weight
    assert table.shape == (CFG.n_items + 1, CFG.embedding_dim)
    assert torch.equal(table[contract.PADDING_INDEX], torch.zeros(CFG.embedding_dim))
    torch.testing.assert_close(table[1:], expected[1:])
    assert (table[1:].norm(dim=1) > 0).all()


def test_long_tail_mask_marks_the_top_fifth_as_head() -> None:
    # 11 items: ceil(0.2 * 11) = 3 head items, the most popular: 2 (50), 4 (20), 7 (9).
    popularity = np.array([0, 5, 50, 1, 20, 3, 7, 9, 2, 8, 4, 6])
    tail = long_tail_mask(popularity)
    assert tail.dtype == np.bool_ and tail.shape == (12,)
    assert np.flatnonzero(~tail[1:]).tolist() == [1, 3, 6]  # item indices 2, 4, 7 (minus 1)
    assert not tail[contract.PADDING_INDEX]
    # 10 items: exactly 2 head items.
    ten = long_tail_mask(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    assert np.flatnonzero(~ten).tolist() == [0, 9, 10]
