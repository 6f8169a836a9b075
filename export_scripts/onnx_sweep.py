"""The serving-time long-tail weight sweep through the exported graphs, as Triton runs them
(user_encoder -> context_weighting -> scorer), for the evaluation report to set beside torch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export_scripts import onnx_graphs
from ltrec.evaluation import (
    KS,
    EvalCases,
    K,
    long_tail_metrics,
    ranking_metrics,
)
from ltrec.models import Recommender, UserEncoder
from ltrec_core import contract


def _figures_from_lists(
    top: np.ndarray, targets: np.ndarray, popularity: np.ndarray, tail: np.ndarray
) -> dict[str, float]:
    """Ranking metrics up to the lists' width, read off the lists themselves."""
    hit = top == targets[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), np.iinfo(np.int64).max // 2)
    return {
        **ranking_metrics(ranks, KS),
        **long_tail_metrics(top[:, :K], popularity, tail),
    }


def onnx_sweep(
    model: Recommender,
    cases: EvalCases,
    popularity: np.ndarray,
    tail: np.ndarray,
    weights: Sequence[float],
    workdir: Path,
    batch_size: int = 128,
    progress: bool = True,
    counts: np.ndarray | None = None,
) -> dict[float, dict[str, float]]:
    """The sweep through the exported graphs, user_encoder -> context_weighting -> scorer,
    as Triton runs them; the history goes to the scorer whole, so it is excluded as in torch.
    The scorer's term penalises `counts` (the model's exposure, as exported; `popularity` when
    None); the lists' popularity figures use `popularity`."""
    model.eval()
    with torch.no_grad():
        table = model.item_table().detach()
    paths = {
        name: workdir / f"{name}.onnx" for name in ("user_encoder", "context_weighting", "scorer")
    }
    onnx_graphs.export_user_encoder(UserEncoder(table, model.user_tower), paths["user_encoder"])
    onnx_graphs.export_context_weighting(
        model.context_weighting, model.cfg.embedding_dim, paths["context_weighting"]
    )
    term = popularity if counts is None else counts
    onnx.save(onnx_graphs.scorer_graph(table.numpy(), term), str(paths["scorer"]))
    sessions = {name: onnx_graphs.session(path) for name, path in paths.items()}
    # TopK needs k <= catalogue rows; slots the catalogue cannot fill stay -1, as in torch.
    width = min(max(KS), len(popularity))
    tops = {w: np.full((len(cases), max(KS)), -1, dtype=np.int64) for w in weights}
    max_history = model.cfg.max_history
    for start in tqdm(
        range(0, len(cases), batch_size),
        desc="ONNX sweep",
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        rows = np.arange(start, min(start + batch_size, len(cases)))
        recent = [cases.histories[r][-max_history:] for r in rows]
        types = [cases.event_types[r][-max_history:] for r in rows]
        items = _pad_left(recent)
        user = sessions["user_encoder"].run(
            None, {contract.HISTORY_ITEMS: items, contract.HISTORY_EVENT_TYPES: _pad_left(types)}
        )[0]
        weighted = sessions["context_weighting"].run(
            None, {contract.USER_EMBEDDING: user, contract.CONTEXT: cases.context[rows]}
        )[0]
        whole = _pad_left([cases.histories[r] for r in rows])
        for w in weights:
            top, scores = sessions["scorer"].run(
                [contract.TOP_ITEMS, contract.TOP_SCORES],
                {
                    contract.WEIGHTED_USER_EMBEDDING: weighted,
                    contract.HISTORY_ITEMS: whole,
                    contract.EXCLUDE_ITEMS: np.zeros((len(rows), 1), dtype=np.int64),
                    contract.LONG_TAIL_WEIGHT: np.full((len(rows), 1), w, dtype=np.float32),
                    contract.TOP_K: np.full((len(rows), 1), width, dtype=np.int64),  # per row
                },
            )
            tops[w][rows, :width] = np.where(np.isfinite(scores), top, -1)
    return {w: _figures_from_lists(tops[w], cases.targets, popularity, tail) for w in weights}


def _pad_left(rows: list[np.ndarray]) -> np.ndarray:
    width = max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r) :] = r
    return out
