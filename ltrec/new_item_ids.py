"""ID vectors for items that training never saw, predicted from their content.

An item vector is content + ID vector. Items without training events (added after training, or
held out as cold) get no gradient, so their ID vector stays at its initial zero and they are
scored by content alone, against known items that carry both terms: they are rarely ranked
high. Here a linear map from an item's content vector to its trained ID vector is fitted after
training by ridge regression over the items that had training events (the penalty chosen by
k-fold cross-validated R^2 on those items, never on test data), and stands in for the missing
ID vector:

- catalogue items without training events get `map(content)` as their ID vector row;
- items added after training (`UpsertItems`, the exported item encoder) get
  `content + map(content)` from the same map (`ItemEncoder`).

A content vector carries less than a trained ID vector (the R^2 is printed in the training
summary), so the prediction is what the item's text, attributes and photo say its ID vector
would be: the typical collaborative placement of items like it.

Which placement is "typical" depends on how the fit weighs the items. Recommendation targets are
events, and events fall on items in proportion to their popularity, so the fit may weigh each
item by popularity^a (a = 0: every item alike, most of them tail items; a = 1: every training
event alike). The exponent and the penalty are chosen together on validation by what the map is
for (`fold_out_ndcg`): the items with events are split into folds, each fold's ID vectors are
replaced by the map fitted on the other folds, and the validation events whose target falls in
the fold are ranked against the whole catalogue, as a new item's events would be. Without
validation cases, the penalty is chosen by cross-validated R^2 and the items weigh alike.

A ridge prediction is shrunk towards the catalogue's mean ID vector (content explains little of
an ID vector), so every new item looks like a bland average item and rarely reaches anyone's top
10. The fitted map is therefore scaled by the largest factor whose validation NDCG@10 over every
case, with a tenth of the items scored as new at a time, stays within 2% of the plain fit's
(`fold_out_scales`, `choose_scale`): new items reach the users their content points to, at a
bounded cost to the known items they displace.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ltrec.models import Recommender

RIDGE_GRID = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
# Exponents a of the items' weights popularity^a in the fit (0: every item alike; 1: every
# training event alike), chosen on validation with the penalty. The served default fits every
# item alike. An event-weighted fit (a chosen from EVENT_WEIGHTED_EXPONENTS) ranks new items
# higher for the users who pick them (ML-1M cold split: cold-item Recall@10 0.0143 -> 0.0232),
# but places them alike, so it ranks the users for one new item (Audience recall@100
# 0.12 -> 0.07) and the new items against each other (ForecastDemand's Spearman 0.40 -> 0.25,
# under the category average) far worse; the report's cold view measures both
# (`experiments/report/views.py`).
POPULARITY_EXPONENTS = (0.0,)
# Scales s of the predicted ID vector (the map's weights and intercept times s), chosen on
# validation after the penalty. A ridge prediction is the mean ID vector of items with such
# content, shrunk towards the catalogue's mean since content predicts little of it (R^2 about
# 0.06 on ML-1M): every new item scores like a bland average item and rarely makes a top 10.
# A larger s restores the spread that trained ID vectors have, so new items reach the users
# whose tastes their content points to, at a cost to the known items they displace. The chosen
# s is the largest whose validation NDCG@10 over every case, with a tenth of the items scored as
# new at a time (`fold_out_scales`), is within SCALE_TOLERANCE of s = 1's: the same rule and
# budget as the serving default long-tail weight (`ltrec.evaluation.tune_long_tail_weight`).
SCALES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
SCALE_TOLERANCE = 0.02
SCALE_FOLDS = 10
EVENT_WEIGHTED_EXPONENTS = (0.0, 0.5, 1.0)
FOLDS = 5
# Scores held at once by `fold_out_ndcg` (validation cases x catalogue; bounds its memory).
SCORE_BUDGET = 2**24


def fit_ridge(
    x: np.ndarray, y: np.ndarray, lam: float, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression y ~ x @ w + b, the intercept unpenalised: (w [Dx, Dy], b [Dy]).

    `sample_weight` (non-negative, not all zero) weighs each row's squared error; the weights
    are scaled to a mean of 1, so a penalty means the same with or without them."""
    if sample_weight is None:
        weight = np.ones(len(x))
    else:
        weight = np.asarray(sample_weight, dtype=np.float64)
        if weight.shape != (len(x),) or (weight < 0).any() or weight.sum() <= 0:
            raise ValueError(f"sample_weight must be {len(x)} non-negative weights, not all zero")
        weight = weight * (len(x) / weight.sum())
    share = weight / weight.sum()
    x_mean, y_mean = share @ x, share @ y
    xc, yc = x - x_mean, y - y_mean
    xw = xc * weight[:, None]
    w = np.linalg.solve(xw.T @ xc + lam * np.eye(x.shape[1]), xw.T @ yc)
    return w, y_mean - x_mean @ w


