"""The report's views: the main view (accuracy, long tail, ablations, the serving-time weight
sweep in torch and ONNX, SimilarItems), the cold-start view and the short, order-free view.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import tail_levers
from experiments.report.fitting import fit_all
from experiments.report.settings import (
    CONTEXT_ABLATIONS,
    CONTEXT_USE,
    LONG_TAIL_WEIGHTS,
    LOSS_VARIANTS,
    MAIN_VIEW_ONLY,
    MODELS,
    SHORT_HISTORY,
    SHORT_VIEW_EPOCHS,
    SHORT_VIEW_EPOCHS_ROWS,
    SHORT_VIEW_ONLY,
    SHUFFLED_AT_TEST,
    ReportConfig,
    _printed,
)
from export_scripts.onnx_sweep import onnx_sweep
from ltrec import item_to_item
from ltrec.audience import evaluate_audience
from ltrec.checkpoint import Checkpoint, SplitMismatch, load_checkpoint_for
from ltrec.evaluation import (
    HEAD_SHARE,
    KS,
    EvalCases,
    K,
    ScoreFn,
    cached,
    cold_start_split,
    evaluate,
    exposure_counts,
    held_out_cases,
    long_tail_adjusted,
    long_tail_mask,
    long_tail_term,
    measure,
    paired_difference,
    short_unordered_split,
    shuffled_context,
    subsample_users,
    tune_long_tail_weight,
    validation_cases,
    with_split,
)
from ltrec.models import Recommender
from ltrec.new_item_ids import (
    EVENT_WEIGHTED_EXPONENTS,
    as_added_items,
    impute_new_item_ids,
    shift_grid,
    with_plain_map,
    without_new_item_ids,
)
from ltrec.prepared import Prepared, prepare
from ltrec.scoring import model_score_fn, user_vectors
from ltrec.train import TrainConfig
from ltrec_core import contract


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


def parity(torch_row: dict, onnx_row: dict) -> dict:
    """The largest difference of a weight's figures, and whether they print the same: ARP (a
    mean popularity, in the hundreds) to 1 decimal as the tables print it, the rest (shares) to
    `PRECISION` decimals."""
    keys = [k for k in onnx_row if isinstance(onnx_row[k], float)]
    diff = max(abs(torch_row[k] - onnx_row[k]) for k in keys)

    def printed(key: str, value: float) -> str:
        return f"{value:.1f}" if key.startswith("arp@") else _printed(value)

    return {
        "max_abs_diff": diff,
        "match_at_printed_precision": all(
            printed(k, torch_row[k]) == printed(k, onnx_row[k]) for k in keys
        ),
    }


# --- The views ------------------------------------------------------------------------------------


def main_view(
    prepared: Prepared,
    cfg: ReportConfig,
    names: list[str],
    loaded: tuple[Recommender, Checkpoint] | None,
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
    for name in (*CONTEXT_ABLATIONS, *LOSS_VARIANTS, "ours_no_set", "ours_converged"):
        if name in models:
            models[name]["vs_ours"] = paired_difference(
                ranks[name], ranks["ours"], KS, seed=cfg.seed
            )
    del ranks

    # Serving-time long-tail weight sweep, torch and ONNX, with the serving default that training
    # chooses on validation (`ltrec.evaluation.tune_long_tail_weight`) among the weights.
    ours = fitted["ours"]
    assert ours.model is not None
    # The term penalises the model's exposure of each item (`ltrec.evaluation.exposure_counts`),
    # as training stores it for the export.
    raw = cached(ours.score_fn)
    valid = validation_cases(prepared)
    default, counts = long_tail_term(raw, popularity, valid)
    if cfg.tail_levers:
        for name in names:
            if fitted[name].model is None or fitted[name].info.get("same_model_as"):
                continue
            models[name]["tail_levers"] = row_tail_levers(
                raw if name == "ours" else cached(fitted[name].score_fn),
                valid,
                cases,
                popularity,
                counts if name == "ours" else None,
            )
            print(f"{MODELS[name]}: tail levers measured", file=sys.stderr)
    weights = sorted({*LONG_TAIL_WEIGHTS, default["chosen"]})
    print(f"long-tail weight chosen on validation: {default['chosen']:g}", file=sys.stderr)
    sweep_torch = {
        w: measure(long_tail_adjusted(raw, counts, w), cases, popularity, tail, f"w={w}", progress)[
            0
        ]
        for w in weights
    }
    default["test_tail"] = sweep_torch[default["chosen"]]["tail"]
    default["popularity_term"] = popularity_term_ablation(raw, popularity, tail, valid, cases)
    with tempfile.TemporaryDirectory() as tmp:
        sweep_onnx = onnx_sweep(
            ours.model,
            cases,
            popularity,
            tail,
            weights,
            Path(tmp),
            progress=progress,
            counts=counts,
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
    similar = item_to_item_view(prepared, ours.model, counts)
    return models, sweep, default, similar


def row_tail_levers(
    raw: ScoreFn,
    valid: EvalCases,
    test: EvalCases,
    popularity: np.ndarray,
    counts: np.ndarray | None,
) -> dict:
    """One row's score-time long-tail levers (`experiments.tail_levers.frontier`) on validation
    and on test, with what +20% tail NDCG@10 costs overall per lever. The exposure term counts
    the row's own exposure on validation (`counts`, else measured here), as served."""
    if counts is None:
        counts = exposure_counts(raw, valid, popularity)
    out: dict[str, Any] = {}
    for split, on in (("valid", valid), ("test", test)):
        result = tail_levers.frontier(raw, on, popularity, counts)
        result["tail_gain_cost"] = {
            lever: tail_levers.cost_of_tail_gain(result["plain"], rows, tail_levers.TAIL_GAIN)
            for lever, rows in result["levers"].items()
        }
        out[split] = result
    out["tail_gain"] = tail_levers.TAIL_GAIN
    return out


