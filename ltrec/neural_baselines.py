"""The neural baselines, trained by our own loop (`ltrec.train.fit`) so that they differ from our
model only where they are meant to.

- SASRec: our own user tower and training loop with an item table made of ID vectors only, so it
  differs from our model only in what an item is (Kang & McAuley 2018, trained with a full
  softmax as in Klenitskiy & Vasilev 2023).
- No context weighting: our model with the context weighting replaced by the identity, for the
  context ablation.

The item-item baselines (ItemKNN, EASE) and the text profile are `ltrec.baselines`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ltrec.evaluation import EvalCases
from ltrec.models import ItemSide, ModelConfig, Recommender
from ltrec.prepared import Prepared, item_side
from ltrec.train import TrainConfig, fit, model_config
from ltrec_core import contract

# Builds a model from its config, the catalogue's text features and its other item inputs.
ModelFactory = Callable[[ModelConfig, torch.Tensor, ItemSide | None], Recommender]


class IDOnlyRecommender(Recommender):
    """Our user tower and context weighting over an item table of ID vectors alone.

    The text projection is dropped, so an item is nothing but its ID: the ablation "ID-only
    item inputs", which is SASRec with our tower. The ID vectors start small and random
    (std 0.02, SASRec's init): with no text to ride on, a zero start would make every item
    identical at the first step.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        text_features: torch.Tensor | None = None,
        side: ItemSide | None = None,
    ) -> None:
        # SASRec reads a sequence of IDs: none of our additions (no set pooling either).
        # Nor the predicted ID vectors of new items (ltrec.new_item_ids): SASRec has none.
        plain = {"id_embeddings": True, "set_pooling": False, "new_item_id_map": False}
        cfg = ModelConfig(**{**cfg.to_dict(), **plain})  # type: ignore[arg-type]
        features = (
            torch.zeros(cfg.n_items + 1, cfg.text_dim) if text_features is None else (text_features)
        )
        super().__init__(cfg, features)  # no content: the item side is dropped
        self.fusion = nn.Identity()  # type: ignore[assignment]
        assert self.item_ids is not None
        nn.init.normal_(self.item_ids.weight, std=0.02)

    def item_table(self) -> torch.Tensor:
        assert self.item_ids is not None
        table = self.item_ids.weight
        keep = torch.ones(table.shape[0], 1, dtype=table.dtype, device=table.device)
        keep[contract.PADDING_INDEX] = 0.0
        return table * keep


class NeutralContext(nn.Module):
    """A context weighting that is exactly the identity: weight 1 on every dimension whatever
    the context, and no parameters to learn. Stands in for `ContextWeighting` in training and
    evaluation alike, so "no context" means the user vector is never re-weighted."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim

    def weights(self, context: torch.Tensor) -> torch.Tensor:
        return torch.ones(*context.shape[:-1], self.embedding_dim, device=context.device)

    def forward(self, user_embedding: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return user_embedding


class NoContextRecommender(Recommender):
    """Our model as served (text + ID items) without context weighting: the ablation that
    measures what the weighting adds."""

    def __init__(
        self, cfg: ModelConfig, text_features: torch.Tensor, side: ItemSide | None = None
    ) -> None:
        super().__init__(cfg, text_features, side)
        self.context_weighting = NeutralContext(cfg.embedding_dim)  # type: ignore[assignment]


def build_model(
    prepared: Prepared,
    cfg: TrainConfig,
    make_model: ModelFactory = Recommender,
) -> Recommender:
    """A fresh model, its weights drawn from `cfg.seed` alone.

    Seeded here rather than left to whatever the previous fit drew, so a row's initial weights
    do not depend on which rows ran before it or for how many epochs, and two variants that share
    modules (our model with and without context weighting) start from the same weights.
    """
    torch.manual_seed(cfg.seed)
    return make_model(
        model_config(prepared, cfg), torch.from_numpy(prepared.text_features), item_side(prepared)
    )


def fit_recommender(
    prepared: Prepared,
    cfg: TrainConfig,
    make_model: ModelFactory = Recommender,
    name: str = "model",
    progress: bool = True,
    valid_cases: EvalCases | None = None,
) -> tuple[Recommender, dict]:
    """Train any `Recommender` with `ltrec.train.fit`, in memory (no checkpoint written).

    The report trains our model, its text-only ablation and SASRec through this one loop so that
    they differ only in the item table. Items with no training interactions (cold-start items
    included) stay out of the softmax, as `ltrec.train.target_distribution` explains.
    """
    model = build_model(prepared, cfg, make_model)
    return fit(prepared, cfg, model, name=name, progress=progress, valid_cases=valid_cases)
