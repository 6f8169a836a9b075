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
    SHIFTS,
    added_item_vectors,
    as_added_items,
    audience_vectors,
    choose_boost,
    cross_validated_r2,
    fit_ridge,
    fold_out_boosts,
    fold_out_ndcg,
    impute_new_item_ids,
    shift_direction,
    with_plain_map,
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


def test_the_boost_ranks_new_items_best_within_the_tolerance_of_the_plain_map() -> None:
    def grid(*points: tuple[float, float, float, float]) -> list[dict[str, float]]:
        keys = ("scale", "shift", "ndcg@10", "new_item_ndcg@10")
        return [dict(zip(keys, point, strict=True)) for point in points]

    def chosen(*points: tuple[float, float, float, float]) -> tuple[float, float]:
        best = choose_boost(grid(*points))
        return best["scale"], best["shift"]

    plain = (1.0, 0.0, 0.20, 0.01)
    # -1.5% kept, -2.5% not: the best new-item figure among those kept.
    assert chosen(
        plain, (2.0, 0.0, 0.197, 0.03), (1.0, 0.5, 0.1985, 0.04), (2.0, 0.5, 0.195, 0.09)
    ) == (1.0, 0.5)
    # Not the largest boost: the one that ranks new items best.
    assert chosen(plain, (3.0, 0.0, 0.199, 0.02), (1.5, 0.2, 0.199, 0.05)) == (1.5, 0.2)
    # Every boost costs more than 2%: the plain map, whatever the new items gain.
    assert chosen(plain, (2.0, 0.0, 0.19, 0.5), (1.0, 1.0, 0.18, 0.9)) == (1.0, 0.0)
    # A tie goes to the smaller boost; the plain map is the reference wherever it is listed.
    assert chosen((1.5, 0.0, 0.2, 0.05), plain, (1.0, 0.5, 0.2, 0.05)) == (1.0, 0.5)


def _boosts_by_brute_force(
    content: np.ndarray,
    ids: np.ndarray,
    users: np.ndarray,
    histories: list[np.ndarray],
    targets: np.ndarray,
    scales: tuple[float, ...],
    shifts: tuple[float, ...],
    direction: np.ndarray,
    folds: int,
) -> list[dict[str, float]]:
    """fold_out_boosts' figures computed the plain way: the whole catalogue re-scored for
    every fold and boost, each case's target ranked against it."""
    rows = np.arange(1, len(content))
    order = np.random.default_rng(0).permutation(rows)
    fold_of = np.full(len(content), -1)
    for k, part in enumerate(np.array_split(order, folds)):
        fold_of[part] = k
    out = []
    for scale in scales:
        for shift in shifts:
            every = gain_new = hits_new = 0.0
            n_new = 0
            for k in range(folds):
                part, rest = fold_of == k, (fold_of >= 0) & (fold_of != k)
                w, b = fit_ridge(content[rest], ids[rest], 1e-8)
                table = content + ids
                table[part] = content[part] + scale * (content[part] @ w + b) + shift * direction
                for u, history, target in zip(users, histories, targets, strict=True):
                    scores = table @ u
                    scores[0] = -np.inf
                    scores[history] = -np.inf
                    rank = int((scores >= scores[target]).sum()) - 1
                    gain = 1.0 / np.log2(rank + 2.0) if rank < 10 else 0.0
                    every += gain
                    if part[target]:
                        n_new += 1
                        gain_new += gain
                        hits_new += rank < 10
            out.append(
                {
                    "scale": scale,
                    "shift": shift,
                    "ndcg@10": every / (folds * len(targets)),
                    "new_item_ndcg@10": gain_new / n_new,
                    "new_item_recall@10": hits_new / n_new,
                }
            )
    return out


