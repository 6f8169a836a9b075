"""Full-ranking, leave-one-out evaluation: no sampled negatives, history items excluded.

A scorer is any callable that maps a batch of `EvalCase`s to scores over the whole catalogue
([batch, N+1], column 0 = padding); the same loop measures our model and every baseline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm import tqdm

from ltrec.data import LeaveOneOut, leave_one_out
from ltrec.sequences import Sequences, build_sequences, context_matrix
from ltrec_core import contract

if TYPE_CHECKING:  # a Prepared is built by ltrec.prepared, which loads the encoders (torch)
    from ltrec.prepared import Prepared


@dataclass
class EvalCases:
    """One case per user: the user's history (indices), its event types, target and context."""

    histories: list[np.ndarray]
    event_types: list[np.ndarray]
    targets: np.ndarray
    context: np.ndarray  # [n_cases, 4], the context of the target event

    def __len__(self) -> int:
        return len(self.targets)


def make_cases(
    history_events: pd.DataFrame,
    target_events: pd.DataFrame,
    device_vocab: list[str],
    region_vocab: list[str],
) -> EvalCases:
    """Pairs each target event with all earlier events of the same user."""
    seqs: Sequences = build_sequences(history_events, device_vocab, region_vocab)
    position = {u: i for i, u in enumerate(seqs.users)}
    histories, types = [], []
    keep = []
    for row, user in enumerate(target_events["user_id"].to_numpy()):
        u = position.get(user)
        if u is None:
            continue
        s = seqs.user_slice(u)
        histories.append(seqs.items[s])
        types.append(seqs.event_types[s])
        keep.append(row)
    targets = target_events.iloc[keep]
    return EvalCases(
        histories=histories,
        event_types=types,
        targets=targets["item_index"].to_numpy(np.int64),
        context=context_matrix(targets, device_vocab, region_vocab),
    )


ScoreFn = Callable[[EvalCases, np.ndarray], np.ndarray]


def target_ranks(scores: np.ndarray, cases: EvalCases, rows: np.ndarray) -> np.ndarray:
    """0-based rank of each target among eligible items (history and padding excluded).

    A NaN score ranks last: a NaN target is behind every item, and a NaN elsewhere is behind
    the target, so a model that emits NaN can never look good.
    """
    scores = np.array(scores, dtype=np.result_type(scores.dtype, np.float32), copy=True)
    scores[np.isnan(scores)] = -np.inf
    scores[:, 0] = -np.inf
    for j, r in enumerate(rows):
        scores[j, cases.histories[r]] = -np.inf
    target_scores = scores[np.arange(len(rows)), cases.targets[rows]][:, None]
    # Ties count against the target (a constant scorer must not look good): every other item
    # with the same score is ranked ahead of it.
    return (scores > target_scores).sum(axis=1) + (scores == target_scores).sum(axis=1) - 1


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        gains = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
        out[f"ndcg@{k}"] = float(gains.mean()) if len(ranks) else 0.0
    return out


