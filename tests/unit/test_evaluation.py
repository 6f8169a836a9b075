"""Full-ranking metrics checked against hand arithmetic; history is excluded from the ranking."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ltrec.data import leave_one_out
from ltrec.evaluation import (
    EvalCases,
    evaluate,
    make_cases,
    most_popular,
    ranking_metrics,
    target_ranks,
)

# A 5-item catalogue (indices 1..5; column 0 is padding) and three cases.
SCORES = np.array(
    [
        # Case A: history [1], target 3. Padding (9.0) and history item 1 (0.9) are excluded;
        # eligible 2: 0.1, 3: 0.8, 4: 0.5, 5: 0.7 -> nothing beats 0.8 -> rank 0.
        [9.0, 0.9, 0.1, 0.8, 0.5, 0.7],
        # Case B: history [2, 4], target 1. Eligible 1: 0.2, 3: 0.3, 5: 0.4 -> items 3 and 5
        # beat it -> rank 2 (the history items 2: 0.9 and 4: 0.95 would have made it 4).
        [0.0, 0.2, 0.9, 0.3, 0.95, 0.4],
        # Case C: history [5], target 2. Eligible 1: 0.6, 2: 0.1, 3: 0.7, 4: 0.8 -> items
        # 1, 3 and 4 beat it -> rank 3.
        [0.0, 0.6, 0.1, 0.7, 0.8, 0.0],
    ]
)
HISTORIES = [[1], [2, 4], [5]]
TARGETS = [3, 1, 2]
RANKS = [0, 2, 3]


def cases(histories: list[list[int]] = HISTORIES) -> EvalCases:
    return EvalCases(
        histories=[np.array(h, dtype=np.int64) for h in histories],
        event_types=[np.ones(len(h), dtype=np.int64) for h in histories],
        targets=np.array(TARGETS, dtype=np.int64),
        context=np.zeros((len(histories), 4), dtype=np.int64),
    )


def fixed_scores(scores: np.ndarray):
    def score(_: EvalCases, rows: np.ndarray) -> np.ndarray:
        return scores[rows]

    return score


def test_target_ranks_exclude_padding_and_history() -> None:
    rows = np.arange(3)
    assert target_ranks(SCORES, cases(), rows).tolist() == RANKS
    # The same scores without histories: case B's history items 2 and 4 now outrank the target
    # (rank 4); case A's item 1 (0.9) beats 0.8 (rank 1); case C's item 5 (0.0) does not.
    no_history = cases([[], [], []])
    assert target_ranks(SCORES, no_history, rows).tolist() == [1, 4, 3]
    # Rows select cases: the second batch row is case C.
    assert target_ranks(SCORES[[0, 2]], cases(), np.array([0, 2])).tolist() == [0, 3]


def test_target_ranks_do_not_modify_the_scores() -> None:
    scores = SCORES.copy()
    target_ranks(scores, cases(), np.arange(3))
    assert np.array_equal(scores, SCORES)


def test_ranking_metrics_by_hand() -> None:
    metrics = ranking_metrics(np.array(RANKS), ks=(1, 3, 5))
    # Recall@1: only rank 0 is < 1 -> 1/3. NDCG@1: gain 1/log2(0 + 2) = 1 for case A -> 1/3.
    assert metrics["recall@1"] == 1 / 3
    assert metrics["ndcg@1"] == 1 / 3
    # Recall@3: ranks 0 and 2 -> 2/3. NDCG@3: (1/log2(2) + 1/log2(4) + 0) / 3 = 1.5 / 3 = 0.5.
    assert metrics["recall@3"] == 2 / 3
    assert metrics["ndcg@3"] == 0.5
    # Recall@5: all three. NDCG@5: (1 + 0.5 + 1/log2(5)) / 3 = (1.5 + 0.430677) / 3 = 0.643559.
    assert metrics["recall@5"] == 1.0
    assert metrics["ndcg@5"] == pytest.approx((1.5 + 1 / math.log2(5)) / 3, rel=1e-12)
    assert metrics["ndcg@5"] == pytest.approx(0.643559, abs=1e-6)
    assert set(metrics) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 3, 5)}


def test_ranking_metrics_of_no_cases_are_zero() -> None:
    assert ranking_metrics(np.array([], dtype=np.int64), ks=(10,)) == {
        "recall@10": 0.0,
        "ndcg@10": 0.0,
    }


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_evaluate_gives_the_hand_figures_in_any_batch_size(batch_size: int) -> None:
    metrics, ranks = evaluate(
        fixed_scores(SCORES), cases(), ks=(1, 3), batch_size=batch_size, progress=False
    )
    assert ranks.tolist() == RANKS
    assert metrics == {"recall@1": 1 / 3, "ndcg@1": 1 / 3, "recall@3": 2 / 3, "ndcg@3": 0.5}


def test_a_better_scored_history_item_does_not_push_the_target_down() -> None:
    scores = SCORES.copy()
    scores[1, 2] = 100.0  # case B's history item 2 now scores far above everything
    scores[1, 4] = 50.0
    _, ranks = evaluate(fixed_scores(scores), cases(), ks=(1,), progress=False)
    assert ranks.tolist() == RANKS
    # ...while an eligible item does: item 3 of case A overtaken by item 2.
    scores[0, 2] = 1.0
    _, ranks = evaluate(fixed_scores(scores), cases(), ks=(1,), progress=False)
    assert ranks.tolist() == [1, 2, 3]


def test_a_nan_target_ranks_beyond_every_k() -> None:
    """A model that emits NaN must not look good: once rank -1, hence an infinite NDCG gain."""
    scores = SCORES.copy()
    scores[0, 3] = np.nan  # case A's target
    ranks = target_ranks(scores, cases(), np.arange(3))
    n_items = len(SCORES[0]) - 1
    assert ranks[0] >= n_items and ranks[1:].tolist() == RANKS[1:]
    ks = (1, 3, n_items)  # up to the whole catalogue
    metrics, evaluated = evaluate(fixed_scores(scores), cases(), ks=ks, progress=False)
    assert evaluated.tolist() == ranks.tolist()
    assert all(np.isfinite(v) for v in metrics.values())
    # Case A now counts as a miss at every k, cases B and C as before.
    assert metrics == ranking_metrics(np.array([n_items, *RANKS[1:]]), ks)
    assert metrics["recall@5"] == 2 / 3
    # A row of NaN only: every item ties with the target, which ranks behind them all.
    scores[1] = np.nan
    assert target_ranks(scores, cases(), np.arange(3))[1] >= n_items


def test_a_nan_elsewhere_does_not_push_the_target_down() -> None:
    scores = SCORES.copy()
    scores[0, [2, 4, 5]] = np.nan  # every eligible item of case A but its target
    scores[2, 1] = np.nan  # one that outscored case C's target (0.6 > 0.1)
    assert target_ranks(scores, cases(), np.arange(3)).tolist() == [0, 2, 2]


@pytest.mark.parametrize("with_nan", [False, True])
def test_ranks_are_the_same_for_float32_and_float64_scores(with_nan: bool) -> None:
    scores = SCORES.copy()
    if with_nan:
        scores[0, 3] = scores[1, 5] = scores[2, 1] = np.nan
    rows = np.arange(3)
    by_dtype = {
        dtype: target_ranks(scores.astype(dtype), cases(), rows).tolist()
        for dtype in (np.float16, np.float32, np.float64)
    }
    assert by_dtype[np.float16] == by_dtype[np.float32] == by_dtype[np.float64]
    assert by_dtype[np.float64] == ([5, 1, 2] if with_nan else RANKS)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 256])
def test_evaluate_returns_ranks_in_case_order(batch_size: int) -> None:
    """`evaluate` scores cases grouped by history length; the ranks still come back in the
    order of the cases, each scored exactly once."""
    rng = np.random.default_rng(0)
    n_cases, n_items = 40, 30
    histories = [
        rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, 12), replace=False)
        for _ in range(n_cases)
    ]
    targets = np.array([rng.choice(np.setdiff1d(np.arange(1, n_items + 1), h)) for h in histories])
    shuffled = EvalCases(
        histories=histories,
        event_types=[np.ones(len(h), dtype=np.int64) for h in histories],
        targets=targets,
        context=np.zeros((n_cases, 4), dtype=np.int64),
    )
    scores = rng.standard_normal((n_cases, n_items + 1)).astype(np.float32)
    seen: list[np.ndarray] = []

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        seen.append(np.asarray(rows).copy())
        return scores[rows]

    metrics, ranks = evaluate(score, shuffled, ks=(5,), batch_size=batch_size, progress=False)
    expected = target_ranks(scores, shuffled, np.arange(n_cases))
    assert len(set(expected.tolist())) > 5  # the check below can tell cases apart
    assert ranks.tolist() == expected.tolist()
    assert metrics == ranking_metrics(expected, (5,))
    assert sorted(np.concatenate(seen).tolist()) == list(range(n_cases))


def test_most_popular_ranks_by_popularity() -> None:
    popularity = np.array([0, 5, 1, 9, 3, 7])  # order by popularity: 3, 5, 1, 4, 2
    score = most_popular(popularity)
    one_each = EvalCases(
        histories=[np.array([], dtype=np.int64)] * 5,
        event_types=[np.array([], dtype=np.int64)] * 5,
        targets=np.array([1, 2, 3, 4, 5]),
        context=np.zeros((5, 4), dtype=np.int64),
    )
    block = score(one_each, np.arange(5))
    assert block.shape == (5, 6)
    block[0, 0] = 123.0  # a writable copy: evaluation may mask it in place
    assert score(one_each, np.arange(1))[0, 0] == 0.0
    _, ranks = evaluate(score, one_each, ks=(1,), progress=False)
    assert ranks.tolist() == [2, 4, 0, 3, 1]


def events() -> pd.DataFrame:
    # Sorted by user then time; u3 has only two events, so it is never evaluated.
    rows = [
        ("u1", 10, 1, 1),
        ("u1", 20, 2, 2),
        ("u1", 30, 3, 1),
        ("u1", 40, 4, 3),
        ("u2", 15, 5, 1),
        ("u2", 25, 1, 1),
        ("u2", 345_600, 2, 4),
        ("u3", 5, 3, 1),
        ("u3", 6, 4, 1),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "timestamp", "item_index", "event_index"])
    frame["item_id"] = "i" + frame["item_index"].astype(str)
    frame["event_type"] = "view"
    frame["device"] = ["mobile"] * 6 + ["desktop"] + ["mobile"] * 2
    frame["region"] = None
    return frame


def test_make_cases_pairs_targets_with_earlier_events_only() -> None:
    split = leave_one_out(events())
    valid = make_cases(split.train, split.valid, ["desktop", "mobile"], [])
    assert valid.targets.tolist() == [3, 1]  # second-to-last of u1 and u2
    assert [h.tolist() for h in valid.histories] == [[1, 2], [5]]
    assert [t.tolist() for t in valid.event_types] == [[1, 2], [1]]

    test_history = pd.concat([split.train, split.valid]).sort_values(
        ["user_id", "timestamp"], kind="stable"
    )
    test = make_cases(test_history, split.test, ["desktop", "mobile"], [])
    assert test.targets.tolist() == [4, 2]
    assert [h.tolist() for h in test.histories] == [[1, 2, 3], [5, 1]]
    # The context is the target event's: u2's last event is Monday 00:00 from a desktop.
    assert test.context.tolist() == [[1, 4, 2, 0], [1, 1, 1, 0]]


def test_make_cases_skips_targets_without_history() -> None:
    history = events().iloc[:3]  # u1 only
    targets = events().iloc[[3, 6, 8]]  # one target each for u1, u2, u3
    got = make_cases(history, targets, [], [])
    assert len(got) == 1
    assert got.targets.tolist() == [4]
    assert got.histories[0].tolist() == [1, 2, 3]
    assert got.context.shape == (1, 4)
