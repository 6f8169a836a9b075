"""Audiences and demand of items, measured offline on the report's cold-start split.

Audience (whom to promote a new product to) and ForecastDemand (how much interest to stock for)
are served from the model's per-user choice probabilities: `p(i|u)`, the softmax over the
catalogue of the user's scores, which is what training fits (`ltrec.models.AudienceScorer`, the
reference of the exported graph). A user's expected interactions with an item are
`activity_u * p(i|u)`, where `activity_u` is the user's number of events (served: the events the
history store keeps for the user; here: the training history, capped at the model's max
history as the store is); an item's forecast is their sum over the users.

The check uses the cold-start split of the report (`ltrec.evaluation.cold_start_split`: a seeded
10% of the items hidden from training and validation): to a model trained on it, the held-out
items are brand-new products, placed by their content alone, as `UpsertItems` places one.

- Audience recall@k: per held-out item, the share of the users who interacted with it that are
  among its top k users (all users scored); the mean over the items. Who interacted: every
  event of the item (none was trained on), and, as a second target, only the test part's.
  Against the k most active users (the popularity audience) and a random audience (k / users
  in expectation).
- Demand: the Spearman rank correlation over the held-out items between the forecast and the
  item's actual interactions (all held-out events; the test part's), against forecasting by
  category average (the mean training interactions of the warm items with the same category,
  else the same first category part, else all warm items).

    python -m ltrec.audience --data data/ml-1m --checkpoint artifacts/ml-1m-cold/checkpoint.pt
    python -m ltrec.audience --data data/ml-1m --train-out artifacts/ml-1m-cold --max-minutes 8

With `--train-out`, a model is first trained on the cold-start split (the served recipe under a
time budget). A checkpoint trained with the held-out items (`artifacts/ml-1m`) is accepted and
said to be: its held-out items are then scored by their content vectors (no ID vector), but
its towers have seen their interactions, so the figures are optimistic (`trained_on_held_out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ltrec.data import LeaveOneOut
from ltrec.evaluation import cold_start_split, events_in_order, with_split
from ltrec.models import AudienceScorer, Recommender
from ltrec.new_item_ids import added_item_vectors, audience_vectors
from ltrec.sequences import build_sequences
from ltrec_core import contract

KS = (100, 500)  # audience sizes reported
COLD_SHARE = 0.1  # as the report's cold-start view (experiments.report.settings)
SEED = 0
BATCH = 512


# --- the measures (pure functions of arrays) ----------------------------------------------------


def audience_recall(
    scores: np.ndarray, actual: Sequence[np.ndarray], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Mean over items of |top-k users by `scores` ∩ actual users| / |actual users|.

    `scores` [Q, U] (higher is better; ties broken by user position), `actual[q]` the positions
    of item q's actual users (items without any are skipped)."""
    keep = [q for q, users in enumerate(actual) if len(users)]
    out: dict[str, float] = {}
    for k in ks:
        shares = []
        for q in keep:
            top = np.argsort(-scores[q], kind="stable")[:k]
            shares.append(np.isin(actual[q], top).mean())
        out[f"recall@{k}"] = float(np.mean(shares)) if shares else 0.0
    out["items"] = len(keep)
    return out


