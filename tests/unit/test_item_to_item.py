"""SimilarItems item to item: the measure's cases, the scale-aware default weight by hand, and the
served default on a small catalogue with a known near-duplicate (through the gateway and the
exported graphs)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ltrec.data import leave_one_out
from ltrec.evaluation import EvalCases, evaluate, evaluate_lists, long_tail_mask
from ltrec.item_to_item import (
    basket_cases,
    compare_baskets,
    held_out_baskets,
    held_out_pairs,
    item_to_item_metrics,
    itemknn_score_fn,
    pair_cases,
    scaled_grid,
    similarity_scale,
    tune_similar_items_weight,
    validation_baskets,
    validation_pairs,
    vector_score_fn,
)
from ltrec_core import contract
from server.gen.ltrec.v1 import recommender_pb2
from tests.support.gateway import DIM, METADATA, run_async, running_gateway, write_repository
from tests.support.scorer import ScorerGraphs


def events(rows: Sequence[tuple[str, int]]) -> pd.DataFrame:
    """user_id, item_index, timestamp; one user's rows in time order."""
    return pd.DataFrame(
        {
            "user_id": [u for u, _ in rows],
            "item_index": [i for _, i in rows],
            "timestamp": np.arange(len(rows), dtype=np.int64),
        }
    )


# --- The cases ---------------------------------------------------------------------------------


def test_a_case_is_the_users_last_history_item_and_next_item() -> None:
    history = events([("a", 1), ("a", 2), ("a", 3), ("b", 4)])
    # a: query 3 -> 5; b: 4 -> 4 is a repeat SimilarItems can never return; c has no history.
    targets = events([("a", 5), ("b", 4), ("c", 1)])
    cases = pair_cases(history, targets)
    assert [h.tolist() for h in cases.histories] == [[3]]
    assert cases.targets.tolist() == [5]

    split = leave_one_out(events([("u", 1), ("u", 2), ("u", 3), ("u", 4), ("v", 5), ("v", 6)]))
    valid, test = validation_pairs(split), held_out_pairs(split)
    # u: train 1, 2 -> validation 3 -> test 4; v has too few events to be evaluated.
    assert ([h.tolist() for h in valid.histories], valid.targets.tolist()) == ([[2]], [3])
    assert ([h.tolist() for h in test.histories], test.targets.tolist()) == ([[3]], [4])


