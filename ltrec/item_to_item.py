"""SimilarItems measured item to item, and the scale-aware choice of its default long-tail weight.

Recommend and SimilarItems share the served scorer, `score - w * log(1 + count)` (the count: the
model's exposure of the item, `ltrec.evaluation.exposure_counts`, or training popularity), but not
the scale of `score`: Recommend's are user-item dot products (around 5-6 at the top on ML-1M),
SimilarItems' are item-item dot products (around 0.2-0.3 for close neighbours). A weight chosen
for the first drowns the second in the popularity term, so SimilarItems gets a default of its
own, chosen here.

The measure: given one item, is the item a user took next among its top 10? A case is a user's
last history item (the query) and the user's next held-out item (the target); the whole catalogue
is ranked by the SimilarItems score with the query masked, as the `similar_items` ensemble does.
On validation the query is the last training item and the target the validation item; on test,
the validation item and the test item. A case is an `EvalCases` row whose history is the query
alone, so the ranking loop, its tie rule and the long-tail metrics are `ltrec.evaluation`'s.

Baskets (SimilarItems' `basket_item_ids`, "complete the basket"): given a user's last few items
together, is the item the user took next among the basket's top 10? The query is the user's last
`BASKET_SIZE` distinct items, every one of them masked from the ranking, as served. On validation
they are the last training items and the target the validation item; on test, the last items up
to and including the validation item, and the test item. Ours scores the basket as served, by the
mean of its item vectors; ItemKNN by the sum of each candidate's similarities to the basket
items (its settings tuned on basket validation). Each model is measured at weight 0, at its
basket default (the same 2% rule on the scale-aware grid, on basket validation) and at its
SimilarItems default (the pair measure's, which a served basket request gets).

    python -m ltrec.item_to_item --data data/ml-1m --checkpoint artifacts/ml-1m/checkpoint.pt

prints both measures for our model and for an item-item ItemKNN, each at weight 0 and at its own
default chosen on validation. Torch is imported only by that command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ltrec import baselines
from ltrec.data import LeaveOneOut
from ltrec.evaluation import (
    LONG_TAIL_TOLERANCE,
    EvalCases,
    ScoreFn,
    evaluate_lists,
    events_in_order,
    long_tail_adjusted,
    long_tail_mask,
    long_tail_metrics,
    ranking_metrics,
    tune_long_tail_weight,
)

K = 10
# Relative weights f (see `scaled_grid`): f = 1 moves an item one standard deviation of the
# score per standard deviation of log-popularity.
RELATIVE_GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
SCALE_QUERIES = 1024  # queries whose score spread sets the scale (evenly spaced, deterministic)
# ItemKNN's settings tried on item-to-item validation (the shrunk cosine of `ltrec.baselines`;
# 5000 neighbours keeps every item of a catalogue that size: the plain shrunk cosine).
ITEMKNN_GRID: tuple[dict[str, float], ...] = tuple(
    {"neighbours": n, "shrink": s} for n in (20, 50, 100, 500, 5000) for s in (0, 10, 100)
)


# Items of a basket case: a user's last few distinct items.
BASKET_SIZE = 3


def pair_cases(history: pd.DataFrame, targets: pd.DataFrame) -> EvalCases:
    """One case per target event: the same user's last `history` event is the query.

    `history` must be grouped by user in time order (as `load_dataset` and `events_in_order`
    give it). Users without history, and cases whose target is the query itself (a repeat the
    served SimilarItems can never return), are left out.
    """
    return basket_cases(history, targets, size=1)


def basket_cases(history: pd.DataFrame, targets: pd.DataFrame, size: int) -> EvalCases:
    """One case per target event: the same user's last `size` distinct `history` items, oldest
    first, are the query (a basket; `size` 1 is `pair_cases`).

    `history` must be grouped by user in time order. Users with fewer than `size` distinct
    items, and cases whose target is in the basket (served, a basket item is never returned),
    are left out.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    # Each item's latest event, still in time order; then each user's last `size` of them.
    latest = history.drop_duplicates(["user_id", "item_index"], keep="last")
    recent = latest.groupby("user_id", sort=False).tail(size)
    baskets = {
        user: items
        for user, items in recent.groupby("user_id", sort=False)["item_index"]
        .agg(lambda s: tuple(s.to_numpy(np.int64)))
        .items()
        if len(items) == size
    }
    histories, keep = [], []
    for row, (user, target) in enumerate(
        zip(targets["user_id"].to_numpy(), targets["item_index"].to_numpy(), strict=True)
    ):
        basket = baskets.get(user)
        if basket is None or target in basket:
            continue
        histories.append(np.array(basket, dtype=np.int64))
        keep.append(row)
    n = len(keep)
    return EvalCases(
        histories=histories,
        event_types=[np.zeros(size, dtype=np.int64) for _ in range(n)],
        targets=targets["item_index"].to_numpy(np.int64)[keep],
        context=np.zeros((n, 4), dtype=np.int64),
    )


