"""The predicted ID vectors of items without training events (ltrec.new_item_ids)."""

from __future__ import annotations

import numpy as np
import torch

from ltrec.models import ModelConfig, Recommender
from ltrec.neural_baselines import IDOnlyRecommender
from ltrec.new_item_ids import (
    cross_validated_r2,
    fit_ridge,
    impute_new_item_ids,
    without_new_item_ids,
)
from ltrec_core import contract

CFG = ModelConfig(
    n_items=60, n_devices=3, n_regions=3, text_dim=16, embedding_dim=8, projection_hidden=16,
    n_layers=1, n_heads=2, max_history=10, new_item_id_map=True,
)  # fmt: skip


def test_ridge_recovers_a_linear_map_and_cross_validation_prefers_a_small_penalty() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    y = x @ w + b + 0.01 * rng.normal(size=(200, 3))
    got_w, got_b = fit_ridge(x, y, 1e-6)
    np.testing.assert_allclose(got_w, w, atol=0.01)
    np.testing.assert_allclose(got_b, b, atol=0.01)
    scores = cross_validated_r2(x, y, grid=(0.01, 1000.0))
    assert scores[0.01] > 0.99 > scores[1000.0]


def test_noise_targets_have_no_predictive_r2() -> None:
    rng = np.random.default_rng(1)
    scores = cross_validated_r2(rng.normal(size=(300, 4)), rng.normal(size=(300, 2)))
    assert max(scores.values()) < 0.05


def _trained_like(model: Recommender, popularity: np.ndarray) -> None:
    """ID vectors that depend linearly on content for the items with events (as if trained),
    zero for the rest (as training leaves them)."""
    torch.manual_seed(0)
    for p in model.fusion.text.parameters():
        torch.nn.init.normal_(p, std=0.5)
    assert model.item_ids is not None
    with torch.no_grad():
        content = model.content_table()
        ids = content @ torch.randn(CFG.embedding_dim, CFG.embedding_dim) * 0.3 + 0.1
        ids[torch.from_numpy(popularity <= 0)] = 0.0
        model.item_ids.weight.copy_(ids)


def test_items_without_events_get_the_content_map_as_their_id_vector() -> None:
    torch.manual_seed(0)
    model = Recommender(CFG, torch.randn(CFG.n_items + 1, CFG.text_dim)).eval()
    popularity = np.arange(CFG.n_items + 1) % 5  # every fifth item never seen in training
    popularity[0] = 0
    _trained_like(model, popularity)
    assert model.item_ids is not None and model.fusion.new_item_ids is not None
    before = model.item_ids.weight.detach().clone()
    done = impute_new_item_ids(model, popularity)
    assert done["applied"] and done["imputed_items"] == int((popularity[1:] == 0).sum())
    assert max(done["cv_r2"].values()) > 0.99  # the map is exactly linear here
    untrained = torch.from_numpy(popularity <= 0)
    untrained[contract.PADDING_INDEX] = False
    with torch.no_grad():
        content = model.content_table()
        ids = model.item_ids.weight
        table = model.item_table()
        # Items with events keep their trained vector; the others get content + map(content),
        # what the exported item encoder gives an item added after training.
        torch.testing.assert_close(ids[~untrained], before[~untrained])
        want = content[untrained] + model.fusion.new_item_ids(content[untrained])
        torch.testing.assert_close(table[untrained], want, atol=1e-5, rtol=1e-5)
        assert ids[untrained].norm(dim=1).min() > 0
        assert torch.equal(table[contract.PADDING_INDEX], torch.zeros(CFG.embedding_dim))
    imputed = model.item_ids.weight.detach().clone()
    plain = without_new_item_ids(model, popularity)
    assert plain.item_ids is not None and plain.fusion.new_item_ids is not None
    torch.testing.assert_close(plain.item_ids.weight.detach(), before)
    assert float(plain.fusion.new_item_ids.weight.detach().abs().sum()) == 0.0
    assert torch.equal(model.item_ids.weight.detach(), imputed)  # the model itself is kept


def test_models_without_the_map_or_without_id_vectors_are_left_alone() -> None:
    popularity = np.ones(CFG.n_items + 1, dtype=np.int64)
    popularity[:3] = 0
    plain = Recommender(
        ModelConfig(**{**CFG.to_dict(), "new_item_id_map": False}),  # type: ignore[arg-type]
        torch.randn(CFG.n_items + 1, CFG.text_dim),
    )
    assert plain.fusion.new_item_ids is None
    assert impute_new_item_ids(plain, popularity) == {"applied": False}
    sasrec = IDOnlyRecommender(CFG)
    assert sasrec.cfg.new_item_id_map is False
    before = sasrec.item_table().detach().clone()
    assert impute_new_item_ids(sasrec, popularity) == {"applied": False}
    assert torch.equal(sasrec.item_table().detach(), before)
