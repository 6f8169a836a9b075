"""The evaluation report: long-tail metrics by hand, top-k lists, the splits, and a quick run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import ltrec.prepared
import ltrec.train
from experiments.report.cli import main
from experiments.report.fitting import (
    FACTORIES,
    _widen_to_interior,
    parse_settings,
    with_shuffled_context,
)
from experiments.report.markdown import _parts_sentence as markdown_parts_sentence
from experiments.report.merge import _SAME_DATA, merge_reports
from experiments.report.sections import _convergence
from experiments.report.settings import (
    CONTEXT_ABLATIONS,
    LONG_TAIL_WEIGHTS,
    LOSS_VARIANTS,
    MAIN_VIEW_ONLY,
    MODELS,
    SHORT_VIEW_ONLY,
    quick_config,
)
from ltrec import baselines
from ltrec.checkpoint import load_checkpoint, read_checkpoint
from ltrec.data import leave_one_out, load_dataset
from ltrec.evaluation import (
    EXPOSURE_DEPTH,
    LONG_TAIL_GRID,
    EvalCases,
    cached,
    cold_start_split,
    evaluate,
    evaluate_lists,
    events_in_order,
    exposure_counts,
    gini,
    held_out_cases,
    long_tail_adjusted,
    long_tail_metrics,
    long_tail_term,
    paired_difference,
    short_unordered_split,
    shuffled_context,
    subsample_users,
    top_k_items,
    tune_long_tail_weight,
    validation_cases,
    with_split,
)
from ltrec.models import ModelConfig
from ltrec.neural_baselines import build_model
from ltrec.new_item_ids import SCALES, SHIFTS
from ltrec.prepared import Prepared, prepare
from ltrec.scoring import model_score_fn
from ltrec.train import _loss, target_distribution
from ltrec_core import contract
from tests.support.datasets import N_ITEMS


def cases(histories: list[list[int]], targets: list[int]) -> EvalCases:
    return EvalCases(
        histories=[np.array(h, dtype=np.int64) for h in histories],
        event_types=[np.ones(len(h), dtype=np.int64) for h in histories],
        targets=np.array(targets, dtype=np.int64),
        context=np.zeros((len(histories), 4), dtype=np.int64),
    )


# --- Long-tail metrics, by hand -----------------------------------------------------------------

# Five items (index 0 is padding). Items 1 and 2 are head, 3-5 tail.
POPULARITY = np.array([0, 10, 8, 3, 1, 0])
TAIL = np.array([False, False, False, True, True, True])
# Three top-2 lists; the third has one slot the catalogue could not fill (-1).
LISTS = np.array([[1, 2], [1, 3], [4, -1]])


def test_long_tail_metrics_by_hand() -> None:
    got = long_tail_metrics(LISTS, POPULARITY, TAIL)
    assert set(got) == {"coverage@2", "arp@2", "aplt@2", "gini@2"}
    # Coverage: items {1, 2, 3, 4} of 5 appear -> 4/5.
    assert got["coverage@2"] == pytest.approx(0.8)
    # ARP: list means (10 + 8)/2 = 9, (10 + 3)/2 = 6.5, 1/1 = 1 -> (9 + 6.5 + 1)/3 = 5.5.
    assert got["arp@2"] == pytest.approx(5.5)
    # APLT: tail shares 0/2, 1/2, 1/1 -> (0 + 0.5 + 1)/3 = 0.5.
    assert got["aplt@2"] == pytest.approx(0.5)
    # Gini of exposure (item 1: 2, items 2-4: 1, item 5: 0): sorted x = [0, 1, 1, 1, 2], n = 5,
    # sum x = 5; sum (2i - n - 1) x_i = -4*0 - 2*1 + 0*1 + 2*1 + 4*2 = 8 -> 8 / (5 * 5) = 0.32.
    assert got["gini@2"] == pytest.approx(0.32)


def test_gini_extremes() -> None:
    assert gini(np.array([3, 3, 3])) == 0.0
    # One item gets everything: (n - 1)/n = 2/3 (sum (2i - 4) x_i = 2 * 5 = 10; 10 / 15).
    assert gini(np.array([0, 0, 5])) == pytest.approx(2 / 3)
    assert gini(np.zeros(4)) == 0.0


# --- Top-k lists --------------------------------------------------------------------------------

# Padding (9.0) and history item 2 (0.9) are excluded; eligible 1: 0.5, 3: 0.5, 4: 0.1, 5: 0.7.
SCORES = np.array([[9.0, 0.5, 0.9, 0.5, 0.1, 0.7], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])


def test_top_k_items_exclude_history_and_break_ties_by_index() -> None:
    toy = cases([[2], [1, 2, 3, 4]], [1, 5])
    top = top_k_items(SCORES, toy, np.arange(2), k=3)
    # Row 1: 5 (0.7), then the tie 1 and 3 (0.5) in index order. Row 2: only item 5 is eligible.
    assert top.tolist() == [[5, 1, 3], [5, -1, -1]]
    # k wider than the catalogue: padded with -1.
    assert top_k_items(SCORES[:1], toy, np.arange(1), k=7).tolist() == [[5, 1, 3, 4, -1, -1, -1]]


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_evaluate_lists_agrees_with_evaluate(batch_size: int) -> None:
    toy = cases([[2], [1, 2, 3, 4]], [1, 5])

    def score(_: EvalCases, rows: np.ndarray) -> np.ndarray:
        return SCORES[rows]

    ranks, top = evaluate_lists(score, toy, k=3, batch_size=batch_size, progress=False)
    _, want = evaluate(score, toy, progress=False)
    # Target 1 ties with item 3 (ties count against it) and trails item 5 -> rank 2.
    assert ranks.tolist() == want.tolist() == [2, 0]
    assert top.tolist() == [[5, 1, 3], [5, -1, -1]]


def test_long_tail_adjustment_moves_unpopular_items_up() -> None:
    toy = cases([[]], [2])
    popularity = np.array([0, math.e - 1, 0])  # log1p: item 1 -> 1, item 2 -> 0

    def score(_: EvalCases, rows: np.ndarray) -> np.ndarray:
        return np.array([[0.0, 2.0, 1.0]])

    # w = 1.5: item 1 scores 2 - 1.5 = 0.5 < item 2's 1.0, so the order flips.
    assert long_tail_adjusted(score, popularity, 0.0)(toy, np.arange(1)).tolist() == [[0, 2, 1]]
    adjusted = long_tail_adjusted(score, popularity, 1.5)(toy, np.arange(1))
    assert adjusted[0, 1:] == pytest.approx([0.5, 1.0])


def test_default_long_tail_weight_by_hand() -> None:
    """The largest weight whose validation NDCG@10 stays within the tolerance of weight 0's."""
    toy = cases([[], []], [1, 3])
    popularity = np.array([0, math.e**2 - 1, math.e - 1, 0, 0])  # log1p: 2, 1, 0, 0
    tail = np.array([False, False, True, True, True])

    def score(_: EvalCases, rows: np.ndarray) -> np.ndarray:
        return np.tile([0.0, 3.0, 2.0, 1.0, 0.5], (len(rows), 1))

    # w = 0 and 0.5: target 1 first (NDCG 1), target 3 third (0.5): mean 0.75. At w = 1 items
    # 1, 2, 3 tie at 1.0 and ties count against the target: both third, mean 0.5.
    tuned = tune_long_tail_weight(score, popularity, tail, toy, grid=(0.0, 0.5, 1.0), tolerance=0.3)
    ndcg = [row["ndcg@10"] for row in tuned["grid"]]
    assert ndcg == pytest.approx([0.75, 0.75, 0.5])
    assert tuned["chosen"] == 0.5  # 0.5 < 0.7 * 0.75
    assert [row["coverage@10"] for row in tuned["grid"]] == [1.0, 1.0, 1.0]
    loose = tune_long_tail_weight(
        score, popularity, tail, toy, grid=(0.0, 0.5, 1.0), tolerance=0.34
    )
    assert loose["chosen"] == 1.0  # 0.5 >= 0.66 * 0.75
    with pytest.raises(ValueError, match="start at 0"):
        tune_long_tail_weight(score, popularity, tail, toy, grid=(0.5, 1.0))