def validation_pairs(split: LeaveOneOut) -> EvalCases:
    """Query = the user's last training item, target = the validation item."""
    return pair_cases(split.train, split.valid)


def held_out_pairs(split: LeaveOneOut) -> EvalCases:
    """Query = the user's validation item, target = the test item."""
    return pair_cases(events_in_order(split.train, split.valid), split.test)


def validation_baskets(split: LeaveOneOut, size: int = BASKET_SIZE) -> EvalCases:
    """Basket = the user's last `size` distinct training items, target = the validation item."""
    return basket_cases(split.train, split.valid, size)


def held_out_baskets(split: LeaveOneOut, size: int = BASKET_SIZE) -> EvalCases:
    """Basket = the user's last `size` distinct items up to and including the validation item,
    target = the test item."""
    return basket_cases(events_in_order(split.train, split.valid), split.test, size)


def vector_score_fn(item_table: np.ndarray) -> ScoreFn:
    """SimilarItems as served (item_lookup -> scorer): the mean of the query items' vectors (one
    item: its vector) dotted with every item vector, [N+1, D] table with row 0 the padding."""
    table = np.ascontiguousarray(item_table, dtype=np.float32)

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        queries = np.stack([table[cases.histories[r]].mean(axis=0) for r in rows])
        return queries @ table.T

    return score


def similarity_scale(score_fn: ScoreFn, popularity: np.ndarray, cases: EvalCases) -> float:
    """sigma_score / sigma_logpop: the weight at which the long-tail term spreads the catalogue
    as much as the scores do.

    sigma_score is the standard deviation of a query's scores over the catalogue (padding and the
    query's items left out), averaged over up to `SCALE_QUERIES` distinct queries (items, or
    baskets) of `cases`, in sorted order; sigma_logpop is the standard deviation of
    log(1 + popularity) over the catalogue. 0 when either is 0 (no weight can change a ranking
    then, or every score ties).
    """
    log_pop = np.log1p(np.asarray(popularity, dtype=np.float64)[1:])
    pop_spread = float(log_pop.std())
    queries = sorted({tuple(h.tolist()) for h in cases.histories})
    if not queries or pop_spread == 0.0:
        return 0.0
    pick = np.linspace(0, len(queries) - 1, min(len(queries), SCALE_QUERIES)).astype(np.int64)
    sample = [np.array(queries[i], dtype=np.int64) for i in np.unique(pick)]
    probe = EvalCases(
        histories=sample,
        event_types=[np.zeros(len(q), dtype=np.int64) for q in sample],
        targets=np.array([q[0] for q in sample], dtype=np.int64),
        context=np.zeros((len(sample), 4), dtype=np.int64),
    )
    scores = np.asarray(score_fn(probe, np.arange(len(sample))), dtype=np.float64).copy()
    for row, query in enumerate(sample):
        scores[row, query] = np.nan
    score_spread = float(np.nanstd(scores[:, 1:], axis=1).mean())
    scale = score_spread / pop_spread
    return scale if np.isfinite(scale) and scale > 0 else 0.0


