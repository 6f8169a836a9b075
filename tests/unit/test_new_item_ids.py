"""The predicted ID vectors of items without training events (ltrec.new_item_ids)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ltrec.models import ModelConfig, Recommender
from ltrec.neural_baselines import IDOnlyRecommender
from ltrec.new_item_ids import (
    EVENT_WEIGHTED_EXPONENTS,
    POPULARITY_EXPONENTS,
    RIDGE_GRID,
    SCALES,
    choose_scale,
    cross_validated_r2,
    fit_ridge,
    fold_out_ndcg,
    fold_out_scales,
    impute_new_item_ids,
    with_map_scale,
    without_new_item_ids,
)
from ltrec_core import contract

CFG = ModelConfig(
    n_items=60, n_devices=3, n_regions=3, text_dim=16, embedding_dim=8, projection_hidden=16,
    n_layers=1, n_heads=2, max_history=10, new_item_id_map=True,
)  # fmt: skip


def test_ridge_recovers_a_linear_map_and_cross_validation_prefers_a_small_penalty() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    y = x @ w + b + 0.01 * rng.normal(size=(200, 3))
    got_w, got_b = fit_ridge(x, y, 1e-6)
    np.testing.assert_allclose(got_w, w, atol=0.01)
    np.testing.assert_allclose(got_b, b, atol=0.01)
    scores = cross_validated_r2(x, y, grid=(0.01, 1000.0))
    assert scores[0.01] > 0.99 > scores[1000.0]


def test_noise_targets_have_no_predictive_r2() -> None:
    rng = np.random.default_rng(1)
    scores = cross_validated_r2(rng.normal(size=(300, 4)), rng.normal(size=(300, 2)))
    assert max(scores.values()) < 0.05


def _trained_like(model: Recommender, popularity: np.ndarray) -> None:
    """ID vectors that depend linearly on content for the items with events (as if trained),
    zero for the rest (as training leaves them)."""
    torch.manual_seed(0)
    for p in model.fusion.text.parameters():
        torch.nn.init.normal_(p, std=0.5)
    assert model.item_ids is not None
    with torch.no_grad():
        content = model.content_table()
        ids = content @ torch.randn(CFG.embedding_dim, CFG.embedding_dim) * 0.3 + 0.1
        ids[torch.from_numpy(popularity <= 0)] = 0.0
        model.item_ids.weight.copy_(ids)


def test_items_without_events_get_the_content_map_as_their_id_vector() -> None:
    torch.manual_seed(0)
    model = Recommender(CFG, torch.randn(CFG.n_items + 1, CFG.text_dim)).eval()
    popularity = np.arange(CFG.n_items + 1) % 5  # every fifth item never seen in training
    popularity[0] = 0
    _trained_like(model, popularity)
    assert model.item_ids is not None and model.fusion.new_item_ids is not None
    before = model.item_ids.weight.detach().clone()
    done = impute_new_item_ids(model, popularity)
    assert done["applied"] and done["imputed_items"] == int((popularity[1:] == 0).sum())
    assert max(done["cv_r2"].values()) > 0.99  # the map is exactly linear here
    untrained = torch.from_numpy(popularity <= 0)
    untrained[contract.PADDING_INDEX] = False
    with torch.no_grad():
        content = model.content_table()
        ids = model.item_ids.weight
        table = model.item_table()
        # Items with events keep their trained vector; the others get content + map(content),
        # what the exported item encoder gives an item added after training.
        torch.testing.assert_close(ids[~untrained], before[~untrained])
        want = content[untrained] + model.fusion.new_item_ids(content[untrained])
        torch.testing.assert_close(table[untrained], want, atol=1e-5, rtol=1e-5)
        assert ids[untrained].norm(dim=1).min() > 0
        assert torch.equal(table[contract.PADDING_INDEX], torch.zeros(CFG.embedding_dim))
    imputed = model.item_ids.weight.detach().clone()
    plain = without_new_item_ids(model, popularity)
    assert plain.item_ids is not None and plain.fusion.new_item_ids is not None
    torch.testing.assert_close(plain.item_ids.weight.detach(), before)
    assert float(plain.fusion.new_item_ids.weight.detach().abs().sum()) == 0.0
    assert torch.equal(model.item_ids.weight.detach(), imputed)  # the model itself is kept


def test_models_without_the_map_or_without_id_vectors_are_left_alone() -> None:
    popularity = np.ones(CFG.n_items + 1, dtype=np.int64)
    popularity[:3] = 0
    plain = Recommender(
        ModelConfig(**{**CFG.to_dict(), "new_item_id_map": False}),  # type: ignore[arg-type]
        torch.randn(CFG.n_items + 1, CFG.text_dim),
    )
    assert plain.fusion.new_item_ids is None
    assert impute_new_item_ids(plain, popularity) == {"applied": False}
    sasrec = IDOnlyRecommender(CFG)
    assert sasrec.cfg.new_item_id_map is False
    before = sasrec.item_table().detach().clone()
    assert impute_new_item_ids(sasrec, popularity) == {"applied": False}
    assert torch.equal(sasrec.item_table().detach(), before)


def test_sample_weights_act_as_repeated_rows() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    counts = rng.integers(1, 4, size=40)
    w, b = fit_ridge(x, y, 0.5, counts.astype(float))
    # The weights are scaled to a mean of 1, so the repeated rows' penalty scales alike.
    scale = counts.sum() / len(counts)
    repeated_x, repeated_y = np.repeat(x, counts, axis=0), np.repeat(y, counts, axis=0)
    want_w, want_b = fit_ridge(repeated_x, repeated_y, 0.5 * scale)
    np.testing.assert_allclose(w, want_w, atol=1e-10)
    np.testing.assert_allclose(b, want_b, atol=1e-10)
    with pytest.raises(ValueError, match="sample_weight"):
        fit_ridge(x, y, 0.5, -np.ones(40))


def _ranking_fixture(
    n_items: int = 120, dim: int = 6, seed: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Content, ID vectors that are an exact linear map of the content, and validation cases
    whose target is each user's best-scored item outside its history."""
    rng = np.random.default_rng(seed)
    content = rng.normal(size=(n_items + 1, dim))
    ids = content @ rng.normal(size=(dim, dim)) * 0.5 + 0.2
    content[0] = ids[0] = 0.0
    users = rng.normal(size=(300, dim))
    histories = [rng.choice(np.arange(1, n_items + 1), size=5, replace=False) for _ in users]
    scores = users @ (content + ids).T
    scores[:, 0] = -np.inf
    for i, h in enumerate(histories):
        scores[i, h] = -np.inf
    return content, ids, users, histories, scores.argmax(axis=1)