def test_a_cached_scorer_tells_sets_of_cases_apart() -> None:
    """One cache over validation and then test cases: the same rows of another set are scored
    again, not answered from the first set's batch; a repeat is answered from the cache."""
    calls = []

    def score(c: EvalCases, rows: np.ndarray) -> np.ndarray:
        calls.append(len(calls))
        return np.tile(c.targets[rows, None].astype(np.float64), (1, 3))

    raw = cached(score)
    valid, test = cases([[]], [1]), cases([[]], [2])
    assert raw(valid, np.arange(1)).tolist() == [[1.0, 1.0, 1.0]]
    assert raw(test, np.arange(1)).tolist() == [[2.0, 2.0, 2.0]]
    assert raw(valid, np.arange(1)).tolist() == [[1.0, 1.0, 1.0]] and len(calls) == 2


def test_exposure_counts_by_hand() -> None:
    """Per item, how many top-`depth` lists (history excluded) hold it; an item nobody trained
    on counts 0 however often it is listed, and so does padding. Lists are at most a tenth of
    the catalogue deep (30 items here: 3)."""
    toy = cases([[1], [], [2]], [4, 4, 4])
    popularity = np.ones(31, dtype=np.int64)
    popularity[[0, 5]] = 0  # padding, and item 5 that nobody trained on
    row = 100.0 - np.arange(31)
    row[5] = 200.0

    def score(_: EvalCases, rows: np.ndarray) -> np.ndarray:
        return np.tile(row, (len(rows), 1))

    # Top 2 per case: [5, 2] (1 is history), [5, 1], [5, 1]; a trained item counts 1 + its
    # lists, item 5 (untrained) 0 however often it is listed.
    counts = exposure_counts(score, toy, popularity, depth=2)
    assert counts.tolist() == [0, 3, 2, 1, 1, 0] + [1] * 25
    # Top 3: [5, 2, 3], [5, 1, 2], [5, 1, 3]; a depth of 10 is held to 3.
    want = [0, 3, 3, 3, 1, 0] + [1] * 25
    assert exposure_counts(score, toy, popularity, depth=3).tolist() == want
    assert exposure_counts(score, toy, popularity, depth=10).tolist() == want


def test_the_term_penalises_its_counts_and_the_lists_keep_popularity() -> None:
    """`counts` moves the ranking; ARP and the tail share still read training popularity."""
    toy = cases([[]], [2])
    popularity = np.array([0, 100, 1])
    tail = np.array([False, False, True])

    def score(_: EvalCases, rows: np.ndarray) -> np.ndarray:
        return np.array([[0.0, 2.0, 1.5]])

    # By popularity, w = 1 sinks item 1 (2 - log 101 < 1.5 - log 2); by counts that leave item
    # 1 unpenalised (count 0) and item 2 penalised, the order stays.
    counts = np.array([0, 0, 50])
    by_popularity = tune_long_tail_weight(score, popularity, tail, toy, grid=(0.0, 1.0))
    by_counts = tune_long_tail_weight(score, popularity, tail, toy, grid=(0.0, 1.0), counts=counts)
    assert [r["ndcg@10"] for r in by_popularity["grid"]] == pytest.approx([1 / math.log2(3), 1.0])
    assert [r["ndcg@10"] for r in by_counts["grid"]] == pytest.approx([1 / math.log2(3)] * 2)
    assert by_counts["grid"][1]["arp@10"] == pytest.approx(50.5)  # (100 + 1) / 2, popularity


def test_long_tail_term_tunes_on_the_models_own_exposure() -> None:
    toy = cases([[], []], [4, 3])
    popularity = np.array([0, 9, 9, 1, 1])
    rows_scores = np.array([[0.0, 4.0, 3.0, 2.0, 1.0], [0.0, 4.0, 3.0, 1.0, 2.0]])

    def score(_: EvalCases, rows: np.ndarray) -> np.ndarray:
        return rows_scores[rows]

    tuned, counts = long_tail_term(score, popularity, toy)
    # A 4-item catalogue: lists of 1 (a tenth of it, at least 1), item 1 tops both.
    assert counts.tolist() == [0, 3, 1, 1, 1]
    assert tuned["counts"] == f"exposure@{EXPOSURE_DEPTH}"
    assert tuned["chosen"] in LONG_TAIL_GRID


# --- The context ablation ------------------------------------------------------------------------

CTX_CFG = ModelConfig(
    n_items=12,
    n_devices=3,
    n_regions=4,
    embedding_dim=8,
    projection_hidden=16,
    n_layers=1,
    n_heads=1,
    max_history=10,
    context_dim=4,
    dropout=0.0,
)


def random_contexts(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            rng.integers(1, contract.HOUR_BUCKETS, n),
            rng.integers(1, contract.WEEKDAY_BUCKETS, n),
            rng.integers(0, CTX_CFG.n_devices, n),
            rng.integers(0, CTX_CFG.n_regions, n),
        ],
        axis=1,
    ).astype(np.int64)


def scrambled(name: str) -> torch.nn.Module:
    """The report's model for `name`, every parameter random (a trained weighting is not 1)."""
    torch.manual_seed(0)
    model = FACTORIES[name](CTX_CFG, torch.randn(CTX_CFG.n_items + 1, CTX_CFG.text_dim))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model.eval()


def test_no_context_weighting_is_the_identity_whatever_the_context() -> None:
    toy = cases([[1, 2, 3], [4], [5, 6, 7, 8], [9, 10]], [4, 5, 6, 7])
    with_a = dataclasses_replace_context(toy, random_contexts(4, seed=1))
    with_b = dataclasses_replace_context(toy, random_contexts(4, seed=2))
    rows = np.arange(len(toy))
    off = scrambled("ours_no_context")
    assert not any(p.numel() for p in off.context_weighting.parameters())  # nothing to learn
    off_a = model_score_fn(off, 10)(with_a, rows)
    assert np.array_equal(off_a, model_score_fn(off, 10)(with_b, rows))
    # ... and equal to scoring the raw user vector, never re-weighted.
    with torch.no_grad():
        items = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 4], [5, 6, 7, 8], [0, 0, 9, 10]])
        table = off.item_table()
        user = off.user_tower(torch.nn.functional.embedding(items, table), items, items.sign())
        assert np.allclose(off_a, (user @ table.T).numpy(), atol=1e-6)
    # The real weighting, with the same random parameters, does depend on the context; so the
    # assertion above would fail if "no context" were the served model.
    on = scrambled("ours")
    assert not np.allclose(
        model_score_fn(on, 10)(with_a, rows), model_score_fn(on, 10)(with_b, rows)
    )


def dataclasses_replace_context(toy: EvalCases, context: np.ndarray) -> EvalCases:
    return EvalCases(toy.histories, toy.event_types, toy.targets, context)