def test_the_query_is_never_its_own_neighbour() -> None:
    table = np.array([[0, 0], [1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    cases = pair_cases(events([("a", 1)]), events([("a", 2)]))
    popularity = np.array([0, 5, 5, 5])
    figures = item_to_item_metrics(
        vector_score_fn(table), popularity, np.zeros(4, bool), cases, weight=0.0
    )
    assert figures["recall@10"] == 1.0 and figures["ndcg@10"] == 1.0  # item 1 itself is masked


# --- Baskets -----------------------------------------------------------------------------------


def test_a_basket_case_is_the_users_last_distinct_items_and_next_item() -> None:
    # a: 1 2 1 3 4 -> distinct, latest last: 2 1 3 4 -> basket (1, 3, 4); b: two distinct items
    # only (left out); c: its target 5 is in its basket (left out); d has no history.
    history = events(
        [("a", 1), ("a", 2), ("a", 1), ("a", 3), ("a", 4), ("b", 7), ("b", 7), ("b", 8)]
        + [("c", 5), ("c", 6), ("c", 9)]
    )
    targets = events([("a", 6), ("b", 1), ("c", 5), ("d", 2)])
    cases = basket_cases(history, targets, size=3)
    assert [h.tolist() for h in cases.histories] == [[1, 3, 4]]
    assert cases.targets.tolist() == [6]
    # Baskets of two: b's counts now; c's (6, 9) no longer holds its target.
    assert [h.tolist() for h in basket_cases(history, targets, size=2).histories] == [
        [3, 4],
        [7, 8],
        [6, 9],
    ]
    one = basket_cases(history, targets, size=1)  # the pair measure's cases
    pairs = pair_cases(history, targets)
    assert [h.tolist() for h in one.histories] == [h.tolist() for h in pairs.histories]
    assert one.targets.tolist() == pairs.targets.tolist()

    split = leave_one_out(events([("u", i) for i in (1, 2, 3, 4, 5, 6)]))
    valid, test = validation_baskets(split, 3), held_out_baskets(split, 3)
    # u: train 1-4 -> validation 5 -> test 6: the test basket ends with the validation item.
    assert ([h.tolist() for h in valid.histories], valid.targets.tolist()) == ([[2, 3, 4]], [5])
    assert ([h.tolist() for h in test.histories], test.targets.tolist()) == ([[3, 4, 5]], [6])


# Items 1-3 are a basket's three corners (films of three genres), item 4 the film between them,
# item 5 a near-duplicate of item 3 that outscores the film between as item 3's neighbour alone.
BASKET_TABLE = np.array(
    [
        [0.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [0.6, 0.6, 0.6],
        [0.1, 0.0, 0.9],
        [-0.5, -0.5, 0.0],
    ],
    dtype=np.float32,
)


def test_the_pooled_basket_finds_the_item_between_its_items_that_its_last_item_misses() -> None:
    """User a took 1, 2, 3 and then 4, the film between all three. Alone, 3's nearest neighbour
    is its near-duplicate 5 (0.9 against 0.6); the basket's mean vector (1/3, 1/3, 1/3) scores 4
    at 0.6 and 5 at 0.33: the basket puts the target first, its last item alone second."""
    history = events([("a", 1), ("a", 2), ("a", 3)])
    targets = events([("a", 4)])
    score = vector_score_fn(BASKET_TABLE)
    baskets, pairs = basket_cases(history, targets, size=3), pair_cases(history, targets)
    assert evaluate(score, baskets, ks=(1,), progress=False)[1].tolist() == [0]
    assert evaluate(score, pairs, ks=(1,), progress=False)[1].tolist() == [1]
    # The ranking masks every basket item, as served: 1, 2 and 3 would score 1/3 each.
    _, top = evaluate_lists(score, baskets, k=6, progress=False)
    assert top[0].tolist() == [4, 5, 6, -1, -1, -1]


def test_itemknn_scores_a_basket_by_the_sum_of_its_similarities() -> None:
    """Item 4 was taken with each of 1, 2 and 3 by one user; item 5 with 3 alone by two users.
    Item 3's nearest neighbour is 5, the basket's is 4 (three similarities against one)."""
    rows = [("x", i) for i in (1, 4)] + [("y", i) for i in (2, 4)] + [("z", i) for i in (3, 4)]
    rows += [("v", i) for i in (3, 5)] + [("w", i) for i in (3, 5)]
    train = events(rows)
    history = events([("a", 1), ("a", 2), ("a", 3)])
    targets = events([("a", 4)])
    baskets, pairs = basket_cases(history, targets, size=3), pair_cases(history, targets)
    knn, settings = itemknn_score_fn(train, 5, baskets, grid=[{"neighbours": 5, "shrink": 0}])
    assert settings == {"neighbours": 5, "shrink": 0}
    assert evaluate(knn, baskets, ks=(1,), progress=False)[1].tolist() == [0]
    assert evaluate(knn, pairs, ks=(1,), progress=False)[1].tolist() == [1]


def test_the_scale_of_a_basket_leaves_all_of_its_items_out() -> None:
    """Basket (1, 2): scores 10, 10 for its own items, 0.3 and 0.1 for items 3 and 4; log(1 +
    popularity) 2, 0, 2, 0: scale = std(0.3, 0.1) / std(2, 0, 2, 0) = 0.1 / 1 = 0.1."""
    e = math.e
    popularity = np.array([0, e**2 - 1, 0, e**2 - 1, 0])
    cases = basket_cases(events([("a", 1), ("a", 2)]), events([("a", 3)]), size=2)
    score = fixed_scores([0.0, 10.0, 10.0, 0.3, 0.1])
    assert similarity_scale(score, popularity, cases) == pytest.approx(0.1)


def test_compare_baskets_reports_each_default_and_the_similar_items_one() -> None:
    split = leave_one_out(
        events(
            [("u", i) for i in (1, 2, 3, 4, 5)]
            + [("v", i) for i in (6, 1, 2, 3, 4)]
            + [("w", i) for i in (2, 6, 1, 3, 5)]
        )
    )
    popularity = np.array([0, 3, 3, 2, 1, 1, 2])
    out = compare_baskets(
        {"ours": vector_score_fn(BASKET_TABLE)},
        popularity,
        long_tail_mask(popularity),
        split,
        {"ours": 0.05},
        size=2,
    )
    ours = out["ours"]
    assert ours["size"] == 2 and ours["test"]["cases"] == 3
    assert ours["default"]["chosen"] in [g["weight"] for g in ours["default"]["grid"]]
    assert ours["test"]["at_similar_items_default"]["weight"] == 0.05
    for key in ("weight_0", "at_default", "at_similar_items_default"):
        assert {"recall@10", "ndcg@10", "coverage@10", "aplt@10"} <= set(ours["test"][key])


# --- The default weight, by hand ---------------------------------------------------------------


def fixed_scores(row: Sequence[float]):
    def score(_: EvalCases, rows: np.ndarray) -> np.ndarray:
        return np.tile(np.asarray(row, dtype=np.float64), (len(rows), 1))

    return score


def test_scale_aware_default_by_hand() -> None:
    """log(1 + popularity) of items 1..5 is 2, 0, 2, 0, 1 (standard deviation sqrt(0.8)); the
    query, item 5, scores 0.3, 0.1, 0.3, 0.1 for the others (standard deviation 0.1) and 1 for
    itself, which the scale leaves out. scale = 0.1 / sqrt(0.8) = 0.1118.

    The popular items 1 and 3 lead the unpopular 2 and 4 by 0.2 in score and 2 in log-popularity,
    so the order flips at w = 0.1: f = 0.5 (w = 0.0559) keeps it, f = 1 (w = 0.112) flips it.
    Targets 1, 1, 2: before the flip each 1 is second (1 and 3 tie, ties against the target) and
    2 fourth, NDCG@10 (2 / log2(3) + 1 / log2(5)) / 3; after, the reverse."""
    e = math.e
    popularity = np.array([0, e**2 - 1, 0, e**2 - 1, 0, e - 1])
    tail = np.array([False, False, True, False, True, True])
    score = fixed_scores([0.0, 0.3, 0.1, 0.3, 0.1, 1.0])
    cases = pair_cases(
        events([("a", 5), ("b", 5), ("c", 5)]), events([("a", 1), ("b", 1), ("c", 2)])
    )

    assert similarity_scale(score, popularity, cases) == pytest.approx(0.1 / math.sqrt(0.8))
    tuned = tune_similar_items_weight(score, popularity, tail, cases, relative=(0.0, 0.5, 1.0))
    assert [row["weight"] for row in tuned["grid"]] == [0.0, 0.0559, 0.112]
    assert [row["relative_weight"] for row in tuned["grid"]] == [0.0, 0.5, 1.0]
    kept = (2 / math.log2(3) + 1 / math.log2(5)) / 3
    flipped = (2 / math.log2(5) + 1 / math.log2(3)) / 3
    assert [row["ndcg@10"] for row in tuned["grid"]] == pytest.approx([kept, kept, flipped])
    assert tuned["chosen"] == 0.0559  # flipped is 12% below kept: outside the 3% tolerance
    assert tuned["scale"] == pytest.approx(0.1118, abs=1e-4) and tuned["cases"] == 3


def test_the_served_counts_set_the_scale_and_the_term() -> None:
    """With counts (ours: its exposure), the scale is the spread of log(1 + counts) and the
    term penalises them: here counts that swap items 1 and 2 keep the popular item 1 first at
    every weight, where popularity sinks it."""
    e = math.e
    popularity = np.array([0, e**2 - 1, 0, e**2 - 1, 0, e - 1])
    counts = np.array([0, 0, e**2 - 1, e**2 - 1, 0, e - 1])
    tail = np.array([False, False, True, False, True, True])
    score = fixed_scores([0.0, 0.3, 0.1, 0.3, 0.1, 1.0])
    cases = pair_cases(
        events([("a", 5), ("b", 5), ("c", 5)]), events([("a", 1), ("b", 1), ("c", 1)])
    )
    by_counts = tune_similar_items_weight(
        score, popularity, tail, cases, relative=(0.0, 1.0, 2.0), counts=counts
    )
    assert by_counts["scale"] == pytest.approx(similarity_scale(score, counts, cases))
    # Item 1 (count 0) ties item 3 at weight 0 (second, ties against) and leads it after.
    assert [row["ndcg@10"] for row in by_counts["grid"]] == pytest.approx(
        [1 / math.log2(3), 1.0, 1.0]
    )
    by_popularity = tune_similar_items_weight(score, popularity, tail, cases, relative=(0.0, 2.0))
    assert by_popularity["grid"][1]["ndcg@10"] < 1 / math.log2(3)
    plain = item_to_item_metrics(score, popularity, tail, cases, 0.5, counts)
    assert plain["ndcg@10"] == 1.0 and plain["arp@10"] > 0


def test_scaled_grid_rounds_drops_repeats_and_starts_at_zero() -> None:
    assert scaled_grid(0.0123456, (0.0, 0.5, 1.0)) == [(0.0, 0.0), (0.5, 0.00617), (1.0, 0.0123)]
    assert scaled_grid(0.0, (0.0, 0.5, 1.0)) == [(0.0, 0.0)]  # no spread: only weight 0
    with pytest.raises(ValueError, match="start at 0"):
        scaled_grid(1.0, (0.5, 1.0))


# --- The served default on a catalogue with a near-duplicate -----------------------------------

# (item_id, title, training popularity, item vector): two Toy Stories (near-duplicates), two more
# family films, two crime films, and three obscure films. Close neighbours score about 0.3, as
# item-item dot products do on ML-1M, where Recommend's scores are around 5-6.
CATALOGUE = [
    ("toy-story", "Toy Story (1995)", 2077, (0.55, 0.0, 0.05, 0.0)),
    ("toy-story-2", "Toy Story 2 (1999)", 1585, (0.53, 0.02, 0.08, 0.0)),
    ("aladdin", "Aladdin (1992)", 1351, (0.45, 0.05, 0.25, 0.0)),
    ("babe", "Babe (1995)", 1751, (0.42, 0.0, 0.3, 0.05)),
    ("heat", "Heat (1995)", 1200, (0.05, 0.55, 0.0, 0.1)),
    ("casino", "Casino (1995)", 1000, (0.02, 0.5, 0.05, 0.2)),
    ("taxman", "Taxman (1999)", 0, (0.12, 0.1, -0.1, 0.3)),
    ("mambo", "Mad About Mambo (2000)", 2, (0.1, -0.05, 0.05, 0.3)),
    ("farmer", "Farmer & Chase (1995)", 1, (0.09, 0.1, 0.0, 0.35)),
]
INDEX = {item_id: i for i, (item_id, *_) in enumerate(CATALOGUE, start=1)}
OBSCURE = {"taxman", "mambo", "farmer"}
# What users took next after what (the validation pairs the default is chosen on): mostly the
# family and crime films among themselves, once from one obscure film to another.
NEXT = [
    ("toy-story", "toy-story-2"),
    ("toy-story-2", "toy-story"),
    ("toy-story", "aladdin"),
    ("toy-story", "babe"),
    ("toy-story-2", "babe"),
    ("aladdin", "babe"),
    ("aladdin", "toy-story"),
    ("babe", "aladdin"),
    ("babe", "toy-story"),
    ("heat", "casino"),
    ("casino", "heat"),
    ("taxman", "farmer"),
]
RECOMMEND_DEFAULT = 0.25  # a Recommend-scale default (ML-1M's is 0.2-0.25)


def catalogue_arrays() -> tuple[np.ndarray, np.ndarray]:
    table = np.zeros((len(CATALOGUE) + 1, DIM), dtype=np.float32)
    table[1:] = [vector for *_, vector in CATALOGUE]
    popularity = np.array([0] + [pop for _, _, pop, _ in CATALOGUE], dtype=np.int64)
    return table, popularity


def chosen_default() -> float:
    table, popularity = catalogue_arrays()
    users = [f"u{n}" for n in range(len(NEXT))]
    history = events([(u, INDEX[q]) for u, (q, _) in zip(users, NEXT, strict=True)])
    targets = events([(u, INDEX[t]) for u, (_, t) in zip(users, NEXT, strict=True)])
    tuned = tune_similar_items_weight(
        vector_score_fn(table), popularity, long_tail_mask(popularity), pair_cases(history, targets)
    )
    return float(tuned["chosen"])


@run_async
async def test_served_similar_items_default_keeps_the_near_duplicate_first(tmp_path: Path) -> None:
    """Training's choice, written where the export writes it, read and sent by the gateway, run
    through the exported graphs: Toy Story's nearest neighbour is Toy Story 2. Had SimilarItems
    been served Recommend's default, obscure films would come first (checked below too)."""
    weight = chosen_default()
    assert 0.0 < weight < RECOMMEND_DEFAULT / 5  # on the scale of item-item scores
    table, popularity = catalogue_arrays()
    tail = long_tail_mask(popularity)
    items = [(i, title, pop, int(tail[n])) for n, (i, title, pop, _) in enumerate(CATALOGUE, 1)]
    repository = write_repository(tmp_path / "model_repository", items)
    metadata = {
        **METADATA,
        "default_long_tail_weight": RECOMMEND_DEFAULT,
        contract.SIMILAR_ITEMS_DEFAULT_WEIGHT_KEY: weight,
    }
    (repository / contract.METADATA_FILE).write_text(json.dumps(metadata), encoding="utf-8")
    graphs = ScorerGraphs(table, popularity)
    async with running_gateway(repository, graphs) as gw:
        similar = await gw.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(item_id="toy-story", k=3), timeout=5
        )
        sent = graphs.ranking_calls(contract.SIMILAR_ITEMS_MODEL)[-1].inputs
        np.testing.assert_allclose(sent[contract.LONG_TAIL_WEIGHT], [[weight]])
        assert [i.item_id for i in similar.items][0] == "toy-story-2"
        assert not OBSCURE & {i.item_id for i in similar.items}

        # The catalogue tells the scales apart: at Recommend's weight obscure films lead.
        buried = await gw.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(
                item_id="toy-story", k=3, long_tail_weight=RECOMMEND_DEFAULT
            ),
            timeout=5,
        )
        assert {i.item_id for i in buried.items} == OBSCURE

        # Recommend keeps its own default.
        view = recommender_pb2.HistoryEvent(
            item_id="heat", event_type=recommender_pb2.EVENT_TYPE_VIEW
        )
        await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=2, history=[view]), timeout=5)
        sent = graphs.ranking_calls(contract.ENSEMBLE_MODEL)[-1].inputs
        np.testing.assert_allclose(sent[contract.LONG_TAIL_WEIGHT], [[RECOMMEND_DEFAULT]])
