"""The offline check of Audience and ForecastDemand (`ltrec.audience`): its measures on
hand-checked examples, the reference scorer against a brute-force numpy computation, and the
whole check on the tiny synthetic dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ltrec.audience import (
    audience_recall,
    category_average_forecast,
    evaluate_audience,
    main,
    random_audience_recall,
    spearman,
)
from ltrec.evaluation import cold_start_split, with_split
from ltrec.models import AudienceScorer, Recommender
from ltrec.prepared import item_side, prepare
from ltrec.train import TrainConfig, model_config, train
from tests.support.datasets import N_ITEMS


def test_audience_recall_is_the_mean_share_of_actual_users_in_the_top_k() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.8, 0.2, 0.0],  # top 2: users 0, 2
            [0.0, 0.5, 0.5, 0.1, 0.9],  # top 2: users 4, then 1 (a tie: the earlier user)
            [0.3, 0.3, 0.3, 0.3, 0.3],  # nobody interacted: skipped
        ]
    )
    actual = [np.array([0, 3]), np.array([1, 2, 4]), np.array([], dtype=np.int64)]
    got = audience_recall(scores, actual, ks=(1, 2, 5))
    assert got["items"] == 2
    assert got["recall@1"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert got["recall@2"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert got["recall@5"] == pytest.approx(1.0)
    assert random_audience_recall(5, ks=(1, 2, 10)) == {
        "recall@1": 0.2,
        "recall@2": 0.4,
        "recall@10": 1.0,
    }


def test_spearman_uses_average_ranks_and_is_zero_for_a_constant_side() -> None:
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ties: ranks (1.5, 1.5, 3) against (1, 2, 3): Pearson of those
    want = np.corrcoef([1.5, 1.5, 3.0], [1.0, 2.0, 3.0])[0, 1]
    assert spearman(np.array([5.0, 5.0, 9.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(want)
    assert spearman(np.ones(4), np.arange(4.0)) == 0.0


def test_category_average_falls_back_to_the_first_part_then_to_every_warm_item() -> None:
    categories = ["Drama|War", "Drama|War", "Drama", "Comedy", "Horror|Drama", "Sci-Fi"]
    popularity = np.array([0, 10, 30, 2, 7, 0, 0], dtype=np.float64)  # index 0: padding
    cold = np.array([False, False, True, False, False, True, True])  # items 2, 5, 6 held out
    forecast = category_average_forecast(categories, popularity, cold)
    assert forecast[2] == 10.0  # "Drama|War": the warm item 1 (item 2 itself is held out)
    assert forecast[5] == pytest.approx(np.mean([10, 2, 7]))  # "Horror|Drama": no Horror item
    assert forecast[6] == pytest.approx(np.mean([10, 2, 7]))  # "Sci-Fi": none at all
    assert forecast[3] == 2.0  # a warm item's own category


def test_the_reference_scorer_is_the_softmax_over_the_catalogue_times_activity() -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((7, 4)).astype(np.float32)
    table[0] = 0.0
    extra = rng.standard_normal((2, 4)).astype(np.float32)
    users = rng.standard_normal((5, 4)).astype(np.float32)
    activity = np.array([1, 3, 10, 2, 5], dtype=np.float32)
    query_rows = [2, 7]  # a trained item and an added one (index N+1 = 7)
    hidden = [4]
    catalogue = np.concatenate([table, extra])
    query = catalogue[query_rows]
    logits = users @ catalogue.T
    logits[:, [0, *hidden]] = -np.inf
    log_norm = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    want = np.exp(query @ users.T - log_norm[None, :]) * activity[None, :]

    top, top_scores, total = AudienceScorer(torch.from_numpy(table))(
        torch.from_numpy(query),
        torch.from_numpy(users),
        torch.from_numpy(activity),
        torch.tensor([hidden]),
        3,
        torch.from_numpy(extra),
    )
    np.testing.assert_allclose(total.numpy(), want.sum(1), rtol=1e-5)
    assert top.tolist() == np.argsort(-want, axis=1)[:, :3].tolist()
    np.testing.assert_allclose(top_scores.numpy(), np.sort(want, axis=1)[:, ::-1][:, :3], rtol=1e-5)


def _cold_setup(tiny_data: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    prepared = prepare(tiny_data, tmp_path / "cache")
    cold_split, cold = cold_start_split(prepared.split, N_ITEMS, share=0.2, seed=0)
    return prepared, cold_split, cold


def test_the_offline_check_runs_on_a_tiny_dataset(tiny_data: Path, tmp_path: Path) -> None:
    """Every figure is there and in range; the random audience's recall is k / users."""
    prepared, cold_split, cold = _cold_setup(tiny_data, tmp_path)
    cold_prepared = with_split(prepared, cold_split)
    torch.manual_seed(0)
    model = Recommender(
        model_config(cold_prepared, TrainConfig(model={"embedding_dim": 8, "max_history": 5})),
        torch.from_numpy(prepared.text_features),
        item_side(prepared),
    ).eval()
    figures = evaluate_audience(
        model,
        prepared.split,
        cold_split,
        cold,
        prepared.item_fields.categories,
        prepared.device_vocab,
        prepared.region_vocab,
        ks=(5, 10),
    )
    assert figures["held_out_items"] == int(cold.sum()) > 0
    assert figures["users"] == 30
    every = figures["all_held_out_events"]
    held_out_events = sum(
        int(cold[p["item_index"].to_numpy()].sum())
        for p in (prepared.split.train, prepared.split.valid, prepared.split.test)
    )
    assert every["interactions"] == held_out_events
    assert every["audience"]["random"] == {"recall@5": 5 / 30, "recall@10": 10 / 30}
    for target in ("all_held_out_events", "test_events"):
        for recall in figures[target]["audience"].values():
            assert all(0.0 <= v <= 1.0 for k, v in recall.items() if k != "items")
        for rho in figures[target]["demand_spearman"].values():
            assert math.isfinite(rho) and -1.0 <= rho <= 1.0


@pytest.mark.slow
def test_the_command_trains_on_the_cold_split_and_writes_the_figures(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--train-out`: the checkpoint it trains has never seen the held-out items."""
    out = tmp_path / "figures.json"

    def tiny_train(prepared, cfg, out_dir, progress=True):  # type: ignore[no-untyped-def]
        cfg = TrainConfig(epochs=1, seed=cfg.seed, model={"embedding_dim": 8, "max_history": 5})
        return train(prepared, cfg, out_dir, progress=False)

    monkeypatch.setattr("ltrec.train.train", tiny_train)
    args = ["--data", str(tiny_data), "--cache", str(tmp_path / "cache")]
    args += ["--train-out", str(tmp_path / "cold"), "--cold-share", "0.2", "--out", str(out)]
    assert main(args) == 0
    figures = json.loads(out.read_text())
    assert figures["trained_on_held_out"] is False
    assert figures["held_out_items"] > 0