def cross_validated_r2(
    x: np.ndarray,
    y: np.ndarray,
    grid: Sequence[float] = RIDGE_GRID,
    folds: int = FOLDS,
    seed: int = 0,
) -> dict[float, float]:
    """R^2 of the held-out folds' predictions (pooled over folds and output dimensions) per
    penalty; the rows are split into `folds` seeded, disjoint folds."""
    order = np.random.default_rng(seed).permutation(len(x))
    parts = np.array_split(order, folds)
    total = float(((y - y.mean(axis=0)) ** 2).sum())
    scores = {}
    for lam in grid:
        error = 0.0
        for part in parts:
            fit_rows = np.setdiff1d(order, part)
            w, b = fit_ridge(x[fit_rows], y[fit_rows], lam)
            error += float(((x[part] @ w + b - y[part]) ** 2).sum())
        scores[float(lam)] = 1.0 - error / total if total > 0 else 0.0
    return scores


def _folds(fit_rows: np.ndarray, n_rows: int, folds: int, seed: int) -> np.ndarray:
    """Each catalogue row's fold, -1 for rows outside `fit_rows` (split into `folds` seeded,
    disjoint folds)."""
    order = np.random.default_rng(seed).permutation(fit_rows)
    fold_of = np.full(n_rows, -1)
    for k, part in enumerate(np.array_split(order, folds)):
        fold_of[part] = k
    return fold_of