def test_fold_out_boosts_ranks_as_the_plain_computation_does() -> None:
    content, ids, users, histories, targets = _ranking_fixture(n_items=60, seed=5)
    rng = np.random.default_rng(1)
    ids = ids + rng.normal(size=ids.shape)  # only partly predictable: ranks move with boosts
    ids[0] = 0.0
    users, histories, targets = users[:80], histories[:80], targets[:80]
    direction = shift_direction(users, content + ids)
    scales, shifts = (1.0, 2.0), (0.0, 0.5, 1.0)
    got = fold_out_boosts(
        content, ids, np.ones(len(content)), 1e-8, np.arange(1, len(content)), users,
        histories, targets, scales=scales, shifts=shifts, direction=direction, folds=4,
    )  # fmt: skip
    want = _boosts_by_brute_force(
        content, ids, users, histories, targets, scales, shifts, direction, folds=4
    )
    assert [(g["scale"], g["shift"]) for g in got] == [(w["scale"], w["shift"]) for w in want]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w)
    # The boosts move ranks (the comparison is not between constant figures).
    assert len({round(g["ndcg@10"], 9) for g in got}) == len(got)
    with pytest.raises(ValueError, match="direction"):
        fold_out_boosts(
            content, ids, np.ones(len(content)), 1e-8, np.arange(1, len(content)), users,
            histories, targets, shifts=(0.0, 1.0),
        )  # fmt: skip


def test_the_shift_direction_raises_the_mean_user_by_one_spread_of_its_scores() -> None:
    rng = np.random.default_rng(4)
    users = rng.normal(size=(50, 6)) + 3.0
    table = rng.normal(size=(31, 6))
    direction = shift_direction(users, table)
    spread = (users @ table[1:].T).std(axis=1).mean()
    assert users.mean(axis=0) @ direction == pytest.approx(spread)
    assert (users @ direction).mean() == pytest.approx(spread)  # on average, every user too
    assert not shift_direction(np.zeros((3, 6)), table).any()


def test_an_exact_map_is_best_unboosted_and_a_boosted_one_costs() -> None:
    content, ids, users, histories, targets = _ranking_fixture()
    rows = np.arange(1, len(content))
    ones = np.ones(len(content))
    direction = shift_direction(users, content + ids)
    grid = fold_out_boosts(
        content, ids, ones, 1e-8, rows, users, histories, targets, shifts=SHIFTS,
        direction=direction,
    )  # fmt: skip
    assert [(g["scale"], g["shift"]) for g in grid] == [(a, t) for a in SCALES for t in SHIFTS]
    # Every target is its user's top item, and an exact map folds every item back in place.
    assert grid[0]["ndcg@10"] == pytest.approx(1.0)
    assert grid[0]["new_item_ndcg@10"] == pytest.approx(1.0)
    assert grid[0]["new_item_recall@10"] == pytest.approx(1.0)
    assert grid[-1]["ndcg@10"] < 0.95  # three times the ID vector, shifted, misplaces items
    assert choose_boost(grid) == grid[0]
    # The same figure as fold_out_ndcg unboosted (the cases with a fitted target).
    assert grid[0]["new_item_ndcg@10"] == pytest.approx(
        fold_out_ndcg(content, ids, ones, 1e-8, rows, users, histories, targets, folds=10)
    )


