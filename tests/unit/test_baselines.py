"""ItemKNN and EASE against hand arithmetic on toy matrices; SASRec's item table is IDs only;
items that are never a training target (cold-start items) get no training signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ltrec.baselines import (
    cooccurrence,
    ease_weights,
    history_matrix,
    interaction_matrix,
    item_item_score_fn,
    itemknn_weights,
)
from ltrec.evaluation import EvalCases, evaluate
from ltrec.models import ModelConfig, Recommender
from ltrec.neural_baselines import IDOnlyRecommender
from ltrec.train import TrainConfig, _loss, target_distribution
from ltrec_core import contract


def toy_events(rows: list[tuple[str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_index"])


def cases(histories: list[list[int]], targets: list[int]) -> EvalCases:
    return EvalCases(
        histories=[np.array(h, dtype=np.int64) for h in histories],
        event_types=[np.ones(len(h), dtype=np.int64) for h in histories],
        targets=np.array(targets, dtype=np.int64),
        context=np.zeros((len(histories), 4), dtype=np.int64),
    )


def test_interaction_matrix_is_binary_and_skips_padding() -> None:
    # u1 saw item 1 twice: one interaction. Column 0 (padding) stays empty.
    x = interaction_matrix(toy_events([("u1", 1), ("u1", 1), ("u1", 2), ("u2", 2)]), n_items=3)
    assert x.tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]
    assert history_matrix(cases([[2, 2, 3]], [1]), np.array([0]), 3).tolist() == [[0, 0, 1, 1]]


# Two items, three users: u1 has both, u2 only item 1, u3 only item 2.
# X^T X (items 1, 2) = [[2, 1], [1, 2]].
TWO = toy_events([("u1", 1), ("u1", 2), ("u2", 1), ("u3", 2)])


def test_ease_closed_form_by_hand() -> None:
    gram = cooccurrence(interaction_matrix(TWO, n_items=2))
    weights = ease_weights(gram, lam=1.0)
    # G + I = [[3, 1], [1, 3]], P = (1/8) [[3, -1], [-1, 3]]; B_ij = -P_ij / P_jj = (1/8)/(3/8)
    # = 1/3 off the diagonal, 0 on it; padding row and column stay 0.
    assert weights.shape == (3, 3)
    assert weights[1:, 1:] == pytest.approx(np.array([[0, 1 / 3], [1 / 3, 0]]), abs=1e-6)
    assert not weights[0].any() and not weights[:, 0].any()
    # A larger lambda shrinks the weight: (G + 9I)^-1 -> B_12 = 1/11.
    assert ease_weights(gram, lam=9.0)[1, 2] == pytest.approx(1 / 11, abs=1e-6)


def test_itemknn_cosine_with_shrink_by_hand() -> None:
    gram = cooccurrence(interaction_matrix(TWO, n_items=2))
    # cos(1, 2) = co-occurrence / sqrt(n1 n2) = 1 / sqrt(2 * 2) = 0.5; with shrink 1: 1 / 3.
    assert itemknn_weights(gram, neighbours=10, shrink=0.0)[1, 2] == pytest.approx(0.5)
    assert itemknn_weights(gram, neighbours=10, shrink=1.0)[1, 2] == pytest.approx(1 / 3)
    assert itemknn_weights(gram, neighbours=10, shrink=0.0)[1, 1] == 0.0


# Four items in two blocks: items 1 and 2 go together (users a, b, c), items 3 and 4 go together
# (users d, e); user f has items 1 and 3, the only bridge between the blocks.
BLOCKS = toy_events(
    [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("c", 1), ("c", 2)]
    + [("d", 3), ("d", 4), ("e", 3), ("e", 4), ("f", 1), ("f", 3)]
)


@pytest.mark.parametrize(
    "weights",
    [
        lambda g: itemknn_weights(g, neighbours=10, shrink=0.0),
        lambda g: ease_weights(g, lam=1.0),
    ],
    ids=["itemknn", "ease"],
)
def test_item_item_models_recommend_within_the_block(weights) -> None:
    gram = cooccurrence(interaction_matrix(BLOCKS, n_items=4))
    score = item_item_score_fn(weights(gram))
    # A user who saw item 1 gets item 2 first; one who saw item 4 gets item 3 first.
    toy = cases([[1], [4]], [2, 3])
    _, ranks = evaluate(score, toy, ks=(1,), progress=False)
    assert ranks.tolist() == [0, 0]
    block = score(toy, np.arange(2))
    assert block[0, 2] > block[0, 3] and block[0, 2] > block[0, 4]
    assert block[1, 3] > block[1, 1] and block[1, 3] > block[1, 2]


def test_itemknn_keeps_only_each_items_nearest_neighbours() -> None:
    gram = cooccurrence(interaction_matrix(BLOCKS, n_items=4))
    full = itemknn_weights(gram, neighbours=10, shrink=0.0)
    # cos(1,2) = 3/sqrt(4*3) = 0.866, cos(1,3) = 1/sqrt(4*3) = 0.289: item 3's similarity to 1
    # is non-zero with every neighbour kept...
    assert full[1, 3] == pytest.approx(1 / np.sqrt(12), abs=1e-6)
    assert full[1, 2] == pytest.approx(3 / np.sqrt(12), abs=1e-6)
    # ...but item 3's single nearest neighbour is item 4 (2/sqrt(3*2) = 0.816), so with one
    # neighbour per candidate item, history item 1 no longer votes for item 3.
    pruned = itemknn_weights(gram, neighbours=1, shrink=0.0)
    assert pruned[1, 3] == 0.0 and pruned[4, 3] == pytest.approx(2 / np.sqrt(6), abs=1e-6)
    assert (pruned[1:, 1:] > 0).sum(axis=0).tolist() == [1, 1, 1, 1]


CFG = ModelConfig(
    n_items=6,
    n_devices=2,
    n_regions=2,
    text_dim=8,
    embedding_dim=8,
    projection_hidden=8,
    n_layers=1,
    n_heads=1,
    max_history=5,
    context_dim=4,
    id_embeddings=False,  # overridden: SASRec's items are IDs
)


def prefixes(model: torch.nn.Module, depth: int = 1) -> set[str]:
    """The module paths, `depth` levels deep, that hold the model's trainable parameters."""
    return {".".join(name.split(".")[:depth]) for name, _ in model.named_parameters()}


