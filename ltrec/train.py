"""Train the towers on a dataset directory and write a checkpoint the export script reads.

Next-item prediction at every position of each user's training sequence (SASRec-style), with a
full softmax over the catalogue by default, or a sampled softmax with the logQ popularity
correction (`--loss sampled`, for catalogues too large for a full softmax). Validation Recall@10
and NDCG@10 use full ranking on a leave-one-out split, next to the most-popular baseline.

    python -m ltrec.train --data data/ml-1m --out artifacts/ml-1m
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ltrec.baselines import cooccurrence, ease_inverse, interaction_matrix
from ltrec.checkpoint import Checkpoint, load_checkpoint_for, save_checkpoint
from ltrec.data import DatasetError
from ltrec.distributed import SINGLE, World, join, leave, world_from_env
from ltrec.evaluation import (
    EvalCases,
    evaluate,
    long_tail_mask,
    long_tail_term,
    make_cases,
    most_popular,
    ranking_metrics,
)
from ltrec.image_encoder import IMAGE_MODEL_NAME
from ltrec.item_to_item import tune_similar_items_weight, validation_pairs, vector_score_fn
from ltrec.models import ModelConfig, Recommender
from ltrec.new_item_ids import impute_new_item_ids, shift_grid
from ltrec.prepared import Prepared, item_side, prepare
from ltrec.scoring import model_score_fn, user_vectors
from ltrec.sequences import Sequences
from ltrec.softmax import full_softmax_loss, matmul_dtype
from ltrec.text_encoder import TEXT_MODEL_NAME
from ltrec_core import contract
from ltrec_core.artifacts import CheckpointMetadata, Vocabularies

SET_CONTEXTS = ("prefix", "others")
SOFTMAX_EXCLUDES = ("none", "prefix", "others")


@dataclass
class TrainConfig:
    # Early stopping on validation NDCG@10 (`patience` epochs without a gain) ends a run; the
    # epoch count and the minutes are caps, and a run they stop says so in its stop reason.
    epochs: int = 200
    max_minutes: float = 17.0
    # Users per step (batches hold about this many users' worth of events: epoch_batches). On
    # ML-1M, 64 learns far more per epoch than 128 at about the same cost per epoch (48 steps an
    # epoch is too few updates): validation NDCG@10 after a 6-minute budget 0.1768 vs 0.1565.
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    loss: str = "full"  # "full" softmax, or "sampled" with logQ correction
    negatives: int = 1024
    # Sampled softmax only: subtract log q from every logit (the logQ popularity correction).
    # Without it, popular items, sampled often as negatives, are pushed down too hard.
    logq: bool = True
    patience: int = 10
    # Validation (a full-ranking pass over every validation user, about a sixth of an epoch's
    # cost on ML-1M) runs every `validate_every` epochs while the schedule is in its first half,
    # then after every epoch, and always after the last one. Patience still counts epochs.
    validate_every: int = 2
    # Input type of the full softmax's matmuls ("auto": bfloat16 on CPUs with native bfloat16,
    # else float32); sums, softmax and gradients stay float32 (ltrec.softmax).
    softmax_precision: str = "auto"
    # Share of users whose training window is put in a random order each epoch. 0 keeps the
    # sequence; 1 trains on every order, i.e. on the history as a set (catalogues whose event
    # order carries little signal). Chosen on validation where the report screens it.
    order_augmentation: float = 0.0
    # Full softmax only: train on logits + tau * log q (logit adjustment, Menon et al. 2021), so
    # the served raw scores carry less of the popularity prior: 0 is the plain loss.
    logit_adjustment: float = 0.0
    # With set pooling, what the set term of the state that predicts item j averages: "prefix",
    # the items before j (the served running mean), or "others", every item of the training
    # window except j (a history read as a set: each item predicted from all the rest, as a
    # held-out item is at test time). Chosen on validation where the report screens it.
    set_context: str = "prefix"
    # Full softmax only: which of the user's other window items each training event's softmax
    # leaves out. "none": all are negatives (next-item prediction, as SASRec trains). "prefix":
    # the items before the target, which serving excludes from the ranking anyway. "others":
    # every other item of the window, which for a history read as a set are positives too, not
    # negatives. Chosen on validation where the report screens it.
    softmax_exclude: str = "none"
    # Whether the new-item map's boost may shift its predictions along the mean user vector as
    # well as scale them (`ltrec.new_item_ids.SHIFTS`; off: scales only), for items added after
    # training (catalogue items without events get the map without the shift). On ML-1M's cold
    # split it lifts cold-item Recall@10 at the default weight from 0.0357 (scale only) to
    # the 0.05 target: README, "New items".
    new_item_shift: bool = True
    # Full softmax with set_context "others" only: distil an EASE teacher (Steck 2019, fitted on
    # the training events with ridge `distill_lam`, each event scored without its own user:
    # `window_teacher_scores`) into the model. Each training event's loss adds `distill_weight`
    # x the cross-entropy between the teacher's distribution over the catalogue (its scores from
    # the window's other items, standardised per event, times `distill_sharpness`, softmaxed)
    # and the model's. 0: no teacher. The served model is the student alone. On ML-1M's short,
    # order-free view a soft teacher (sharpness 0.5: the top of its distribution spread over
    # hundreds of items) beat a sharp one (1) on validation: README, "Figures".
    distill_weight: float = 0.0
    distill_lam: float = 100.0
    distill_sharpness: float = 0.5
    # The share of the softmax's items, most trained first, whose columns the teacher's
    # distribution covers (1: all). EASE is reliable where items have data; below, the model's
    # own loss and the items' text speak alone.
    distill_head_share: float = 1.0
    # How much of its training popularity prior the teacher's distribution loses: its logits
    # minus `distill_debias` x log q (q: the softmax's target distribution, training popularity
    # + 1), logit adjustment (Menon et al. 2021) on the teacher. 0: EASE's ranking as it is, which
    # favours the head (on ML-1M's short view a teacher on every item cost tail NDCG@10 a third).
    distill_debias: float = 0.0
    # The share, in [0, 1], of an item-item cosine teacher mixed into the EASE teacher: each
    # event's scores are the cosines (co-occurrence over the square root of both items' counts,
    # ItemKNN's similarity with every neighbour) of its window's other items, again without the
    # user's own events (`window_cosine_scores`); the two teachers' standardised scores are mixed
    # in this proportion and standardised again. Cosine divides out popularity where EASE keeps
    # it: on ML-1M's short view ItemKNN's tail NDCG@10 is 1.5x EASE's at the same overall.
    distill_cosine: float = 0.0
    seed: int = 0
    threads: int = 0  # 0 = torch default
    model: dict[str, float | int] = field(default_factory=dict)  # ModelConfig overrides

    def __post_init__(self) -> None:
        if self.set_context not in SET_CONTEXTS:
            raise ValueError(
                f"set_context must be one of {', '.join(SET_CONTEXTS)}, got {self.set_context!r}"
            )
        if self.validate_every < 1:
            raise ValueError(f"validate_every must be at least 1, got {self.validate_every}")
        if not 0.0 <= self.logit_adjustment <= 2.0:
            raise ValueError(f"logit_adjustment must be in [0, 2], got {self.logit_adjustment:g}")
        if self.logit_adjustment and self.loss != "full":
            raise ValueError("logit_adjustment applies to the full softmax only (loss='full')")
        if self.softmax_exclude not in SOFTMAX_EXCLUDES:
            raise ValueError(
                f"softmax_exclude must be one of {', '.join(SOFTMAX_EXCLUDES)}, got "
                f"{self.softmax_exclude!r}"
            )
        if self.softmax_exclude != "none" and self.loss != "full":
            raise ValueError("softmax_exclude applies to the full softmax only (loss='full')")
        if self.set_context == "others" and self.model.get("set_pooling") is False:
            raise ValueError("set_context 'others' needs set pooling (it replaces its mean)")
        if self.distill_weight < 0 or self.distill_lam <= 0 or self.distill_sharpness <= 0:
            raise ValueError(
                "distill_weight must be >= 0 and distill_lam, distill_sharpness > 0, got "
                f"{self.distill_weight:g}, {self.distill_lam:g}, {self.distill_sharpness:g}"
            )
        if not 0.0 <= self.distill_cosine <= 1.0:
            raise ValueError(f"distill_cosine must be in [0, 1], got {self.distill_cosine:g}")
        if self.distill_cosine and not self.distill_weight:
            raise ValueError("distill_cosine mixes into the EASE teacher: it needs distill_weight")
        if not 0.0 <= self.distill_debias <= 2.0:
            raise ValueError(f"distill_debias must be in [0, 2], got {self.distill_debias:g}")
        if not 0.0 < self.distill_head_share <= 1.0:
            raise ValueError(
                f"distill_head_share must be in (0, 1], got {self.distill_head_share:g}"
            )
        if self.distill_weight and (self.loss != "full" or self.set_context != "others"):
            raise ValueError("distill_weight needs the full softmax and set_context 'others'")


# Batch widths are rounded up to a multiple of this: a handful of distinct tensor shapes per
# epoch, so the allocator keeps reusing the same blocks instead of fragmenting the heap.
WIDTH_STEP = 16

# A training batch: history, event types, targets, context (`_batches`).
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def epoch_spans(seqs: Sequences, window: int, rng: np.random.Generator) -> np.ndarray:
    """One training window per user for an epoch, [n_users, 2] (start, stop) into `seqs`.

    A sequence no longer than `window` is taken whole; a longer one contributes a window whose
    end is drawn uniformly, so over the epochs all of it is seen.
    """
    starts, stops = seqs.offsets[:-1], seqs.offsets[1:]
    lengths = stops - starts
    long = lengths > window
    ends = stops.copy()
    if long.any():
        ends[long] = starts[long] + rng.integers(window, lengths[long] + 1)
    return np.stack([np.maximum(starts, ends - window), ends], axis=1)


def epoch_batches(spans: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Users grouped into batches of about `batch_size` users' worth of events each.

    Users are ordered by window length (ties in random order) and cut into batches holding about
    the mean batch's number of events, so a batch is nearly all real events instead of ~half
    padding; the batches then come in random order. Every step still averages the loss over
    about the same number of events, so an event weighs the same whichever batch it falls in.
    """
    lengths = spans[:, 1] - spans[:, 0]
    order = np.lexsort((rng.random(len(lengths)), -lengths))
    budget = batch_size * max(1.0, float(lengths.mean()))
    batches: list[np.ndarray] = []
    start = 0
    total = 0.0
    for i, u in enumerate(order):
        total += lengths[u]
        if total >= budget or i == len(order) - 1:
            batches.append(order[start : i + 1])
            start, total = i + 1, 0.0
    return [batches[i] for i in rng.permutation(len(batches))]


