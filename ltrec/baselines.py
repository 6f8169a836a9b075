"""Baselines the long-tail claim is measured against, all scored by the same full-ranking loop.

- ItemKNN: item-item cosine on the binary training interaction matrix, with a shrink term; a
  candidate item scores the sum of its similarities to the history items among its nearest
  neighbours (Sarwar et al. 2001; Deshpande & Karypis 2004).
- EASE: the closed-form item-item linear autoencoder with a zero diagonal (Steck 2019).
- The MiniLM text profile: training-free, the content-only floor.

The neural baselines (SASRec, no context weighting), trained by our own loop, are
`ltrec.neural_baselines`; most-popular lives in `ltrec.evaluation`. ItemKNN and EASE fold a user
in from the history of the case (train, plus the validation event for a test case); their
item-item weights are fitted on the training events only, like every other model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from ltrec.evaluation import EvalCases, ScoreFn, evaluate
from ltrec_core import contract

# --- Item-item models ---------------------------------------------------------------------------


def interaction_matrix(events: pd.DataFrame, n_items: int) -> np.ndarray:
    """Binary [n_users, N+1] matrix of who interacted with what (repeats count once)."""
    users, _ = pd.factorize(events["user_id"])
    x = np.zeros((users.max() + 1 if len(users) else 0, n_items + 1), dtype=np.float32)
    x[users, events["item_index"].to_numpy()] = 1.0
    x[:, contract.PADDING_INDEX] = 0.0
    return x


def history_matrix(cases: EvalCases, rows: np.ndarray, n_items: int) -> np.ndarray:
    """Binary [len(rows), N+1] history vectors of some cases (the fold-in of ItemKNN and EASE)."""
    x = np.zeros((len(rows), n_items + 1), dtype=np.float32)
    for j, r in enumerate(rows):
        x[j, cases.histories[r]] = 1.0
    x[:, contract.PADDING_INDEX] = 0.0
    return x


def item_item_score_fn(weights: np.ndarray) -> ScoreFn:
    """score(user, j) = sum over the user's history items h of weights[h, j]."""
    n_items = weights.shape[0] - 1

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        return history_matrix(cases, rows, n_items) @ weights

    return score


def cooccurrence(x: np.ndarray) -> np.ndarray:
    """X^T X in float64: co-occurrence counts, with item counts on the diagonal."""
    x64 = x.astype(np.float64)
    return x64.T @ x64


def itemknn_weights(gram: np.ndarray, neighbours: int, shrink: float) -> np.ndarray:
    """Shrunk cosine similarity, each candidate item (column) keeping its `neighbours` most
    similar items; the diagonal is zero, so an item never recommends itself."""
    counts = np.diag(gram).copy()
    norms = np.sqrt(counts)
    denom = np.outer(norms, norms) + shrink
    sim = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    np.fill_diagonal(sim, 0.0)
    n = sim.shape[0]
    if neighbours < n:
        # Per column j, zero everything below its `neighbours`-th largest similarity.
        drop = np.argpartition(-sim, neighbours, axis=0)[neighbours:]
        np.put_along_axis(sim, drop, 0.0, axis=0)
    return sim.astype(np.float32)


def ease_inverse(gram: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(X^T X + lambda I)^-1 over the items with training interactions: (those items' indices,
    the inverse among them). Items without interactions (and padding) have zero rows and
    columns in X^T X and are left out, so the inverse is smaller."""
    active = np.flatnonzero(np.diag(gram) > 0)
    g = gram[np.ix_(active, active)].copy()
    g[np.diag_indices_from(g)] += lam
    return active, np.linalg.inv(g)


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """B = I - P diagMat(1 / diag(P)) with P = (X^T X + lambda I)^-1, i.e. B_ij = -P_ij / P_jj
    off the diagonal and 0 on it (Steck 2019, eq. 8).

    Items without training interactions (and padding) have zero rows and columns in X^T X, so
    their weights are exactly zero; they are left out of the inverse, which is then smaller.
    """
    active, p = ease_inverse(gram, lam)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    weights = np.zeros(gram.shape, dtype=np.float32)
    weights[np.ix_(active, active)] = b
    return weights


def tune(
    name: str,
    candidates: list[dict[str, float]],
    build: Callable[..., ScoreFn],
    valid_cases: EvalCases,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Grid search on validation NDCG@10; returns the best parameters and every grid point."""
    grid = []
    for params in tqdm(candidates, desc=f"tune {name}", unit="setting", disable=not progress):
        metrics, _ = evaluate(build(**params), valid_cases, desc=name, progress=False)
        grid.append({**params, **metrics})
    best = max(grid, key=lambda g: g["ndcg@10"])
    return {key: best[key] for key in candidates[0]}, grid


# --- A training-free text baseline --------------------------------------------------------------

# How many of the latest history items make the text profile.
TEXT_PROFILE_ITEMS = 20


def text_profile_score_fn(text_features: np.ndarray, last: int = TEXT_PROFILE_ITEMS) -> ScoreFn:
    """Items scored by the cosine between their MiniLM text embedding and the mean embedding of
    the user's `last` latest history items: no training, no interaction counts, so a new or
    rarely seen item competes on its text alone (the content-only floor for the long tail)."""
    features = np.asarray(text_features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        profiles = np.zeros((len(rows), unit.shape[1]), dtype=np.float32)
        for j, r in enumerate(rows):
            recent = cases.histories[r][-last:]
            if len(recent):
                profiles[j] = unit[recent].mean(axis=0)
        lengths = np.linalg.norm(profiles, axis=1, keepdims=True)
        profiles = np.divide(profiles, lengths, out=np.zeros_like(profiles), where=lengths > 0)
        return profiles @ unit.T

    return score


# --- The context ablation: the same model with the weighting switched off ----------------------