def test_no_context_training_loss_ignores_the_context() -> None:
    hist = torch.tensor([[1, 2, 3], [0, 4, 5]])
    targets = torch.tensor([[1, 2, 3, 4], [0, 4, 5, 6]])
    popularity = np.ones(CTX_CFG.n_items + 1, dtype=np.int64)
    q, log_q = target_distribution(popularity)
    cfg = ltrec.train.TrainConfig()

    def loss(name: str, seed: int) -> float:
        ctx = torch.from_numpy(random_contexts(8, seed).reshape(2, 4, 4))
        with torch.no_grad():
            return _loss(scrambled(name), (hist, hist.sign(), targets, ctx), cfg, log_q, q).item()

    assert loss("ours_no_context", 1) == loss("ours_no_context", 2)
    assert loss("ours", 1) != loss("ours", 2)


def test_shuffled_context_permutes_rows_and_keeps_the_rest() -> None:
    toy = cases([[1], [2], [3], [4], [5], [6]], [2, 3, 4, 5, 6, 1])
    toy = dataclasses_replace_context(toy, np.arange(24, dtype=np.int64).reshape(6, 4))
    mixed = shuffled_context(toy, seed=0)
    assert mixed.histories is toy.histories and mixed.targets is toy.targets
    assert not np.array_equal(mixed.context, toy.context)
    assert sorted(map(tuple, mixed.context.tolist())) == sorted(map(tuple, toy.context.tolist()))
    assert np.array_equal(shuffled_context(toy, seed=0).context, mixed.context)  # seeded


def test_paired_difference_by_hand() -> None:
    # Ranks 0 (NDCG 1), 1 (1/log2 3), 20 (miss) against 0, 0, 0.
    diff = paired_difference(np.array([0, 1, 20]), np.array([0, 0, 0]), ks=(10,), resamples=200)
    assert diff["recall@10"] == pytest.approx(-1 / 3)
    assert diff["ndcg@10"] == pytest.approx(((1 / np.log2(3)) - 1 - 1) / 3)
    low, high = diff["ndcg@10_ci95"]
    assert low <= diff["ndcg@10"] <= high <= 0
    same = paired_difference(np.array([3, 4]), np.array([3, 4]), ks=(10,))
    assert same["ndcg@10"] == 0 and same["ndcg@10_ci95"] == [0.0, 0.0]


# --- Splits -------------------------------------------------------------------------------------


def events() -> pd.DataFrame:
    # Sorted by user (u2 first: file order) then time; u2's last two events share a timestamp.
    rows = [
        ("u2", 5, 3),
        ("u2", 7, 4),
        ("u2", 9, 1),
        ("u2", 9, 2),
        ("u1", 1, 1),
        ("u1", 2, 2),
        ("u1", 3, 5),
        ("u1", 4, 3),
        ("u3", 1, 5),
        ("u3", 2, 2),
        ("u3", 3, 4),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "timestamp", "item_index"])
    frame["event_index"] = 1
    frame["item_id"] = "i" + frame["item_index"].astype(str)
    return frame


def test_events_in_order_rebuilds_the_sequences_without_the_test_events() -> None:
    split = leave_one_out(events())
    history = events_in_order(split.train, split.valid)
    # Exactly the original order, less each user's last event; u2's tie keeps file order.
    assert history.equals(events().drop(index=[3, 7, 10]).reset_index(drop=True))


def test_cold_start_split_hides_exactly_the_chosen_items() -> None:
    split = leave_one_out(events())
    cold_split, cold = cold_start_split(split, n_items=6, share=0.4, seed=3)
    # Items 1..5 have events; 40% of them = 2 are chosen. Item 6 has none and is never chosen.
    chosen = np.flatnonzero(cold)
    assert len(chosen) == 2 and set(chosen) <= {1, 2, 3, 4, 5} and not cold[0] and not cold[6]
    for part, before in ((cold_split.train, split.train), (cold_split.valid, split.valid)):
        assert not part["item_index"].isin(chosen).any()
        # Nothing else is removed.
        assert part.equals(before[~before["item_index"].isin(chosen)].reset_index(drop=True))
    assert cold_split.test.equals(split.test)
    # Seeded: the same call chooses the same items.
    assert np.array_equal(cold_start_split(split, 6, 0.4, seed=3)[1], cold)


def test_subsample_users_keeps_whole_users() -> None:
    split = leave_one_out(events())
    small = subsample_users(split, 2, seed=0)
    users = set(small.train["user_id"])
    assert len(users) == 2
    for part, whole in ((small.train, split.train), (small.test, split.test)):
        assert set(part["user_id"]) <= users
        assert len(part) == whole["user_id"].isin(users).sum()
    assert subsample_users(split, 10) is split


# --- A tiny synthetic dataset, end to end --------------------------------------------------------


def test_cold_items_stay_in_the_catalogue(tiny_data: Path, tmp_path: Path) -> None:
    prepared: Prepared = prepare(tiny_data, tmp_path / "cache")
    cold_split, cold = cold_start_split(prepared.split, N_ITEMS, share=0.1, seed=0)
    derived = with_split(prepared, cold_split)
    split = prepared.split
    seen = pd.concat([split.train, split.valid, split.test])["item_index"].nunique()
    assert cold.sum() == round(0.1 * seen) > 0  # 10% of the items with events
    # Same catalogue: ids, texts, text features; popularity of the hidden items is zero.
    assert derived.item_ids == prepared.item_ids and derived.texts == prepared.texts
    assert np.array_equal(derived.text_features, prepared.text_features)
    assert not derived.popularity[cold].any()
    assert derived.popularity.sum() == len(cold_split.train)
    assert not np.isin(derived.train_sequences.items, np.flatnonzero(cold)).any()
    # Cold test cases: only hidden targets, and their histories never contain a hidden item.
    cold_cases = held_out_cases(derived, targets=cold)
    assert len(cold_cases) > 0 and cold[cold_cases.targets].all()
    assert not any(cold[h].any() for h in cold_cases.histories)
    assert len(load_dataset(tiny_data).items) == N_ITEMS