def evaluate(
    score_fn: ScoreFn,
    cases: EvalCases,
    ks: Sequence[int] = (10, 50),
    batch_size: int = 256,
    desc: str = "evaluate",
    progress: bool = True,
) -> tuple[dict[str, float], np.ndarray]:
    ranks = np.zeros(len(cases), dtype=np.int64)
    # Cases of similar history length share a batch, so a sequence model pads little.
    order = np.argsort([len(h) for h in cases.histories], kind="stable")
    batches = range(0, len(cases), batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        ranks[rows] = target_ranks(score_fn(cases, rows), cases, rows)
    return ranking_metrics(ranks, ks), ranks


def most_popular(popularity: np.ndarray) -> ScoreFn:
    """The most-popular baseline: the same ranking for everyone, by training interactions."""
    base = popularity.astype(np.float64)

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(base, (len(rows), len(base))).copy()

    return score


# --- Views beyond accuracy: top-k lists, long-tail and cold-start ------------------------------


def events_in_order(*frames: pd.DataFrame) -> pd.DataFrame:
    """Concatenate event frames into the order `make_cases` needs: grouped by user (users in
    order of first appearance), then by timestamp.

    The sort is stable, so events with equal timestamps keep their concatenation order; pass the
    frames earliest part first (train, then validation) and a tie resolves as in the file.
    """
    frame = pd.concat(frames, ignore_index=True)
    user_order, _ = pd.factorize(frame["user_id"])
    order = np.lexsort((frame["timestamp"].to_numpy(), user_order))
    return frame.iloc[order].reset_index(drop=True)


def top_k_items(scores: np.ndarray, cases: EvalCases, rows: np.ndarray, k: int) -> np.ndarray:
    """[len(rows), k] catalogue indices, best first, with the exclusions of `target_ranks`.

    Equal scores are ordered by catalogue index. Slots that no eligible item can fill (a
    catalogue smaller than history + k) hold -1.
    """
    scores = scores.astype(np.float64, copy=True)
    scores[:, 0] = -np.inf
    for j, r in enumerate(rows):
        scores[j, cases.histories[r]] = -np.inf
    k_eff = min(k, scores.shape[1])
    part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    top[~np.isfinite(np.take_along_axis(part_scores, order, axis=1))] = -1
    if k_eff < k:
        top = np.pad(top, ((0, 0), (0, k - k_eff)), constant_values=-1)
    return top


def evaluate_lists(
    score_fn: ScoreFn,
    cases: EvalCases,
    k: int = 10,
    batch_size: int = 256,
    desc: str = "evaluate",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """`evaluate`'s target ranks plus each case's top-k list, from one scoring pass.

    Beyond-accuracy metrics (coverage, popularity bias) need the lists, not only the ranks.
    """
    ranks = np.zeros(len(cases), dtype=np.int64)
    top = np.full((len(cases), k), -1, dtype=np.int64)
    batches = range(0, len(cases), batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        rows = np.arange(start, min(start + batch_size, len(cases)))
        scores = score_fn(cases, rows)
        ranks[rows] = target_ranks(scores, cases, rows)
        top[rows] = top_k_items(scores, cases, rows, k)
    return ranks, top


def long_tail_adjusted(score_fn: ScoreFn, counts: np.ndarray, weight: float) -> ScoreFn:
    """score - weight * log(1 + counts), the serving scorer's long-tail adjustment; `counts` is
    the term's per-item count ([N+1]): a trained model's `exposure_counts`, or training
    popularity for a model without them."""
    penalty = weight * np.log1p(counts.astype(np.float64))

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        return score_fn(cases, rows).astype(np.float64) - penalty

    return score


def cached(score_fn: ScoreFn) -> ScoreFn:
    """Memoise a scorer per batch of a set of cases, so a weight sweep scores the catalogue
    once; one cache may serve several sets of cases (validation, then test)."""
    store: dict[tuple[int, int, int], np.ndarray] = {}
    scored: list[EvalCases] = []  # kept alive, so an id in a key stays theirs

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        key = (id(cases), int(rows[0]), len(rows))
        if key not in store:
            if not any(c is cases for c in scored):
                scored.append(cases)
            store[key] = score_fn(cases, rows)
        return store[key]

    return score


# The serving default of the long-tail weight is chosen on validation from this grid: the largest
# weight whose validation NDCG@10 stays within LONG_TAIL_TOLERANCE (relative) of weight 0's: the
# served default may cost at most 2% of overall NDCG@10 for its coverage and tail exposure.
LONG_TAIL_GRID = (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5)
LONG_TAIL_TOLERANCE = 0.02
# The long-tail term penalises log(1 + exposure): 1 + how many training users' top-EXPOSURE_DEPTH
# lists (weight 0, validation histories) hold the item, 0 for an untrained one. Penalising what
# the model itself over-shows, rather than what was bought most, spreads the lists further for
# the same cost (ML-1M validation, a make-train checkpoint: Coverage@10 0.71 against 0.67 within
# 2% of weight 0's NDCG@10; depths 10 and 200 did worse there than 50).
EXPOSURE_DEPTH = 50


def exposure_counts(
    score_fn: ScoreFn,
    cases: EvalCases,
    popularity: np.ndarray,
    depth: int = EXPOSURE_DEPTH,
    progress: bool = False,
) -> np.ndarray:
    """INT64 [N+1]: per catalogue index, 1 + how many of `cases`' top-`depth` lists (weight 0,
    the history excluded) hold it: the model's own exposure of each item, the long-tail term's
    count. Items without training interactions (`popularity` 0: held out, or added after
    training) count 0, as an item added when serving does: the term never holds back a new item,
    and the 1 keeps a new item's lift over a trained item the model never lists (that one had
    its chance; at weight 1, log 2 of score).

    The lists are at most a tenth of the catalogue deep: lists that hold most of a small
    catalogue show every item to nearly everyone, and the count would only measure whose
    history an item is in (the excluded ones), the opposite of what the term is for."""
    n = len(popularity)
    depth = max(1, min(depth, (n - 1) // 10))
    _, top = evaluate_lists(score_fn, cases, k=depth, desc="exposure", progress=progress)
    counts = np.bincount(top[top > 0].ravel(), minlength=n)[:n].astype(np.int64) + 1
    counts[np.asarray(popularity) == 0] = 0
    counts[contract.PADDING_INDEX] = 0
    return counts


def tune_long_tail_weight(
    score_fn: ScoreFn,
    popularity: np.ndarray,
    tail: np.ndarray,
    valid_cases: EvalCases,
    grid: Sequence[float] = LONG_TAIL_GRID,
    tolerance: float = LONG_TAIL_TOLERANCE,
    counts: np.ndarray | None = None,
) -> dict:
    """The default long-tail weight: the largest `grid` weight whose validation NDCG@10 is at
    least (1 - tolerance) times weight 0's. Returns it with the figures of every weight
    (NDCG@10, Recall@10 and `long_tail_metrics` of the top-10 lists). `counts`: the term's
    per-item count (`long_tail_adjusted`), `popularity` when None; the lists' popularity
    figures always use `popularity`."""
    if not grid or grid[0] != 0.0 or list(grid) != sorted(grid):
        raise ValueError(f"grid must start at 0 and increase, got {list(grid)}")
    raw = cached(score_fn)
    rows = []
    for weight in grid:
        ranks, top = evaluate_lists(
            long_tail_adjusted(raw, popularity if counts is None else counts, weight),
            valid_cases,
            k=10,
            progress=False,
        )
        rows.append(
            {
                "weight": float(weight),
                **ranking_metrics(ranks, ks=(10,)),
                **long_tail_metrics(top, popularity, tail),
            }
        )
    floor = (1.0 - tolerance) * rows[0]["ndcg@10"]
    chosen = max(r["weight"] for r in rows if r["ndcg@10"] >= floor)
    return {"chosen": chosen, "tolerance": tolerance, "grid": rows}


def long_tail_term(
    score_fn: ScoreFn, popularity: np.ndarray, valid_cases: EvalCases
) -> tuple[dict, np.ndarray]:
    """A trained model's served long-tail term: its `exposure_counts` on the validation
    histories and the default weight `tune_long_tail_weight` chooses for them. Returns (the
    tuning dict, with "counts" naming the term's count, and the counts)."""
    raw = cached(score_fn)
    counts = exposure_counts(raw, valid_cases, popularity)
    tuned = tune_long_tail_weight(
        raw, popularity, long_tail_mask(popularity), valid_cases, counts=counts
    )
    return {**tuned, "counts": f"exposure@{EXPOSURE_DEPTH}"}, counts


def gini(exposure: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 = equal exposure, (n-1)/n = one item gets all.

    G = sum_i (2i - n - 1) x_(i) / (n sum x), with x sorted ascending and i = 1..n.
    """
    x = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def long_tail_metrics(
    top: np.ndarray, popularity: np.ndarray, tail: np.ndarray
) -> dict[str, float]:
    """Coverage, ARP, APLT and Gini of the top-k lists (`k` = the lists' width).

    - coverage@k: share of the catalogue (indices 1..N) that appears in any list;
    - arp@k: mean over lists of the mean training popularity of the list's items;
    - aplt@k: mean over lists of the share of tail items in the list;
    - gini@k: Gini of how often each catalogue item is recommended (items never shown count).
    Unfilled slots (-1) are ignored.
    """
    k = top.shape[1]
    n_items = len(popularity) - 1
    filled = top > 0
    safe = np.where(filled, top, 0)
    lengths = filled.sum(axis=1)
    listed = lengths > 0
    pop = np.where(filled, popularity[safe], 0).sum(axis=1)
    in_tail = np.where(filled, tail[safe], False).sum(axis=1)
    exposure = np.bincount(top[filled], minlength=n_items + 1)[1:]
    return {
        f"coverage@{k}": float((exposure > 0).sum() / n_items) if n_items else 0.0,
        f"arp@{k}": float((pop[listed] / lengths[listed]).mean()) if listed.any() else 0.0,
        f"aplt@{k}": float((in_tail[listed] / lengths[listed]).mean()) if listed.any() else 0.0,
        f"gini@{k}": gini(exposure),
    }


def cold_start_split(
    split: LeaveOneOut, n_items: int, share: float = 0.1, seed: int = 0
) -> tuple[LeaveOneOut, np.ndarray]:
    """Hide a seeded `share` of the interacted items from training, as if they were new.

    Candidates are the items with at least one event in any part (an item nobody touched has no
    test case). Every event of a chosen item leaves train and validation, so neither training
    nor tuning sees it; the test part is kept whole and the catalogue is unchanged, so the chosen
    items are still ranked (by their text, for a model that reads it). Returns the new split and
    a boolean mask over catalogue indices 0..N, True for the chosen items.
    """
    seen = np.unique(
        np.concatenate([p["item_index"].to_numpy() for p in (split.train, split.valid, split.test)])
    )
    seen = seen[seen > 0]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(seen, size=int(round(share * len(seen))), replace=False)
    cold = np.zeros(n_items + 1, dtype=bool)
    cold[chosen] = True

    def warm(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[~cold[frame["item_index"].to_numpy()]].reset_index(drop=True)

    return LeaveOneOut(train=warm(split.train), valid=warm(split.valid), test=split.test), cold


def short_unordered_split(split: LeaveOneOut, keep: int = 10, seed: int = 0) -> LeaveOneOut:
    """A view of short, order-free histories: each user's last `keep` + 2 events, in a seeded
    random order, split leave-one-out again (so `keep` training events, one validation and one
    test event, none of them later than another in any meaningful sense).

    Stands in for catalogues where histories are short (a handful of events), items have few
    events each and the order carries little signal: there a user's history is a set, and a
    model that only reads sequences is at a disadvantage against item-item models. Users with
    fewer than 3 events keep them all in training, as in `leave_one_out`.
    """
    events = events_in_order(split.train, split.valid, split.test)
    by_user = events.groupby("user_id", sort=False)
    recent = events[by_user.cumcount(ascending=False).to_numpy() < keep + 2]
    rng = np.random.default_rng(seed)
    noise = rng.random(len(recent))
    users, _ = pd.factorize(recent["user_id"])
    order = np.lexsort((noise, users))  # users stay grouped; within a user, a random order
    shuffled = recent.iloc[order].reset_index(drop=True)
    # The user's timestamps, earliest first, go to the new order: every later step that sorts
    # by time (`events_in_order`) keeps the shuffled order. Users keep their block positions,
    # so the block-aligned time column of `recent` is exactly that.
    shuffled["timestamp"] = recent["timestamp"].to_numpy()
    return leave_one_out(shuffled)


def subsample_users(split: LeaveOneOut, n_users: int, seed: int = 0) -> LeaveOneOut:
    """A seeded sample of whole users (every part of each), for quick runs."""
    users = split.train["user_id"].unique()
    if n_users >= len(users):
        return split
    keep = set(np.random.default_rng(seed).choice(users, size=n_users, replace=False).tolist())

    def part(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["user_id"].isin(keep)].reset_index(drop=True)

    return LeaveOneOut(train=part(split.train), valid=part(split.valid), test=part(split.test))


# --- The context ablation: shuffled context, paired differences ---------------------------------


def shuffled_context(cases: EvalCases, seed: int = 0) -> EvalCases:
    """The same cases with their context rows permuted across cases (one case per user).

    Histories and targets stay where they are; each case gets another user's context. The
    context keeps its distribution (every row is still used once) and loses its link to the user.
    """
    order = np.random.default_rng(seed).permutation(len(cases))
    return EvalCases(
        histories=cases.histories,
        event_types=cases.event_types,
        targets=cases.targets,
        context=cases.context[order],
    )


def paired_difference(
    ranks: np.ndarray,
    base_ranks: np.ndarray,
    ks: Sequence[int] = (10, 50),
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Mean per-case difference (row minus base) in Recall@K and NDCG@K, from the target ranks
    of two rows on the same cases, with a 95% paired bootstrap interval over the cases.

    Both rank arrays must be over the same cases in the same order. The interval covers the
    test sample only, not the spread between training runs (seeds, time budgets).
    """
    if len(ranks) != len(base_ranks):
        raise ValueError(f"paired cases differ in number: {len(ranks)} vs {len(base_ranks)}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ranks), size=(resamples, len(ranks))) if len(ranks) else None
    out: dict[str, float | list[float]] = {}
    for k in ks:
        for metric in ("recall", "ndcg"):
            per_case = _gains(ranks, k, metric) - _gains(base_ranks, k, metric)
            key = f"{metric}@{k}"
            out[key] = float(per_case.mean()) if len(per_case) else 0.0
            if draws is None:
                out[f"{key}_ci95"] = [0.0, 0.0]
                continue
            means = per_case[draws].mean(axis=1)
            out[f"{key}_ci95"] = [
                float(np.quantile(means, 0.025)),
                float(np.quantile(means, 0.975)),
            ]
    return out


def _gains(ranks: np.ndarray, k: int, metric: str) -> np.ndarray:
    hit = ranks < k
    if metric == "recall":
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)


HEAD_SHARE = 0.2  # head = the most popular 20% of items by training interactions


def long_tail_mask(popularity: np.ndarray, head_share: float = HEAD_SHARE) -> np.ndarray:
    """True for tail items: everything outside the top `head_share` of items by popularity."""
    n = len(popularity) - 1
    order = np.argsort(-popularity[1:], kind="stable") + 1
    tail = np.ones(len(popularity), dtype=bool)
    tail[order[: int(math.ceil(head_share * n))]] = False
    tail[contract.PADDING_INDEX] = False
    return tail


# --- The report's protocol: cases from a split, one row's figures -------------------------------

K = 10  # the cut-off of the report's headline figures
KS = (10, 50)  # every cut-off it reports


def with_split(prepared: Prepared, split: LeaveOneOut) -> Prepared:
    """The same catalogue (ids, texts, text features) with another split; popularity and
    training sequences follow the new training part."""
    popularity = np.bincount(
        split.train["item_index"].to_numpy(), minlength=len(prepared.item_ids) + 1
    )
    popularity[contract.PADDING_INDEX] = 0
    return dataclasses.replace(
        prepared,
        split=split,
        popularity=popularity.astype(np.int64),
        train_sequences=build_sequences(split.train, prepared.device_vocab, prepared.region_vocab),
    )


def validation_cases(prepared: Prepared) -> EvalCases:
    split = prepared.split
    return make_cases(split.train, split.valid, prepared.device_vocab, prepared.region_vocab)


def held_out_cases(prepared: Prepared, targets: np.ndarray | None = None) -> EvalCases:
    """Test targets with train + validation as history; `targets` (a mask over catalogue
    indices) keeps only test events whose item is in it."""
    split = prepared.split
    test = split.test
    if targets is not None:
        test = test[targets[test["item_index"].to_numpy()]].reset_index(drop=True)
    history = events_in_order(split.train, split.valid)
    return make_cases(history, test, prepared.device_vocab, prepared.region_vocab)


def _subset(ranks: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {**ranking_metrics(ranks[mask], ks=(K,)), "cases": int(mask.sum())}


def measure(
    score_fn: ScoreFn,
    cases: EvalCases,
    popularity: np.ndarray,
    tail: np.ndarray,
    desc: str,
    progress: bool = True,
) -> tuple[dict, np.ndarray]:
    """The figures of one row, and the target rank of each case (for paired comparisons)."""
    ranks, top = evaluate_lists(score_fn, cases, k=K, desc=desc, progress=progress)
    target_tail = tail[cases.targets]
    figures = {
        **ranking_metrics(ranks, KS),
        **long_tail_metrics(top, popularity, tail),
        "tail": _subset(ranks, target_tail),
        "head": _subset(ranks, ~target_tail),
    }
    return figures, ranks
