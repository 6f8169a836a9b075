"""Fitting the report's rows: baselines tuned on validation, neural rows screened and trained
to convergence, the ablations' variants.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from experiments.report.settings import (
    LOSS_VARIANTS,
    MODELS,
    NEURAL,
    ReportConfig,
    grid_keys,
    long_tail_choice,
    settings_text,
)
from ltrec import baselines, neural_baselines
from ltrec.checkpoint import Checkpoint
from ltrec.evaluation import (
    EvalCases,
    ScoreFn,
    most_popular,
    shuffled_context,
    validation_cases,
)
from ltrec.models import ItemSide, ModelConfig, Recommender
from ltrec.neural_baselines import ModelFactory
from ltrec.prepared import Prepared
from ltrec.scoring import model_score_fn
from ltrec.train import TrainConfig


def with_shuffled_context(prepared: Prepared, seed: int) -> Prepared:
    """The training events' context rows permuted across all training events (so across
    users): the same context distribution, no link to the user, the item or the time."""
    seqs = prepared.train_sequences
    order = np.random.default_rng(seed).permutation(len(seqs.context))
    return dataclasses.replace(
        prepared, train_sequences=dataclasses.replace(seqs, context=seqs.context[order])
    )


@dataclass
class Fitted:
    score_fn: ScoreFn
    info: dict
    model: Recommender | None = None


def _text_only(
    cfg: ModelConfig, features: torch.Tensor, side: ItemSide | None = None
) -> Recommender:
    settings: dict[str, Any] = {**cfg.to_dict(), "id_embeddings": False}
    return Recommender(ModelConfig(**settings), features, side)


def _text_and_id(
    cfg: ModelConfig, features: torch.Tensor, side: ItemSide | None = None
) -> Recommender:
    settings: dict[str, Any] = {**cfg.to_dict(), "id_embeddings": True}
    return Recommender(ModelConfig(**settings), features, side)


def _text_and_id_no_context(
    cfg: ModelConfig, features: torch.Tensor, side: ItemSide | None = None
) -> Recommender:
    settings: dict[str, Any] = {**cfg.to_dict(), "id_embeddings": True}
    return neural_baselines.NoContextRecommender(ModelConfig(**settings), features, side)


def _text_and_id_no_set(
    cfg: ModelConfig, features: torch.Tensor, side: ItemSide | None = None
) -> Recommender:
    settings: dict[str, Any] = {**cfg.to_dict(), "id_embeddings": True, "set_pooling": False}
    return Recommender(ModelConfig(**settings), features, side)


FACTORIES: dict[str, ModelFactory] = {
    "sasrec": neural_baselines.IDOnlyRecommender,
    "ours_text": _text_only,
    "ours": _text_and_id,
    "ours_converged": _text_and_id,
    "ours_no_set": _text_and_id_no_set,
    "ours_no_teacher": _text_and_id,  # our row's settings, distillation off (fit_all)
    "ours_no_context": _text_and_id_no_context,
    "ours_context_shuffled": _text_and_id,  # trained on shuffled context (fit_all)
    "ours_sampled": _text_and_id,  # trained with LOSS_VARIANTS' loss (fit_all)
    "ours_sampled_no_logq": _text_and_id,
}


def fit_all(
    prepared: Prepared,
    cfg: ReportConfig,
    view: str,
    checkpoint: tuple[Recommender, Checkpoint] | None = None,
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
    item_item: list[str] = [name for name in ("itemknn", "ease") if name in wanted]
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

    grids: dict[str, tuple[Callable[..., ScoreFn], list[dict[str, float]]]] = {
        "itemknn": (knn, cfg.itemknn_grid),
        "ease": (ease, cfg.ease_grid),
    }
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

    trained_with: dict[str, TrainConfig] = {}  # each neural row's settings, as trained
    for name in NEURAL:
        if name not in wanted:
            continue
        if name == "ours_no_teacher":
            # The distillation ablation: exactly our row's settings without the teacher, only
            # when our row had one (else it would train the same model twice).
            taught = trained_with.get("ours")
            if taught is None or not taught.distill_weight:
                continue
            model, summary = neural_baselines.fit_recommender(
                prepared,
                dataclasses.replace(taught, distill_weight=0.0),
                FACTORIES[name],
                name=f"{view}: {name}",
                progress=progress,
            )
            info = {
                "tuning": "our row's settings, the teacher off; early stopping on validation "
                "NDCG@10",
                "teacher_off": True,
                **summary,
            }
            fitted[name] = Fitted(model_score_fn(model, model.cfg.max_history), info, model)
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
            if name in cfg.row_epochs:
                train_cfg = dataclasses.replace(train_cfg, epochs=cfg.row_epochs[name])
            screening: list[dict] = []
            screened: tuple[Recommender, dict] | None = None
            fixed = cfg.fixed_settings.get(name)
            if fixed:  # chosen by an earlier screen, given on the command line: no screen
                train_cfg = with_settings(train_cfg, fixed)
            elif cfg.neural_grids.get(name):
                train_cfg, screening, screened = _screen(
                    name, view, cfg, train_cfg, train_on, valid_on, progress
                )
            trained_with[name] = train_cfg
            model, summary = neural_baselines.fit_recommender(
                train_on,
                train_cfg,
                FACTORIES[name],
                name=f"{view}: {name}",
                progress=progress,
                valid_cases=valid_on,
            )
            kept = None
            if screened is not None and better_on_validation(screened[1], summary):
                # The chosen setting's short, fully annealed run beat its converged run (whose
                # long schedule stops early at a high learning rate): keep the better model.
                kept = {
                    "run": "screening",
                    "screen_ndcg@10": screened[1]["best"]["ndcg@10"],
                    "converged_ndcg@10": summary["best"]["ndcg@10"],
                    "converged_epochs": len(summary["epochs"]),
                }
                model, summary = screened[0], dict(screened[1])
                summary["stop_reason"] = (
                    f"its {cfg.screen_epochs}-epoch annealed screening schedule, kept: validation "
                    f"NDCG@10 above its converged run's (which stopped after "
                    f"{kept['converged_epochs']} epochs)"
                )
                print(
                    f"{view}: {name} keeps its screening run (validation NDCG@10 "
                    f"{kept['screen_ndcg@10']:.4f} against {kept['converged_ndcg@10']:.4f})",
                    file=sys.stderr,
                )
            info = {"tuning": "early stopping on validation NDCG@10", **summary}
            if fixed:
                info["tuning"] = (
                    f"settings fixed on the command line ({settings_text(fixed)}), then early "
                    "stopping on validation NDCG@10"
                )
                info["fixed_settings"] = dict(fixed)
            if kept is not None:
                info["kept"] = kept
            if screening:
                keys = " and ".join(grid_keys(cfg.neural_grids[name]))
                info["tuning"] = (
                    f"{keys} chosen on validation NDCG@10 after {cfg.screen_epochs} epochs "
                    "each"
                    + (
                        " (the long-tail rule: the most validation tail within 2% of the best)"
                        if any(point.get("long_tail_rule") for point in screening)
                        else ""
                    )
                    + ", then early stopping on validation NDCG@10"
                )
                info["screening"] = screening
                info["screened"] = grid_keys(cfg.neural_grids[name])
        fitted[name] = Fitted(model_score_fn(model, model.cfg.max_history), info, model)
    if "ours_context_shuffled_test" in wanted:
        ours = fitted["ours"]  # no training: the main row's model, tested on shuffled context
        fitted["ours_context_shuffled_test"] = Fitted(
            ours.score_fn, {"tuning": "the main row's model", "same_model_as": "ours"}, ours.model
        )
    return fitted


def parse_settings(text: str) -> tuple[str, dict[str, float | str]]:
    """`ROW:key=value,...` (`--settings`) as (row, grid point); keys as in GRID_KEYS."""
    row, sep, rest = text.partition(":")
    if not sep or not row or not rest:
        raise ValueError(f"expected ROW:key=value[,key=value...], got {text!r}")
    point: dict[str, float | str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in GRID_KEYS:
            raise ValueError(f"setting keys must be {', '.join(GRID_KEYS)}, got {item!r}")
        if key in TEXT_KEYS:
            point[key] = value.strip()
        else:
            try:
                point[key] = float(value)
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}") from None
    return row.strip(), point


GRID_KEYS = (
    "lr",
    "batch_size",
    "weight_decay",
    "dropout",
    "embedding_dim",
    "order_augmentation",
    "set_context",
    "softmax_exclude",
    "new_item_shift",
    "distill_weight",
    "distill_lam",
    "distill_sharpness",
    "distill_head_share",
    "distill_debias",
    "distill_cosine",
    "seed",
)
TEXT_KEYS = ("set_context", "softmax_exclude")


def with_settings(train: TrainConfig, params: dict[str, float | str]) -> TrainConfig:
    """`train` with a neural grid point applied: "lr", "batch_size", "weight_decay",
    "order_augmentation", "set_context", "softmax_exclude", "new_item_shift" (1: on, 0: off),
    "distill_weight", "distill_lam", "distill_sharpness", "distill_head_share", "distill_debias",
    "distill_cosine" and "seed" (the initial weights and the batches; another seed is another
    run of the same settings) to the training, "dropout" and "embedding_dim" (the width of every
    vector: item, state and user) to the model."""
    unknown = set(params) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"neural grid keys must be {', '.join(GRID_KEYS)}, got {sorted(unknown)}")
    model = dict(train.model)
    if "dropout" in params:
        model["dropout"] = float(params["dropout"])
    if "embedding_dim" in params:
        width = float(params["embedding_dim"])
        heads = int(model.get("n_heads", ModelConfig.n_heads))
        if width != int(width) or width < 1 or int(width) % heads:
            raise ValueError(
                f"embedding_dim must be a positive multiple of n_heads ({heads}), got {width:g}"
            )
        model["embedding_dim"] = int(width)
    return dataclasses.replace(
        train,
        lr=float(params.get("lr", train.lr)),
        batch_size=int(params.get("batch_size", train.batch_size)),
        weight_decay=float(params.get("weight_decay", train.weight_decay)),
        order_augmentation=float(params.get("order_augmentation", train.order_augmentation)),
        set_context=str(params.get("set_context", train.set_context)),
        softmax_exclude=str(params.get("softmax_exclude", train.softmax_exclude)),
        new_item_shift=_switch(params.get("new_item_shift", train.new_item_shift)),
        distill_weight=float(params.get("distill_weight", train.distill_weight)),
        distill_lam=float(params.get("distill_lam", train.distill_lam)),
        distill_sharpness=float(params.get("distill_sharpness", train.distill_sharpness)),
        distill_head_share=float(params.get("distill_head_share", train.distill_head_share)),
        distill_debias=float(params.get("distill_debias", train.distill_debias)),
        distill_cosine=float(params.get("distill_cosine", train.distill_cosine)),
        seed=_whole(params.get("seed", train.seed), "seed"),
        model=model,
    )


def _whole(value: float | str | int, key: str) -> int:
    """A grid value that must be a whole number (a seed): 1.0 -> 1; 1.5 is refused, naming `key`."""
    number = float(value)
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")
    return int(number)


def _switch(value: float | str | bool) -> bool:
    """A grid point's on/off setting: 1 or 0 (a bool as it stands)."""
    if isinstance(value, bool):
        return value
    if float(value) not in (0.0, 1.0):
        raise ValueError(f"new_item_shift must be 0 or 1, got {value}")
    return float(value) == 1.0