def test_quick_report_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["--data", str(tiny_data), "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert main([*args, "--quick", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    # every row, but the teacher ablation: the quick run's own row has no teacher to ablate
    assert set(report["models"]) == set(MODELS) - set(SHORT_VIEW_ONLY)
    assert set(CONTEXT_ABLATIONS) < set(MODELS)
    accuracy = {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 50)}
    long_tail = {f"{m}@10" for m in ("coverage", "arp", "aplt", "gini")}
    for name, model in report["models"].items():
        assert MODELS[name] in md
        test = model["test"]
        assert accuracy | long_tail | {"tail", "head"} <= set(test)
        for group in ("tail", "head"):
            assert {"recall@10", "ndcg@10", "cases"} <= set(test[group])
        assert test["tail"]["cases"] + test["head"]["cases"] == report["data"]["users_evaluated"]
        for value in [test[k] for k in accuracy | long_tail]:
            assert math.isfinite(value) and value >= 0
        if name in (*CONTEXT_ABLATIONS, *LOSS_VARIANTS, *MAIN_VIEW_ONLY):
            continue  # main view only (below)
        assert {"recall@10", "ndcg@10", "cases"} <= set(model["cold_start"])
        assert math.isfinite(model["cold_start"]["ndcg@10"]) and model["cold_start"]["ndcg@10"] >= 0
    # Ours on the cold view: what the new items cost the whole test set, and the ablation of the
    # new-item map fitted event-weighted, its Audience and demand figures beside the served map's.
    ours_cold = report["models"]["ours"]["cold_start"]
    assert set(ours_cold["all_cases_ndcg@10"]) == {"weight_0", "at_default_weight"}
    # The new-item map's boost chosen on validation, and its ablation (the plain map) when the
    # boost is not the plain map's.
    assert ours_cold["map_scale"] in SCALES and ours_cold["map_shift"] in SHIFTS
    boosted = ours_cold["map_scale"] != 1.0 or ours_cold["map_shift"] != 0.0
    assert ("unscaled_map" in ours_cold) == boosted
    for row in (ours_cold.get("unscaled_map") or {}).values():
        assert 0 <= row["all_cases_ndcg@10"] <= 1 and 0 <= row["recall@10"] <= 1
    weighted = ours_cold["event_weighted_map"]
    assert weighted["popularity_exponent"] in (0.0, 0.5, 1.0)
    for key in ("weight_0", "at_default_weight"):
        assert 0 <= weighted[key]["all_cases_ndcg@10"] <= 1 and "recall@10" in weighted[key]
    assert "demand_spearman" in weighted["audience"]["all_held_out_events"]
    assert "new-item map fitted event-weighted (popularity^" in md
    assert "ours: p(item | user) alone, new-item map fitted event-weighted" in md
    # Most-popular shows everyone the same list less their history: at most 10 + the longest
    # history's items are ever shown.
    longest = load_dataset(tiny_data).events["user_id"].value_counts().max()
    assert report["models"]["most_popular"]["test"]["coverage@10"] <= (10 + longest) / N_ITEMS
    sweep = report["long_tail_sweep"]
    weights = [s["weight"] for s in sweep]
    assert set(LONG_TAIL_WEIGHTS) <= set(weights) and weights == sorted(set(weights))
    # The serving default chosen on validation is among them, marked, and in the cold view.
    default = report["long_tail_default"]
    assert [s["weight"] for s in sweep if s["default"]] == [default["chosen"]]
    valid_ndcg = {row["weight"]: row["ndcg@10"] for row in default["grid"]}
    assert valid_ndcg[default["chosen"]] >= (1 - default["tolerance"]) * valid_ndcg[0.0]
    assert all(
        ndcg < (1 - default["tolerance"]) * valid_ndcg[0.0]
        for w, ndcg in valid_ndcg.items()
        if w > default["chosen"]
    )
    at_default = report["models"]["ours"]["cold_start"]["at_default_weight"]
    assert {"weight", "recall@10", "ndcg@10"} <= set(at_default)
    assert "(default)" in md
    # Audience and demand on the cold view (ltrec.audience), in the JSON and the Markdown.
    audience = report["models"]["ours"]["cold_start"]["audience"]
    assert audience["trained_on_held_out"] is False and audience["held_out_items"] > 0
    every = audience["all_held_out_events"]
    assert set(every["audience"]) == {
        "model_expected_interactions",
        "model_probability",
        "most_active_users",
        "random",
    }
    assert all(math.isfinite(v) for v in every["demand_spearman"].values())
    assert "### Audience and demand of the held-out items (ours)" in md
    assert "| category average |" in md
    # SimilarItems item to item: ours and ItemKNN, each at 0 and at its own validation default.
    assert "## SimilarItems, item to item (test)" in md
    for similar in report["item_to_item"].values():
        assert similar["default"]["chosen"] in [g["weight"] for g in similar["default"]["grid"]]
        assert {"recall@10", "ndcg@10", "coverage@10"} <= set(similar["test"]["at_default"])
    assert set(report["item_to_item"]) == {"ours", "itemknn"}
    # Baskets (the last 3 distinct items together): each at 0, its basket default and its
    # SimilarItems default (what a served basket request gets).
    assert "## SimilarItems, basket of 3 (test)" in md
    for similar in report["item_to_item"].values():
        basket = similar["basket"]
        assert basket["size"] == 3 and basket["test"]["cases"] > 0
        assert basket["default"]["chosen"] in [g["weight"] for g in basket["default"]["grid"]]
        served = basket["test"]["at_similar_items_default"]
        assert served["weight"] == similar["default"]["chosen"]
        assert {"recall@10", "ndcg@10", "coverage@10"} <= set(served)
    assert "(SimilarItems default)" in md and "(basket default)" in md
    for s in sweep:
        assert accuracy | long_tail <= set(s["torch"]) and accuracy | long_tail <= set(s["onnx"])
        assert s["parity"]["match_at_printed_precision"], s
    # A larger long-tail weight recommends less popular items.
    assert sweep[-1]["torch"]["arp@10"] < sweep[0]["torch"]["arp@10"]
    # The context ablation: rows beside the main one, with their paired difference to it.
    models = report["models"]
    assert "## Context ablation (test)" in md
    context = models["ours"]["context"]
    assert (context["train"], context["test"]) == ("real", "real")
    assert set(context["weights"]) == {
        "mean_abs_deviation",
        "max_abs_deviation",
        "std_across_cases",
    }
    assert "weights" not in models["ours_no_context"]["context"]
    for name in CONTEXT_ABLATIONS:
        diff = models[name]["vs_ours"]
        got = models[name]["test"]
        for key in ("recall@10", "ndcg@10", "ndcg@50"):
            assert diff[key] == pytest.approx(got[key] - models["ours"]["test"][key])
            low, high = diff[f"{key}_ci95"]
            assert low <= diff[key] <= high
        assert "cold_start" not in models[name]  # main view only
    assert models["ours_no_context"]["fit"]["epochs"]  # trained, not copied
    assert models["ours_context_shuffled"]["fit"]["epochs"]
    assert models["ours_context_shuffled_test"]["fit"]["same_model_as"] == "ours"
    assert report["data"]["context_fields"]["device"] == {"distinct": 1, "unknown_share": 0.0}
    # The popularity-correction ablation: sampled softmax with and without logQ, trained.
    assert "## Popularity correction (test)" in md
    for name, variant in LOSS_VARIANTS.items():
        fit = models[name]["fit"]
        assert fit["epochs"]
        assert {k: fit["train_config"][k] for k in variant} == variant
        assert "cold_start" not in models[name]
        diff = models[name]["vs_ours"]
        assert diff["ndcg@10"] == pytest.approx(
            models[name]["test"]["ndcg@10"] - models["ours"]["test"]["ndcg@10"]
        )
    assert models["ours"]["fit"]["train_config"]["loss"] == "full"
    # The short, order-free view: every row but the main-view-only ablations, refitted there.
    assert "## Short, order-free histories (test)" in md
    for name, model in models.items():
        if name in (*CONTEXT_ABLATIONS, *LOSS_VARIANTS, *MAIN_VIEW_ONLY):
            assert "short_history" not in model and "cold_start" not in model
            continue
        short = model["short_history"]
        assert 0 <= short["ndcg@10"] <= short["recall@10"] <= 1
    assert report["data"]["short_train_events"] <= report["data"]["train_events"]
    # SASRec's settings are chosen on its own validation, from its own grid, then converged.
    sasrec = models["sasrec"]["fit"]
    grid = quick_config().neural_grids["sasrec"]
    assert [{k: p[k] for k in ("lr", "dropout")} for p in sasrec["screening"]] == grid
    best = max(sasrec["screening"], key=lambda p: p["ndcg@10"])
    assert sasrec["train_config"]["lr"] == best["lr"]
    assert sasrec["model_config"]["dropout"] == best["dropout"]
    assert "## Training to convergence (main view)" in md
    assert "settings screened on validation" in md
    for name in ("sasrec", "ours", "ours_text", "ours_converged"):
        assert models[name]["fit"]["stop_reason"]
    # The served model's converged run: trained here (not the main row's model), with its
    # paired difference to the main row.
    converged = models["ours_converged"]
    assert converged["fit"]["epochs"] and "same_model_as" not in converged["fit"]
    assert converged["vs_ours"]["ndcg@10"] == pytest.approx(
        converged["test"]["ndcg@10"] - models["ours"]["test"]["ndcg@10"]
    )