def popularity_term_ablation(
    score: ScoreFn, popularity: np.ndarray, tail: np.ndarray, valid: EvalCases, cases: EvalCases
) -> dict[str, Any]:
    """The ablation of the term's count: `w * log(1 + training popularity)`, as served before
    exposure, at the default the same rule chooses for it on validation; its validation and
    test figures, to set beside the served term's."""
    tuned = tune_long_tail_weight(score, popularity, tail, valid)
    chosen = tuned["chosen"]
    test, _ = measure(
        long_tail_adjusted(score, popularity, chosen),
        cases,
        popularity,
        tail,
        "popularity term",
        progress=False,
    )
    return {
        "chosen": chosen,
        "validation": next(r for r in tuned["grid"] if r["weight"] == chosen),
        "validation_weight_0": tuned["grid"][0],
        "test": {k: v for k, v in test.items() if k not in ("tail", "head")},
        "test_tail": test.get("tail"),
    }


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
    loaded: tuple[Recommender, Checkpoint] | None = None
    if checkpoint is not None:
        try:
            loaded = load_checkpoint_for(checkpoint, prepared.item_ids, prepared.popularity)
        except SplitMismatch as exc:
            raise SystemExit(f"error: {exc}; leave out --checkpoint to train here") from exc
        ckpt = loaded[1]
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
            prepared,
            cfg,
            [name for name in names if name not in SHORT_VIEW_ONLY],
            loaded,
            cases,
            tail,
            progress,
        )
    else:  # rows measured in other views only (a part of a report run in parts)
        models = {name: {"label": MODELS[name]} for name in names if name not in SHORT_VIEW_ONLY}
        sweep, default, similar = [], None, None

    split = prepared.split
    result: dict[str, Any] = {
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


def short_view_config(cfg: ReportConfig) -> ReportConfig:
    """The short view's sizes: its neural rows validate after every epoch, and the rows of
    SHORT_VIEW_EPOCHS_ROWS (ours) train at most SHORT_VIEW_EPOCHS epochs unless the command line
    gave --epochs. Validation there costs about 4% of an epoch (0.6 s against 16 s on ML-1M),
    and validating every other epoch in the schedule's first half (`TrainConfig.validate_every`,
    for the main view's costlier pass) leaves patience only half as many checks; the shorter
    schedule anneals ours' learning rate within what patience allows (on the default 200 epochs
    the default grid's run stopped at epoch 32 on a plateau of the high learning rate). The
    other rows keep the report's schedule, which validated better for them."""
    row_epochs = dict(cfg.row_epochs)
    if "epochs" not in cfg.train_overrides and cfg.train.epochs > SHORT_VIEW_EPOCHS:
        row_epochs.update({name: SHORT_VIEW_EPOCHS for name in SHORT_VIEW_EPOCHS_ROWS})
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, validate_every=1), row_epochs=row_epochs
    )