def test_sasrec_item_table_is_ids_only() -> None:
    torch.manual_seed(0)
    model = IDOnlyRecommender(CFG, torch.randn(CFG.n_items + 1, CFG.text_dim))
    table = model.item_table()
    assert table.shape == (CFG.n_items + 1, CFG.embedding_dim)
    assert not table[contract.PADDING_INDEX].any()
    assert model.item_ids is not None
    assert torch.equal(table[1:], model.item_ids.weight[1:])
    # Random start (std 0.02), unlike our zero-initialised ID vectors that ride on the text.
    assert 0.005 < float(table[1:].detach().std()) < 0.05
    # No item content anywhere: the fusion (text, image, attributes) is gone, not just unused.
    assert prefixes(model) == {"item_ids", "user_tower", "context_weighting"}
    ours = Recommender(
        ModelConfig(**{**CFG.to_dict(), "id_embeddings": True}),
        torch.randn(CFG.n_items + 1, CFG.text_dim),
    )
    assert prefixes(ours) == prefixes(model) | {"fusion"}
    fusion = {p for p in prefixes(ours, depth=2) if p.startswith("fusion.")}
    assert fusion == {"fusion.text", "fusion.image", "fusion.attributes"}
    # Other text features: the same ID-only table, while our table moves with the text.
    with torch.no_grad():
        ours_table = ours.item_table().clone()
        for m in (model, ours):
            m.text_features.copy_(torch.randn_like(m.text_features))
        assert torch.equal(model.item_table(), table)
        assert not torch.allclose(ours.item_table()[1:], ours_table[1:])