def _batches(
    seqs: Sequences,
    window: int,
    batch_size: int,
    rng: np.random.Generator,
    order_augmentation: float = 0.0,
) -> Iterator[Batch]:
    """An epoch of right-padded training batches: (history, event types, targets, context).

    targets[:, t] is the item at position t of the window (0 = padding), predicted from the
    begin vector and the history before it; padding only ever follows a row's real events.
    With `order_augmentation` p, a share p of the users' windows come in a random order (the
    same permutation for items, event types and context).
    """
    for batch, _ in _shard_batches(seqs, window, batch_size, rng, order_augmentation):
        yield batch


def _shard_batches(
    seqs: Sequences,
    window: int,
    batch_size: int,
    rng: np.random.Generator,
    order_augmentation: float = 0.0,
    rank: int = 0,
    processes: int = 1,
) -> Iterator[tuple[Batch, float]]:
    """`_batches` for process `rank` of `processes`: its shard of every batch, with the shard's
    share of the batch's events.

    Every process draws the same epoch (the same seeded `rng`, consumed the same way), so the
    global batches are exactly one process's batches, and each process takes every
    `processes`-th user of each (users rank, rank + processes, ...: a batch's users have about
    the same window length, so the shards come out about equal). One step is then one process's
    step over the same users, at the same batch size, learning-rate schedule and steps per
    epoch, only computed in parts; whole batches per process would instead multiply the batch
    and divide the steps by the number of processes. A shard's mean loss weighted by its share
    (its events over the batch's) sums over the processes to the batch's mean. A process whose
    shard would be empty (a batch of fewer users than processes) gets the batch's first user at
    share 0: it still takes the step that the gradient averaging waits for, and adds nothing.
    """
    spans = epoch_spans(seqs, window, rng)
    permute = rng.random(len(spans)) < order_augmentation if order_augmentation > 0 else None
    for chosen in epoch_batches(spans, batch_size, rng):
        orders = []  # every user's, so that every process draws the same permutations
        for u in chosen:
            order = np.arange(spans[u, 0], spans[u, 1])
            if permute is not None and permute[u]:
                order = rng.permutation(order)
            orders.append(order)
        mine = orders[rank::processes]
        share = sum(map(len, mine)) / sum(map(len, orders)) if mine else 0.0
        mine = mine or orders[:1]
        longest = max(map(len, mine))
        width = min(window, -(-longest // WIDTH_STEP) * WIDTH_STEP)
        b_size = len(mine)
        hist = np.zeros((b_size, max(width - 1, 1)), dtype=np.int64)
        hist_types = np.zeros_like(hist)
        targets = np.zeros((b_size, hist.shape[1] + 1), dtype=np.int64)
        context = np.zeros((b_size, hist.shape[1] + 1, 4), dtype=np.int64)
        for i, order in enumerate(mine):
            n = len(order)
            hist[i, : n - 1] = seqs.items[order[:-1]]
            hist_types[i, : n - 1] = seqs.event_types[order[:-1]]
            targets[i, :n] = seqs.items[order]
            context[i, :n] = seqs.context[order]
        batch = (
            torch.from_numpy(hist),
            torch.from_numpy(hist_types),
            torch.from_numpy(targets),
            torch.from_numpy(context),
        )
        yield batch, share


def leave_one_out_means(vectors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """For each position of each row, the mean vector of the row's other real items:
    vectors [B, W, D] of items [B, W] (0 = padding, whose vectors are zero) -> [B, W, D]; zero
    where a row has no other item."""
    real = (items != contract.PADDING_INDEX).unsqueeze(-1).to(vectors.dtype)
    vectors = vectors * real
    others = real.sum(dim=1, keepdim=True) - real
    return (vectors.sum(dim=1, keepdim=True) - vectors) / others.clamp(min=1.0) * real


def window_exclusions(
    targets: torch.Tensor, column: torch.Tensor, which: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, column) pairs a batch's softmax leaves out (`TrainConfig.softmax_exclude`).

    targets [B, W] (0 = padding) are the window items; the rows are the batch's real events in
    row-major order (as `states[targets != 0]`), `column` maps an item to its softmax column.
    "prefix" pairs each event with the items before it in its window, "others" with every other
    item of its window; an item equal to the event's own target (a repeat) is never left out.
    """
    valid = targets != contract.PADDING_INDEX
    width = targets.shape[1]
    row = torch.cumsum(valid.flatten(), 0).view_as(targets) - 1
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)  # [B, t (the event), s (the other item)]
    pair &= targets.unsqueeze(2) != targets.unsqueeze(1)
    if which == "prefix":
        pair &= torch.ones(width, width, dtype=torch.bool).tril(-1)
    b, t, s = torch.nonzero(pair, as_tuple=True)
    rows, columns = row[b, t], column[targets[b, s]]
    kept = columns >= 0  # an item outside the softmax has nothing to leave out
    return rows[kept], columns[kept]


# The EASE teacher's inverse is dense: N^2 float64 while it is computed (3.2 GB at 20,000 items).
DISTILL_MAX_ITEMS = 20_000


@dataclass(frozen=True)
class Teacher:
    """The distillation teacher: EASE's inverse, and the co-occurrences X^T X when the cosine
    teacher is mixed in (`TrainConfig.distill_cosine`)."""

    inverse: torch.Tensor  # [N+1, N+1]
    gram: torch.Tensor | None = None  # [N+1, N+1], float32


def ease_teacher(prepared: Prepared, cfg: TrainConfig) -> Teacher:
    """P = (X^T X + lam I)^-1 [N+1, N+1] over the training events, from which EASE's weights
    follow (Steck 2019): the distillation teacher (`window_teacher_scores`). Rows and columns
    of padding and of items without training events are zero."""
    n_items = len(prepared.item_ids)
    if n_items > DISTILL_MAX_ITEMS:
        raise ValueError(
            f"distill_weight: the EASE teacher is a dense {n_items:,} x {n_items:,} inverse; "
            f"catalogues of at most {DISTILL_MAX_ITEMS:,} items can have one"
        )
    gram = cooccurrence(interaction_matrix(prepared.split.train, n_items))
    cosine = torch.from_numpy(gram.astype(np.float32)) if cfg.distill_cosine else None
    return Teacher(teacher_inverse(gram, cfg.distill_lam), cosine)


def teacher_inverse(gram: np.ndarray, lam: float) -> torch.Tensor:
    """EASE's inverse (`ltrec.baselines.ease_inverse`) as a float32 [N+1, N+1] tensor, zero
    for padding and items without interactions."""
    active, inverse = ease_inverse(gram, lam)
    full = np.zeros(gram.shape, dtype=np.float32)
    full[np.ix_(active, active)] = inverse
    return torch.from_numpy(full)


def window_teacher_scores(targets: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The EASE teacher's scores [events, N+1] of each real event of the windows `targets`
    [B, W] (row-major, as `targets[targets != 0]`), from the window's other items, by an EASE
    fitted without the window's user: out of sample, as the teacher will be at test time.

    A model fitted with the user would score the user's own training events from having seen
    them (a quarter of its probability on the target, on ML-1M's short view): distilling that
    only repeats the labels. The user's part of X^T X is x x^T (x: the indicator of the
    window's items), so removing it is a rank-one update of the inverse (Sherman-Morrison):
    P_u = P + (P x)(P x)^T / (1 - x^T P x), which costs |window| x N per window, not a refit.
    The weights are then B_u[i, j] = -P_u[i, j] / P_u[j, j] (zero on the diagonal), and an
    event's score the sum of its window's other rows. The window is the user's history when it
    fits whole (a longer history keeps the rest of its events in; an item repeated in a window
    counts twice in x, where X, binary, has it once)."""
    valid = targets != contract.PADDING_INDEX
    keep = valid.to(inverse.dtype)
    # In place on the one [B, W, N+1] tensor: at ML-1M's size this is 2-3x faster than a
    # temporary per step (the loop makes one such tensor per training step).
    rows = inverse[targets].mul_(keep.unsqueeze(2))  # [B, W, N+1]: P[I, :]
    spread = rows.sum(1)  # [B, N+1]: P x
    spread_at_window = torch.gather(spread, 1, targets) * keep  # [B, W]: (P x)[I]
    own = spread_at_window.sum(1)  # [B]: x^T P x
    scale = 1.0 / (1.0 - own).clamp(min=1e-6)
    # P_u[I, :] = P[I, :] + scale (P x)[I] (P x)^T, a batched outer product added in place.
    rows.baddbmm_((scale.unsqueeze(1) * spread_at_window).unsqueeze(2), spread.unsqueeze(1))
    diagonal = torch.diagonal(inverse) + scale.unsqueeze(1) * spread.square()  # diag(P_u)
    rows.mul_((-1.0 / diagonal.clamp(min=1e-12)).unsqueeze(1))  # B_u[I, :]; padding rows 0
    return _others_sum(rows.scatter_(2, targets.unsqueeze(2), 0.0), valid)


def _others_sum(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[events, N+1]: for each real event of the windows, the sum of its window's other rows
    of `weights` [B, W, N+1] (rows of padding are zero)."""
    window = torch.arange(weights.shape[0]).unsqueeze(1).expand_as(valid)[valid]
    return weights.sum(1)[window].sub_(weights[valid])


def window_cosine_scores(targets: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The cosine teacher's scores [events, N+1], as `window_teacher_scores` gives EASE's: each
    event's the sum of its window's other items' cosines to every item, from co-occurrences
    without the window's user. With x the window's indicator, the user's part of X^T X is
    x x^T: an item i of the window co-occurs C[i, j] - x_j times with j, and each item j has
    n_j - x_j events, so cos_u(i, j) = (C[i, j] - x_j) / sqrt((n_i - 1)(n_j - x_j)) (zero where
    a count is zero, and for i = j)."""
    valid = targets != contract.PADDING_INDEX
    keep = valid.to(gram.dtype)
    counts = torch.diagonal(gram)  # n: each item's training events (X binary)
    x = torch.zeros(targets.shape[0], gram.shape[0], dtype=gram.dtype)
    x.scatter_(1, targets, keep)  # binary: a repeat in a window counts once, as in X
    x[:, contract.PADDING_INDEX] = 0.0
    own = counts[targets] - 1.0  # [B, W]: n_i - 1
    other = counts.unsqueeze(0) - x  # [B, N+1]: n_j - x_j
    # 1 / sqrt of each count, 0 where it is not positive; padding rows 0 too.
    own_scale = torch.where(own > 0, own.clamp(min=1e-12).rsqrt(), torch.zeros_like(own)) * keep
    other_scale = torch.where(other > 0, other.clamp(min=1e-12).rsqrt(), torch.zeros_like(other))
    weights = gram[targets].sub_(x.unsqueeze(1))  # [B, W, N+1]: C_u[I, :], then cos_u, in place
    weights.mul_(other_scale.unsqueeze(1)).mul_(own_scale.unsqueeze(2))
    return _others_sum(weights.scatter_(2, targets.unsqueeze(2), 0.0), valid)


def _standardised(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's unmasked scores centred and scaled to unit spread; masked entries 0."""
    kept = (~mask).sum(1, keepdim=True).clamp(min=1)
    mean = scores.masked_fill(mask, 0.0).sum(1, keepdim=True) / kept
    centred = (scores - mean).masked_fill(mask, 0.0)
    spread = (centred.square().sum(1, keepdim=True) / kept).sqrt().clamp(min=1e-6)
    return centred / spread


def distill_loss(
    users: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    active: torch.Tensor,
    teacher: torch.Tensor,
    excluded: tuple[torch.Tensor, torch.Tensor],
    sharpness: float,
    taught: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    cosine: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy from the teacher's distribution to the model's over the softmax's
    columns (`active`); each event's excluded columns (its window's other items) are left out
    of both. The teacher's scores (`window_teacher_scores`) are standardised per event and
    multiplied by `sharpness` before its softmax; `prior` [columns], when given, is subtracted
    from those logits (`distill_debias` x log q: the teacher without its popularity prior).
    `cosine` (X^T X, share): the cosine teacher's standardised scores mixed in at that share
    (`window_cosine_scores`), the mix standardised again."""
    scores = window_teacher_scores(targets, teacher)[:, active]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[excluded[0], excluded[1]] = True
    if taught is not None:  # the columns the teacher speaks for (`distill_head_share`)
        mask |= ~taught.unsqueeze(0)
    standard = _standardised(scores, mask)
    if cosine is not None and cosine[1] > 0:
        gram, share = cosine
        other = _standardised(window_cosine_scores(targets, gram)[:, active], mask)
        standard = _standardised((1.0 - share) * standard + share * other, mask)
    teacher_logits = standard * sharpness
    if prior is not None:
        teacher_logits = teacher_logits - prior.unsqueeze(0)
    teacher_probs = torch.softmax(teacher_logits.masked_fill(mask, float("-inf")), dim=1)
    logits = (users @ table[active].T).masked_fill(mask, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=1).masked_fill(mask, 0.0)
    return -(teacher_probs * log_probs).sum(1).mean()


def _loss(
    model: Recommender,
    batch: tuple[torch.Tensor, ...],
    cfg: TrainConfig,
    log_q: torch.Tensor,
    q: torch.Tensor,
    teacher: Teacher | None = None,
) -> torch.Tensor:
    hist, hist_types, targets, context = batch
    table = model.item_table()
    set_means = None
    if cfg.set_context == "others":
        set_means = leave_one_out_means(F.embedding(targets, table), targets)
    states, _ = model.user_tower.states(
        F.embedding(hist, table), hist, hist_types, right_padded=True, set_means=set_means
    )
    valid = targets != contract.PADDING_INDEX
    users = model.context_weighting(states[valid], context[valid])
    target = targets[valid]
    if cfg.loss == "full":
        # Only the items that can be targets (q > 0) are columns: the same softmax as masking the
        # others with -inf, without writing and back-propagating through that mask. The fused
        # loss never builds the [events, items] logits (ltrec.softmax).
        active = torch.nonzero(q > 0).squeeze(1)
        column = torch.full(q.shape, -1, dtype=torch.long)
        column[active] = torch.arange(len(active))
        excluded = (
            window_exclusions(targets, column, cfg.softmax_exclude)
            if cfg.softmax_exclude != "none"
            else None
        )
        loss = full_softmax_loss(
            users,
            table[active],
            column[target],
            matmul_dtype=matmul_dtype(cfg.softmax_precision),
            bias=cfg.logit_adjustment * log_q[active] if cfg.logit_adjustment else None,
            excluded=excluded,
        )
        if teacher is not None and cfg.distill_weight:
            if excluded is None:
                excluded = window_exclusions(targets, column, "others")
            taught = None
            if cfg.distill_head_share < 1.0:  # the most popular share of the softmax's items
                share = q[active]
                taught = share >= torch.quantile(share, 1.0 - cfg.distill_head_share)
            prior = cfg.distill_debias * log_q[active] if cfg.distill_debias else None
            loss = loss + cfg.distill_weight * distill_loss(
                users,
                table,
                targets,
                active,
                teacher.inverse,
                excluded,
                cfg.distill_sharpness,
                taught,
                prior,
                None if teacher.gram is None else (teacher.gram, cfg.distill_cosine),
            )
        return loss
    # Sampled softmax: negatives drawn by popularity, logits corrected by log q (logQ) unless
    # the ablation turns the correction off.
    negatives = torch.multinomial(q, cfg.negatives, replacement=True)
    correction = log_q if cfg.logq else torch.zeros_like(log_q)
    pos = (users * table[target]).sum(-1, keepdim=True) - correction[target].unsqueeze(1)
    neg = users @ table[negatives].T - correction[negatives].unsqueeze(0)
    neg = neg.masked_fill(negatives.unsqueeze(0) == target.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long))


def _progress(step: int, total_steps: int, elapsed: float, max_minutes: float) -> float:
    """How far the run is through whichever budget (steps or minutes) runs out first, 0..1;
    `elapsed` in seconds."""
    return min(max(step / total_steps, elapsed / (max_minutes * 60)), 1.0)


def _overruns(elapsed: float, epochs_done: int, max_minutes: float) -> bool:
    """Whether one more epoch like the average so far would take the run past its minutes."""
    return elapsed * (epochs_done + 1) / epochs_done > max_minutes * 60


def _set_lr(
    optimiser: torch.optim.Optimizer,
    peak: float,
    step: int,
    warmup_steps: int,
    total_steps: int,
    elapsed: float,
    max_minutes: float,
) -> None:
    """Linear warm-up, then cosine decay over whichever budget (steps or minutes) runs out first,
    so a run stopped by its time budget still ends at a low learning rate."""
    if step < warmup_steps:
        lr = peak * (step + 1) / warmup_steps
    else:
        progress = _progress(step, total_steps, elapsed, max_minutes)
        lr = peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in optimiser.param_groups:
        group["lr"] = lr


# ModelConfig settings that new training uses unless `TrainConfig.model` says otherwise; the
# dataclass keeps the values that older checkpoints were trained with.
MODEL_DEFAULTS: dict[str, float | int | bool] = {"set_pooling": True, "new_item_id_map": True}


def model_config(prepared: Prepared, cfg: TrainConfig) -> ModelConfig:
    return ModelConfig(
        n_items=len(prepared.item_ids),
        n_devices=len(prepared.device_vocab) + 1,
        n_regions=len(prepared.region_vocab) + 1,
        **{**MODEL_DEFAULTS, **cfg.model},  # type: ignore[arg-type]
    )


def target_distribution(popularity: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, log q) over the catalogue: training popularity, smoothed by one.

    Items that are never a training target (no training interactions: new in the catalogue, or
    held out as cold) get q = 0, which keeps them out of the softmax and out of the sampled
    negatives. A full softmax would otherwise push them down as "never wanted" at every step,
    and they would be served worse than an item added after training.
    """
    pop = torch.from_numpy(np.asarray(popularity)).double()
    q = (pop + 1.0) / (pop + 1.0).sum()
    q[pop <= 0] = 0.0
    q[contract.PADDING_INDEX] = 0.0
    q = q / q.sum()
    return q.float(), torch.log(q.clamp(min=1e-12)).float()


class _StepLoss(torch.nn.Module):
    """The training loss as a module's forward: what DistributedDataParallel wraps (its
    gradient averaging is armed by a forward call, and `_loss` calls the model's parts)."""

    def __init__(
        self,
        model: Recommender,
        cfg: TrainConfig,
        log_q: torch.Tensor,
        q: torch.Tensor,
        teacher: Teacher | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg, self.log_q, self.q, self.teacher = cfg, log_q, q, teacher

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return _loss(self.model, batch, self.cfg, self.log_q, self.q, self.teacher)


def _distributed_step_loss(
    model: Recommender,
    cfg: TrainConfig,
    log_q: torch.Tensor,
    q: torch.Tensor,
    teacher: Teacher | None = None,
) -> torch.nn.Module:
    """`_StepLoss` under DDP. Unused parameters are expected (the image path of a catalogue
    without images, parts only serving uses): DDP must look for them every step, and it leaves
    their gradients unset as one process does, so AdamW skips them alike. Buffers are constant
    features, not running statistics: nothing to broadcast each step."""
    return torch.nn.parallel.DistributedDataParallel(
        _StepLoss(model, cfg, log_q, q, teacher),
        find_unused_parameters=True,
        forward_sync_buffers=False,
    )


def fit(
    prepared: Prepared,
    cfg: TrainConfig,
    model: Recommender,
    name: str = "",
    progress: bool = True,
    valid_cases: EvalCases | None = None,
    world: World = SINGLE,
) -> tuple[Recommender, dict]:
    """The training loop shared by `train` and the evaluation's models and ablations.

    Early stopping on validation NDCG@10; the best epoch's weights are loaded back.
    `valid_cases` replaces the validation cases built from `prepared.split` (the context
    ablation validates on shuffled context, as it trains on it).

    In several processes (`world`, from torchrun) each takes its shard of every batch
    (`_shard_batches`) and DDP averages the gradients, so a step is one process's step at the
    same global batch. Rank 0 alone validates, keeps the best weights, imputes the new-item ID
    map and decides when to stop; its clock (for the learning-rate schedule and the time budget)
    and its stop decision are broadcast, so all ranks take the same steps and stop together.
    The summary is rank 0's; other ranks return an empty one.
    """
    if cfg.set_context == "others" and model.user_tower.set_projection is None:
        raise ValueError("set_context 'others' needs a model with set pooling")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif world.distributed:
        torch.set_num_threads(world.default_threads())
    model_cfg = model.cfg
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    q, log_q = target_distribution(prepared.popularity)
    teacher = ease_teacher(prepared, cfg) if cfg.distill_weight else None
    step_loss = _distributed_step_loss(model, cfg, log_q, q, teacher) if world.distributed else None
    split = prepared.split
    if valid_cases is None and world.main:
        valid_cases = make_cases(
            split.train, split.valid, prepared.device_vocab, prepared.region_vocab
        )
    # Validation cases whose target is a long-tail item (`long_tail_mask` of training
    # popularity): each validation also reports their NDCG@10, the long tail's own figure.
    tail_cases = (
        long_tail_mask(prepared.popularity)[valid_cases.targets]
        if valid_cases is not None
        else None
    )
    window = model_cfg.max_history + 1
    steps_per_epoch = math.ceil(len(prepared.train_sequences) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = min(100, total_steps // 10 + 1)
    label = f"{name} " if name else ""
    started = time.monotonic()
    best: dict = {"epoch": 0, "ndcg@10": -1.0}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history: list[dict] = []
    step, stop_reason = 0, "epochs"
    _set_lr(optimiser, cfg.lr, step, warmup_steps, total_steps, 0.0, cfg.max_minutes)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        epoch_started = time.monotonic()
        bar = tqdm(
            _shard_batches(
                prepared.train_sequences,
                window,
                cfg.batch_size,
                rng,
                cfg.order_augmentation,
                world.rank,
                world.size,
            ),
            total=steps_per_epoch,
            desc=f"{label}epoch {epoch}/{cfg.epochs}",
            unit="batch",
            disable=not progress or not world.main,
        )
        for batch, share in bar:
            if step_loss is None:
                loss = _loss(model, batch, cfg, log_q, q, teacher)
                scaled = loss
            else:
                world.seed_step(cfg.seed, step)
                loss = step_loss(*batch)
                # DDP averages over the ranks: share x ranks makes that the batch's mean.
                scaled = loss * (share * world.size)
            optimiser.zero_grad(set_to_none=True)
            scaled.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            step += 1
            elapsed = world.broadcast_float(time.monotonic() - started)
            _set_lr(optimiser, cfg.lr, step, warmup_steps, total_steps, elapsed, cfg.max_minutes)
            losses.append(loss.item() * share if world.distributed else loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        losses = world.sum(losses)  # each step's loss over its global batch
        trained = time.monotonic()
        stop = False
        if world.main:
            # Would another epoch like the ones so far overrun the time budget? Then this is the
            # last.
            last = epoch == cfg.epochs or _overruns(trained - started, epoch, cfg.max_minutes)
            record = {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "seconds": trained - started,
                "train_epoch_seconds": trained - epoch_started,
                "validation_seconds": 0.0,
            }
            history.append(record)
            if not (
                last
                or epoch % cfg.validate_every == 0
                or _progress(step, total_steps, trained - started, cfg.max_minutes) >= 0.5
            ):
                print(
                    f"{label}epoch {epoch}: loss {record['loss']:.4f}  (no validation; "
                    f"{record['train_epoch_seconds']:.1f} s training; "
                    f"{(trained - started) / 60:.1f} min)",
                    file=sys.stderr,
                )
            else:
                metrics, ranks = evaluate(
                    model_score_fn(model, model_cfg.max_history),
                    valid_cases,  # type: ignore[arg-type]
                    desc="validation",
                    progress=progress,
                )
                if tail_cases is not None and tail_cases.any():
                    tail_ranks = ranks[tail_cases]
                    metrics["tail_ndcg@10"] = ranking_metrics(tail_ranks, (10,))["ndcg@10"]
                elapsed = time.monotonic() - started
                record.update(
                    seconds=elapsed, validation_seconds=time.monotonic() - trained, **metrics
                )
                tail_text = (
                    f"tail ndcg@10 {metrics['tail_ndcg@10']:.4f}  "
                    if "tail_ndcg@10" in metrics
                    else ""
                )
                print(
                    f"{label}epoch {epoch}: loss {record['loss']:.4f}  valid recall@10 "
                    f"{metrics['recall@10']:.4f}  ndcg@10 {metrics['ndcg@10']:.4f}  {tail_text}"
                    f"({record['train_epoch_seconds']:.1f} s training + "
                    f"{record['validation_seconds']:.1f} s validation; {elapsed / 60:.1f} min)",
                    file=sys.stderr,
                )
                if metrics["ndcg@10"] > best["ndcg@10"]:
                    best = {"epoch": epoch, **metrics}
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if epoch - best["epoch"] >= cfg.patience:
                    stop_reason, stop = f"no validation gain for {cfg.patience} epochs", True
                elif _overruns(elapsed, epoch, cfg.max_minutes):
                    stop_reason, stop = f"time budget of {cfg.max_minutes} min", True
        if world.broadcast_flag(stop):
            break
    world.check_replicas(model)
    if not world.main:
        return model, {}
    model.load_state_dict(best_state)
    model.eval()
    validation = None
    if valid_cases is not None and getattr(model.fusion, "new_item_ids", None) is not None:
        # The new-item map is chosen by how its predictions rank validation targets.
        vectors = user_vectors(model, valid_cases, model_cfg.max_history)
        validation = (vectors, valid_cases.histories, valid_cases.targets)
    new_item_ids = impute_new_item_ids(
        model,
        prepared.popularity,
        seed=cfg.seed,
        validation=validation,
        shifts=shift_grid(cfg.new_item_shift),
    )
    summary = {
        "train_config": asdict(cfg),
        "model_config": model_cfg.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "never_target_items": int((q[1:] == 0).sum()),
        "processes": world.size,
        "best": best,
        "epochs": history,
        "stop_reason": stop_reason,
        "train_seconds": time.monotonic() - started,
        "new_item_ids": new_item_ids,
    }
    return model, summary


def train(
    prepared: Prepared,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    world: World = SINGLE,
) -> dict:
    """Train our model; writes checkpoint.pt (what export reads) and metrics.json.

    In several processes (`world`) all of them train (`fit`), and rank 0 alone validates, tunes
    the serving defaults and writes the files; the other ranks return an empty summary."""
    model_cfg = model_config(prepared, cfg)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    model = Recommender(model_cfg, torch.from_numpy(prepared.text_features), item_side(prepared))
    if not world.main:
        fit(prepared, cfg, model, progress=progress, world=world)
        return {}
    valid_cases = make_cases(
        prepared.split.train, prepared.split.valid, prepared.device_vocab, prepared.region_vocab
    )
    popular_metrics, _ = evaluate(
        most_popular(prepared.popularity), valid_cases, desc="most-popular", progress=progress
    )
    model, fitted = fit(prepared, cfg, model, progress=progress, world=world)
    # The serving default of the long-tail weight, on validation (export reads it).
    long_tail_weight, exposure = long_tail_term(
        model_score_fn(model, model_cfg.max_history), prepared.popularity, valid_cases
    )
    summary = {
        "text_model": TEXT_MODEL_NAME,
        "image_model": IMAGE_MODEL_NAME,
        **fitted,
        "long_tail_weight": long_tail_weight,
        "similar_items_long_tail_weight": tune_similar_items_default(model, prepared, exposure),
        "most_popular_valid": popular_metrics,
        "data": {"dir": str(prepared.data_dir), "cleaning": prepared.report},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        Checkpoint(
            metadata=CheckpointMetadata(
                model_config=model_cfg.to_dict(),
                item_ids=prepared.item_ids,
                titles=prepared.titles,
                texts=prepared.texts,
                image_paths=prepared.image_paths,
                vocabularies=Vocabularies(
                    event_types=list(contract.EVENT_TYPES),
                    device=prepared.device_vocab,
                    region=prepared.region_vocab,
                ),
                summary=summary,
                item_fields=prepared.item_fields,
            ),
            state_dict=model.state_dict(),
            text_features=prepared.text_features,
            image_rows=prepared.image_rows,
            image_features=prepared.image_features,
            attribute_ids=prepared.attribute_ids,
            popularity=prepared.popularity,
            long_tail=long_tail_mask(prepared.popularity),
            exposure=exposure,
        ),
        out_dir / "checkpoint.pt",
    )
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def retune_long_tail_weight(
    prepared: Prepared, out_dir: Path, refit_map: bool = False, shift: bool | None = None
) -> dict:
    """Choose the long-tail weight's serving default again for `out_dir`'s checkpoint (one
    trained before training chose it, or to see it on other data of the same catalogue), and
    store it in the checkpoint and metrics.json; SimilarItems' too. With `refit_map`, the
    new-item map and its boost are fitted again first, as training fits them
    (`impute_new_item_ids`; where new items land moves the exposure counts), its boost allowed
    to shift as `shift` says (None: as the checkpoint was trained, `new_item_shift`). Returns
    the checkpoint's summary, which holds the choices."""
    path = out_dir / "checkpoint.pt"
    model, ckpt = load_checkpoint_for(path, prepared.item_ids, prepared.popularity)
    valid_cases = make_cases(
        prepared.split.train, prepared.split.valid, prepared.device_vocab, prepared.region_vocab
    )
    if refit_map and getattr(model.fusion, "new_item_ids", None) is not None:
        # The model's tensors are the checkpoint's (`load_checkpoint`): the fit writes into both.
        vectors = user_vectors(model, valid_cases, model.cfg.max_history)
        trained_with = ckpt.summary.get("train_config", {})
        ckpt.summary["new_item_ids"] = impute_new_item_ids(
            model,
            prepared.popularity,
            seed=int(trained_with.get("seed", 0)),
            validation=(vectors, valid_cases.histories, valid_cases.targets),
            shifts=shift_grid(bool(trained_with.get("new_item_shift")) if shift is None else shift),
        )
    tuned, ckpt.exposure = long_tail_term(
        model_score_fn(model, model.cfg.max_history), prepared.popularity, valid_cases
    )
    ckpt.summary["long_tail_weight"] = tuned
    ckpt.summary["similar_items_long_tail_weight"] = tune_similar_items_default(
        model, prepared, ckpt.exposure
    )
    save_checkpoint(ckpt, path)
    (out_dir / "metrics.json").write_text(json.dumps(ckpt.summary, indent=2))
    return ckpt.summary


def tune_similar_items_default(
    model: Recommender, prepared: Prepared, exposure: np.ndarray | None
) -> dict:
    """SimilarItems' serving default of the long-tail weight, on validation item to item
    (`ltrec.item_to_item`): its item-item scores are on another scale than Recommend's. The
    served scorer's term penalises `exposure` (the checkpoint's; popularity when None)."""
    model.eval()
    with torch.no_grad():
        table = model.item_table().numpy()
    return tune_similar_items_weight(
        vector_score_fn(table),
        prepared.popularity,
        long_tail_mask(prepared.popularity),
        validation_pairs(prepared.split),
        counts=exposure,
    )


def _long_tail_line(tuned: dict) -> str:
    at = {row["weight"]: row for row in tuned["grid"]}
    chosen, zero = at[tuned["chosen"]], at[0.0]
    return (
        f"long-tail weight (serving default, chosen on validation; the term penalises "
        f"log(1 + {tuned.get('counts', 'popularity')})): {tuned['chosen']:g}, the "
        f"largest with NDCG@10 within {tuned['tolerance']:.0%} of weight 0's: NDCG@10 "
        f"{chosen['ndcg@10']:.4f} vs {zero['ndcg@10']:.4f}, Coverage@10 "
        f"{chosen['coverage@10']:.4f} vs {zero['coverage@10']:.4f}, tail share of the lists "
        f"{chosen['aplt@10']:.3f} vs {zero['aplt@10']:.3f}"
    )


def _similar_items_line(tuned: dict) -> str:
    at = {row["weight"]: row for row in tuned["grid"]}
    chosen, zero = at[tuned["chosen"]], at[0.0]
    return (
        f"SimilarItems long-tail weight (serving default, chosen on validation item to item): "
        f"{tuned['chosen']:g} ({chosen['relative_weight']:g} x the score scale "
        f"{tuned['scale']:.3g}): NDCG@10 {chosen['ndcg@10']:.4f} vs {zero['ndcg@10']:.4f} at 0, "
        f"Coverage@10 {chosen['coverage@10']:.4f} vs {zero['coverage@10']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset directory")
    parser.add_argument("--out", type=Path, required=True, help="where checkpoint.pt goes")
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"))
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=TrainConfig.weight_decay,
        help="AdamW's decoupled weight decay (default %(default)g; wider vectors need more: the "
        "report's short view chose 1 at 128-d)",
    )
    parser.add_argument("--loss", choices=("full", "sampled"), default=TrainConfig.loss)
    parser.add_argument("--negatives", type=int, default=TrainConfig.negatives)
    parser.add_argument(
        "--no-logq",
        action="store_true",
        help="sampled softmax without the logQ popularity correction (an ablation)",
    )
    parser.add_argument("--patience", type=int, default=TrainConfig.patience)
    parser.add_argument(
        "--validate-every",
        type=int,
        default=TrainConfig.validate_every,
        help="validate every N epochs in the schedule's first half (every epoch after it)",
    )
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--embedding-dim", type=int, default=ModelConfig.embedding_dim)
    parser.add_argument("--layers", type=int, default=ModelConfig.n_layers)
    parser.add_argument("--heads", type=int, default=ModelConfig.n_heads)
    parser.add_argument("--max-history", type=int, default=ModelConfig.max_history)
    parser.add_argument("--dropout", type=float, default=ModelConfig.dropout)
    parser.add_argument(
        "--text-only", action="store_true", help="no per-item ID vectors (item = its text alone)"
    )
    parser.add_argument(
        "--new-item-shift",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the new-item map's boost may shift added items' predictions along the "
        "mean user vector, not only scale them (chosen on validation; on by default); with "
        "--refit-new-item-map, for that refit (default there: as the checkpoint was trained)",
    )
    parser.add_argument(
        "--id-dropout",
        type=float,
        default=ModelConfig.id_dropout,
        help="share of ID vectors left out per step: better new items, less accuracy "
        "(python -m benchmarks.id_dropout measures it)",
    )
    parser.add_argument(
        "--order-augmentation",
        type=float,
        default=TrainConfig.order_augmentation,
        help="share of users whose training window comes in a random order each epoch: 0 "
        "reads histories as sequences, 1 as sets (for catalogues whose order says little)",
    )
    parser.add_argument(
        "--logit-adjustment",
        type=float,
        default=TrainConfig.logit_adjustment,
        help="train on logits + TAU * log(popularity share) so the served scores carry less "
        "of the popularity prior (full softmax; 0 = the plain loss)",
    )
    parser.add_argument(
        "--set-context",
        choices=SET_CONTEXTS,
        default=TrainConfig.set_context,
        help="with set pooling, what a training state's set term averages: prefix (the items "
        "before the target, as served) or others (every other item of the window: a history "
        "read as a set)",
    )
    parser.add_argument(
        "--softmax-exclude",
        choices=SOFTMAX_EXCLUDES,
        default=TrainConfig.softmax_exclude,
        help="which other items of the user's training window each event's full softmax leaves "
        "out: none (all are negatives, next-item prediction), prefix (the earlier ones, which "
        "serving excludes anyway) or others (all of them: a history read as a set, whose other "
        "items are positives, not negatives)",
    )
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=TrainConfig.distill_weight,
        help="weight of an EASE teacher's distribution in each event's loss (needs "
        "--set-context others; 0 = no teacher): the served model is the student alone",
    )
    parser.add_argument(
        "--distill-lam",
        type=float,
        default=TrainConfig.distill_lam,
        help="the EASE teacher's ridge (with --distill-weight)",
    )
    parser.add_argument(
        "--distill-sharpness",
        type=float,
        default=TrainConfig.distill_sharpness,
        help="the EASE teacher's standardised scores are multiplied by this before its softmax",
    )
    parser.add_argument(
        "--distill-head-share",
        type=float,
        default=TrainConfig.distill_head_share,
        help="the share of items, most trained first, whose columns the EASE teacher's "
        "distribution covers (with --distill-weight; 1 = all)",
    )
    parser.add_argument(
        "--distill-cosine",
        type=float,
        default=TrainConfig.distill_cosine,
        help="the share, in [0, 1], of an item-item cosine teacher mixed into the EASE "
        "teacher (with --distill-weight; 0 = EASE alone)",
    )
    parser.add_argument(
        "--distill-debias",
        type=float,
        default=TrainConfig.distill_debias,
        help="how much of its popularity prior the EASE teacher's distribution loses: its "
        "logits minus this x log(training popularity + 1), in [0, 2] (with --distill-weight)",
    )
    parser.add_argument(
        "--no-set-pooling",
        action="store_true",
        help="the user tower reads the history as a sequence only (no running mean of the "
        "history's item vectors); an ablation",
    )
    parser.add_argument(
        "--tune-long-tail-only",
        action="store_true",
        help="no training: choose the serving default of the long-tail weight for the "
        "checkpoint in --out on --data's validation split, and store it there",
    )
    parser.add_argument(
        "--refit-new-item-map",
        action="store_true",
        help="with --tune-long-tail-only: first fit the new-item map and its boost again "
        "(as training does), then choose the long-tail defaults",
    )
    parser.add_argument(
        "--softmax-precision",
        choices=("auto", "float32", "bfloat16"),
        default=TrainConfig.softmax_precision,
        help="input type of the full softmax's matmuls (auto: bfloat16 where the CPU has it)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=TrainConfig.threads,
        help="torch threads per process (0: torch's default in one process; under torchrun, "
        "the cores divided among this machine's processes)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be at least 0, got {args.threads}")
    try:
        world = world_from_env()
    except ValueError as exc:
        parser.error(f"invalid torchrun environment: {exc}")
    if not 0.0 <= args.id_dropout < 1.0:
        parser.error(f"--id-dropout must be in [0, 1), got {args.id_dropout:g}")
    if not 0.0 <= args.order_augmentation <= 1.0:
        parser.error(f"--order-augmentation must be in [0, 1], got {args.order_augmentation:g}")
    if not 0.0 <= args.weight_decay <= 10.0:
        parser.error(f"--weight-decay must be in [0, 10], got {args.weight_decay:g}")
    try:
        cfg = TrainConfig(
            epochs=args.epochs,
            max_minutes=args.max_minutes,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            loss=args.loss,
            negatives=args.negatives,
            logq=not args.no_logq,
            patience=args.patience,
            validate_every=args.validate_every,
            seed=args.seed,
            threads=args.threads,
            softmax_precision=args.softmax_precision,
            order_augmentation=args.order_augmentation,
            logit_adjustment=args.logit_adjustment,
            set_context=args.set_context,
            softmax_exclude=args.softmax_exclude,
            distill_weight=args.distill_weight,
            distill_lam=args.distill_lam,
            distill_sharpness=args.distill_sharpness,
            distill_head_share=args.distill_head_share,
            distill_debias=args.distill_debias,
            distill_cosine=args.distill_cosine,
            new_item_shift=(
                TrainConfig.new_item_shift if args.new_item_shift is None else args.new_item_shift
            ),
            model={
                "embedding_dim": args.embedding_dim,
                "n_layers": args.layers,
                "n_heads": args.heads,
                "max_history": args.max_history,
                "dropout": args.dropout,
                "id_embeddings": not args.text_only,
                "id_dropout": args.id_dropout,
                "set_pooling": not args.no_set_pooling,
            },
        )
    except ValueError as exc:
        parser.error(f"invalid training settings: {exc}")
    started = time.monotonic()
    join(world)
    try:
        return _run(args, cfg, world, started)
    finally:
        leave(world)


def _run(args: argparse.Namespace, cfg: TrainConfig, world: World, started: float) -> int:
    """`main` once the settings are read: prepare, train (on every rank), report (on rank 0)."""
    if args.refit_new_item_map and not args.tune_long_tail_only:
        print("error: --refit-new-item-map goes with --tune-long-tail-only", file=sys.stderr)
        return 2
    if args.tune_long_tail_only and args.new_item_shift is not None and not args.refit_new_item_map:
        print(
            "error: --[no-]new-item-shift with --tune-long-tail-only needs --refit-new-item-map "
            "(the shift is part of the new-item map's fit)",
            file=sys.stderr,
        )
        return 2
    if args.tune_long_tail_only and not world.main:
        return 0
    # Rank 0 prepares first, so that it alone encodes and caches the item texts; the other ranks
    # then read its cache, or stop with it if the data is bad.
    prepared, error = None, None
    if world.main:
        try:
            prepared = prepare(args.data, args.cache)
        except DatasetError as exc:
            error = exc
    if not world.broadcast_flag(error is None):
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
        return 2
    if prepared is None:
        prepared = prepare(args.data, args.cache)
    if args.tune_long_tail_only:
        try:
            stored = retune_long_tail_weight(
                prepared, args.out, args.refit_new_item_map, args.new_item_shift
            )
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(_long_tail_line(stored["long_tail_weight"]))
        print(_similar_items_line(stored["similar_items_long_tail_weight"]))
        return 0
    if cfg.distill_weight and len(prepared.item_ids) > DISTILL_MAX_ITEMS:  # every rank stops
        print(
            f"error: --distill-weight: the EASE teacher is a dense N x N inverse; this catalogue "
            f"has {len(prepared.item_ids):,} items, at most {DISTILL_MAX_ITEMS:,} can have one",
            file=sys.stderr,
        )
        return 2
    if not world.main:
        train(prepared, cfg, args.out, progress=False, world=world)
        return 0
    print(f"cleaning: {prepared.report_text}", file=sys.stderr)
    print(
        f"data: {len(prepared.item_ids)} items, {len(prepared.train_sequences)} users, "
        f"{len(prepared.split.train)} train events, {len(prepared.split.valid)} validation cases"
        + (f"; {world.size} processes" if world.distributed else ""),
        file=sys.stderr,
    )
    summary = train(prepared, cfg, args.out, progress=not args.no_progress, world=world)
    best, pop = summary["best"], summary["most_popular_valid"]
    print(f"\nvalidation (leave-one-out, full ranking, {len(prepared.split.valid)} users):")
    print(f"  {'model':<14} {'Recall@10':>10} {'NDCG@10':>10}")
    print(f"  {'most-popular':<14} {pop['recall@10']:>10.4f} {pop['ndcg@10']:>10.4f}")
    print(f"  {'ltrec':<14} {best['recall@10']:>10.4f} {best['ndcg@10']:>10.4f}")
    print(_long_tail_line(summary["long_tail_weight"]))
    print(_similar_items_line(summary["similar_items_long_tail_weight"]))
    epochs = summary["epochs"]
    print(
        f"{len(epochs)} epochs: {np.mean([e['train_epoch_seconds'] for e in epochs]):.1f} s "
        f"training + {np.mean([e['validation_seconds'] for e in epochs]):.1f} s validation per "
        f"epoch (mean), {torch.get_num_threads()} threads"
        + (f" x {world.size} processes" if world.distributed else "")
    )
    print(
        f"best epoch {best['epoch']}, stopped: {summary['stop_reason']}, "
        f"total {(time.monotonic() - started) / 60:.1f} min; "
        f"checkpoint {args.out / 'checkpoint.pt'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
