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
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ltrec.models import Recommender

RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
FOLDS = 5


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression y ~ x @ w + b, the intercept unpenalised: (w [Dx, Dy], b [Dy])."""
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
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


def impute_new_item_ids(model: Recommender, popularity: np.ndarray, seed: int = 0) -> dict:
    """Fit the content -> ID map on the items with training events, store it in the model's
    `fusion.new_item_ids` and write its prediction into the ID rows of the catalogue items
    without training events. A model without ID vectors or without the map is left as it is.
    Returns what was done, for the training summary."""
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
    lam = max(scores, key=lambda k: scores[k])
    w, b = fit_ridge(content[trained], ids[trained], lam)
    with torch.no_grad():
        new_item_ids.weight.copy_(torch.from_numpy(w.T))
        new_item_ids.bias.copy_(torch.from_numpy(b))
        if untrained.any():
            rows = torch.from_numpy(np.flatnonzero(untrained))
            predicted = torch.from_numpy(content[untrained] @ w + b)
            model.item_ids.weight[rows] = predicted.to(model.item_ids.weight.dtype)
    model.train(was_training)
    return {
        "applied": True,
        "ridge_lambda": lam,
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


def _untrained(popularity: np.ndarray) -> np.ndarray:
    """Catalogue rows (padding excluded) without training events."""
    untrained = np.asarray(popularity) <= 0
    untrained[0] = False
    return untrained