def _screen(
    name: str,
    view: str,
    cfg: ReportConfig,
    train_cfg: TrainConfig,
    train_on: Prepared,
    valid_on: EvalCases | None,
    progress: bool,
) -> tuple[TrainConfig, list[dict], tuple[Recommender, dict]]:
    """Each point of the row's grid trained for `cfg.screen_epochs` epochs, a complete short
    schedule (warm-up, cosine decay to 5%, no early stop); returns the training config of the
    best point by validation NDCG@10 (moved by `long_tail_choice` to the point with the most
    tail within 2% of it, where points differ only in LONG_TAIL_KEYS), every point's figures,
    and the chosen point's model and training summary (the row keeps it if it beats the
    converged run on validation).

    A short annealed run ranks settings by how well they learn, at a fraction of the cost of
    converging each; its known bias is towards settings that learn fast (a higher learning rate,
    less dropout), which the report shows by printing every point."""
    points = []
    runs: list[tuple[Recommender, dict]] = []
    for params in cfg.neural_grids[name]:
        trial_cfg = dataclasses.replace(
            with_settings(train_cfg, params),
            epochs=cfg.screen_epochs,
            patience=cfg.screen_epochs,
        )
        trial_model, summary = neural_baselines.fit_recommender(
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
        runs.append((trial_model, summary))
    best = max(range(len(points)), key=lambda i: points[i]["ndcg@10"])
    index = long_tail_choice(points, best)
    chosen = dict(cfg.neural_grids[name][index])
    points[index]["chosen"] = True
    if index != best:
        points[index]["long_tail_rule"] = True
        print(
            f"{view}: {name} the long-tail rule keeps {settings_text(chosen)} (validation "
            f"NDCG@10 {points[index]['ndcg@10']:.4f}, the best {points[best]['ndcg@10']:.4f})",
            file=sys.stderr,
        )
    print(f"{view}: {name} settings chosen on validation {chosen}", file=sys.stderr)
    return with_settings(train_cfg, chosen), points, runs[index]


def better_on_validation(candidate: dict, incumbent: dict) -> bool:
    """Whether training summary `candidate`'s best validation NDCG@10 is above `incumbent`'s."""
    return float(candidate["best"]["ndcg@10"]) > float(incumbent["best"]["ndcg@10"])


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
