"""The evaluation report: our model, its ablations and the baselines on one leave-one-out split.

Every model is trained on the training part, tuned on validation (early stopping for the neural
models, a small grid for ItemKNN and EASE) and reported on test with full ranking over the whole
catalogue, history excluded (`docs/evaluation.md` has the protocol). Beside accuracy: the
long-tail view (tail- vs head-target accuracy, coverage, ARP, APLT, Gini), the cold-start view
(items hidden from training entirely), the context ablation (our model with and without its
context weighting, and with the context shuffled across users) and the serving-time long-tail
weight sweep, which is computed both in torch and through the exported ONNX graphs.

    python -m ltrec.report --data data/ml-1m --out reports/ml-1m \
        [--checkpoint artifacts/ml-1m/checkpoint.pt] [--quick] [--models ours,ours_no_context]

writes `report.md`, `report.json` and `report.png` into `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export_scripts import onnx_graphs
from ltrec import baselines, item_to_item
from ltrec.baselines import ModelFactory
from ltrec.checkpoint import load_checkpoint
from ltrec.data import DatasetError, LeaveOneOut
from ltrec.evaluation import (
    HEAD_SHARE,
    EvalCases,
    ScoreFn,
    cached,
    cold_start_split,
    evaluate,
    evaluate_lists,
    events_in_order,
    long_tail_adjusted,
    long_tail_mask,
    long_tail_metrics,
    make_cases,
    most_popular,
    paired_difference,
    ranking_metrics,
    short_unordered_split,
    shuffled_context,
    subsample_users,
    tune_long_tail_weight,
)
from ltrec.models import ItemSide, ModelConfig, Recommender, UserEncoder
from ltrec.prepared import Prepared, prepare
from ltrec.scoring import model_score_fn
from ltrec.sequences import build_sequences
from ltrec.train import TrainConfig
from ltrec_core import contract

K = 10
KS = (10, 50)
LONG_TAIL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5)
COLD_SHARE = 0.1
PRECISION = 4  # decimals printed in the report; the ONNX figures must match at this precision

# Display order and labels; the JSON uses the keys.
MODELS: dict[str, str] = {
    "most_popular": "Most popular",
    "itemknn": "ItemKNN",
    "ease": "EASE",
    "text_profile": "MiniLM text profile (training-free)",
    "sasrec": "SASRec (ours, ID-only items)",
    "ours_text": "ours, text-only items",
    "ours": "ours, text + ID items",
    "ours_no_set": "ours, history as a sequence only (no set pooling)",
    "ours_no_context": "ours, no context weighting",
    "ours_context_shuffled_test": "ours, context shuffled at test",
    "ours_context_shuffled": "ours, context shuffled in training and test",
    "ours_sampled": "ours, sampled softmax with logQ correction",
    "ours_sampled_no_logq": "ours, sampled softmax without logQ correction",
}
NEURAL = (
    "sasrec",
    "ours_text",
    "ours",
    "ours_no_set",
    "ours_no_context",
    "ours_context_shuffled",
    "ours_sampled",
    "ours_sampled_no_logq",
)
# The popularity-correction ablation: "ours" trained with a popularity-sampled softmax, with and
# without subtracting log q from the logits. The main row's full softmax needs no correction.
LOSS_VARIANTS: dict[str, dict[str, object]] = {
    "ours_sampled": {"loss": "sampled", "logq": True},
    "ours_sampled_no_logq": {"loss": "sampled", "logq": False},
}
# The context ablation: rows compared with "ours", in the main view only (the cold-start view is
# about what text buys). What each row's context is in training and at test:
CONTEXT_USE: dict[str, tuple[str, str]] = {
    "ours": ("real", "real"),
    "ours_no_context": ("none", "none"),
    "ours_context_shuffled_test": ("real", "shuffled"),
    "ours_context_shuffled": ("shuffled", "shuffled"),
}
CONTEXT_ABLATIONS = ("ours_no_context", "ours_context_shuffled_test", "ours_context_shuffled")
SHUFFLED_AT_TEST = ("ours_context_shuffled_test", "ours_context_shuffled")


@dataclass
class ReportConfig:
    """Sizes and grids of one run; `--quick` swaps in a CI-sized one."""

    # Converged mode: every neural row runs until `patience` epochs bring no validation gain;
    # the minutes are a per-row safety cap, and a row stopped by it is marked in the report.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_minutes=45.0))
    users: int | None = None  # subsample this many users (whole users), None = all
    itemknn_grid: list[dict[str, float]] = field(
        default_factory=lambda: [
            {"neighbours": n, "shrink": s}
            for n in (5, 10, 20, 50, 100, 200, 500)
            for s in (0, 10, 100)
        ]
    )
    ease_grid: list[dict[str, float]] = field(
        default_factory=lambda: [{"lam": lam} for lam in (50, 100, 250, 500, 1000, 2500, 5000)]
    )
    # Per neural row, training settings chosen on validation for that row: each point trains
    # `screen_epochs` epochs, and the best by validation NDCG@10 is then trained to convergence.
    # Keys: "lr" (TrainConfig) and "dropout" (ModelConfig).
    neural_grids: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {
            "sasrec": [
                {"lr": lr, "dropout": dropout} for lr in (1e-3, 2e-3) for dropout in (0.2, 0.5)
            ],
            # Ours trained in the report (a view without its checkpoint): whether to train on the
            # history as a sequence or as a set (TrainConfig.order_augmentation).
            "ours": [{"order_augmentation": 0.0}, {"order_augmentation": 1.0}],
        }
    )
    screen_epochs: int = 10
    # Which views to run (`--views`): "main" (accuracy, long tail, weight sweep), "cold",
    # "short" (short, order-free histories).
    views: tuple[str, ...] = ("main", "cold", "short")
    cold_share: float = COLD_SHARE
    seed: int = 0
    # Which rows of MODELS to fit and report (`--models`); "ours" is always among them.
    models: tuple[str, ...] = tuple(MODELS)
    # TrainConfig fields set on the command line; they win over a checkpoint's training config.
    train_overrides: dict[str, float | int] = field(default_factory=dict)


def quick_config() -> ReportConfig:
    return ReportConfig(
        train=TrainConfig(
            epochs=2,
            max_minutes=1.0,
            batch_size=64,
            patience=2,
            model={
                "embedding_dim": 16,
                "n_layers": 1,
                "n_heads": 1,
                "max_history": 50,
                "projection_hidden": 32,
                "context_dim": 4,
            },
        ),
        users=300,
        itemknn_grid=[{"neighbours": 20, "shrink": 0}, {"neighbours": 100, "shrink": 10}],
        ease_grid=[{"lam": 10}, {"lam": 100}, {"lam": 1000}],
        neural_grids={"sasrec": [{"lr": 1e-3, "dropout": 0.2}, {"lr": 2e-3, "dropout": 0.5}]},
        screen_epochs=1,
    )


# --- Splits and cases ---------------------------------------------------------------------------


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


def with_shuffled_context(prepared: Prepared, seed: int) -> Prepared:
    """The training events' context rows permuted across all training events (so across
    users): the same context distribution, no link to the user, the item or the time."""
    seqs = prepared.train_sequences
    order = np.random.default_rng(seed).permutation(len(seqs.context))
    return dataclasses.replace(
        prepared, train_sequences=dataclasses.replace(seqs, context=seqs.context[order])
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


# --- Fitting ------------------------------------------------------------------------------------


@dataclass
class Fitted:
    score_fn: ScoreFn
    info: dict
    model: Recommender | None = None


def _text_only(
    cfg: ModelConfig, features: torch.Tensor, side: ItemSide | None = None
) -> Recommender:
    return Recommender(ModelConfig(**{**cfg.to_dict(), "id_embeddings": False}), features, side)


def _text_and_id(
    cfg: ModelConfig, features: torch.Tensor, side: ItemSide | None = None
) -> Recommender:
    return Recommender(ModelConfig(**{**cfg.to_dict(), "id_embeddings": True}), features, side)


def _text_and_id_no_context(
    cfg: ModelConfig, features: torch.Tensor, side: ItemSide | None = None
) -> Recommender:
    return baselines.NoContextRecommender(
        ModelConfig(**{**cfg.to_dict(), "id_embeddings": True}), features, side
    )


def _text_and_id_no_set(
    cfg: ModelConfig, features: torch.Tensor, side: ItemSide | None = None
) -> Recommender:
    return Recommender(
        ModelConfig(**{**cfg.to_dict(), "id_embeddings": True, "set_pooling": False}),
        features,
        side,
    )


FACTORIES: dict[str, ModelFactory] = {
    "sasrec": baselines.IDOnlyRecommender,
    "ours_text": _text_only,
    "ours": _text_and_id,
    "ours_no_set": _text_and_id_no_set,
    "ours_no_context": _text_and_id_no_context,
    "ours_context_shuffled": _text_and_id,  # trained on shuffled context (fit_all)
    "ours_sampled": _text_and_id,  # trained with LOSS_VARIANTS' loss (fit_all)
    "ours_sampled_no_logq": _text_and_id,
}


def fit_all(
    prepared: Prepared,
    cfg: ReportConfig,
    view: str,
    checkpoint: tuple[Recommender, dict] | None = None,
    progress: bool = True,
    names: Collection[str] | None = None,
) -> dict[str, Fitted]:
    """The models of the table (`names`, default all), fitted on `prepared.split.train` and
    tuned on its validation.

    Items absent from that training part (the cold-start view's) are never softmax targets nor
    negatives for the neural models, as if they were added to the catalogue after training."""
    wanted = set(MODELS if names is None else names)
    n_items = len(prepared.item_ids)
    valid = validation_cases(prepared)
    fitted: dict[str, Fitted] = {}
    if "most_popular" in wanted:
        fitted["most_popular"] = Fitted(most_popular(prepared.popularity), {"tuning": "none"})
    if "text_profile" in wanted:
        fitted["text_profile"] = Fitted(
            baselines.text_profile_score_fn(prepared.text_features),
            {"tuning": f"none (mean of the last {baselines.TEXT_PROFILE_ITEMS} items)"},
        )
    item_item = [name for name in ("itemknn", "ease") if name in wanted]
    gram = (
        baselines.cooccurrence(baselines.interaction_matrix(prepared.split.train, n_items))
        if item_item
        else np.zeros((0, 0))
    )

    def knn(neighbours: float, shrink: float) -> ScoreFn:
        return baselines.item_item_score_fn(
            baselines.itemknn_weights(gram, int(neighbours), shrink)
        )

    def ease(lam: float) -> ScoreFn:
        return baselines.item_item_score_fn(baselines.ease_weights(gram, lam))

    grids = {"itemknn": (knn, cfg.itemknn_grid), "ease": (ease, cfg.ease_grid)}
    for name in item_item:
        build, grid = grids[name]
        best, points = baselines.tune(f"{view}: {name}", grid, build, valid, progress)
        if name == "ease":
            best, points = _widen_to_interior(view, best, points, build, valid, progress)
        else:
            best, points = _widen_to_interior(
                view, best, points, build, valid, progress, key="neighbours", upper=n_items
            )
        fitted[name] = Fitted(
            build(**best), {"tuning": "grid on validation NDCG@10", "best": best, "grid": points}
        )
        print(f"{view}: {name} best {best}", file=sys.stderr)

    for name in NEURAL:
        if name not in wanted:
            continue
        if name == "ours" and checkpoint is not None:
            model, ckpt = checkpoint
            summary = ckpt.summary
            info = {
                "tuning": "early stopping on validation NDCG@10 (make train)",
                "checkpoint": True,
                "best": summary.get("best"),
                "epochs": summary.get("epochs"),
                "stop_reason": summary.get("stop_reason"),
                "train_seconds": summary.get("train_seconds"),
                "train_config": summary.get("train_config"),
                "model_config": ckpt.model_config,
            }
        else:
            train_on, valid_on = prepared, None
            if name == "ours_context_shuffled":
                train_on = with_shuffled_context(prepared, cfg.seed + 1)
                valid_on = shuffled_context(valid, cfg.seed + 2)
            train_cfg = dataclasses.replace(cfg.train, **LOSS_VARIANTS.get(name, {}))  # type: ignore[arg-type]
            screening: list[dict] = []
            if cfg.neural_grids.get(name):
                train_cfg, screening = _screen(
                    name, view, cfg, train_cfg, train_on, valid_on, progress
                )
            model, summary = baselines.fit_recommender(
                train_on,
                train_cfg,
                FACTORIES[name],
                name=f"{view}: {name}",
                progress=progress,
                valid_cases=valid_on,
            )
            info = {"tuning": "early stopping on validation NDCG@10", **summary}
            if screening:
                keys = " and ".join(cfg.neural_grids[name][0])
                info["tuning"] = (
                    f"{keys} chosen on validation NDCG@10 after {cfg.screen_epochs} epochs "
                    "each, then early stopping on validation NDCG@10"
                )
                info["screening"] = screening
                info["screened"] = list(cfg.neural_grids[name][0])
        fitted[name] = Fitted(model_score_fn(model, model.cfg.max_history), info, model)
    if "ours_context_shuffled_test" in wanted:
        ours = fitted["ours"]  # no training: the main row's model, tested on shuffled context
        fitted["ours_context_shuffled_test"] = Fitted(
            ours.score_fn, {"tuning": "the main row's model", "same_model_as": "ours"}, ours.model
        )
    return fitted


def with_settings(train: TrainConfig, params: dict[str, float]) -> TrainConfig:
    """`train` with a neural grid point applied: "lr" and "order_augmentation" to the training,
    "dropout" to the model."""
    unknown = set(params) - {"lr", "dropout", "order_augmentation"}
    if unknown:
        raise ValueError(
            f"neural grid keys must be lr, dropout or order_augmentation, got {sorted(unknown)}"
        )
    model = dict(train.model)
    if "dropout" in params:
        model["dropout"] = params["dropout"]
    return dataclasses.replace(
        train,
        lr=params.get("lr", train.lr),
        order_augmentation=params.get("order_augmentation", train.order_augmentation),
        model=model,
    )


def _screen(
    name: str,
    view: str,
    cfg: ReportConfig,
    train_cfg: TrainConfig,
    train_on: Prepared,
    valid_on: EvalCases | None,
    progress: bool,
) -> tuple[TrainConfig, list[dict]]:
    """Each point of the row's grid trained for `cfg.screen_epochs` epochs, a complete short
    schedule (warm-up, cosine decay to 5%, no early stop); returns the training config of the
    best point by validation NDCG@10, and every point's figures.

    A short annealed run ranks settings by how well they learn, at a fraction of the cost of
    converging each; its known bias is towards settings that learn fast (a higher learning rate,
    less dropout), which the report shows by printing every point."""
    points = []
    for params in cfg.neural_grids[name]:
        trial_cfg = dataclasses.replace(
            with_settings(train_cfg, params),
            epochs=cfg.screen_epochs,
            patience=cfg.screen_epochs,
        )
        _, summary = baselines.fit_recommender(
            train_on,
            trial_cfg,
            FACTORIES[name],
            name=f"{view}: {name} screen {params}",
            progress=progress,
            valid_cases=valid_on,
        )
        points.append(
            {**params, **summary["best"], "seconds": summary["train_seconds"]}  # type: ignore[dict-item]
        )
    best = max(points, key=lambda point: point["ndcg@10"])
    chosen = {key: best[key] for key in cfg.neural_grids[name][0]}
    print(f"{view}: {name} settings chosen on validation {chosen}", file=sys.stderr)
    return with_settings(train_cfg, chosen), points


def _widen_to_interior(
    view: str,
    best: dict[str, float],
    points: list[dict[str, float]],
    build: Callable[..., ScoreFn],
    valid: EvalCases,
    progress: bool,
    key: str = "lam",
    factor: float = 2.5,
    rounds: int = 4,
    upper: float = float("inf"),
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """A grid extended along `key` past whichever edge holds the best value (by `factor`, up to
    `rounds` times, never below 1 nor above `upper`), the other settings held at the best
    point's, so the choice is an interior optimum rather than the grid's boundary."""
    for _ in range(rounds):
        tried = sorted({point[key] for point in points})
        if best[key] == tried[0] and tried[0] / factor >= 1.0:
            value = tried[0] / factor
        elif best[key] == tried[-1] and tried[-1] < upper:
            value = min(tried[-1] * factor, upper)
        else:
            break
        if key in ("neighbours",):
            value = float(round(value))
        extra = [{**best, key: value}]
        _, more = baselines.tune(f"{view}: widened {key}", extra, build, valid, progress)
        points = points + more
        top = max(points, key=lambda point: point["ndcg@10"])
        best = {name: top[name] for name in best}
    return best, points


# --- Measuring ----------------------------------------------------------------------------------


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


def context_weight_spread(model: Recommender, context: np.ndarray) -> dict[str, float]:
    """How far a trained weighting is from neutral on these contexts: mean and largest |w - 1|
    over cases and dimensions, and how much w varies across cases (per-dimension standard
    deviation, averaged). A weighting that stayed at 1 cannot change a ranking, and one that
    does not vary across cases does not use the context."""
    with torch.no_grad():
        w = model.context_weighting.weights(torch.from_numpy(context)).numpy().astype(np.float64)
    return {
        "mean_abs_deviation": float(np.abs(w - 1.0).mean()),
        "max_abs_deviation": float(np.abs(w - 1.0).max()),
        "std_across_cases": float(w.std(axis=0).mean()),
    }


def context_fields(prepared: Prepared) -> dict[str, dict[str, float]]:
    """How many distinct buckets each context field takes over the training events, and the
    share of events in the unknown bucket (0; device and region only): a field with one value
    carries nothing the weighting could use."""
    ctx = prepared.train_sequences.context
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(contract.CONTEXT_FIELDS):
        column = ctx[:, j]
        out[name] = {"distinct": int(len(np.unique(column))) if len(column) else 0}
        if name in ("device", "region"):
            share = float((column == contract.UNKNOWN_BUCKET).mean()) if len(column) else 1.0
            out[name]["unknown_share"] = share
    return out


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
    weights: tuple[float, ...],
    workdir: Path,
    batch_size: int = 128,
    progress: bool = True,
) -> dict[float, dict[str, float]]:
    """The sweep through the exported graphs, user_encoder -> context_weighting -> scorer,
    as Triton runs them; the history goes to the scorer whole, so it is excluded as in torch."""
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
    onnx.save(onnx_graphs.scorer_graph(table.numpy(), popularity), str(paths["scorer"]))
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
                    contract.TOP_K: np.array([width], dtype=np.int64),
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


def _printed(value: float) -> str:
    return f"{value:.{PRECISION}f}"


def parity(torch_row: dict, onnx_row: dict) -> dict:
    keys = [k for k in onnx_row if isinstance(onnx_row[k], float)]
    diff = max(abs(torch_row[k] - onnx_row[k]) for k in keys)
    return {
        "max_abs_diff": diff,
        "match_at_printed_precision": all(
            _printed(torch_row[k]) == _printed(onnx_row[k]) for k in keys
        ),
    }


# --- The run ------------------------------------------------------------------------------------


def main_view(
    prepared: Prepared,
    cfg: ReportConfig,
    names: list[str],
    loaded: tuple[Recommender, dict] | None,
    cases: EvalCases,
    tail: np.ndarray,
    progress: bool,
) -> tuple[dict[str, dict], list[dict], dict, dict]:
    """The main view: every row fitted on the split and measured on its test cases (accuracy,
    long tail, ablation differences), the serving-time long-tail weight sweep of "ours" in
    torch and ONNX, and SimilarItems item to item. Returns (rows, sweep, default, similar)."""
    popularity = prepared.popularity
    fitted = fit_all(prepared, cfg, "main", loaded, progress, names)
    # One seeded permutation of the test context across users, shared by the shuffled rows.
    shuffled = shuffled_context(cases, cfg.seed)
    models: dict[str, dict] = {}
    ranks: dict[str, np.ndarray] = {}
    for name in names:
        on = shuffled if name in SHUFFLED_AT_TEST else cases
        figures, ranks[name] = measure(fitted[name].score_fn, on, popularity, tail, name, progress)
        models[name] = {"label": MODELS[name], "test": figures, "fit": fitted[name].info}
        if name in CONTEXT_USE:
            train_ctx, test_ctx = CONTEXT_USE[name]
            models[name]["context"] = {"train": train_ctx, "test": test_ctx}
            model = fitted[name].model
            if name != "ours_no_context" and model is not None:
                models[name]["context"]["weights"] = context_weight_spread(model, on.context)
        print(f"{MODELS[name]}: test ndcg@10 {figures['ndcg@10']:.4f}", file=sys.stderr)
    for name in (*CONTEXT_ABLATIONS, *LOSS_VARIANTS, "ours_no_set"):
        if name in models:
            models[name]["vs_ours"] = paired_difference(
                ranks[name], ranks["ours"], KS, seed=cfg.seed
            )
    del ranks

    # Serving-time long-tail weight sweep, torch and ONNX, with the serving default that training
    # chooses on validation (`ltrec.evaluation.tune_long_tail_weight`) among the weights.
    ours = fitted["ours"]
    assert ours.model is not None
    default = tune_long_tail_weight(ours.score_fn, popularity, tail, validation_cases(prepared))
    weights = sorted({*LONG_TAIL_WEIGHTS, default["chosen"]})
    print(f"long-tail weight chosen on validation: {default['chosen']:g}", file=sys.stderr)
    raw = cached(ours.score_fn)
    sweep_torch = {
        w: measure(
            long_tail_adjusted(raw, popularity, w), cases, popularity, tail, f"w={w}", progress
        )[0]
        for w in weights
    }
    with tempfile.TemporaryDirectory() as tmp:
        sweep_onnx = onnx_sweep(
            ours.model, cases, popularity, tail, weights, Path(tmp), progress=progress
        )
    sweep = []
    for w in weights:
        t = {k: v for k, v in sweep_torch[w].items() if k not in ("tail", "head")}
        sweep.append(
            {
                "weight": w,
                "default": w == default["chosen"],
                "torch": t,
                "onnx": sweep_onnx[w],
                "parity": parity(t, sweep_onnx[w]),
            }
        )
    del fitted, raw
    # SimilarItems item to item: ours as served and an item-item ItemKNN (ltrec.item_to_item).
    similar = item_to_item_view(prepared, ours.model)
    return models, sweep, default, similar


def run_report(
    data: Path,
    cfg: ReportConfig,
    cache: Path,
    checkpoint: Path | None = None,
    progress: bool = True,
    quick: bool = False,
) -> dict:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    full = prepare(data, cache)
    prepared = full
    sampled: int | None = None
    if cfg.users is not None and cfg.users < full.split.train["user_id"].nunique():
        prepared = with_split(full, subsample_users(full.split, cfg.users, cfg.seed))
        sampled = cfg.users
    loaded: tuple[Recommender, dict] | None = None
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint)
        ckpt = loaded[1]
        if ckpt.item_ids != prepared.item_ids or not np.array_equal(
            ckpt.popularity, prepared.popularity
        ):
            raise SystemExit(
                f"error: {checkpoint} was not trained on this split of {data} "
                "(catalogue or training popularity differ); leave out --checkpoint to train here"
            )
        trained_cfg = ckpt.summary.get("train_config")
        if trained_cfg:  # the ablations get the checkpoint's sizes and training budget
            train = TrainConfig(**{**trained_cfg, **cfg.train_overrides})
            cfg = dataclasses.replace(cfg, train=train)
    n_items = len(prepared.item_ids)
    popularity = prepared.popularity
    tail = long_tail_mask(popularity)
    cases = held_out_cases(prepared)
    print(f"main view: {len(cases)} test cases, {n_items} items", file=sys.stderr)

    names = [name for name in MODELS if name in cfg.models or name == "ours"]
    if "main" in cfg.views:
        models, sweep, default, similar = main_view(
            prepared, cfg, names, loaded, cases, tail, progress
        )
    else:  # rows measured in other views only (a part of a report run in parts)
        models = {name: {"label": MODELS[name]} for name in names}
        sweep, default, similar = [], None, None

    split = prepared.split
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": {
            "dir": str(data),
            "quick": quick,
            "users_evaluated": len(cases),
            "users_sampled": sampled,
            "items": n_items,
            "train_events": len(split.train),
            "valid_events": len(split.valid),
            "test_events": len(split.test),
            "head_share": HEAD_SHARE,
            "tail_items": int(tail.sum()),
            "tail_test_cases": int(tail[cases.targets].sum()),
            "head_test_cases": int((~tail[cases.targets]).sum()),
            "context_fields": context_fields(prepared),
        },
        "protocol": {
            "split": "leave-one-out per user (last = test, second-to-last = validation)",
            "ranking": "full catalogue, history excluded, ties count against the target",
            "ks": list(KS),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "config": dataclasses.asdict(cfg),
        },
        "models": models,
        "long_tail_sweep": sweep,
        "long_tail_default": default,
        "item_to_item": similar,
    }
    if "cold" in cfg.views:
        result["data"].update(cold_view(prepared, cfg, names, models, progress))
    if "short" in cfg.views:
        result["data"].update(short_view(prepared, cfg, names, models, progress))
    return {
        **result,
        "seconds": time.monotonic() - started,
        # Training budgets are in minutes, so a busy machine trains fewer epochs: say how busy.
        "load_average": {"start": load_before, "end": os.getloadavg()[0]},
    }


SHORT_HISTORY = 10  # training events per user in the short, order-free view


def short_view(
    prepared: Prepared,
    cfg: ReportConfig,
    names: list[str],
    models: dict[str, dict],
    progress: bool,
) -> dict[str, int]:
    """The short, order-free view (`ltrec.evaluation.short_unordered_split`): each user's last
    SHORT_HISTORY + 2 events in a random order, every row refitted and tuned on it. Adds each
    row's "short_history" figures (accuracy, tail-target accuracy, coverage) to `models`."""
    split = short_unordered_split(prepared.split, SHORT_HISTORY, cfg.seed)
    short = with_split(prepared, split)
    cases = held_out_cases(short)
    tail = long_tail_mask(short.popularity)
    rows = [name for name in names if name not in CONTEXT_ABLATIONS and name not in LOSS_VARIANTS]
    print(
        f"short view: {len(split.train)} training events, {len(cases)} test cases", file=sys.stderr
    )
    fitted = fit_all(short, cfg, "short", None, progress, rows)
    for name in rows:
        figures, _ = measure(fitted[name].score_fn, cases, short.popularity, tail, name, progress)
        models[name]["short_history"] = {
            key: figures[key] for key in ("recall@10", "ndcg@10", "coverage@10", "tail", "head")
        } | {"fit": fitted[name].info}
    per_item = short.popularity[1:]
    return {
        "short_train_events": len(split.train),
        "short_test_cases": len(cases),
        "short_median_events_per_item": float(np.median(per_item[per_item > 0])),
    }


def cold_view(
    prepared: Prepared,
    cfg: ReportConfig,
    names: list[str],
    models: dict[str, dict],
    progress: bool,
) -> dict[str, int]:
    """The cold-start view: a seeded share of items hidden from training and tuning, every row
    refitted without them and measured on the test cases whose target is one of them. Adds each
    row's "cold_start" figures to `models`; returns the view's sizes."""
    n_items = len(prepared.item_ids)
    cold_split, cold = cold_start_split(prepared.split, n_items, cfg.cold_share, cfg.seed)
    cold_prepared = with_split(prepared, cold_split)
    cold_cases = held_out_cases(cold_prepared, targets=cold)
    print(
        f"cold-start view: {int(cold.sum())} items hidden, {len(cold_cases)} test cases",
        file=sys.stderr,
    )
    cold_names = [
        name for name in names if name not in CONTEXT_ABLATIONS and name not in LOSS_VARIANTS
    ]
    cold_fitted = fit_all(cold_prepared, cfg, "cold", None, progress, cold_names)
    for name in cold_names:
        metrics, _ = evaluate(
            cold_fitted[name].score_fn, cold_cases, ks=(K,), desc=f"cold {name}", progress=progress
        )
        models[name]["cold_start"] = {
            **metrics,
            "cases": len(cold_cases),
            "fit": cold_fitted[name].info,
        }
    if "ours" in cold_fitted:  # as served: at the default weight its own training would choose
        served = cold_fitted["ours"].score_fn
        cold_default = tune_long_tail_weight(
            served,
            cold_prepared.popularity,
            long_tail_mask(cold_prepared.popularity),
            validation_cases(cold_prepared),
        )
        metrics, _ = evaluate(
            long_tail_adjusted(served, cold_prepared.popularity, cold_default["chosen"]),
            cold_cases,
            ks=(K,),
            desc="cold ours at the default weight",
            progress=progress,
        )
        models["ours"]["cold_start"]["at_default_weight"] = {
            "weight": cold_default["chosen"],
            **metrics,
            "tuning": cold_default,
        }
    return {
        "cold_items": int(cold.sum()),
        "cold_test_cases": len(cold_cases),
        "cold_train_events": len(cold_split.train),
    }


# --- Writing ------------------------------------------------------------------------------------

# What must agree for rows of separate runs to share one table.
_SAME_DATA = ("dir", "items", "users_evaluated", "users_sampled", "train_events", "test_events")


def merge_reports(parts: list[dict]) -> dict:
    """One report from reports run in parts (`--models`) on the same data and split.

    Rows keep the order of MODELS; a row present in several parts keeps, per view (test figures,
    fit, cold start, short histories), what the first part that has it says. The
    first part's long-tail sweep and default stay (every part measures the same "ours" when they
    share a checkpoint); a view's sizes (cold start, short histories) come from the first part
    that ran it.
    """
    if not parts:
        raise ValueError("no reports to merge")
    first = parts[0]
    for part in parts[1:]:
        for key in _SAME_DATA:
            if part["data"].get(key) != first["data"].get(key):
                raise ValueError(
                    f"the reports were not run on the same data: data.{key} is "
                    f"{first['data'].get(key)!r} in the first and {part['data'].get(key)!r} in "
                    "another"
                )
    rows: dict[str, dict] = {}
    for part in parts:  # per row, each view's figures from the first part that has them
        for name, row in part["models"].items():
            merged_row = rows.setdefault(name, {})
            for key, value in row.items():
                merged_row.setdefault(key, value)
    data = dict(first["data"])
    for prefix in ("cold_", "short_"):  # a view's sizes, from the first part that ran it
        for part in parts:
            sizes = {k: v for k, v in part["data"].items() if k.startswith(prefix)}
            if sizes and not any(k.startswith(prefix) for k in data):
                data.update(sizes)
    return {
        **first,
        "data": data,
        "models": {name: rows[name] for name in MODELS if name in rows},
        "seconds": sum(part.get("seconds", 0.0) for part in parts),
        "parts": [
            {"created": part.get("created"), "models": list(part["models"])} for part in parts
        ],
    }


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    full = report  # the other views' sections read every row; the main view's, its own rows
    report = {**report, "models": {k: m for k, m in report["models"].items() if "test" in m}}
    d, models, f = report["data"], report["models"], _printed
    lines = [
        "# Evaluation report" + (" (quick)" if d["quick"] else ""),
        "",
        f"Data `{d['dir']}`: {d['items']:,} items, {d['users_evaluated']:,} test users"
        + (f" (a sample of {d['users_sampled']:,})" if d["users_sampled"] else "")
        + f", {d['train_events']:,} training events. Leave-one-out (last event = test, "
        "second-to-last = validation), full ranking over the whole catalogue, history excluded, "
        "ties against the "
        f"target; every model trained on train, tuned on validation, reported on test. "
        f"Protocol: `docs/evaluation.md`. Created {report['created']}, took "
        f"{report['seconds'] / 60:.1f} min"
        + (
            " (1-minute load average {start:.1f} at the start, {end:.1f} at the end; the "
            "training budgets are in minutes, so a busy machine trains fewer epochs).".format(
                **report["load_average"]
            )
            if "load_average" in report
            else "."
        )
        + (
            ""
            if set(models) == set(MODELS)
            else " Only these rows were run (`--models`): "
            + ", ".join(m["label"] for m in models.values())
            + "."
        ),
        "",
        "## Accuracy (test)",
        "",
        _row(["model", "Recall@10", "NDCG@10", "Recall@50", "NDCG@50", "tuned"]),
        _row(["---"] + ["---:"] * 4 + ["---"]),
    ]
    for m in models.values():
        t = m["test"]
        lines.append(
            _row(
                [
                    m["label"],
                    f(t["recall@10"]),
                    f(t["ndcg@10"]),
                    f(t["recall@50"]),
                    f(t["ndcg@50"]),
                    _tuned(m["fit"]),
                ]
            )
        )
    lines += _convergence(report)
    lines += _context_ablation(report)
    lines += _loss_ablation(report)
    lines += [
        "",
        "## Long tail (test)",
        "",
        f"Head = the top {d['head_share']:.0%} of items by training interactions, tail = the other "
        f"{d['tail_items']:,} items. {d['tail_test_cases']:,} test cases have a tail target, "
        f"{d['head_test_cases']:,} a head target. Coverage@10 = share of the catalogue in any "
        "top-10; ARP@10 = mean training popularity of recommended items; APLT@10 = mean share of "
        "tail items per list; Gini@10 = inequality of exposure over the catalogue "
        "(1 = one item gets all).",
        "",
        _row(
            [
                "model",
                "tail Recall@10",
                "tail NDCG@10",
                "head Recall@10",
                "head NDCG@10",
                "Coverage@10",
                "ARP@10",
                "APLT@10",
                "Gini@10",
            ]
        ),
        _row(["---"] + ["---:"] * 8),
    ]
    for m in models.values():
        t = m["test"]
        lines.append(
            _row(
                [
                    m["label"],
                    f(t["tail"]["recall@10"]),
                    f(t["tail"]["ndcg@10"]),
                    f(t["head"]["recall@10"]),
                    f(t["head"]["ndcg@10"]),
                    f(t["coverage@10"]),
                    f"{t['arp@10']:.1f}",
                    f(t["aplt@10"]),
                    f(t["gini@10"]),
                ]
            )
        )
    lines += _cold_start(full)
    lines += _short_history(full)
    if not report["long_tail_sweep"]:  # a part run without the main view
        return "\n".join(lines + [""])
    lines += [
        "",
        "## Serving-time long-tail weight (ours, text + ID)",
        "",
        "Scores adjusted as served: `score - w * log(1 + popularity)`. Each figure computed twice: "
        "in torch (full ranking) and through the exported ONNX graphs run by onnxruntime "
        "(user_encoder -> context_weighting -> scorer, top-50 read from the scorer's output). "
        + _default_weight_sentence(report),
        "",
        _row(
            [
                "w",
                "Recall@10",
                "NDCG@10",
                "NDCG@10 (ONNX)",
                "Coverage@10",
                "Coverage@10 (ONNX)",
                "APLT@10",
                "APLT@10 (ONNX)",
                "ARP@10",
                "Gini@10",
            ]
        ),
        _row(["---:"] * 10),
    ]
    for s in report["long_tail_sweep"]:
        t, o = s["torch"], s["onnx"]
        lines.append(
            _row(
                [
                    f"{s['weight']:g}" + (" (default)" if s.get("default") else ""),
                    f(t["recall@10"]),
                    f(t["ndcg@10"]),
                    f(o["ndcg@10"]),
                    f(t["coverage@10"]),
                    f(o["coverage@10"]),
                    f(t["aplt@10"]),
                    f(o["aplt@10"]),
                    f"{t['arp@10']:.1f}",
                    f(t["gini@10"]),
                ]
            )
        )
    matches = all(s["parity"]["match_at_printed_precision"] for s in report["long_tail_sweep"])
    worst = max(s["parity"]["max_abs_diff"] for s in report["long_tail_sweep"])
    lines += [
        "",
        f"ONNX vs torch, every figure of every weight (Recall/NDCG@10/50, Coverage, ARP, APLT, "
        f"Gini): {'identical' if matches else 'NOT identical'} at {PRECISION} decimals; largest "
        f"absolute difference {worst:.2g}.",
        "",
        "![long-tail plot](report.png)",
        "",
    ]
    lines += _item_to_item_section(report)
    return "\n".join(lines)


def item_to_item_view(prepared: Prepared, model: Recommender) -> dict:
    """SimilarItems measured item to item (`ltrec.item_to_item`): ours as served (item-vector
    dot products) and ItemKNN's shrunk cosine (its settings tuned on item-to-item validation),
    each at weight 0 and at its own default chosen on validation on the scale-aware grid."""
    model.eval()
    with torch.no_grad():
        table = model.item_table().numpy()
    split = prepared.split
    knn, settings = item_to_item.itemknn_score_fn(
        split.train, len(prepared.item_ids), item_to_item.validation_pairs(split)
    )
    popularity = prepared.popularity
    scorers = {"ours": item_to_item.vector_score_fn(table), "itemknn": knn}
    results = item_to_item.compare(scorers, popularity, long_tail_mask(popularity), split)
    results["itemknn"]["settings"] = settings
    return results


def _item_to_item_section(report: dict) -> list[str]:
    """SimilarItems' table, or nothing for a report from before it was measured."""
    if not report.get("item_to_item"):
        return []
    f, results = _printed, report["item_to_item"]
    labels = {"ours": MODELS["ours"], "itemknn": MODELS["itemknn"]}
    tolerance = next(iter(results.values()))["default"]["tolerance"]
    lines = [
        "## SimilarItems, item to item (test)",
        "",
        "Given a user's validation item, is the test item among its 10 most similar items? The "
        "catalogue ranked by the SimilarItems score minus `w * log(1 + popularity)`, the query "
        "excluded: ours as served (item-vector dot products), ItemKNN by its shrunk item-item "
        "cosine (settings tuned on this task's validation). Each model's default `w` is chosen on "
        "validation (query = last training item, target = validation item): the largest weight "
        f"within {tolerance:.0%} of weight 0's NDCG@10 on a grid of `f * scale`, where `scale` is "
        "the model's score spread over the spread of log-popularity (`ltrec/item_to_item.py`).",
        "",
        _row(["model", "w", "f", "Recall@10", "NDCG@10", "Coverage@10", "APLT@10"]),
        _row(["---"] + ["---:"] * 6),
    ]
    for name, r in results.items():
        tuned = r["default"]
        at = {g["weight"]: g for g in tuned["grid"]}
        for key, w in (("weight_0", 0.0), ("at_default", tuned["chosen"])):
            t = r["test"][key]
            label = labels.get(name, name) + (" (default)" if key == "at_default" else "")
            lines.append(
                _row(
                    [
                        label,
                        f"{w:g}",
                        f"{at[w]['relative_weight']:g}",
                        f(t["recall@10"]),
                        f(t["ndcg@10"]),
                        f(t["coverage@10"]),
                        f(t["aplt@10"]),
                    ]
                )
            )
    return [*lines, ""]


def _signed(value: float) -> str:
    text = f"{value:+.{PRECISION}f}"
    return text[1:] if float(text) == 0 else text  # no sign on a difference that prints as 0


def _with_interval(diff: dict, key: str) -> str:
    low, high = diff[f"{key}_ci95"]
    return f"{_signed(diff[key])} [{_signed(low)}, {_signed(high)}]"


def stopped_on_cap(info: dict) -> bool:
    """Whether a neural row's training ended on a cap (minutes or epochs) rather than on its
    validation NDCG@10 ceasing to improve: such a row may not have converged."""
    reason = str(info.get("stop_reason") or "")
    return reason.startswith("time budget") or reason == "epochs"


def _short_history(report: dict) -> list[str]:
    """The short, order-free view's table, or nothing when it was not run."""
    d, f = report["data"], _printed
    rows = [m for m in report["models"].values() if "short_history" in m]
    if "short_train_events" not in d or not rows:
        return []
    lines = [
        "",
        "## Short, order-free histories (test)",
        "",
        f"Each user's last {SHORT_HISTORY} + 2 events in a random order, split leave-one-out "
        f"again: {d['short_train_events']:,} training events, {d['short_test_cases']:,} test "
        f"cases, a median of {d['short_median_events_per_item']:g} training events per item. "
        "A stand-in for catalogues with short histories, a long tail and little order signal, "
        "where a history is a set more than a sequence. Every row refitted and tuned on it.",
        "",
        _row(["model", "Recall@10", "NDCG@10", "tail NDCG@10", "Coverage@10", "tuned"]),
        _row(["---", "---:", "---:", "---:", "---:", "---"]),
    ]
    for m in rows:
        v = m["short_history"]
        lines.append(
            _row(
                [
                    m["label"],
                    f(v["recall@10"]),
                    f(v["ndcg@10"]),
                    f(v["tail"]["ndcg@10"]),
                    f(v["coverage@10"]),
                    _tuned(v["fit"]),
                ]
            )
        )
    return lines


def _cold_start(report: dict) -> list[str]:
    """The cold-start table, or nothing when the report ran without that view (`--views`)."""
    d, models, f = report["data"], report["models"], _printed
    if "cold_items" not in d:
        return []
    lines = [
        "",
        "## Cold start (test)",
        "",
        f"{d['cold_items']:,} items (a seeded 10% of those with events) hidden from training and "
        f"tuning, kept in the catalogue with their text; every model refitted without them "
        f"({d['cold_train_events']:,} training events). {d['cold_test_cases']:,} test cases have "
        "one of them as target. An ID-based model has learnt nothing about these items. "
        "(The context and loss ablation rows are measured in the main view only.)",
        "",
        _row(["model", "Recall@10", "NDCG@10"]),
        _row(["---", "---:", "---:"]),
    ]
    for m in models.values():
        if "cold_start" not in m:
            continue
        c = m["cold_start"]
        lines.append(_row([m["label"], f(c["recall@10"]), f(c["ndcg@10"])]))
        if "at_default_weight" in c:
            at = c["at_default_weight"]
            label = f"{m['label']}, at the default long-tail weight (w = {at['weight']:g})"
            lines.append(_row([label, f(at["recall@10"]), f(at["ndcg@10"])]))
    return lines


def _convergence(report: dict) -> list[str]:
    """How each neural row's training ended: epochs, best epoch, minutes and stop reason."""
    rows = [(m, m["fit"]) for m in report["models"].values() if (m["fit"].get("epochs") or [])]
    if not rows:
        return []
    lines = [
        "",
        "## Training to convergence (main view)",
        "",
        "Each neural row trains until its validation NDCG@10 has not improved for `patience` "
        "epochs (then the best epoch's weights are kept); a row that ended on its epoch or "
        "minute cap instead is marked **capped** and may not have converged. Settings: the "
        "training config of the row; SASRec's learning rate and dropout are chosen on its own "
        "validation (screening below).",
        "",
        _row(["model", "epochs (best)", "minutes", "patience", "stop reason", "settings"]),
        _row(["---", "---:", "---:", "---:", "---", "---"]),
    ]
    for m, info in rows:
        train = info.get("train_config") or {}
        model = info.get("model_config") or {}
        reason = str(info.get("stop_reason") or "-")
        if stopped_on_cap(info):
            reason = f"**capped**: {reason}"
        seconds = info.get("train_seconds")
        lines.append(
            _row(
                [
                    m["label"],
                    _epochs(info),
                    "-" if seconds is None else f"{seconds / 60:.1f}",
                    str(train.get("patience", "-")),
                    reason,
                    f"lr {train.get('lr', '-'):g}, dropout {model.get('dropout', '-'):g}"
                    + (
                        f", order augmentation {train['order_augmentation']:g}"
                        if train.get("order_augmentation")
                        else ""
                    )
                    if train and model
                    else "-",
                ]
            )
        )
    for m, info in rows:
        if not info.get("screening"):
            continue
        keys = info.get("screened", ["lr", "dropout"])
        lines += [
            "",
            f"{m['label']}: settings screened on validation ({len(info['screening'])} points, "
            f"each a full short schedule):",
            "",
            _row([*keys, "validation NDCG@10", "best epoch", "minutes"]),
            _row(["---:"] * (len(keys) + 3)),
        ]
        for point in info["screening"]:
            lines.append(
                _row(
                    [
                        *(f"{point[key]:g}" for key in keys),
                        _printed(point["ndcg@10"]),
                        str(point["epoch"]),
                        f"{point['seconds'] / 60:.1f}",
                    ]
                )
            )
    return lines


def _epochs(info: dict) -> str:
    epochs = info.get("epochs") or []
    best = (info.get("best") or {}).get("epoch")
    return f"{len(epochs)} (best {best})" if epochs else "-"


def _context_ablation(report: dict) -> list[str]:
    """The context ablation table and what it says, or nothing when its rows were not run."""
    models, f = report["models"], _printed
    rows = [name for name in CONTEXT_USE if name in models]
    if not any(name in models for name in CONTEXT_ABLATIONS):
        return []
    fields = report["data"]["context_fields"]
    described = []
    for name, info in fields.items():
        note = f"{info['distinct']} value{'s' if info['distinct'] != 1 else ''}"
        if "unknown_share" in info:
            note += f", {info['unknown_share']:.0%} unknown"
        described.append(f"{name} ({note})")
    lines = [
        "",
        "## Context ablation (test)",
        "",
        "Our model as served (text + ID items) with its context weighting (context -> a "
        "per-dimension weight on the user vector), against: the same model with the weighting "
        "replaced by the identity in training and at test; the main row's model with the test "
        "context shuffled across users; and the model trained, validated and tested on context "
        "shuffled across events. Shuffling keeps the context's distribution and destroys its "
        "information. Same split, training budget and seed as the other neural rows. Context "
        f"over the training events: {', '.join(described)}. Δ = row - main row, per test user, "
        "with a 95% paired bootstrap interval over the test users; it covers the test sample, "
        "not the spread between training runs.",
        "",
        _row(
            [
                "model",
                "context: train / test",
                "epochs",
                "Recall@10",
                "Δ Recall@10 [95% CI]",
                "NDCG@10",
                "Δ NDCG@10 [95% CI]",
                "NDCG@50",
                "Δ NDCG@50",
                "tail NDCG@10",
                "Coverage@10",
            ]
        ),
        _row(["---", "---", "---:"] + ["---:"] * 8),
    ]
    for name in rows:
        m = models[name]
        t, diff = m["test"], m.get("vs_ours")
        lines.append(
            _row(
                [
                    m["label"],
                    " / ".join(CONTEXT_USE[name]),
                    _epochs(
                        m["fit"] if name != "ours_context_shuffled_test" else models["ours"]["fit"]
                    ),
                    f(t["recall@10"]),
                    _with_interval(diff, "recall@10") if diff else "-",
                    f(t["ndcg@10"]),
                    _with_interval(diff, "ndcg@10") if diff else "-",
                    f(t["ndcg@50"]),
                    _signed(diff["ndcg@50"]) if diff else "-",
                    f(t["tail"]["ndcg@10"]),
                    f(t["coverage@10"]),
                ]
            )
        )
    lines += ["", _context_verdict(models)]
    spread = models["ours"]["context"].get("weights")
    if spread:
        lines += [
            "",
            "The main row's trained weighting on the test contexts (w in (0, 2), starting at "
            f"exactly 1): mean |w - 1| = {spread['mean_abs_deviation']:.2f} (largest "
            f"{spread['max_abs_deviation']:.2f}); w varies across test users by "
            f"{spread['std_across_cases']:.3f} (per-dimension standard deviation, averaged).",
        ]
    return lines


def _default_weight_sentence(report: dict) -> str:
    default = report.get("long_tail_default")
    if not default:
        return ""
    grid = ", ".join(f"{row['weight']:g}" for row in default["grid"])
    return (
        f"The serving default, as training chooses it on validation: w = {default['chosen']:g}, "
        f"the largest of {{{grid}}} whose validation NDCG@10 is within "
        f"{default['tolerance']:.0%} of w = 0's."
    )


def _loss_ablation(report: dict) -> list[str]:
    """The popularity-correction table, or nothing when its rows were not run."""
    models, f = report["models"], _printed
    rows = ["ours", *(name for name in LOSS_VARIANTS if name in models)]
    if len(rows) == 1:
        return []
    n = (models[rows[1]]["fit"].get("train_config") or {}).get("negatives")
    lines = [
        "",
        "## Popularity correction (test)",
        "",
        "Our model trained with the full softmax over every item (the main row, no correction "
        f"needed) against a sampled softmax{f' with {n} negatives' if n else ''} drawn by "
        "training popularity, with and without subtracting log q from each logit (logQ). "
        "Without the correction popular items, which are sampled often as negatives, are "
        "pushed down more than the data says. Same budget and seed. Δ = row - main row, per test "
        "user, with a 95% paired bootstrap interval over the test users.",
        "",
        _row(
            [
                "model",
                "epochs",
                "NDCG@10",
                "Δ NDCG@10 [95% CI]",
                "tail NDCG@10",
                "head NDCG@10",
                "Coverage@10",
                "ARP@10",
            ]
        ),
        _row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for name in rows:
        m = models[name]
        t, diff = m["test"], m.get("vs_ours")
        lines.append(
            _row(
                [
                    m["label"],
                    _epochs(m["fit"]),
                    f(t["ndcg@10"]),
                    _with_interval(diff, "ndcg@10") if diff else "-",
                    f(t["tail"]["ndcg@10"]),
                    f(t["head"]["ndcg@10"]),
                    f(t["coverage@10"]),
                    f"{t['arp@10']:.1f}",
                ]
            )
        )
    return lines


def _context_verdict(models: dict) -> str:
    """What the ablation rows say, read off the NDCG@10 intervals.

    The row without the weighting tests the weighting layer; the shuffled rows test the
    context's information (the layer is there, the information is not). Keeping the two apart
    matters: a layer can help through a rescaling that is the same for every user."""
    outcome: dict[str, int] = {}  # -1 lower than the main row, 0 not measurably, +1 higher
    sentences = []
    plain = {
        "ours_no_context": ("Without the weighting", "the weighting layer"),
        "ours_context_shuffled_test": (
            "With the test context shuffled",
            "the context's information",
        ),
        "ours_context_shuffled": (
            "Trained and tested on shuffled context",
            "the context's information",
        ),
    }
    for name, (opening, subject) in plain.items():
        diff = models.get(name, {}).get("vs_ours")
        if not diff:
            continue
        low, high = diff["ndcg@10_ci95"]
        outcome[name] = -1 if high < 0 else (1 if low > 0 else 0)
        effect = {
            -1: f"lower than the main row, so {subject} helps",
            0: f"not measurably different (the interval contains 0), so {subject} adds nothing "
            "measurable",
            1: f"higher than the main row, so {subject} does not help here",
        }[outcome[name]]
        sentences.append(f"{opening}, NDCG@10 changes by {_signed(diff['ndcg@10'])}: {effect}.")
    shuffled = [outcome[n] for n in SHUFFLED_AT_TEST if n in outcome]
    if outcome.get("ours_no_context") == -1 and shuffled and all(o >= 0 for o in shuffled):
        sentences.append(
            "Together: the gain comes from the weighting as a learned rescaling of the user "
            "vector, not from the context: shuffled context does as well."
        )
    return " ".join(sentences)


def _tuned(info: dict) -> str:
    if "best" in info and isinstance(info["best"], dict) and "epoch" not in info["best"]:
        return ", ".join(f"{k} {v:g}" for k, v in info["best"].items())
    if "best" in info and isinstance(info["best"], dict):
        source = "checkpoint, " if info.get("checkpoint") else ""
        return f"{source}best epoch {info['best'].get('epoch')}"
    return info.get("tuning", "")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {k: m for k, m in report["models"].items() if "test" in m}  # main-view rows
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [m["label"] for m in models.values()]
    x = np.arange(len(labels))
    tail = [m["test"]["tail"]["ndcg@10"] for m in models.values()]
    head = [m["test"]["head"]["ndcg@10"] for m in models.values()]
    left.bar(x - 0.2, tail, 0.4, label="tail targets")
    left.bar(x + 0.2, head, 0.4, label="head targets")
    left.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    left.set_ylabel("NDCG@10 (test)")
    left.set_title("Accuracy on tail vs head targets")
    left.legend()

    sweep = report["long_tail_sweep"]
    cov = [s["torch"]["coverage@10"] for s in sweep]
    ndcg = [s["torch"]["ndcg@10"] for s in sweep]
    right.plot(cov, ndcg, "o-", label="ours, text + ID")
    for s, cx, ny in zip(sweep, cov, ndcg, strict=True):
        right.annotate(
            f"w={s['weight']:g}\nAPLT {s['torch']['aplt@10']:.2f}",
            (cx, ny),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4),
        )
    for name in ("ease", "itemknn", "sasrec"):
        if name not in models:
            continue
        t = models[name]["test"]
        right.plot([t["coverage@10"]], [t["ndcg@10"]], "s", label=models[name]["label"])
    right.set_xlabel("Coverage@10")
    right.set_ylabel("NDCG@10 (test)")
    right.set_title("Long-tail weight: accuracy vs coverage")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltrec.report",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset directory")
    parser.add_argument("--out", type=Path, required=True, help="where report.{md,json,png} go")
    parser.add_argument(
        "--cache", type=Path, default=Path("artifacts/cache"), help="text feature cache"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="use this trained model as 'ours' (main view)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI size: 300 users, 2 epochs, tiny models"
    )
    parser.add_argument("--users", type=int, help="subsample this many users")
    parser.add_argument("--epochs", type=int, help="epochs per neural model")
    parser.add_argument("--max-minutes", type=float, help="training budget per neural model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--screen-epochs",
        type=int,
        help="epochs of each screened setting of a row with a settings grid (default "
        f"{ReportConfig.screen_epochs})",
    )
    parser.add_argument(
        "--models",
        help=f"comma-separated rows to run (default all; 'ours' always): {', '.join(MODELS)}",
    )
    parser.add_argument(
        "--views",
        default="main,cold,short",
        help="comma-separated views to run: main (accuracy, long tail, weight sweep, "
        "SimilarItems), cold (the cold-start view), short (short, order-free histories); a "
        "report run in parts may leave main to another part (--merge)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="REPORT_JSON",
        help="no training: merge the rows of report.json files run in parts (--models) on the "
        "same data into one report in --out (the first file's long-tail sweep is kept; a row "
        "in several files is taken from the first)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            merged = merge_reports([json.loads(path.read_text()) for path in args.merge])
        except (OSError, ValueError) as exc:
            print(f"error: --merge: {exc}", file=sys.stderr)
            return 2
        merged["merged_from"] = [str(path) for path in args.merge]
        write_report(merged, args.out)
        print(markdown(merged))
        print(f"wrote {args.out / 'report.md'}, report.json, report.png", file=sys.stderr)
        return 0
    if args.screen_epochs is not None and args.screen_epochs < 1:
        parser.error(f"--screen-epochs must be at least 1, got {args.screen_epochs}")
    views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    unknown_views = sorted(set(views) - {"main", "cold", "short"})
    if not views:
        parser.error("--views: name at least one of main, cold, short")
    if unknown_views:
        parser.error(f"--views: unknown {', '.join(unknown_views)}; choose from main, cold, short")
    names = tuple(MODELS)
    if args.models:
        chosen = {name.strip() for name in args.models.split(",") if name.strip()}
        unknown = sorted(chosen - set(MODELS))
        if unknown:
            parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
        names = tuple(name for name in MODELS if name in chosen or name == "ours")
    cfg = quick_config() if args.quick else ReportConfig()
    overrides: dict[str, float | int] = {"seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **overrides),  # type: ignore[arg-type]
        train_overrides=overrides,
        seed=args.seed,
        users=args.users if args.users is not None else cfg.users,
        models=names,
        views=views,
        screen_epochs=args.screen_epochs if args.screen_epochs else cfg.screen_epochs,
    )
    try:
        report = run_report(
            args.data, cfg, args.cache, args.checkpoint, not args.no_progress, args.quick
        )
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {args.out / 'report.md'}, report.json, report.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