def test_items_never_a_training_target_get_no_training_signal() -> None:
    """Cold items (no training interactions) stay out of the softmax: as negatives a full softmax
    would push them down at every step; a new item added after training gets no such signal."""
    torch.manual_seed(0)
    model = Recommender(
        ModelConfig(**{**CFG.to_dict(), "id_embeddings": True}),
        torch.randn(CFG.n_items + 1, CFG.text_dim),
    )
    popularity = np.array([0, 5, 0, 3, 1, 0, 2])
    q, log_q = target_distribution(popularity)
    assert q[[0, 2, 5]].tolist() == [0.0, 0.0, 0.0] and bool((q[[1, 3, 4, 6]] > 0).all())
    assert torch.isclose(q.sum(), torch.tensor(1.0))
    hist = torch.tensor([[1, 3]])
    batch = (hist, torch.ones_like(hist), torch.tensor([[1, 3, 4]]), torch.zeros(1, 3, 4).long())
    for loss_kind in ("full", "sampled"):
        model.zero_grad()
        _loss(model, batch, TrainConfig(loss=loss_kind, negatives=64), log_q, q).backward()
        grad = model.item_ids.weight.grad
        assert not grad[[2, 5]].any(), loss_kind
        assert grad[[1, 3, 4]].abs().sum(dim=1).all(), loss_kind


def test_losses_match_their_definitions() -> None:
    """Full softmax = cross-entropy over the items that can be targets (q > 0) only; sampled
    softmax subtracts log q from every logit unless the logQ ablation turns that off."""
    torch.manual_seed(0)
    model = Recommender(
        ModelConfig(**{**CFG.to_dict(), "id_embeddings": True}),
        torch.randn(CFG.n_items + 1, CFG.text_dim),
    )
    model.eval()  # no dropout: the hand computation below sees the same vectors
    popularity = np.array([0, 5, 0, 3, 1, 0, 2])
    q, log_q = target_distribution(popularity)
    hist = torch.tensor([[1, 3]])
    targets = torch.tensor([[1, 3, 4]])
    batch = (hist, torch.ones_like(hist), targets, torch.zeros(1, 3, 4).long())
    with torch.no_grad():
        table = model.item_table()
        states, _ = model.user_tower.states(F.embedding(hist, table), hist, torch.ones_like(hist))
        users = model.context_weighting(states[0], torch.zeros(3, 4).long())
        logits = users @ table.T
        active = [1, 3, 4, 6]
        log_p = torch.log_softmax(logits[:, active], dim=1)
        expected = -log_p[torch.arange(3), torch.tensor([0, 1, 2])].mean()
        full = _loss(model, batch, TrainConfig(loss="full", softmax_precision="float32"), log_q, q)
        low = _loss(model, batch, TrainConfig(loss="full", softmax_precision="bfloat16"), log_q, q)
    assert torch.isclose(full, expected, atol=1e-6)
    assert torch.isclose(low, expected, atol=2e-2)  # bfloat16 matmul inputs, float32 softmax

    def sampled(logq: bool) -> torch.Tensor:
        torch.manual_seed(1)  # the same negatives for both
        cfg = TrainConfig(loss="sampled", negatives=16, logq=logq)
        with torch.no_grad():
            return _loss(model, batch, cfg, log_q, q)

    torch.manual_seed(1)
    negatives = torch.multinomial(q, 16, replacement=True)
    target = targets[0]
    for logq in (True, False):
        shift = log_q if logq else torch.zeros_like(log_q)
        pos = logits[torch.arange(3), target] - shift[target]
        neg = logits[:, negatives] - shift[negatives]
        neg = neg.masked_fill(negatives.unsqueeze(0) == target.unsqueeze(1), float("-inf"))
        want = -torch.log_softmax(torch.cat([pos[:, None], neg], 1), 1)[:, 0].mean()
        assert torch.isclose(sampled(logq), want, atol=1e-5), logq
    assert not torch.isclose(sampled(True), sampled(False))


def test_id_dropout_leaves_whole_id_vectors_out_in_training_only() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG.to_dict(), "id_embeddings": True, "id_dropout": 0.5})
    model = Recommender(cfg, torch.randn(CFG.n_items + 1, CFG.text_dim))
    assert model.item_ids is not None
    torch.nn.init.normal_(model.item_ids.weight)
    model.eval()
    with torch.no_grad():
        content = model.content_table()
        assert torch.allclose(model.item_table()[1:], (content + model.item_ids.weight)[1:])
        model.train()
        model.fusion.eval()  # the content path without its own dropout, to compare rows
        left_out = [
            (model.item_table()[1:] - content[1:]).abs().sum(dim=1) < 1e-6 for _ in range(20)
        ]
    left_out_share = torch.stack(left_out).float().mean()
    assert 0.3 < float(left_out_share) < 0.7  # about half the items, per step
    assert not torch.equal(left_out[0], left_out[1])  # a fresh draw each step