def test_fold_out_ndcg_is_perfect_when_content_predicts_the_ids_exactly() -> None:
    content, ids, users, histories, targets = _ranking_fixture()
    rows = np.arange(1, len(content))
    ones = np.ones(len(content))
    exact = fold_out_ndcg(content, ids, ones, 1e-8, rows, users, histories, targets)
    assert exact == pytest.approx(1.0)  # every target is its user's top item
    # A penalty that shrinks the map towards its intercept places the folded items worse.
    shrunk = fold_out_ndcg(content, ids, ones, 1e6, rows, users, histories, targets)
    assert shrunk < 0.8 * exact
    # Only the cases whose target is among the fitted rows count: none here.
    others = np.setdiff1d(rows, targets)
    assert fold_out_ndcg(content, ids, ones, 1e-8, others, users, histories, targets) == 0.0


def test_validation_chooses_the_fit_weighting_that_places_new_items_best() -> None:
    torch.manual_seed(0)
    model = Recommender(CFG, torch.randn(CFG.n_items + 1, CFG.text_dim)).eval()
    popularity = np.where(np.arange(CFG.n_items + 1) % 2 == 0, 50, 1)
    popularity[0], popularity[-4:] = 0, 0  # the last four items have no training events
    _trained_like(model, popularity)
    assert model.item_ids is not None
    with torch.no_grad():
        content = model.content_table()
        # The rare items' ID vectors follow another map than the popular items'.
        rare = torch.from_numpy(popularity == 1)
        model.item_ids.weight[rare] = content[rare] @ torch.randn(8, 8)
        table = model.item_table().numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    users = rng.normal(size=(400, CFG.embedding_dim))
    histories = [np.array([1]) for _ in users]
    popular = np.flatnonzero(popularity == 50)
    scores = users @ table[popular].T
    targets = popular[scores.argmax(axis=1)]  # validation targets are popular items
    validation = (users, histories, targets)
    default = copy.deepcopy(model)
    done = impute_new_item_ids(
        model, popularity, validation=validation, exponents=EVENT_WEIGHTED_EXPONENTS
    )
    assert done["applied"] and done["chosen_by"].startswith("validation")
    assert done["popularity_exponent"] == 1.0
    assert len(done["grid"]) == len(EVENT_WEIGHTED_EXPONENTS) * len(RIDGE_GRID)
    # The served default weighs every item alike; validation still chooses its penalty.
    assert POPULARITY_EXPONENTS == (0.0,)
    plain = impute_new_item_ids(default, popularity, validation=validation)
    assert plain["popularity_exponent"] == 0.0 and len(plain["grid"]) == len(RIDGE_GRID)
    chosen = max(done["grid"], key=lambda g: g["ndcg@10"])
    assert chosen["ndcg@10"] > max(
        g["ndcg@10"] for g in done["grid"] if g["popularity_exponent"] == 0.0
    )