def random_audience_recall(n_users: int, ks: Sequence[int] = KS) -> dict[str, float]:
    """A random audience of k holds each actual user with probability k / n_users."""
    return {f"recall@{k}": min(k, n_users) / n_users for k in ks}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant."""
    ra = pd.Series(a).rank().to_numpy()
    rb = pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def category_average_forecast(
    categories: Sequence[str], popularity: np.ndarray, cold: np.ndarray
) -> np.ndarray:
    """For each catalogue index (0..N), the mean training popularity of the warm items (not
    cold, not padding) with the same category, else with the same first category part (before
    the first '|'), else of all warm items."""
    warm = ~cold.copy()
    warm[contract.PADDING_INDEX] = False
    cats = ["", *categories]
    frame = pd.DataFrame(
        {
            "category": cats,
            "first": [c.split("|")[0] for c in cats],
            "popularity": popularity.astype(np.float64),
        }
    )
    warm_frame = frame[warm]
    by_category = warm_frame.groupby("category")["popularity"].mean()
    by_first = warm_frame.groupby("first")["popularity"].mean()
    overall = float(warm_frame["popularity"].mean()) if len(warm_frame) else 0.0
    forecast = frame["category"].map(by_category)
    forecast = forecast.fillna(frame["first"].map(by_first)).fillna(overall)
    return forecast.to_numpy(np.float64)


# --- the model's side ---------------------------------------------------------------------------


def user_states(
    model: Recommender, split: LeaveOneOut, device_vocab: list[str], region_vocab: list[str]
) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """Every user with training or validation events: ids, context-weighted vectors [U, D] of
    their last max_history events (the context of their last event), and their activity (that
    many events at most, as the history store keeps)."""
    history = events_in_order(split.train, split.valid)
    seqs = build_sequences(history, device_vocab, region_vocab)
    max_history = model.cfg.max_history
    with torch.no_grad():
        table = model.item_table()
    vectors, activity = [], []
    for start in range(0, len(seqs), BATCH):
        rows = range(start, min(start + BATCH, len(seqs)))
        slices = [seqs.user_slice(u) for u in rows]
        items = [seqs.items[s][-max_history:] for s in slices]
        types = [seqs.event_types[s][-max_history:] for s in slices]
        width = max(len(h) for h in items)
        hist = torch.zeros(len(items), width, dtype=torch.long)
        kinds = torch.zeros_like(hist)
        for i, (h, t) in enumerate(zip(items, types, strict=True)):
            hist[i, : len(h)] = torch.tensor(h)
            kinds[i, : len(t)] = torch.tensor(t)
        context = torch.from_numpy(np.stack([seqs.context[s][-1] for s in slices]))
        with torch.no_grad():
            user = model.user_tower(F.embedding(hist, table), hist, kinds, right_padded=True)
            vectors.append(model.context_weighting(user, context))
        activity += [len(h) for h in items]
    return list(seqs.users), torch.cat(vectors), np.asarray(activity, dtype=np.float32)


def expected_interactions(
    scorer: AudienceScorer, query: torch.Tensor, users: torch.Tensor, activity: np.ndarray
) -> np.ndarray:
    """activity_u * p(q|u), [Q, U]: what the served audience ranks users by and sums."""
    none = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        log_norm = torch.cat(
            [
                scorer.log_normalisers(users[s : s + BATCH], none)
                for s in range(0, len(users), BATCH)
            ]
        )
        log_p = query @ users.T - log_norm
    return (log_p.exp() * torch.from_numpy(activity)).numpy().astype(np.float64)


def evaluate_audience(
    model: Recommender,
    split: LeaveOneOut,
    cold_split: LeaveOneOut,
    cold: np.ndarray,
    categories: Sequence[str],
    device_vocab: list[str],
    region_vocab: list[str],
    *,
    trained_on_held_out: bool = False,
    ks: Sequence[int] = KS,
) -> dict[str, Any]:
    """The figures of the module docstring. `split` is the full split (the held-out items'
    events in every part, or in its test part, are the targets); the user histories are the
    training and validation parts of `cold_split`, its cold-start version (`cold` masks the
    held-out items, as `cold_start_split` returns them)."""
    n_items = len(cold) - 1
    users, vectors, activity = user_states(model, cold_split, device_vocab, region_vocab)
    position = {u: i for i, u in enumerate(users)}
    held_out = np.flatnonzero(cold)
    with torch.no_grad():
        table = model.content_table() if trained_on_held_out else model.item_table()
        full_table = model.item_table()
    if trained_on_held_out:  # the held-out rows as an added item's: content only
        full_table = full_table.clone()
        full_table[held_out] = table[held_out]
    else:  # the held-out rows as added items' (`UpsertItems`), the new-item boost included
        full_table = full_table.clone()
        full_table[held_out] = added_item_vectors(model, held_out).to(full_table.dtype)
    scorer = AudienceScorer(full_table)
    query = full_table[held_out]
    if not trained_on_held_out:  # an added item as a query, as the item lookup reads it: no shift
        query = audience_vectors(model, query)
    expected = expected_interactions(scorer, query, vectors, activity)
    probability = expected / activity[None, :]

    events = pd.concat([split.train, split.valid, split.test], ignore_index=True)
    targets = {
        "all_held_out_events": events,
        "test_events": split.test,
    }
    warm_popularity = np.bincount(
        cold_split.train["item_index"].to_numpy(), minlength=n_items + 1
    ).astype(np.float64)
    category_forecast = category_average_forecast(categories, warm_popularity, cold)[held_out]
    figures: dict[str, Any] = {
        "held_out_items": len(held_out),
        "users": len(users),
        "trained_on_held_out": trained_on_held_out,
        "ks": list(ks),
    }
    for name, frame in targets.items():
        frame = frame[cold[frame["item_index"].to_numpy()]]
        actual_users: list[np.ndarray] = []
        counts = np.zeros(len(held_out), dtype=np.float64)
        grouped = frame.groupby("item_index")["user_id"]
        per_item = {int(i): g for i, g in grouped}
        for q, item in enumerate(held_out):
            who = per_item.get(int(item))
            ids = [] if who is None else [position[u] for u in who.unique() if u in position]
            actual_users.append(np.asarray(ids, dtype=np.int64))
            counts[q] = 0 if who is None else len(who)
        figures[name] = {
            "interactions": int(counts.sum()),
            "items_with_interactions": int((counts > 0).sum()),
            "audience": {
                "model_expected_interactions": audience_recall(expected, actual_users, ks),
                "model_probability": audience_recall(probability, actual_users, ks),
                "most_active_users": audience_recall(
                    np.broadcast_to(activity, expected.shape), actual_users, ks
                ),
                "random": random_audience_recall(len(users), ks),
            },
            "demand_spearman": {
                "model_expected_interactions": spearman(expected.sum(axis=1), counts),
                "model_probability": spearman(probability.sum(axis=1), counts),
                "category_average": spearman(category_forecast, counts),
            },
        }
    return figures


def format_figures(figures: dict[str, Any]) -> str:
    """The figures as a few plain lines (the CLI's output; the report has its own table)."""
    lines = [
        f"{figures['held_out_items']} held-out items, {figures['users']} users"
        + (
            " (checkpoint trained WITH the held-out items: optimistic)"
            if figures["trained_on_held_out"]
            else ""
        )
    ]
    for target in ("all_held_out_events", "test_events"):
        t = figures[target]
        lines.append(
            f"{target}: {t['interactions']} interactions on {t['items_with_interactions']} items"
        )
        for name, recall in t["audience"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in recall.items() if k != "items")
            lines.append(f"  audience {name}: {shown}")
        for name, rho in t["demand_spearman"].items():
            lines.append(f"  demand Spearman {name}: {rho:+.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ltrec.checkpoint import load_checkpoint
    from ltrec.prepared import prepare
    from ltrec.train import TrainConfig, train

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"))
    parser.add_argument("--checkpoint", type=Path, help="a trained model to measure")
    parser.add_argument(
        "--train-out", type=Path, help="train on the cold-start split into this directory first"
    )
    parser.add_argument("--max-minutes", type=float, default=8.0, help="with --train-out")
    parser.add_argument("--cold-share", type=float, default=COLD_SHARE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.train_out is None):
        parser.error("give one of --checkpoint and --train-out")

    prepared = prepare(args.data, args.cache)
    n_items = len(prepared.item_ids)
    cold_split, cold = cold_start_split(prepared.split, n_items, args.cold_share, args.seed)
    checkpoint = args.checkpoint
    if args.train_out is not None:
        cfg = TrainConfig(max_minutes=args.max_minutes, seed=args.seed)
        train(with_split(prepared, cold_split), cfg, args.train_out)
        checkpoint = args.train_out / "checkpoint.pt"
    model, ckpt = load_checkpoint(checkpoint)
    if ckpt.item_ids != prepared.item_ids:
        parser.error(f"{checkpoint} was trained on another catalogue than {args.data}")
    trained_on_held_out = bool(np.asarray(ckpt.popularity)[cold].sum() > 0)
    figures = evaluate_audience(
        model,
        prepared.split,
        cold_split,
        cold,
        prepared.item_fields.categories,
        prepared.device_vocab,
        prepared.region_vocab,
        trained_on_held_out=trained_on_held_out,
    )
    figures["checkpoint"] = str(checkpoint)
    figures["cold_share"] = args.cold_share
    figures["seed"] = args.seed
    print(format_figures(figures))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
