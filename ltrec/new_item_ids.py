"""ID vectors for items that training never saw, predicted from their content.

An item vector is content + ID vector. Items without training events (added after training, or
held out as cold) get no gradient, so their ID vector stays at its initial zero and they are
scored by content alone, against known items that carry both terms: they are rarely ranked
high. Here a linear map from an item's content vector to its trained ID vector is fitted after
training by ridge regression over the items that had training events (the penalty chosen by
k-fold cross-validated R^2 on those items, never on test data), and stands in for the missing
ID vector:

- catalogue items without training events get `map(content)` as their ID vector row, with
  the best boost that has no shift (below);
- items added after training (`UpsertItems`, the exported item encoder) get
  `content + map(content)` from the same map (`ItemEncoder`), the shift included.

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
10. A boost restores its reach: a scale of the fitted map (the spread trained ID vectors have)
and (`TrainConfig.new_item_shift`, on by default) a shift of the prediction along the mean user
vector (a new item's score rises by about the same amount for every user, as an item bias
would). The boost is chosen on validation with a tenth of the items scored as new at a time
(`fold_out_boosts`, `choose_boost`): the one that ranks the items scored as new best (their
validation NDCG@10) among those whose NDCG@10 over every case stays within 2% of the plain
fit's, so new items reach the users their content points to, at a bounded cost to the known
items they displace.

The shift is for items added after training, and only for them. A catalogue item without
training events was listed through the whole training window and nobody picked it: it is not
new, and lifting it for every user costs list places that no one takes (on ML-1M, 179 films
without training events; lifted, they lowered the served default long-tail weight and its
Coverage@10). So its row gets the map with the best boost among those without a shift
(`impute_new_item_ids`: the scale the same rule keeps on the grid's unshifted points), while
the map itself, which the item encoder applies to added items, carries the chosen scale and
shift; `as_added_items` gives catalogue rows the added items' vectors (the cold-start view's
held-out items stand for products added after training).

And the shift lifts an added item as a candidate only: a lift for every user does not reorder
the users of one item, nor say what a history of it or a query of it means. So where an added
item is read as a query (SimilarItems, Audience and ForecastDemand: the exported item lookup) or
as a history event (the user encoder), its vector is taken without the shift
(`ltrec.models.ItemLookup`, `UserEncoder`; `audience_vectors` here).
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
# whose tastes their content points to, at a cost to the known items they displace. The scale
# kept is the one whose items scored as new rank best within SCALE_TOLERANCE of s = 1's NDCG@10
# over every case, a tenth of the items scored as new at a time (`fold_out_boosts`,
# `choose_boost`): the same budget as the serving default long-tail weight
# (`ltrec.evaluation.tune_long_tail_weight`).
SCALES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
# Shifts t of the predicted ID vector along the mean user direction, in units of the spread of a
# user's scores (`shift_direction`): a new item's score rises by t times that spread for a user
# whose vector projects onto the mean user vector as the mean does (by about as much for every
# user; ML-1M's user vectors have cosine 0.5 to their mean). Scaling alone raises a new item for
# the users its predicted ID vector points to and lowers it for the others; the shift raises it
# for all. On ML-1M's cold split (validation, a tenth of the items scored as new at a time), the
# shift alone reaches new-item Recall@10 0.050 for -0.95% NDCG@10 over every case, the scale
# alone 0.039 for the same cost. On by default, for added items only (the module docstring).
# Chosen with the scale (`choose_boost`), in steps of
# 0.05: the choice sits at the edge of the 2% budget, and steps of 0.1 left up to half a point
# of it unused (the cold split's first run kept scale 1.5 and shift 0.2 at -1.7%, scale 1 and
# shift 0.4 tying with it on new-item NDCG@10).
SHIFTS = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1
SCALE_TOLERANCE = 0.02


def shift_grid(shift: bool) -> tuple[float, ...]:
    """The shifts `impute_new_item_ids` searches: `SHIFTS` when the shift is on
    (`TrainConfig.new_item_shift`, the default), none otherwise."""
    return SHIFTS if shift else (0.0,)


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


def shift_direction(user_vectors: np.ndarray, item_table: np.ndarray) -> np.ndarray:
    """The unit of a new item's shift: the mean user vector m scaled so that a user whose
    vector projects onto m as m itself does (u . m = |m|^2, the mean projection) sees a score
    rise of one spread of its scores (the mean over users of the standard deviation of their
    scores over the catalogue rows 1..N of `item_table`), [D]."""
    users = np.asarray(user_vectors, dtype=np.float64)
    mean = users.mean(axis=0)
    norm2 = float(mean @ mean)
    if len(users) == 0 or norm2 <= 0:
        return np.zeros(np.asarray(item_table).shape[1])
    spread, step = 0.0, max(1, SCORE_BUDGET // max(1, len(item_table)))
    for start in range(0, len(users), step):
        spread += float((users[start : start + step] @ item_table[1:].T).std(axis=1).sum())
    return (spread / len(users)) * mean / norm2


def fold_out_boosts(
    content: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    lam: float,
    fit_rows: np.ndarray,
    user_vectors: np.ndarray,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    scales: Sequence[float] = SCALES,
    shifts: Sequence[float] = (0.0,),
    direction: np.ndarray | None = None,
    folds: int = SCALE_FOLDS,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Per (scale s, shift t): validation NDCG@10 over every case, and NDCG@10 / Recall@10 over
    the cases whose target is scored as new, with the `fit_rows` items split into `folds` seeded
    folds and each fold's vectors in turn replaced by content + s * the map fitted on the other
    folds (ridge with `weights` and `lam`) + t * `direction` (`shift_direction`; needed when a
    shift is not 0). Full ranking over the rows of `content` (row 0 padding), the user's
    history excluded, ties counted against the target, as in `fold_out_ndcg`; every case counts
    in every fold, so the every-case figure is the mean over folds.

    Only the fold's columns change from one boost to the next, so each chunk of cases is
    scored once: a target's rank is the count of the other columns at or above its score plus
    that of the fold's boosted columns."""
    if direction is None:
        if any(shift != 0.0 for shift in shifts):
            raise ValueError("a shift needs its direction")
        direction = np.zeros(content.shape[1])
    fold_of = _folds(fit_rows, len(content), folds, seed)
    table = content + ids
    boosts = [(float(scale), float(shift)) for scale in scales for shift in shifts]
    every = np.zeros(len(boosts))
    new_gain, new_hits = np.zeros(len(boosts)), np.zeros(len(boosts))
    new_cases = 0
    step = max(1, SCORE_BUDGET // len(content))
    for k in range(folds):
        part = np.flatnonzero(fold_of == k)
        rest = np.flatnonzero((fold_of >= 0) & (fold_of != k))
        w, b = fit_ridge(content[rest], ids[rest], lam, weights[rest])
        predicted = content[part] @ w + b
        in_part = np.zeros(len(content), dtype=bool)
        in_part[part] = True
        column = np.full(len(content), -1)
        column[part] = np.arange(len(part))
        new_cases += int(in_part[targets].sum())
        for start in range(0, len(targets), step):
            chunk = np.arange(start, min(start + step, len(targets)))
            users = user_vectors[chunk]
            scores = users @ table.T
            cells = _history_cells([histories[int(r)] for r in chunk])
            scores[:, 0] = -np.inf
            scores[cells] = -np.inf
            chunk_targets = targets[chunk]
            is_new = in_part[chunk_targets]
            plain, spread = users @ content[part].T, users @ predicted.T
            lift = users @ direction  # [C]: a unit shift's score rise per user
            part_cells = in_part[cells[1]]
            part_rows, part_cols = cells[0][part_cells], column[cells[1][part_cells]]
            outside = scores.copy()
            outside[:, part] = -np.inf  # the other columns, scored once
            # A known target keeps its score; its count among the other columns is fixed.
            known = ~is_new
            known_score = scores[known, chunk_targets[known]]
            known_outside = (outside[known] >= known_score[:, None]).sum(axis=1)
            for j, (scale, shift) in enumerate(boosts):
                boosted = plain + scale * spread + shift * lift[:, None]
                boosted[part_rows, part_cols] = -np.inf
                rank = np.empty(len(chunk), dtype=np.int64)
                rank[known] = (
                    known_outside + (boosted[known] >= known_score[:, None]).sum(axis=1) - 1
                )
                if is_new.any():
                    new_score = boosted[is_new, column[chunk_targets[is_new]]]
                    rank[is_new] = (
                        (outside[is_new] >= new_score[:, None]).sum(axis=1)
                        + (boosted[is_new] >= new_score[:, None]).sum(axis=1)
                        - 1
                    )
                gain = np.where(rank < 10, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)
                every[j] += float(gain.sum())
                new_gain[j] += float(gain[is_new].sum())
                new_hits[j] += float((rank[is_new] < 10).sum())
    return [
        {
            "scale": scale,
            "shift": shift,
            "ndcg@10": every[j] / (folds * len(targets)) if len(targets) else 0.0,
            "new_item_ndcg@10": new_gain[j] / new_cases if new_cases else 0.0,
            "new_item_recall@10": new_hits[j] / new_cases if new_cases else 0.0,
        }
        for j, (scale, shift) in enumerate(boosts)
    ]


def choose_boost(
    grid: Sequence[dict[str, float]], tolerance: float = SCALE_TOLERANCE
) -> dict[str, float]:
    """The grid point (`fold_out_boosts`) whose new-item NDCG@10 is highest among those whose
    every-case NDCG@10 is within `tolerance` (relative) of the plain fit's (the smallest scale
    and shift: 1 and 0 in `SCALES` and `SHIFTS`); on a tie the smaller boost. The plain fit
    when nothing else qualifies."""
    reference = min(grid, key=lambda g: (g["scale"], g.get("shift", 0.0)))
    floor = (1.0 - tolerance) * reference["ndcg@10"]
    kept = [g for g in grid if g["ndcg@10"] >= floor or g is reference]
    return max(kept, key=lambda g: (g["new_item_ndcg@10"], -g["scale"], -g.get("shift", 0.0)))


def impute_new_item_ids(
    model: Recommender,
    popularity: np.ndarray,
    seed: int = 0,
    validation: tuple[np.ndarray, Sequence[np.ndarray], np.ndarray] | None = None,
    exponents: Sequence[float] = POPULARITY_EXPONENTS,
    scales: Sequence[float] = SCALES,
    shifts: Sequence[float] = (0.0,),
) -> dict:
    """Fit the content -> ID map on the items with training events, store it in the model's
    `fusion.new_item_ids` (with the chosen boost, its shift in the intercept: for items added
    after training) and write the prediction with the best unshifted boost
    (`catalogue_scale`) into the ID rows of the catalogue items without training events. A
    model without ID vectors or without the map is left as it is.

    `validation` (user vectors [C, D], history indices, target indices of the validation
    cases, as the model scores them) chooses the popularity exponent (from `exponents`) and
    the penalty by `fold_out_ndcg`, then the scale of the prediction (from `scales`) and its
    shift along the mean user direction (from `shifts`: none by default; training passes
    `SHIFTS` with `TrainConfig.new_item_shift`; `shift_direction`) together by
    `fold_out_boosts` and `choose_boost`; without it, the penalty is chosen by cross-validated
    R^2, every item weighs alike, the scale is 1 and there is no shift. Returns what was done,
    for the training summary (`offset`: the shift's vector, added to the map's intercept)."""
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
        ids = model.item_ids.weight.double().numpy().copy()
    # The untrained rows as training leaves them (zero), not as an earlier fit predicted them:
    # fitting again gives the same map.
    ids[untrained] = 0.0
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
    scale, shift, catalogue_scale = 1.0, 0.0, 1.0
    offset = np.zeros(ids.shape[1])
    # (1.0,) and (0.0,): the plain fit, no search
    if validation is not None and (tuple(scales) != (1.0,) or tuple(shifts) != (0.0,)):
        user_vectors, histories, targets = validation
        users = np.asarray(user_vectors, dtype=np.float64)
        direction = shift_direction(users, content + ids)
        boost_grid = fold_out_boosts(
            content, ids, counts ** chosen["popularity_exponent"], chosen["ridge_lambda"],
            np.flatnonzero(trained), users, histories, np.asarray(targets), scales=scales,
            shifts=shifts, direction=direction, seed=seed,
        )  # fmt: skip
        best = choose_boost(boost_grid)
        scale, shift = best["scale"], best["shift"]
        offset = shift * direction
        # The catalogue rows get no shift, so their scale is the best among the unshifted
        # points (the same rule; the plain fit when the grid has none).
        unshifted = [g for g in boost_grid if g["shift"] == 0.0]
        catalogue_scale = choose_boost(unshifted)["scale"] if unshifted else 1.0
        chosen["boost_grid"] = boost_grid
        chosen["shift_unit_norm"] = float(np.linalg.norm(direction))
    chosen["scale"] = scale
    chosen["shift"] = shift
    chosen["offset"] = offset.tolist()
    chosen["catalogue_scale"] = catalogue_scale
    weights = counts[trained] ** chosen["popularity_exponent"]
    w, b = fit_ridge(content[trained], ids[trained], chosen["ridge_lambda"], weights)
    with torch.no_grad():
        new_item_ids.weight.copy_(torch.from_numpy(scale * w.T))
        new_item_ids.bias.copy_(torch.from_numpy(scale * b + offset))
        if untrained.any():  # listed through training, not new: no shift
            rows = torch.from_numpy(np.flatnonzero(untrained))
            predicted = torch.from_numpy(catalogue_scale * (content[untrained] @ w + b))
            model.item_ids.weight[rows] = predicted.to(model.item_ids.weight.dtype)
    model.fusion.new_item_scale = scale  # what `with_plain_map` undoes
    model.fusion.new_item_offset = offset
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


def with_plain_map(model: Recommender, popularity: np.ndarray) -> Recommender:
    """A copy of `model` whose new-item map (and the predicted ID rows of the items without
    training events) is the plain ridge prediction: the boost it carries (`fusion.new_item_scale`
    and `fusion.new_item_offset`) taken out (an ablation). The model itself is untouched."""
    copied = copy.deepcopy(model)
    new_item_ids = getattr(copied.fusion, "new_item_ids", None)
    scale = float(copied.fusion.new_item_scale)
    offset = getattr(copied.fusion, "new_item_offset", None)
    offset = np.zeros(0) if offset is None else np.asarray(offset, dtype=np.float64)
    if copied.item_ids is None or new_item_ids is None or (scale == 1.0 and not offset.any()):
        return copied
    with torch.no_grad():
        rows = torch.from_numpy(np.flatnonzero(_untrained(popularity)))
        ids = copied.item_ids.weight
        shift = torch.from_numpy(offset).to(ids.dtype) if offset.size else 0.0
        new_item_ids.weight.div_(scale)
        new_item_ids.bias.copy_((new_item_ids.bias - shift) / scale)
        copied.fusion.new_item_scale = 1.0
        copied.fusion.new_item_offset = np.zeros(ids.shape[1])
        # The rows as `impute_new_item_ids` leaves them (no shift), or as `as_added_items` does
        # (the shift): the plain prediction either way.
        ids[rows] = _mapped(copied, _content_rows(copied, rows))
    return copied


def as_added_items(model: Recommender, rows: np.ndarray) -> None:
    """Give the catalogue `rows` (items without training events) the ID vectors that items added
    after training get from the item encoder: the map's prediction with its whole boost, the
    shift included (`impute_new_item_ids` leaves the shift out of catalogue rows). In place; a
    model without the map is left as it is."""
    if model.item_ids is None or getattr(model.fusion, "new_item_ids", None) is None:
        return
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    predicted = _mapped(model, _content_rows(model, index), with_offset=True)
    with torch.no_grad():
        model.item_ids.weight[index] = predicted


def added_item_vectors(model: Recommender, rows: np.ndarray) -> torch.Tensor:
    """The item vectors [R, D] that catalogue `rows` would have as items added after training
    (content + the map's prediction, its whole boost), whatever their ID rows hold now: the
    rows of `model.item_table()` otherwise."""
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    if model.item_ids is None or getattr(model.fusion, "new_item_ids", None) is None:
        with torch.no_grad():
            return model.item_table()[index]
    content = _content_rows(model, index)
    return content + _mapped(model, content, with_offset=True).to(content.dtype)


def audience_vectors(model: Recommender, vectors: torch.Tensor) -> torch.Tensor:
    """Added items' vectors as Audience and ForecastDemand score them: without the boost's shift
    (`Recommender.added_item_offset`), a lift for every user that would otherwise rank an item's
    users by how close each is to the mean user (the exported item lookup does the same)."""
    offset = model.added_item_offset()
    return vectors if offset is None else vectors - offset.to(vectors.dtype)


def _content_rows(model: Recommender, rows: torch.Tensor) -> torch.Tensor:
    """The content vectors of catalogue `rows`, as evaluation computes them (eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        content = model.content_table()[rows]
    model.train(was_training)
    return content


def _mapped(model: Recommender, content: torch.Tensor, with_offset: bool = False) -> torch.Tensor:
    """The map's prediction (an ID vector) for `content` vectors, without the boost's shift
    unless `with_offset`."""
    new_item_ids = model.fusion.new_item_ids
    assert new_item_ids is not None and model.item_ids is not None
    with torch.no_grad():
        predicted = new_item_ids(content.to(new_item_ids.weight.dtype))
    offset = None if with_offset else model.added_item_offset()
    if offset is not None:
        predicted = predicted - offset.to(predicted.dtype)
    return predicted.to(model.item_ids.weight.dtype)


def _untrained(popularity: np.ndarray) -> np.ndarray:
    """Catalogue rows (padding excluded) without training events."""
    untrained = np.asarray(popularity) <= 0
    untrained[0] = False
    return untrained