def short_view(
    prepared: Prepared,
    cfg: ReportConfig,
    names: list[str],
    models: dict[str, dict],
    progress: bool,
) -> dict[str, float]:
    """The short, order-free view (`ltrec.evaluation.short_unordered_split`): each user's last
    SHORT_HISTORY + 2 events in a random order, every row refitted and tuned on it. Adds each
    row's "short_history" figures (accuracy, tail-target accuracy, coverage) to `models`."""
    split = short_unordered_split(prepared.split, SHORT_HISTORY, cfg.seed)
    short = with_split(prepared, split)
    cases = held_out_cases(short)
    tail = long_tail_mask(short.popularity)
    rows = [
        name for name in names if name not in (*CONTEXT_ABLATIONS, *LOSS_VARIANTS, *MAIN_VIEW_ONLY)
    ]
    print(
        f"short view: {len(split.train)} training events, {len(cases)} test cases", file=sys.stderr
    )
    fitted = fit_all(short, short_view_config(cfg), "short", None, progress, rows)
    rows = [name for name in rows if name in fitted]  # the teacher ablation needs a teacher
    for name in rows:
        models.setdefault(name, {"label": MODELS[name]})
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
        name
        for name in names
        if name not in (*CONTEXT_ABLATIONS, *LOSS_VARIANTS, *MAIN_VIEW_ONLY, *SHORT_VIEW_ONLY)
    ]
    cold_fitted = fit_all(cold_prepared, cfg, "cold", None, progress, cold_names)
    for name, fitted in cold_fitted.items():
        model = fitted.model
        if model is not None and getattr(model.fusion, "new_item_ids", None) is not None:
            # The held-out items stand for products added after training: their vectors are
            # those UpsertItems gives (the map's whole boost; a catalogue item without events
            # gets the best boost without a shift).
            as_added_items(model, np.flatnonzero(cold))
            cold_fitted[name] = dataclasses.replace(
                fitted, score_fn=model_score_fn(model, model.cfg.max_history)
            )
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
        served = cached(cold_fitted["ours"].score_fn)
        # Its term's counts: its exposure on the cold split's validation; the held-out items have
        # no training events, so they count 0, as items added when serving do.
        cold_default, cold_counts = long_tail_term(
            served, cold_prepared.popularity, validation_cases(cold_prepared)
        )
        metrics, _ = evaluate(
            long_tail_adjusted(served, cold_counts, cold_default["chosen"]),
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
        # What the new items' places cost or give the whole test set (every test case, the
        # cold targets among them), at weight 0 and at the default weight.
        every = held_out_cases(cold_prepared)
        at_weights = at_zero_and_default(served, cold_counts, every, cold_default)
        models["ours"]["cold_start"]["all_cases_ndcg@10"] = {
            key: figures["ndcg@10"] for key, figures in at_weights.items()
        }
        model = cold_fitted["ours"].model
        if model is not None and getattr(model.fusion, "new_item_ids", None) is not None:
            # The ablation: the same model with the cold items' predicted ID vectors taken out
            # (zero, as training leaves them), at weight 0 and at the same default weight.
            ablated = without_new_item_ids(model, cold_prepared.popularity)
            plain = model_score_fn(ablated, ablated.cfg.max_history)
            models["ours"]["cold_start"]["without_new_item_ids"] = at_zero_and_default(
                plain, cold_counts, cold_cases, cold_default
            )
            scale = float(model.fusion.new_item_scale)
            offset = getattr(model.fusion, "new_item_offset", None)
            shift = float((cold_fitted["ours"].info.get("new_item_ids") or {}).get("shift", 0.0))
            models["ours"]["cold_start"]["map_scale"] = scale
            models["ours"]["cold_start"]["map_shift"] = shift
            if scale != 1.0 or (offset is not None and np.any(offset)):
                # The ablation of the map's boost: the plain ridge prediction (scale 1, no shift).
                unscaled = with_plain_map(model, cold_prepared.popularity)
                unscaled_score = model_score_fn(unscaled, unscaled.cfg.max_history)
                on_cold = at_zero_and_default(unscaled_score, cold_counts, cold_cases, cold_default)
                on_every = at_zero_and_default(unscaled_score, cold_counts, every, cold_default)
                models["ours"]["cold_start"]["unscaled_map"] = {
                    key: {**figures, "all_cases_ndcg@10": on_every[key]["ndcg@10"]}
                    for key, figures in on_cold.items()
                }
            models["ours"]["cold_start"]["event_weighted_map"] = event_weighted_view(
                model,
                prepared,
                cold_prepared,
                cold_split,
                cold,
                cold_cases,
                cold_default["chosen"],
                cold_counts,
                bool((cold_fitted["ours"].info.get("train_config") or {}).get("new_item_shift")),
            )
        if model is not None:
            models["ours"]["cold_start"]["audience"] = audience_view(
                model, prepared, cold_split, cold
            )
    return {
        "cold_items": int(cold.sum()),
        "cold_test_cases": len(cold_cases),
        "cold_train_events": len(cold_split.train),
    }


def event_weighted_view(
    model: Recommender,
    prepared: Prepared,
    cold_prepared: Prepared,
    cold_split: Any,
    cold: np.ndarray,
    cold_cases: EvalCases,
    default_weight: float,
    counts: np.ndarray,
    shift: bool = False,
) -> dict[str, Any]:
    """The ablation of the new-item map's weighting: the same trained model with its map fitted
    event-weighted (items weighed by popularity^a, a and the penalty chosen on the cold split's
    validation, `ltrec.new_item_ids.EVENT_WEIGHTED_EXPONENTS`) instead of the served default
    (every item alike). Cold-item and all-case accuracy at weight 0 and at the served default
    weight; the term penalises `counts`), and the Audience and demand figures, to set beside the
    served map's."""
    weighted = copy.deepcopy(model)
    valid = validation_cases(cold_prepared)
    vectors = user_vectors(weighted, valid, weighted.cfg.max_history)
    fit = impute_new_item_ids(
        weighted,
        cold_prepared.popularity,
        validation=(vectors, valid.histories, valid.targets),
        exponents=EVENT_WEIGHTED_EXPONENTS,
        shifts=shift_grid(shift),  # the boost's grid as the model's training had it
    )
    as_added_items(weighted, np.flatnonzero(cold))  # as the served map's view has them
    score = model_score_fn(weighted, weighted.cfg.max_history)
    tuning = {"chosen": default_weight}
    on_cold = at_zero_and_default(score, counts, cold_cases, tuning)
    on_every = at_zero_and_default(score, counts, held_out_cases(cold_prepared), tuning)
    figures: dict[str, Any] = {
        "popularity_exponent": fit.get("popularity_exponent"),
        "ridge_lambda": fit.get("ridge_lambda"),
    }
    for key, cold_figures in on_cold.items():
        figures[key] = {**cold_figures, "all_cases_ndcg@10": on_every[key]["ndcg@10"]}
    figures["audience"] = audience_view(weighted, prepared, cold_split, cold)
    return figures


def at_zero_and_default(
    score: ScoreFn, counts: np.ndarray, cases: EvalCases, tuning: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """A scorer's figures on `cases` at weight 0 and at the default weight `tuning["chosen"]`
    (`tune_long_tail_weight`'s answer), as served (the term penalising `counts`):
    {"weight_0": ..., "at_default_weight": ...}, each with its weight."""
    figures = {}
    for key, weight in (("weight_0", 0.0), ("at_default_weight", float(tuning["chosen"]))):
        metrics, _ = evaluate(
            long_tail_adjusted(score, counts, weight), cases, ks=(K,), progress=False
        )
        figures[key] = {"weight": weight, **metrics}
    return figures


def audience_view(
    model: Recommender, prepared: Prepared, cold_split: Any, cold: np.ndarray
) -> dict[str, Any]:
    """Audience and ForecastDemand on the cold-start view (`ltrec.audience`): for a model
    fitted on `cold_split`, the audience recall@k of the held-out items' users and the demand
    forecast's Spearman correlation with their interactions, against the most active users,
    a random audience and the category average."""
    started = time.monotonic()
    figures = evaluate_audience(
        model,
        prepared.split,
        cold_split,
        cold,
        prepared.item_fields.categories,
        prepared.device_vocab,
        prepared.region_vocab,
    )
    figures["seconds"] = round(time.monotonic() - started, 1)
    return figures


# --- Writing ------------------------------------------------------------------------------------


def item_to_item_view(prepared: Prepared, model: Recommender, counts: np.ndarray) -> dict:
    """SimilarItems measured item to item and by baskets (`ltrec.item_to_item`): ours as served
    (item-vector dot products; a basket's mean vector) and ItemKNN's shrunk cosine (summed over a
    basket; its settings tuned on each measure's validation), each at weight 0 and at its own
    default chosen on validation on the scale-aware grid (baskets: also at the SimilarItems
    default, which a served basket request gets). Ours' term penalises `counts` (its exposure),
    ItemKNN's training popularity."""
    model.eval()
    with torch.no_grad():
        table = model.item_table().numpy()
    return item_to_item.measure_all(
        table, prepared.split, len(prepared.item_ids), prepared.popularity, ours_counts=counts
    )