def test_a_chosen_boost_scales_and_shifts_the_map_and_its_ablation_undoes_it() -> None:
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
    users = rng.normal(size=(300, CFG.embedding_dim)) + 1.0
    histories = [np.array([1]) for _ in users]
    targets = rng.choice(np.flatnonzero(popularity > 0), size=len(users))
    validation = (users, histories, targets)
    plain = copy.deepcopy(model)
    unit = impute_new_item_ids(
        plain, popularity, validation=validation, scales=(1.0,), shifts=(0.0,)
    )
    assert unit["scale"] == 1.0 and unit["shift"] == 0.0 and "boost_grid" not in unit
    assert not np.any(unit["offset"])
    done = impute_new_item_ids(
        model, popularity, validation=validation, scales=(1.0, 4.0), shifts=(0.0, 0.5)
    )
    assert [(g["scale"], g["shift"]) for g in done["boost_grid"]] == [
        (1.0, 0.0), (1.0, 0.5), (4.0, 0.0), (4.0, 0.5)
    ]  # fmt: skip
    best = choose_boost(done["boost_grid"])
    assert (done["scale"], done["shift"]) == (best["scale"], best["shift"])
    assert model.fusion.new_item_scale == done["scale"]
    forced = copy.deepcopy(plain)
    impute_new_item_ids(forced, popularity, validation=validation, scales=(4.0,), shifts=(0.5,))
    assert forced.fusion.new_item_scale == 4.0
    assert forced.fusion.new_item_ids is not None and forced.item_ids is not None
    assert plain.fusion.new_item_ids is not None
    # The direction is measured on the catalogue as training leaves it (no predicted rows).
    untouched = without_new_item_ids(plain, popularity).item_table().detach()
    direction = shift_direction(users, untouched.double().numpy())
    offset = torch.from_numpy(forced.fusion.new_item_offset).float()
    torch.testing.assert_close(offset, 0.5 * torch.from_numpy(direction).float())
    torch.testing.assert_close(
        forced.fusion.new_item_ids.weight, 4.0 * plain.fusion.new_item_ids.weight
    )
    torch.testing.assert_close(
        forced.fusion.new_item_ids.bias, 4.0 * plain.fusion.new_item_ids.bias + offset
    )
    untrained = torch.from_numpy(popularity <= 0)
    untrained[0] = False
    rows = np.flatnonzero(untrained.numpy())
    # A catalogue item without training events is not new: its row gets the best boost without
    # a shift, here none on the grid, so the plain prediction; with an unshifted point (4, 0)
    # on the grid, that point's scale.
    assert (
        done["catalogue_scale"]
        == choose_boost([g for g in done["boost_grid"] if g["shift"] == 0.0])["scale"]
    )
    with torch.no_grad():
        torch.testing.assert_close(forced.item_table()[untrained], plain.item_table()[untrained])
    scaled = copy.deepcopy(plain)
    fit = impute_new_item_ids(
        scaled, popularity, validation=validation, scales=(4.0,), shifts=(0.0, 0.5)
    )
    assert fit["catalogue_scale"] == 4.0
    with torch.no_grad():
        lift = scaled.item_table() - 4.0 * plain.item_table() + 3.0 * plain.content_table()
    torch.testing.assert_close(lift[untrained], torch.zeros_like(lift[untrained]))
    # An added item's vector (the item encoder's: content + the map) is shifted: its score rises
    # for the users the mean user stands for.
    added = added_item_vectors(forced, rows)
    with torch.no_grad():
        content = forced.content_table()[untrained]  # `ItemEncoder`: vector + map(vector)
        torch.testing.assert_close(added, content + forced.fusion.new_item_ids(content))
        torch.testing.assert_close(
            added - 4.0 * plain.item_table()[untrained] + 3.0 * content,
            offset.expand(len(rows), -1),
        )
    # Audience scores an added item without the shift: the scaled prediction.
    with torch.no_grad():
        torch.testing.assert_close(
            audience_vectors(forced, added), content + 4.0 * plain.item_ids.weight[untrained]
        )
    # `as_added_items` gives catalogue rows those vectors (the cold view's held-out items), in
    # place, and the plain-map ablation undoes the shift on them too.
    as_added = copy.deepcopy(forced)
    as_added_items(as_added, rows)
    with torch.no_grad():
        torch.testing.assert_close(as_added.item_table()[untrained], added)
        torch.testing.assert_close(
            as_added.item_table()[~untrained], forced.item_table()[~untrained]
        )
    torch.testing.assert_close(
        with_plain_map(as_added, popularity).item_table(), plain.item_table()
    )
    # The ablation is the plain fit again, the boosted model itself untouched.
    back = with_plain_map(forced, popularity)
    assert back.fusion.new_item_scale == 1.0 and back.item_ids is not None
    assert back.fusion.new_item_ids is not None
    torch.testing.assert_close(back.item_ids.weight, plain.item_ids.weight)
    torch.testing.assert_close(back.fusion.new_item_ids.bias, plain.fusion.new_item_ids.bias)
    torch.testing.assert_close(back.item_table(), plain.item_table())
    assert forced.fusion.new_item_scale == 4.0
    assert not torch.allclose(forced.fusion.new_item_ids.bias, plain.fusion.new_item_ids.bias)
    # and for a boosted catalogue row too
    assert not torch.allclose(scaled.item_table(), plain.item_table())
    torch.testing.assert_close(with_plain_map(scaled, popularity).item_table(), plain.item_table())
