"""A trained model as an evaluation score function: the whole catalogue, as served at weight 0."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ltrec.evaluation import EvalCases, ScoreFn
from ltrec.models import Recommender


def model_score_fn(model: Recommender, max_history: int) -> ScoreFn:
    """Scores of the whole catalogue for evaluation, exactly as served with weight 0."""
    model.eval()
    with torch.no_grad():
        table = model.item_table()

    def score(cases: EvalCases, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (_user_vectors(model, table, cases, rows, max_history) @ table.T).numpy()

    return score


def user_vectors(
    model: Recommender, cases: EvalCases, max_history: int, batch: int = 512
) -> np.ndarray:
    """The context-weighted user vectors of every case, [n_cases, D], as `model_score_fn`
    scores them."""
    model.eval()
    out = []
    with torch.no_grad():
        table = model.item_table()
        for start in range(0, len(cases), batch):
            rows = np.arange(start, min(start + batch, len(cases)))
            out.append(_user_vectors(model, table, cases, rows, max_history).numpy())
    return np.concatenate(out) if out else np.zeros((0, table.shape[1]), dtype=np.float32)


def _user_vectors(
    model: Recommender,
    table: torch.Tensor,
    cases: EvalCases,
    rows: np.ndarray,
    max_history: int,
) -> torch.Tensor:
    hist = [cases.histories[r][-max_history:] for r in rows]
    types = [cases.event_types[r][-max_history:] for r in rows]
    width = max(1, max(len(h) for h in hist))
    # Right-padded: the same user vectors as the served (left-padded) graph, through the fused
    # attention (the export's parity checks compare the two paths).
    items = torch.from_numpy(_pad_right(hist, width))
    events = torch.from_numpy(_pad_right(types, width))
    ctx = torch.from_numpy(cases.context[rows])
    user = model.user_tower(F.embedding(items, table), items, events, right_padded=True)
    return model.context_weighting(user, ctx)


def _pad_right(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