def test_short_unordered_split_keeps_the_last_events_in_a_random_order() -> None:
    rng = np.random.default_rng(3)
    rows = []
    for u in range(30):
        n = 2 if u == 0 else 25  # user 0: too short to evaluate, all in training
        for t in range(n):
            rows.append(
                {"user_id": f"u{u}", "item_index": int(rng.integers(1, 50)), "timestamp": t}
            )
    events = pd.DataFrame(rows)
    split = leave_one_out(events)
    short = short_unordered_split(split, keep=4, seed=0)
    assert short.train.groupby("user_id").size().to_dict() == {"u0": 2} | {
        f"u{u}": 4 for u in range(1, 30)
    }
    assert len(short.valid) == len(short.test) == 29
    moved = 0
    for u in range(1, 30):
        mine = events[events["user_id"] == f"u{u}"]
        last = mine.tail(6)
        got = events_in_order(short.train, short.valid, short.test)
        got = got[got["user_id"] == f"u{u}"]
        # The same six latest events, in an order that sorting by time keeps.
        assert sorted(got["item_index"]) == sorted(last["item_index"])
        assert list(got["timestamp"]) == sorted(got["timestamp"])
        moved += list(got["item_index"]) != list(last["item_index"])
    assert moved > 20  # shuffled for (nearly) every user
    again = short_unordered_split(split, keep=4, seed=0)
    assert again.test.equals(short.test)  # seeded


def test_text_profile_scores_by_cosine_to_the_latest_items() -> None:
    features = np.array(
        [[0, 0], [1, 0], [0, 2], [1, 1], [-1, 0]], dtype=np.float32
    )  # row 0 = padding
    score = baselines.text_profile_score_fn(features, last=2)
    toy = cases([[4, 1, 2], []], [3, 3])
    got = score(toy, np.array([0, 1]))
    # Profile of user 0 = mean of unit(1, 0) and unit(0, 1) (the last two; item 4 is older).
    profile = np.array([0.5, 0.5]) / np.linalg.norm([0.5, 0.5])
    want = np.array([[0.0, *(f / np.linalg.norm(f) @ profile for f in features[1:])]])
    assert np.allclose(got[0], want[0], atol=1e-6)
    assert got[0].argmax() == 3  # the item between the two
    assert np.all(got[1] == 0)  # no history: no preference


def test_convergence_table_marks_rows_stopped_on_a_cap() -> None:
    def row(reason: str, patience: int = 10, epochs: int = 200) -> dict:
        return {
            "label": reason,
            "fit": {
                "epochs": [{"epoch": 1}, {"epoch": 2}],
                "best": {"epoch": 2},
                "stop_reason": reason,
                "train_seconds": 90.0,
                "train_config": {
                    "patience": patience,
                    "epochs": epochs,
                    "lr": 0.002,
                    "batch_size": 64,
                },
                "model_config": {"dropout": 0.2},
            },
        }

    lines = _convergence(
        {
            "models": {
                "a": row("no validation gain for 10 epochs"),
                "b": row("time budget of 45.0 min"),
                "c": row("epochs"),
                "d": {"label": "EASE", "fit": {"tuning": "grid"}},
                "e": row("epochs", patience=2, epochs=2),  # one complete schedule, by design
            }
        }
    )
    text = "\n".join(lines)
    assert "| 10 | no validation gain for 10 epochs | lr 0.002, batch 64, dropout 0.2 |" in text
    assert "**capped**: no validation" not in text
    assert "**capped**: time budget of 45.0 min" in text
    assert text.count("**capped**: epochs") == 1
    assert "| 2 | one complete 2-epoch schedule (`--patience` = `--epochs`) |" in text
    assert "EASE" not in text  # not a neural row
    assert "| 2 (best 2) | 1.5 | 10 |" in text


def test_ease_grid_is_widened_past_an_edge_optimum() -> None:
    peak = 12500.0  # beyond the grid's top (5000): the search must walk out to it

    def build(lam: float):  # a scorer that ranks the target first only at lam = peak
        def score(c: EvalCases, rows: np.ndarray) -> np.ndarray:
            good = abs(np.log(lam / peak)) < 0.1
            out = np.zeros((len(rows), 6))
            out[:, 5 if good else 4] = 1.0
            return out

        return score

    toy = cases([[1], [2]], [5, 5])
    grid = [{"lam": lam} for lam in (100, 1000, 5000)]
    _, points = baselines.tune("ease", grid, build, toy, progress=False)
    best, points = _widen_to_interior("t", {"lam": 5000}, points, build, toy, progress=False)
    assert best["lam"] == pytest.approx(peak)
    assert sorted(p["lam"] for p in points)[-1] == pytest.approx(peak * 2.5)  # one past it
    # An interior optimum is left alone.
    same, unchanged = _widen_to_interior("t", {"lam": 1000}, points, build, toy, progress=False)
    assert same == {"lam": 1000} and unchanged == points


def test_merge_reports_joins_parts_and_refuses_other_data() -> None:
    def part(names: list[str], users: int, cold: bool) -> dict:
        data = {key: 1 for key in _SAME_DATA} | {"users_evaluated": users}
        if cold:
            data |= {"cold_items": 3, "cold_test_cases": 2, "cold_train_events": 9}
        return {
            "data": data,
            "models": {name: {"label": name, "from": len(names)} for name in names},
            "seconds": 60.0,
            "long_tail_sweep": [names[0]],
        }

    merged = merge_reports(
        [part(["ours", "sasrec"], 5, False), part(["ease", "ours", "ours_text"], 5, True)]
    )
    assert list(merged["models"]) == ["ease", "sasrec", "ours_text", "ours"]
    assert merged["models"]["ours"]["from"] == 2  # from the first part
    assert merged["long_tail_sweep"] == ["ours"]
    assert merged["data"]["cold_items"] == 3 and merged["seconds"] == 120.0
    with pytest.raises(ValueError, match="users_evaluated"):
        merge_reports([part(["ours"], 5, False), part(["ease"], 6, False)])

    # A neural row trained in two parts (two schedules): the run with the better validation
    # NDCG@10 gives its figures, whichever part comes first; its other views still merge.
    def trained(valid: float, test: float) -> dict:
        return {"label": "s", "fit": {"best": {"ndcg@10": valid}}, "test": {"ndcg@10": test}}

    first, second = part(["sasrec"], 5, False), part(["sasrec"], 5, False)
    first["models"]["sasrec"] = trained(0.19, 0.18)
    second["models"]["sasrec"] = trained(0.20, 0.17) | {"short_history": {"ndcg@10": 0.1}}
    for parts in ([first, second], [second, first]):
        merged = merge_reports(parts)
        row = merged["models"]["sasrec"]
        assert row["test"] == {"ndcg@10": 0.17} and row["short_history"] == {"ndcg@10": 0.1}
        assert merged["chosen_on_validation"] == {"sasrec": parts.index(second)}
    first["models"]["sasrec"] = trained(0.20, 0.18)  # the same validation: the first part's
    assert merge_reports([first, second])["models"]["sasrec"]["test"] == {"ndcg@10": 0.18}
    assert merge_reports([first, second])["chosen_on_validation"] == {}
    # Rows loaded from checkpoints are no schedules: the first part that loaded one (the served
    # model, whose sweep the report keeps) gives the row, though another validates better.
    for row, valid in ((first, 0.19), (second, 0.20)):
        row["models"]["sasrec"]["fit"] |= {"checkpoint": True, "best": {"ndcg@10": valid}}
    merged = merge_reports([first, second])
    assert merged["models"]["sasrec"]["test"] == {"ndcg@10": 0.18}
    assert merged["chosen_on_validation"] == {}
    assert merged["models"]["sasrec"]["short_history"] == {"ndcg@10": 0.1}

    # A refit view (short histories) run in two parts with different settings: that view is
    # taken from the part whose refit validates better there, whatever the order of the parts
    # and wherever the main view comes from.
    def short(valid: float, test: float) -> dict:
        return {"ndcg@10": test, "fit": {"best": {"ndcg@10": valid}}}

    third, fourth = part(["ours"], 5, False), part(["ours"], 5, False)
    third["models"]["ours"] = {"label": "o", "short_history": short(0.0996, 0.1004)}
    fourth["models"]["ours"] = {"label": "o", "short_history": short(0.1022, 0.1059)}
    for parts in ([third, fourth], [fourth, third]):
        merged = merge_reports(parts)
        assert merged["models"]["ours"]["short_history"]["ndcg@10"] == 0.1059
        assert merged["chosen_on_validation"] == {"ours.short_history": parts.index(fourth)}
        assert "o (short-history view) from part" in markdown_parts_sentence(
            {**merged, "parts": [{"created": "a"}, {"created": "b"}]}
        )