def _history_cells(histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(case, item) of every history item of a chunk of cases, to mask at once."""
    rows = np.concatenate([np.full(len(history), i) for i, history in enumerate(histories)])
    cols = np.concatenate(list(histories))
    return rows.astype(np.int64), cols.astype(np.int64)


def _target_ranks(
    scores: np.ndarray, cells: tuple[np.ndarray, np.ndarray], targets: np.ndarray
) -> np.ndarray:
    """Each case's target rank (0 = first) with padding and the case's history masked (in
    place), ties counted against the target: every other item scored at least as high ranks
    above it, as in `ltrec.evaluation`."""
    scores[:, 0] = -np.inf
    scores[cells] = -np.inf
    target = scores[np.arange(len(scores)), targets]
    return np.asarray((scores >= target[:, None]).sum(axis=1) - 1)


def fold_out_ndcg(
    content: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    lam: float,
    fit_rows: np.ndarray,
    user_vectors: np.ndarray,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    folds: int = FOLDS,
    seed: int = 0,
) -> float:
    """Validation NDCG@10 of items scored as if they were new: the `fit_rows` items (those with
    training events) are split into `folds` seeded folds; for each fold, its items' vectors
    become content + the map fitted on the other folds (ridge with `weights` and `lam`), and
    every validation case whose target is in the fold ranks the whole catalogue (the rows of
    `content`, row 0 padding; the user's history excluded, ties counted against the target, as
    in `ltrec.evaluation`). Cases whose target is not in `fit_rows` count for nothing.

    `user_vectors` [C, D] are the validation cases' user vectors, `histories` their history
    indices and `targets` their target indices."""
    fold_of = _folds(fit_rows, len(content), folds, seed)
    table = content + ids
    gains, cases = 0.0, 0
    for k in range(folds):
        part = np.flatnonzero(fold_of == k)
        rest = np.flatnonzero((fold_of >= 0) & (fold_of != k))
        w, b = fit_ridge(content[rest], ids[rest], lam, weights[rest])
        folded = table.copy()
        folded[part] = content[part] + content[part] @ w + b
        rows = np.flatnonzero(fold_of[targets] == k)
        step = max(1, SCORE_BUDGET // len(content))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            cells = _history_cells([histories[int(r)] for r in chunk])
            rank = _target_ranks(user_vectors[chunk] @ folded.T, cells, targets[chunk])
            hit = rank < 10
            gains += float((1.0 / np.log2(rank[hit] + 2.0)).sum())
        cases += len(rows)
    return gains / cases if cases else 0.0


def fold_out_scales(
    content: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    lam: float,
    fit_rows: np.ndarray,
    user_vectors: np.ndarray,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    scales: Sequence[float] = SCALES,
    folds: int = SCALE_FOLDS,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Per scale s: validation NDCG@10 over every case, and NDCG@10 / Recall@10 over the cases
    whose target is scored as new, with the `fit_rows` items split into `folds` seeded folds
    and each fold's vectors in turn replaced by content + s * the map fitted on the other folds
    (ridge with `weights` and `lam`). Full ranking over the rows of `content` (row 0 padding),
    the user's history excluded, ties counted against the target, as in `fold_out_ndcg`; every
    case counts in every fold, so the every-case figure is the mean over folds."""
    fold_of = _folds(fit_rows, len(content), folds, seed)
    table = content + ids
    every = np.zeros(len(scales))
    new_gain, new_hits = np.zeros(len(scales)), np.zeros(len(scales))
    new_cases = 0
    step = max(1, SCORE_BUDGET // len(content))
    for k in range(folds):
        part = np.flatnonzero(fold_of == k)
        rest = np.flatnonzero((fold_of >= 0) & (fold_of != k))
        w, b = fit_ridge(content[rest], ids[rest], lam, weights[rest])
        predicted = content[part] @ w + b
        new_cases += int((fold_of[targets] == k).sum())
        for start in range(0, len(targets), step):
            chunk = np.arange(start, min(start + step, len(targets)))
            users = user_vectors[chunk]
            base = users @ table.T
            plain, spread = users @ content[part].T, users @ predicted.T
            cells = _history_cells([histories[int(r)] for r in chunk])
            is_new = fold_of[targets[chunk]] == k
            for j, scale in enumerate(scales):
                scores = base.copy()
                scores[:, part] = plain + scale * spread
                rank = _target_ranks(scores, cells, targets[chunk])
                gain = np.where(rank < 10, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)
                every[j] += float(gain.sum())
                new_gain[j] += float(gain[is_new].sum())
                new_hits[j] += float((rank[is_new] < 10).sum())
    return [
        {
            "scale": float(scale),
            "ndcg@10": every[j] / (folds * len(targets)) if len(targets) else 0.0,
            "new_item_ndcg@10": new_gain[j] / new_cases if new_cases else 0.0,
            "new_item_recall@10": new_hits[j] / new_cases if new_cases else 0.0,
        }
        for j, scale in enumerate(scales)
    ]


def choose_scale(grid: Sequence[dict[str, float]], tolerance: float = SCALE_TOLERANCE) -> float:
    """The largest scale whose every-case NDCG@10 is within `tolerance` (relative) of the
    smallest scale's (scale 1 in `SCALES`; the smallest when nothing larger qualifies)."""
    reference = min(grid, key=lambda g: g["scale"])
    floor = (1.0 - tolerance) * reference["ndcg@10"]
    return max(g["scale"] for g in grid if g["ndcg@10"] >= floor or g is reference)


def impute_new_item_ids(
    model: Recommender,
    popularity: np.ndarray,
    seed: int = 0,
    validation: tuple[np.ndarray, Sequence[np.ndarray], np.ndarray] | None = None,
    exponents: Sequence[float] = POPULARITY_EXPONENTS,
    scales: Sequence[float] = SCALES,
) -> dict:
    """Fit the content -> ID map on the items with training events, store it in the model's
    `fusion.new_item_ids` and write its prediction into the ID rows of the catalogue items
    without training events. A model without ID vectors or without the map is left as it is.

    `validation` (user vectors [C, D], history indices, target indices of the validation
    cases, as the model scores them) chooses the popularity exponent (from `exponents`) and
    the penalty by `fold_out_ndcg`, then the scale of the prediction from `scales` by
    `fold_out_scales` and `choose_scale`; without it, the penalty is chosen by cross-validated
    R^2, every item weighs alike and the scale is 1. Returns what was done, for the training
    summary."""
    new_item_ids = getattr(model.fusion, "new_item_ids", None)
    if model.item_ids is None or new_item_ids is None:
        return {"applied": False}
    untrained = _untrained(popularity)
    trained = ~untrained
    trained[0] = False
    if trained.sum() < 2 * FOLDS:
        return {"applied": False, "reason": f"fewer than {2 * FOLDS} items with training events"}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        content = model.content_table().double().numpy()
        ids = model.item_ids.weight.double().numpy()
    scores = cross_validated_r2(content[trained], ids[trained], seed=seed)
    counts = np.asarray(popularity, dtype=np.float64)
    chosen: dict = {
        "popularity_exponent": 0.0,
        "ridge_lambda": max(scores, key=lambda k: scores[k]),
        "chosen_by": "cross-validated R^2",
    }
    if validation is not None:
        user_vectors, histories, targets = validation
        fit_rows = np.flatnonzero(trained)
        grid = []
        for exponent in exponents:
            for lam in RIDGE_GRID:
                ndcg = fold_out_ndcg(
                    content, ids, counts**exponent, lam, fit_rows,
                    np.asarray(user_vectors, dtype=np.float64), histories,
                    np.asarray(targets), seed=seed,
                )  # fmt: skip
                grid.append({"popularity_exponent": exponent, "ridge_lambda": lam, "ndcg@10": ndcg})
        best = max(grid, key=lambda g: g["ndcg@10"])
        chosen = {
            "popularity_exponent": best["popularity_exponent"],
            "ridge_lambda": best["ridge_lambda"],
            "chosen_by": "validation NDCG@10 of items scored as new (fold_out_ndcg)",
            "fold_out_ndcg@10": best["ndcg@10"],
            "grid": grid,
        }
    scale = 1.0
    if validation is not None and tuple(scales) != (1.0,):  # (1.0,): the plain fit, no search
        user_vectors, histories, targets = validation
        scale_grid = fold_out_scales(
            content, ids, counts ** chosen["popularity_exponent"], chosen["ridge_lambda"],
            np.flatnonzero(trained), np.asarray(user_vectors, dtype=np.float64), histories,
            np.asarray(targets), scales=scales, seed=seed,
        )  # fmt: skip
        scale = choose_scale(scale_grid)
        chosen["scale_grid"] = scale_grid
    chosen["scale"] = scale
    weights = counts[trained] ** chosen["popularity_exponent"]
    w, b = fit_ridge(content[trained], ids[trained], chosen["ridge_lambda"], weights)
    w, b = scale * w, scale * b
    with torch.no_grad():
        new_item_ids.weight.copy_(torch.from_numpy(w.T))
        new_item_ids.bias.copy_(torch.from_numpy(b))
        if untrained.any():
            rows = torch.from_numpy(np.flatnonzero(untrained))
            predicted = torch.from_numpy(content[untrained] @ w + b)
            model.item_ids.weight[rows] = predicted.to(model.item_ids.weight.dtype)
    model.fusion.new_item_scale = scale  # what `with_map_scale` undoes
    model.train(was_training)
    return {
        "applied": True,
        **chosen,
        "cv_r2": scores,
        "fitted_items": int(trained.sum()),
        "imputed_items": int(untrained.sum()),
    }


def without_new_item_ids(model: Recommender, popularity: np.ndarray) -> Recommender:
    """A copy of `model` without what `impute_new_item_ids` did (an ablation): the ID rows of the
    items without training events back at zero, and the map at zero, as training leaves them."""
    plain = copy.deepcopy(model)
    new_item_ids = getattr(plain.fusion, "new_item_ids", None)
    if plain.item_ids is None or new_item_ids is None:
        return plain
    with torch.no_grad():
        plain.item_ids.weight[torch.from_numpy(np.flatnonzero(_untrained(popularity)))] = 0.0
        new_item_ids.weight.zero_()
        new_item_ids.bias.zero_()
    return plain


def with_map_scale(model: Recommender, popularity: np.ndarray, scale: float) -> Recommender:
    """A copy of `model` whose new-item map (and the predicted ID rows of the items without
    training events) is `scale` times the fitted ridge map instead of the scale it carries (an
    ablation: 1.0 is the plain ridge prediction)."""
    copied = copy.deepcopy(model)
    new_item_ids = getattr(copied.fusion, "new_item_ids", None)
    current = float(copied.fusion.new_item_scale)
    if copied.item_ids is None or new_item_ids is None or current == scale:
        return copied
    factor = scale / current
    with torch.no_grad():
        rows = torch.from_numpy(np.flatnonzero(_untrained(popularity)))
        copied.item_ids.weight[rows] *= factor
        new_item_ids.weight.mul_(factor)
        new_item_ids.bias.mul_(factor)
    copied.fusion.new_item_scale = scale
    return copied


def _untrained(popularity: np.ndarray) -> np.ndarray:
    """Catalogue rows (padding excluded) without training events."""
    untrained = np.asarray(popularity) <= 0
    untrained[0] = False
    return untrained
