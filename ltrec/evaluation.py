"""Full-ranking, leave-one-out evaluation: no sampled negatives, history items excluded.

A scorer is any callable that maps a batch of `EvalCase`s to scores over the whole catalogue
([batch, N+1], column 0 = padding); the same loop measures our model and every baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from ltrec.features import Sequences, build_sequences, context_matrix


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
    """0-based rank of each target among eligible items (history and padding excluded)."""
    scores = scores.astype(np.float64, copy=True)
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
    batches = range(0, len(cases), batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        rows = np.arange(start, min(start + batch_size, len(cases)))
        ranks[rows] = target_ranks(score_fn(cases, rows), cases, rows)
    return ranking_metrics(ranks, ks), ranks


def most_popular(popularity: np.ndarray) -> ScoreFn:
    """The most-popular baseline: the same ranking for everyone, by training interactions."""
    base = popularity.astype(np.float64)

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(base, (len(rows), len(base))).copy()

    return score