def scaled_grid(
    scale: float, relative: Sequence[float] = RELATIVE_GRID
) -> list[tuple[float, float]]:
    """(f, w) pairs with w = f * scale rounded to 3 significant digits, repeats dropped.

    Why relative: `score - w * log(1 + popularity)` reorders a list only where w times a
    difference in log-popularity outweighs the difference in score, so what a weight does is
    w * sigma_logpop / sigma_score (`similarity_scale`), not w. With w = f * scale, a candidate one
    standard deviation of log-popularity less popular than another gains f standard deviations
    of score, whatever the scorer's units: dot products around 5 (Recommend), item-vector dot
    products around 0.3 (SimilarItems), ItemKNN's shrunk cosines. One grid of f then serves every
    scorer, and the choice on validation is about how much correction the task tolerates.
    """
    if not relative or relative[0] != 0.0 or list(relative) != sorted(relative):
        raise ValueError(f"relative grid must start at 0 and increase, got {list(relative)}")
    pairs: list[tuple[float, float]] = []
    for f in relative:
        w = float(f"{f * scale:.3g}")
        if not pairs or w > pairs[-1][1]:
            pairs.append((float(f), w))
    return pairs


def tune_similar_items_weight(
    score_fn: ScoreFn,
    popularity: np.ndarray,
    tail: np.ndarray,
    valid_pairs: EvalCases,
    relative: Sequence[float] = RELATIVE_GRID,
    tolerance: float = LONG_TAIL_TOLERANCE,
    counts: np.ndarray | None = None,
) -> dict:
    """SimilarItems' default long-tail weight: `tune_long_tail_weight`'s rule (the largest grid
    weight whose validation NDCG@10 is at least (1 - tolerance) times weight 0's) on the
    item-to-item cases, over the scale-aware grid `scaled_grid(similarity_scale(...))`.
    `counts`: the term's per-item count (a trained model's exposure, which the served scorer
    penalises), `popularity` when None.

    Returns `tune_long_tail_weight`'s dict (chosen, tolerance, grid rows) with each row's
    relative weight `f`, the `scale`, and the number of `cases`.
    """
    counts = popularity if counts is None else counts
    scale = similarity_scale(score_fn, counts, valid_pairs)
    pairs = scaled_grid(scale, relative)
    tuned = tune_long_tail_weight(
        score_fn,
        popularity,
        tail,
        valid_pairs,
        grid=[w for _, w in pairs],
        tolerance=tolerance,
        counts=counts,
    )
    for row, (f, _) in zip(tuned["grid"], pairs, strict=True):
        row["relative_weight"] = f
    return {**tuned, "scale": scale, "cases": len(valid_pairs)}