def test_the_scale_is_the_largest_within_the_tolerance_of_scale_one() -> None:
    def grid(*ndcgs: float) -> list[dict[str, float]]:
        return [
            {"scale": s, "ndcg@10": n} for s, n in zip((1.0, 1.5, 2.0, 3.0), ndcgs, strict=True)
        ]

    assert choose_scale(grid(0.20, 0.199, 0.197, 0.15)) == 2.0  # -1.5% kept, -25% not
    assert choose_scale(grid(0.20, 0.195, 0.199, 0.15)) == 2.0  # not the first to fall out
    assert choose_scale(grid(0.20, 0.19, 0.18, 0.15)) == 1.0  # every larger scale costs > 2%
    assert choose_scale(grid(0.20, 0.21, 0.22, 0.23)) == 3.0


def test_an_exact_map_is_best_at_scale_one_and_a_scaled_one_costs() -> None:
    content, ids, users, histories, targets = _ranking_fixture()
    rows = np.arange(1, len(content))
    ones = np.ones(len(content))
    grid = fold_out_scales(content, ids, ones, 1e-8, rows, users, histories, targets)
    assert [g["scale"] for g in grid] == list(SCALES)
    # Every target is its user's top item, and an exact map folds every item back in place.
    assert grid[0]["ndcg@10"] == pytest.approx(1.0)
    assert grid[0]["new_item_ndcg@10"] == pytest.approx(1.0)
    assert grid[0]["new_item_recall@10"] == pytest.approx(1.0)
    assert grid[-1]["ndcg@10"] < 0.95  # three times the ID vector misplaces items
    assert choose_scale(grid) < SCALES[-1]
    # The same figure as fold_out_ndcg at scale 1 (the cases with a fitted target).
    assert grid[0]["new_item_ndcg@10"] == pytest.approx(
        fold_out_ndcg(content, ids, ones, 1e-8, rows, users, histories, targets, folds=10)
    )


def test_a_chosen_scale_multiplies_the_map_and_its_ablation_undoes_it() -> None:
    torch.manual_seed(0)
    model = Recommender(CFG, torch.randn(CFG.n_items + 1, CFG.text_dim)).eval()
    popularity = np.arange(CFG.n_items + 1) % 5
    popularity[0] = 0
    _trained_like(model, popularity)
    assert model.item_ids is not None and model.fusion.new_item_ids is not None
    with torch.no_grad():  # ID vectors only partly predictable from content
        model.item_ids.weight.add_(torch.randn_like(model.item_ids.weight) * 2.0)
        model.item_ids.weight[torch.from_numpy(popularity <= 0)] = 0.0
    rng = np.random.default_rng(0)
    users = rng.normal(size=(300, CFG.embedding_dim))
    histories = [np.array([1]) for _ in users]
    targets = rng.choice(np.flatnonzero(popularity > 0), size=len(users))
    plain = copy.deepcopy(model)
    unit = impute_new_item_ids(
        plain, popularity, validation=(users, histories, targets), scales=(1.0,)
    )
    done = impute_new_item_ids(
        model, popularity, validation=(users, histories, targets), scales=(1.0, 4.0)
    )
    assert unit["scale"] == 1.0 and "scale_grid" not in unit
    assert done["scale"] == choose_scale(done["scale_grid"])
    assert [g["scale"] for g in done["scale_grid"]] == [1.0, 4.0]
    scale = done["scale"]
    assert model.fusion.new_item_scale == scale
    assert plain.fusion.new_item_ids is not None
    torch.testing.assert_close(
        model.fusion.new_item_ids.weight, scale * plain.fusion.new_item_ids.weight
    )
    forced = copy.deepcopy(plain)
    impute_new_item_ids(forced, popularity, validation=(users, histories, targets), scales=(4.0,))
    assert forced.fusion.new_item_scale == 4.0
    assert forced.fusion.new_item_ids is not None and forced.item_ids is not None
    torch.testing.assert_close(
        forced.fusion.new_item_ids.bias, 4.0 * plain.fusion.new_item_ids.bias
    )
    # The ablation at scale 1 is the plain fit again, the scaled model itself untouched.
    back = with_map_scale(forced, popularity, 1.0)
    assert back.fusion.new_item_scale == 1.0 and back.item_ids is not None
    torch.testing.assert_close(back.item_ids.weight, plain.item_ids.weight)
    torch.testing.assert_close(back.item_table(), plain.item_table())
    assert forced.fusion.new_item_scale == 4.0
    assert not torch.allclose(forced.item_table(), plain.item_table())