def test_report_in_parts_and_merged(tiny_data: Path, tmp_path: Path) -> None:
    args = ["--data", str(tiny_data), "--cache", str(tmp_path / "cache"), "--quick"]
    first, second, merged = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    assert main([*args, "--out", str(first), "--models", "ease", "--views", "main"]) == 0
    report = json.loads((first / "report.json").read_text())
    assert "cold_items" not in report["data"] and "short_train_events" not in report["data"]
    assert all(
        "cold_start" not in m and "short_history" not in m for m in report["models"].values()
    )
    assert "## Cold start" not in (first / "report.md").read_text()
    # A part without the main view: rows measured in the short view only, nothing trained twice.
    assert main([*args, "--out", str(second), "--models", "most_popular", "--views", "short"]) == 0
    short = json.loads((second / "report.json").read_text())
    assert all("test" not in m and "short_history" in m for m in short["models"].values())
    assert short["long_tail_sweep"] == []
    md = (second / "report.md").read_text()
    assert "## Short, order-free histories (test)" in md and "## Serving-time" not in md
    parts = [str(first / "report.json"), str(second / "report.json")]
    assert main(["--data", str(tiny_data), "--out", str(merged), "--merge", *parts]) == 0
    joined = json.loads((merged / "report.json").read_text())
    assert list(joined["models"]) == ["most_popular", "ease", "ours"]
    # "ours" is in both parts: its main-view figures from the first, its short view from the
    # second; most-popular has only the short view.
    assert {"test", "fit", "short_history"} <= set(joined["models"]["ours"])
    assert joined["models"]["ours"]["test"] == report["models"]["ours"]["test"]
    assert "test" not in joined["models"]["most_popular"]
    text = (merged / "report.md").read_text()
    assert "## Short, order-free histories (test)" in text and "## Serving-time" in text
    with pytest.raises(SystemExit):
        main([*args, "--out", str(first), "--views", "main,warm"])
    with pytest.raises(SystemExit):
        main([*args, "--out", str(first), "--screen-epochs", "0"])
    with pytest.raises(SystemExit):
        main([*args, "--out", str(first), "--views", ","])


def test_parse_settings() -> None:
    assert parse_settings("sasrec:lr=1e-3,dropout=0.2,batch_size=64") == (
        "sasrec",
        {"lr": 1e-3, "dropout": 0.2, "batch_size": 64.0},
    )
    assert parse_settings("ours:set_context=others") == ("ours", {"set_context": "others"})
    assert parse_settings("ours:embedding_dim=128,weight_decay=1") == (
        "ours",
        {"embedding_dim": 128.0, "weight_decay": 1.0},
    )
    for bad in ("sasrec", "sasrec:", ":lr=1", "sasrec:lr", "sasrec:lr=fast", "sasrec:depth=2"):
        with pytest.raises(ValueError):
            parse_settings(bad)