def item_to_item_metrics(
    score_fn: ScoreFn,
    popularity: np.ndarray,
    tail: np.ndarray,
    cases: EvalCases,
    weight: float,
    counts: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@10 and NDCG@10 of the targets, and the top-10 lists' long-tail metrics; the term
    penalises `counts` (`popularity` when None)."""
    term = popularity if counts is None else counts
    ranks, top = evaluate_lists(
        long_tail_adjusted(score_fn, term, weight), cases, k=K, progress=False
    )
    return {**ranking_metrics(ranks, ks=(K,)), **long_tail_metrics(top, popularity, tail)}


def compare(
    models: Mapping[str, ScoreFn],
    popularity: np.ndarray,
    tail: np.ndarray,
    split: LeaveOneOut,
    counts: Mapping[str, np.ndarray] | None = None,
) -> dict[str, dict]:
    """Per model: its SimilarItems default chosen on validation pairs, and the test pairs'
    figures at weight 0 and at that default. `counts[name]`: what a model's long-tail term
    penalises (`popularity` for a model not in it)."""
    valid, test = validation_pairs(split), held_out_pairs(split)
    out: dict[str, dict] = {}
    for name, score_fn in models.items():
        term = (counts or {}).get(name)
        tuned = tune_similar_items_weight(score_fn, popularity, tail, valid, counts=term)
        out[name] = {
            "default": tuned,
            "test": {
                "cases": len(test),
                "weight_0": item_to_item_metrics(score_fn, popularity, tail, test, 0.0, term),
                "at_default": item_to_item_metrics(
                    score_fn, popularity, tail, test, tuned["chosen"], term
                ),
            },
        }
    return out


def compare_baskets(
    models: Mapping[str, ScoreFn],
    popularity: np.ndarray,
    tail: np.ndarray,
    split: LeaveOneOut,
    similar_items_defaults: Mapping[str, float],
    size: int = BASKET_SIZE,
    counts: Mapping[str, np.ndarray] | None = None,
) -> dict[str, dict]:
    """Per model: its basket default chosen on validation baskets (`tune_similar_items_weight`'s
    rule and grid), and the test baskets' figures at weight 0, at that default and at
    `similar_items_defaults[name]` (its pair measure's default: what a served basket request
    gets; `counts` as for `compare`)."""
    valid, test = validation_baskets(split, size), held_out_baskets(split, size)
    out: dict[str, dict] = {}
    for name, score_fn in models.items():
        term = (counts or {}).get(name)
        tuned = tune_similar_items_weight(score_fn, popularity, tail, valid, counts=term)
        similar = similar_items_defaults[name]
        out[name] = {
            "size": size,
            "default": tuned,
            "test": {
                "cases": len(test),
                "weight_0": item_to_item_metrics(score_fn, popularity, tail, test, 0.0, term),
                "at_default": item_to_item_metrics(
                    score_fn, popularity, tail, test, tuned["chosen"], term
                ),
                "at_similar_items_default": {
                    "weight": similar,
                    **item_to_item_metrics(score_fn, popularity, tail, test, similar, term),
                },
            },
        }
    return out


def itemknn_score_fn(
    train: pd.DataFrame,
    n_items: int,
    valid_pairs: EvalCases,
    grid: Sequence[Mapping[str, float]] = ITEMKNN_GRID,
) -> tuple[ScoreFn, dict[str, float]]:
    """ItemKNN's item-item similarity (shrunk cosine of the training matrix), its settings tuned
    on item-to-item validation NDCG@10; a case's history is the query alone, so its scores are
    the query's row (a basket's: the sum of its items' rows). Returns the scorer and the chosen
    settings."""
    gram = baselines.cooccurrence(baselines.interaction_matrix(train, n_items))

    def build(neighbours: float, shrink: float) -> ScoreFn:
        return baselines.item_item_score_fn(
            baselines.itemknn_weights(gram, int(neighbours), shrink)
        )

    best, _ = baselines.tune(
        "itemknn item-to-item", [dict(g) for g in grid], build, valid_pairs, progress=False
    )
    return build(**best), best


def relative_weight(tuned: Mapping, weight: float) -> float:
    """f of `weight` on the grid of `tune_similar_items_weight`'s result `tuned` (w / scale off
    the grid, 0 without a scale)."""
    for row in tuned["grid"]:
        if row["weight"] == weight:
            return float(row["relative_weight"])
    return weight / tuned["scale"] if tuned["scale"] else 0.0


def _table(results: Mapping[str, dict], measure: str | None = None) -> list[str]:
    """The test figures of `compare` (`measure` None) or of its basket results ("basket")."""
    lines = [f"{'model':<24} {'w':>8} {'f':>6} {'Recall@10':>10} {'NDCG@10':>8} {'Cov@10':>7}"]
    for name, r in results.items():
        r = r if measure is None else r[measure]
        tuned = r["default"]
        rows = [("weight_0", name, 0.0), ("at_default", f"{name} (default)", tuned["chosen"])]
        if "at_similar_items_default" in r["test"]:
            w = r["test"]["at_similar_items_default"]["weight"]
            rows.append(("at_similar_items_default", f"{name} (SimilarItems')", w))
        for key, label, w in rows:
            t = r["test"][key]
            rel = relative_weight(tuned, w)
            lines.append(
                f"{label:<24} {w:>8.3g} {rel:>6.3g} {t['recall@10']:>10.4f} {t['ndcg@10']:>8.4f} "
                f"{t['coverage@10']:>7.4f}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltrec.item_to_item",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset directory")
    parser.add_argument("--checkpoint", type=Path, required=True, help="make train's checkpoint")
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"))
    parser.add_argument(
        "--basket-size",
        type=int,
        default=BASKET_SIZE,
        help=f"items of a basket case: the user's last distinct ones (default {BASKET_SIZE})",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="also write the figures there, as the report's item_to_item (a model's basket "
        "figures under its 'basket')",
    )
    args = parser.parse_args(argv)
    if args.basket_size < 1:
        parser.error(f"--basket-size must be at least 1, got {args.basket_size}")
    import torch

    from ltrec.checkpoint import SplitMismatch
    from ltrec.data import DatasetError
    from ltrec.prepared import prepare_for_checkpoint

    try:
        prepared, model, ckpt = prepare_for_checkpoint(args.data, args.cache, args.checkpoint)
    except (DatasetError, SplitMismatch, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        table = model.item_table().numpy()
    results = measure_all(
        table,
        prepared.split,
        len(prepared.item_ids),
        prepared.popularity,
        args.basket_size,
        ckpt.exposure,
    )
    stored = ckpt.summary.get("similar_items_long_tail_weight")
    knn_settings = results["itemknn"]["settings"]
    print(
        f"item to item, test ({results['ours']['test']['cases']} users): query = validation "
        f"item, target = test item; w chosen on validation, f = w / scale; ItemKNN {knn_settings}"
    )
    print("\n".join(_table(results)))
    basket = results["ours"]["basket"]
    print(
        f"\nbasket of {basket['size']}, test ({basket['test']['cases']} users): query = the last "
        f"{basket['size']} distinct items up to the validation item, together; target = test "
        f"item; ItemKNN {results['itemknn']['basket']['settings']}"
    )
    print("\n".join(_table(results, "basket")))
    for name, r in results.items():
        scales = r["default"]["scale"], r["basket"]["default"]["scale"]
        print(f"{name}: scale {scales[0]:.4g}, basket scale {scales[1]:.4g}")
    if stored is not None:
        print(f"the checkpoint's SimilarItems default: {stored['chosen']:g}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def measure_all(
    item_table: np.ndarray,
    split: LeaveOneOut,
    n_items: int,
    popularity: np.ndarray,
    basket_size: int = BASKET_SIZE,
    ours_counts: np.ndarray | None = None,
) -> dict[str, dict]:
    """Both measures for ours (`item_table`, as served: its long-tail term penalises
    `ours_counts`, the checkpoint's exposure; `popularity` when None) and ItemKNN (tuned per
    measure on its validation; its term penalises `popularity`): `compare`'s figures per model,
    its basket figures under "basket", ItemKNN's settings under "settings" (and the basket's
    under "basket"/"settings")."""
    counts = None if ours_counts is None else {"ours": ours_counts}
    tail = long_tail_mask(popularity)
    ours = vector_score_fn(item_table)
    knn, knn_settings = itemknn_score_fn(split.train, n_items, validation_pairs(split))
    results = compare({"ours": ours, "itemknn": knn}, popularity, tail, split, counts)
    results["itemknn"]["settings"] = knn_settings
    basket_knn, basket_settings = itemknn_score_fn(
        split.train, n_items, validation_baskets(split, basket_size)
    )
    baskets = compare_baskets(
        {"ours": ours, "itemknn": basket_knn},
        popularity,
        tail,
        split,
        {name: r["default"]["chosen"] for name, r in results.items()},
        basket_size,
        counts,
    )
    baskets["itemknn"]["settings"] = basket_settings
    for name, figures in baskets.items():
        results[name]["basket"] = figures
    return results


if __name__ == "__main__":
    sys.exit(main())