def test_fixed_settings_replace_the_screen(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["--data", str(tiny_data), "--out", str(out), "--cache", str(tmp_path / "cache")]
    fixed = ["--settings", "sasrec:lr=3e-3,dropout=0.4,weight_decay=0.5", "--patience", "7"]
    levers = ["--tail-levers"]
    assert main([*args, "--quick", "--no-progress", "--models", "sasrec", *fixed, *levers]) == 0
    rows = json.loads((out / "report.json").read_text())["models"]
    fit = rows["sasrec"]["fit"]
    assert "screening" not in fit
    # --tail-levers: each neural row's lever frontier on validation and test, and its table
    assert set(rows["sasrec"]["tail_levers"]) == {"valid", "test", "tail_gain"}
    assert set(rows["ours"]["tail_levers"]["test"]["levers"]) == {"exposure", "popularity", "step"}
    # the plain model's test figures are the row's own
    plain = rows["sasrec"]["tail_levers"]["test"]["plain"]
    assert plain["ndcg"] == pytest.approx(rows["sasrec"]["test"]["ndcg@10"])
    assert plain["tail"] == pytest.approx(rows["sasrec"]["test"]["tail"]["ndcg@10"])
    assert "## Score-time long-tail levers" in (out / "report.md").read_text()
    assert fit["fixed_settings"] == {"lr": 3e-3, "dropout": 0.4, "weight_decay": 0.5}
    assert fit["train_config"]["lr"] == 3e-3 and fit["model_config"]["dropout"] == 0.4
    assert fit["train_config"]["patience"] == 7 and fit["train_config"]["weight_decay"] == 0.5
    # the accuracy table says which settings were given rather than chosen there
    assert (
        "settings given (lr 0.003, dropout 0.4, weight_decay 0.5)"
        in (out / "report.md").read_text()
    )
    for bad in (
        ["--settings", "ease:lr=1"],
        ["--settings", "sasrec:lr=x"],
        ["--patience", "0"],
        ["--models", "sasrec", "--settings", "ours_text:lr=1e-3"],  # a row not run
        ["--settings", "sasrec:lr=1e-3", "--settings", "sasrec:lr=2e-3"],  # given twice
        ["--checkpoint", "model.pt", "--settings", "ours:lr=1e-3"],  # not trained here
        ["--settings", "ours:distill_weight=1"],  # a teacher needs set_context others
        ["--settings", "ours:set_context=all"],  # no such reading
        ["--models", "ours_no_teacher", "--settings", "ours_no_teacher:lr=1e-3"],  # ours' own
    ):
        with pytest.raises(SystemExit):
            main([*args, "--quick", *bad])


def test_the_teacher_ablation_trains_our_settings_without_the_teacher(
    tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    args = ["--data", str(tiny_data), "--out", str(out), "--cache", str(tmp_path / "cache")]
    taught = "ours:set_context=others,softmax_exclude=others,distill_weight=1,lr=3e-3"
    rows = ["--models", "ours_no_teacher", "--views", "main,short"]
    assert main([*args, "--quick", "--no-progress", *rows, "--settings", taught]) == 0
    report = json.loads((out / "report.json").read_text())
    ours, ablation = report["models"]["ours"], report["models"]["ours_no_teacher"]
    assert "test" not in ablation and "short_history" in ablation  # the short view only
    taught_config = ours["short_history"]["fit"]["train_config"]
    assert taught_config["distill_weight"] == 1.0 and taught_config["lr"] == 3e-3
    config = ablation["short_history"]["fit"]["train_config"]
    assert config["distill_weight"] == 0.0
    assert {k: v for k, v in config.items() if k != "distill_weight"} == {
        k: v for k, v in taught_config.items() if k != "distill_weight"
    }
    assert ablation["short_history"] != ours["short_history"]
    row = f"| {MODELS['ours_no_teacher']} |"
    assert any(
        line.startswith(row) and "our row's settings with distill_weight 0" in line
        for line in (out / "report.md").read_text().splitlines()
    )
    # without a teacher on our row there is nothing to ablate: no row, rather than a twin
    assert main([*args, "--quick", "--no-progress", *rows]) == 0
    assert "ours_no_teacher" not in json.loads((out / "report.json").read_text())["models"]


def test_report_runs_only_the_chosen_rows(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["--data", str(tiny_data), "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert main([*args, "--quick", "--no-progress", "--models", "ours_no_context"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["ours", "ours_no_context"]  # "ours" always comes along
    assert "Only these rows were run" in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        main([*args, "--quick", "--models", "ours,nonsense"])


def test_rows_start_from_the_same_weights(tiny_data: Path, tmp_path: Path) -> None:
    prepared = prepare(tiny_data, tmp_path / "cache")
    cfg = quick_config().train
    ours = build_model(prepared, cfg, FACTORIES["ours"]).state_dict()
    torch.rand(17)  # whatever ran before (another row's training) must not matter
    assert all(torch.equal(v, ours[k]) for k, v in build_model(prepared, cfg).state_dict().items())
    off = build_model(prepared, cfg, FACTORIES["ours_no_context"]).state_dict()
    assert not any(k.startswith("context_weighting") for k in off)
    assert set(off) < set(ours)
    assert all(torch.equal(v, ours[k]) for k, v in off.items())  # same start but the weighting


def test_shuffled_training_context_keeps_the_events(tiny_data: Path, tmp_path: Path) -> None:
    prepared = prepare(tiny_data, tmp_path / "cache")
    # Vary the context so a permutation shows.
    seqs = prepared.train_sequences
    seqs.context[:, 3] = np.arange(len(seqs.context)) % 5
    mixed = with_shuffled_context(prepared, seed=0).train_sequences
    assert np.array_equal(mixed.items, seqs.items) and np.array_equal(mixed.offsets, seqs.offsets)
    assert not np.array_equal(mixed.context, seqs.context)
    assert np.array_equal(np.sort(mixed.context, axis=0), np.sort(seqs.context, axis=0))


def _tiny_train_config(**overrides: Any) -> ltrec.train.TrainConfig:
    """One epoch of a one-layer, 16-d model on the tiny data (seconds)."""
    return ltrec.train.TrainConfig(
        epochs=1,
        batch_size=16,
        model={"embedding_dim": 16, "n_layers": 1, "n_heads": 1, "max_history": 20},
        **overrides,
    )


def test_training_chooses_the_serving_long_tail_weight_and_export_reads_it(
    tiny_data: Path, tmp_path: Path
) -> None:
    from export_scripts.export import SIMILAR_ITEMS_WEIGHT as SIMILAR
    from export_scripts.export import checkpoint_long_tail_weight
    from ltrec.train import main as train_main
    from ltrec.train import train

    cfg = _tiny_train_config()
    cache, out = tmp_path / "cache", tmp_path / "model"
    summary = train(prepare(tiny_data, cache), cfg, out, progress=False)
    tuned = summary["long_tail_weight"]
    assert [row["weight"] for row in tuned["grid"]][0] == 0.0
    # The term's count is the model's exposure, stored for the export and what the tuning used.
    assert tuned["counts"] == f"exposure@{EXPOSURE_DEPTH}"
    stored = read_checkpoint(out / "checkpoint.pt")
    prepared = prepare(tiny_data, cache)
    model, _ = load_checkpoint(out / "checkpoint.pt")
    want = exposure_counts(
        model_score_fn(model, model.cfg.max_history),
        validation_cases(prepared),
        prepared.popularity,
    )
    assert stored.exposure is not None and stored.exposure.tolist() == want.tolist()
    trained = prepared.popularity > 0
    assert (want[~trained] == 0).all() and (want[trained] >= 1).all() and want.max() > 1
    assert tuned["chosen"] in [row["weight"] for row in tuned["grid"]]
    assert checkpoint_long_tail_weight(out / "checkpoint.pt") == tuned["chosen"]
    assert json.loads((out / "metrics.json").read_text())["long_tail_weight"] == tuned
    # SimilarItems' own default, chosen item to item on a grid scaled to its scores.
    similar = summary["similar_items_long_tail_weight"]
    assert similar["scale"] > 0 and similar["grid"][0]["weight"] == 0.0
    assert similar["chosen"] in [row["weight"] for row in similar["grid"]]
    assert checkpoint_long_tail_weight(out / "checkpoint.pt", SIMILAR) == similar["chosen"]
    # A checkpoint from before the tuning: export falls back to 0, and the retune command
    # stores the same choices again.
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    del ckpt["summary"]["long_tail_weight"], ckpt["summary"][SIMILAR], ckpt["exposure"]
    torch.save(ckpt, out / "checkpoint.pt")
    assert checkpoint_long_tail_weight(out / "checkpoint.pt") is None
    assert checkpoint_long_tail_weight(out / "checkpoint.pt", SIMILAR) is None
    args = ["--data", str(tiny_data), "--out", str(out), "--cache", str(cache)]
    assert train_main([*args, "--tune-long-tail-only"]) == 0
    assert checkpoint_long_tail_weight(out / "checkpoint.pt") == tuned["chosen"]
    assert checkpoint_long_tail_weight(out / "checkpoint.pt", SIMILAR) == similar["chosen"]
    assert read_checkpoint(out / "checkpoint.pt").exposure.tolist() == want.tolist()
    # The new-item map fitted again first: the same data chooses the same map and boost. By
    # default the boost may shift as well as scale (the shift grid is searched).
    from ltrec.new_item_ids import SHIFTS

    fitted = summary["new_item_ids"]
    assert {g["shift"] for g in fitted["boost_grid"]} == set(SHIFTS)
    assert summary["train_config"]["new_item_shift"] is True
    assert train_main([*args, "--tune-long-tail-only", "--refit-new-item-map"]) == 0
    refit = read_checkpoint(out / "checkpoint.pt")
    keys = ("scale", "shift", "ridge_lambda", "offset")
    assert {k: refit.summary["new_item_ids"][k] for k in keys} == {k: fitted[k] for k in keys}
    # and without the shift when asked: the scale-only grid
    assert train_main(
        [*args, "--tune-long-tail-only", "--refit-new-item-map", "--no-new-item-shift"]
    ) == 0  # fmt: skip
    scaled = read_checkpoint(out / "checkpoint.pt").summary["new_item_ids"]
    assert scaled["shift"] == 0.0 and not any(scaled["offset"])
    assert {g["shift"] for g in scaled["boost_grid"]} == {0.0}
    assert train_main([*args, "--refit-new-item-map"]) == 2  # only with the retune
    # the shift is part of the map's fit: with the retune, only when the map is refitted
    assert train_main([*args, "--tune-long-tail-only", "--new-item-shift"]) == 2
    assert train_main([*args, "--tune-long-tail-only", "--no-new-item-shift"]) == 2
    # No checkpoint there: a clear error.
    other = tmp_path / "nothing"
    other.mkdir()
    assert train_main([*args[:3], str(other), *args[4:], "--tune-long-tail-only"]) == 2


def test_grid_points_set_training_and_model_settings() -> None:
    from experiments.report.fitting import with_settings
    from experiments.report.settings import ReportConfig

    cfg = with_settings(
        ltrec.train.TrainConfig(),
        {"lr": 1e-3, "dropout": 0.5, "order_augmentation": 1.0, "set_context": "others"},
    )
    assert (cfg.lr, cfg.model["dropout"], cfg.order_augmentation) == (1e-3, 0.5, 1.0)
    assert cfg.set_context == "others"
    with pytest.raises(ValueError, match="neural grid keys"):
        with_settings(ltrec.train.TrainConfig(), {"momentum": 0.9})
    # the new-item map's shift: an on/off setting, on by default
    assert ltrec.train.TrainConfig().new_item_shift
    assert not with_settings(ltrec.train.TrainConfig(), {"new_item_shift": 0.0}).new_item_shift
    with pytest.raises(ValueError, match="new_item_shift must be 0 or 1"):
        with_settings(ltrec.train.TrainConfig(), {"new_item_shift": 0.5})
    # capacity and regularisation: the width goes to the model, the weight decay to training
    wide = with_settings(ltrec.train.TrainConfig(), {"embedding_dim": 128.0, "weight_decay": 1.0})
    assert (wide.model["embedding_dim"], wide.weight_decay) == (128, 1.0)
    assert isinstance(wide.model["embedding_dim"], int)
    for width in (0.0, 12.5, 127.0):  # the width must split evenly over the default 2 heads
        with pytest.raises(ValueError, match="embedding_dim must be a positive multiple"):
            with_settings(ltrec.train.TrainConfig(), {"embedding_dim": width})
    # ours is screened on sequence, random order and set reading of the history
    ours = ReportConfig().neural_grids["ours"]
    assert {(p["order_augmentation"], p["set_context"]) for p in ours} == {
        (0.0, "prefix"),
        (1.0, "prefix"),
        (1.0, "others"),
    }


@pytest.mark.parametrize("screen_wins", [True, False])
def test_a_row_keeps_its_screening_run_only_when_it_validates_better(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, screen_wins: bool
) -> None:
    """The chosen setting's short annealed run is kept over its converged run when (and only
    when) its validation NDCG@10 is higher; the report says which run it kept."""
    import dataclasses

    from experiments.report import fitting
    from experiments.report.sections import _tuned
    from ltrec import neural_baselines

    prepared = prepare(tiny_data, tmp_path / "cache")
    cfg = dataclasses.replace(quick_config(), screen_epochs=3)
    real_fit = neural_baselines.fit_recommender

    def fake_fit(train_on, train_cfg, factory, **kwargs):  # type: ignore[no-untyped-def]
        model, summary = real_fit(
            train_on, dataclasses.replace(train_cfg, epochs=1), factory, **kwargs
        )
        screening = "screen" in kwargs.get("name", "")
        value = (0.3 if screening else 0.2) if screen_wins else (0.1 if screening else 0.2)
        summary["best"] = {**summary["best"], "ndcg@10": value + 0.01 * train_cfg.lr}
        model.tag = "screen" if screening else "converged"  # type: ignore[attr-defined]
        return model, summary

    monkeypatch.setattr(neural_baselines, "fit_recommender", fake_fit)
    fitted = fitting.fit_all(prepared, cfg, "main", None, False, ["sasrec"])["sasrec"]
    assert fitted.model.tag == ("screen" if screen_wins else "converged")  # type: ignore[union-attr]
    if screen_wins:
        assert fitted.info["kept"]["run"] == "screening"
        assert fitted.info["kept"]["screen_ndcg@10"] > fitted.info["kept"]["converged_ndcg@10"]
        assert "screening run, kept over the converged run" in _tuned(fitted.info)
        assert "screening schedule, kept" in fitted.info["stop_reason"]
    else:
        assert "kept" not in fitted.info
        assert "screening run" not in _tuned(fitted.info)


def test_targets_are_judged_from_the_reports_own_figures() -> None:
    from experiments.report.sections import _targets

    def row(label: str, ndcg: float, tail: float) -> dict:
        return {"label": label, "test": {"ndcg@10": ndcg, "tail": {"ndcg@10": tail}}}

    report = {
        "models": {
            "sasrec": row("SASRec", 0.19, 0.13),
            "ours": {
                **row("ours", 0.195, 0.16),
                "cold_start": {
                    "at_default_weight": {"weight": 0.1, "recall@10": 0.02},
                    "all_cases_ndcg@10": {"weight_0": 0.17, "at_default_weight": 0.168},
                },
                "short_history": {"ndcg@10": 0.12, "tail": {"ndcg@10": 0.03}},
            },
            "ease": {
                "label": "EASE",
                "short_history": {"ndcg@10": 0.11, "tail": {"ndcg@10": 0.04}},
            },
        },
        "long_tail_sweep": [
            {"weight": 0.0, "torch": {"ndcg@10": 0.195, "coverage@10": 0.6}},
            {"weight": 0.1, "default": True, "torch": {"ndcg@10": 0.19, "coverage@10": 0.71}},
        ],
    }
    lines = {line.split(" | ")[0].lstrip("| "): line for line in _targets(report)[7:]}
    assert len(lines) == 9
    texts = list(lines.values())
    assert "(1.23x)" in texts[2] and texts[2].endswith("| **met** |")
    assert "(-2.56%)" in texts[3] and texts[3].endswith("| missed |")
    assert "0.7100" in texts[4] and texts[4].endswith("| **met** |")
    assert texts[5].endswith("| missed |")  # cold recall 0.02 < 0.05
    assert "(-1.18%)" in texts[6] and texts[6].endswith("| **met** |")  # cold split, every case
    assert texts[7].endswith("| **met** |")  # short view NDCG 0.12 >= EASE's 0.11
    assert texts[8].endswith("| missed |")  # short view tail 0.03 < EASE's 0.04
    assert "(stretch met)" in texts[1]
    # without the rows a target needs, it is left out, not judged
    assert _targets({"models": {}, "long_tail_sweep": []}) == []


def test_training_without_the_new_item_shift_chooses_a_scale_only(
    tiny_data: Path, tmp_path: Path
) -> None:
    from ltrec.new_item_ids import SCALES
    from ltrec.train import train

    cfg = _tiny_train_config(new_item_shift=False)
    summary = train(prepare(tiny_data, tmp_path / "cache"), cfg, tmp_path / "model", progress=False)
    fitted = summary["new_item_ids"]
    assert {g["shift"] for g in fitted["boost_grid"]} == {0.0}
    assert [g["scale"] for g in fitted["boost_grid"]] == list(SCALES)
    assert fitted["shift"] == 0.0 and not any(fitted["offset"])
    assert summary["train_config"]["new_item_shift"] is False
