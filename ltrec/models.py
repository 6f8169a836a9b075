"""The towers: item tower (text + image + attributes), GPT-style user encoder, context
weighting, catalogue scorer.

Item vectors come from item *content*: MiniLM over the item text (title, category, brand, price
bucket, description), EfficientNet-Lite0 over the product photo where there is one, and hashed
attribute tokens, fused by `ItemFusion`. An item seen twice is represented as well as one seen a
million times, and a new item needs only its content. The user tower reads the item vectors of
the history, never item ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model

from ltrec_core import contract


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the towers; stored in the checkpoint so export rebuilds the same modules."""

    n_items: int  # catalogue size N (indices 1..N; 0 is padding)
    n_devices: int  # device vocabulary size + 1 (0 = unknown)
    n_regions: int  # region vocabulary size + 1 (0 = unknown)
    text_dim: int = 384
    embedding_dim: int = 64
    projection_hidden: int = 256
    n_layers: int = 2
    n_heads: int = 2
    max_history: int = 200
    dropout: float = 0.2
    context_dim: int = 16
    text_max_tokens: int = 64
    # A trained per-item vector added to the text vector. Weight decay keeps it near zero for
    # items with few interactions, so they (and new items: exactly zero) ride on their text.
    id_embeddings: bool = True
    image_dim: int = contract.IMAGE_FEATURE_DIM
    # Training only: the share of image-bearing items shown to a step without their image, so the
    # text + attribute path stands on its own for the (many) items that have no image.
    image_dropout: float = 0.3
    # Training only: the share of items whose ID vector a step leaves out, so the content path
    # (text, image, attributes) has to place items on its own, as it must for new items.
    id_dropout: float = 0.0
    # A history is also a set: add a trained map of the running mean of the history's item
    # vectors to every state (zero-initialised, so it starts as the plain transformer). False
    # for checkpoints trained before it existed; new training turns it on (ltrec.train).
    set_pooling: bool = False
    # Items without training events have no ID vector. With this on, a linear map from the
    # content vector to the ID vector, fitted after training (`ltrec.new_item_ids`), predicts
    # one: the ID row of catalogue items that had no training events, and the item encoder's
    # output for items added later. False for checkpoints trained before it (ltrec.train
    # turns it on).
    new_item_id_map: bool = False

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


# Rows of the item table computed at once without gradients (`Recommender.content_table`).
TABLE_CHUNK_ROWS = 262_144


class TextProjection(nn.Module):
    """Trained map from the frozen sentence embedding into the recommendation space."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.projection_hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.projection_hidden, cfg.embedding_dim),
        )

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        return self.net(text_features)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers pooling for all-MiniLM-L6-v2: masked mean, then L2 norm."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2.0, dim=-1)


class ItemFusion(nn.Module):
    """Text features + image features + attribute ids -> item vector.

    vector = text(t) + has_image * image(i) + sum of attribute embeddings. The image branch and
    the attribute embeddings start at exactly zero, so until training gives them something to
    say they add nothing; an item without an image gets the text + attribute vector, the same
    vector training used for every image-less item (and, by image dropout, for image-bearing
    items too), never a vector computed from a blank picture.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.text = TextProjection(cfg)
        self.image = nn.Sequential(
            nn.LayerNorm(cfg.image_dim),
            nn.Linear(cfg.image_dim, cfg.projection_hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.projection_hidden, cfg.embedding_dim),
        )
        nn.init.zeros_(self.image[-1].weight)
        nn.init.zeros_(self.image[-1].bias)
        self.attributes = nn.Embedding(
            contract.ATTRIBUTE_BUCKETS, cfg.embedding_dim, padding_idx=contract.PADDING_INDEX
        )
        nn.init.zeros_(self.attributes.weight)
        # Fitted after training, not by gradient (`ltrec.new_item_ids`); zero until then.
        self.new_item_ids: nn.Linear | None = None
        # The boost the fitted map carries (chosen on validation; a checkpoint's summary says
        # it): its scale, and the offset added to its intercept (None: no offset).
        self.new_item_scale = 1.0
        self.new_item_offset: np.ndarray | None = None
        if cfg.new_item_id_map and cfg.id_embeddings:
            self.new_item_ids = nn.Linear(cfg.embedding_dim, cfg.embedding_dim)
            nn.init.zeros_(self.new_item_ids.weight)
            nn.init.zeros_(self.new_item_ids.bias)

    def attribute_vectors(self, attribute_ids: torch.Tensor) -> torch.Tensor:
        return self.attributes(attribute_ids).sum(dim=1)

    def forward(
        self,
        text_features: torch.Tensor,
        image_features: torch.Tensor,
        has_image: torch.Tensor,
        attribute_ids: torch.Tensor,
    ) -> torch.Tensor:
        return (
            self.text(text_features)
            + has_image * self.image(image_features)
            + self.attribute_vectors(attribute_ids)
        )


@dataclass
class ItemSide:
    """The item inputs besides text, for the trained catalogue (row 0 = padding).

    Image features are kept only for the rows that have an image (`image_rows`), so a catalogue
    of a million image-less items costs nothing here.
    """

    image_rows: torch.Tensor  # INT64 [n_img] catalogue indices with a readable image
    image_features: torch.Tensor  # FP32 [n_img, image_dim]
    attribute_ids: torch.Tensor | None  # INT64 [N+1, ATTRIBUTE_SLOTS], or None: no attributes

    @classmethod
    def empty(cls, image_dim: int = contract.IMAGE_FEATURE_DIM) -> ItemSide:
        return cls(
            torch.zeros(0, dtype=torch.int64), torch.zeros(0, image_dim, dtype=torch.float32), None
        )


class ItemEncoder(nn.Module):
    """MiniLM + pooling + the trained fusion: an item's text tokens, image features and
    attribute ids -> its item vector (exported to Triton for items added after training)."""

    def __init__(self, encoder: nn.Module, fusion: ItemFusion) -> None:
        super().__init__()
        self.encoder = encoder
        self.fusion = fusion

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
        has_image: torch.Tensor,
        attribute_ids: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = mean_pool(hidden, attention_mask)
        vector = self.fusion(text, image_features, has_image, attribute_ids)
        if self.fusion.new_item_ids is not None:  # the predicted ID vector of a new item
            vector = vector + self.fusion.new_item_ids(vector)
        return vector


class UserTower(nn.Module):
    """GPT-2 architecture over the item vectors of a history (plus event-type embeddings).

    A learned begin-of-history vector is prepended, so an empty history still has a defined
    embedding and the first history item is a training target too. Padding (index 0) may sit on
    either side: positions count real events only, and the user embedding is the state at the
    last real position.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.event_embedding = nn.Embedding(len(contract.EVENT_TYPES) + 1, cfg.embedding_dim)
        # Small, like GPT-2's own embeddings: a unit-scale vector would drown the item signal.
        nn.init.normal_(self.event_embedding.weight, std=0.02)
        self.begin = nn.Parameter(torch.randn(cfg.embedding_dim) * 0.02)
        gpt_cfg = GPT2Config(
            vocab_size=1,
            n_positions=cfg.max_history + 1,
            n_embd=cfg.embedding_dim,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.embedding_dim * 4,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=0.0,  # dropout on [B, heads, L, L] costs a fifth of a CPU step
            # GPT-2's tanh-approximated GELU as one fused kernel: the same function as the
            # default "gelu_new", whose five elementwise ops cost half of a validation pass.
            activation_function="gelu_pytorch_tanh",
            bos_token_id=0,
            eos_token_id=0,
        )
        gpt_cfg._attn_implementation = "eager"  # exports to plain ONNX ops
        self.gpt = GPT2Model(gpt_cfg)
        self.set_projection: nn.Linear | None = None
        if cfg.set_pooling:
            self.set_projection = nn.Linear(cfg.embedding_dim, cfg.embedding_dim)
            nn.init.zeros_(self.set_projection.weight)
            nn.init.zeros_(self.set_projection.bias)

    @contextmanager
    def _fused_attention(self) -> Iterator[None]:
        """PyTorch's scaled-dot-product attention (causal, no mask tensor) for the duration.

        The module is built with the eager implementation, which is what the export traces into
        plain ONNX ops; the fused kernel computes the same attention and is what training and
        validation run.
        """
        config = self.gpt.config
        previous = config._attn_implementation
        config._attn_implementation = "sdpa"
        try:
            yield
        finally:
            config._attn_implementation = previous

    def states(
        self,
        item_vectors: torch.Tensor,
        history_items: torch.Tensor,
        event_types: torch.Tensor,
        right_padded: bool = False,
        set_means: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden state after the begin vector and after each history position: [B, L+1, D].

        `right_padded=True` promises that padding only ever follows a row's real events. Then
        the causal mask alone keeps every real position from seeing padding, positions are plain
        0..L, and attention runs through the fused kernel with no mask tensor: the same states
        at the real positions as the general (left- or right-padded) path, at a fraction of the
        cost. Training and evaluation batches are built right-padded; the export keeps the
        general path, since served histories come left-padded.

        `set_means` [B, L+1, D] (training only) replaces the running mean that set pooling adds
        to each state: the leave-one-out set context (`ltrec.train.TrainConfig.set_context`).
        """
        batch = history_items.shape[0]
        inputs = item_vectors + self.event_embedding(event_types)
        begin = self.begin.expand(batch, 1, -1)
        inputs = torch.cat([begin, inputs], dim=1)
        real = torch.cat(
            [
                torch.ones_like(history_items[:, :1]),
                (history_items != contract.PADDING_INDEX).long(),
            ],
            dim=1,
        )
        if right_padded:
            with self._fused_attention():
                hidden = self.gpt(inputs_embeds=inputs).last_hidden_state
        else:
            positions = (real.cumsum(dim=1) - 1).clamp(min=0)
            hidden = self.gpt(
                inputs_embeds=inputs, attention_mask=real, position_ids=positions
            ).last_hidden_state
        if self.set_projection is not None:
            if set_means is None:
                set_means = running_mean(item_vectors, real[:, 1:])
            hidden = hidden + self.set_projection(set_means)
        return hidden, real

    def forward(
        self,
        item_vectors: torch.Tensor,
        history_items: torch.Tensor,
        event_types: torch.Tensor,
        right_padded: bool = False,
    ) -> torch.Tensor:
        hidden, real = self.states(item_vectors, history_items, event_types, right_padded)
        steps = torch.arange(real.shape[1], device=real.device).unsqueeze(0)
        last = (real * steps).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0]), last]


def running_mean(item_vectors: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean of the real item vectors up to each state, [B, L+1, D]: state 0 (the begin vector)
    has seen none (zero), state t the first t history positions. Padding counts for nothing,
    on either side."""
    mask = real.unsqueeze(-1).to(item_vectors.dtype)
    sums = (item_vectors * mask).cumsum(dim=1)
    counts = mask.cumsum(dim=1).clamp(min=1.0)
    means = sums / counts
    return torch.cat([torch.zeros_like(means[:, :1]), means], dim=1)


class ContextWeighting(nn.Module):
    """Context (hour, weekday, device, region) -> a per-dimension weight on the user embedding.

    The weight is 2*sigmoid(MLP), initialised to exactly 1 so the context starts neutral and
    training moves it only where it helps.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.context_dim
        self.hour = nn.Embedding(contract.HOUR_BUCKETS, d)
        self.weekday = nn.Embedding(contract.WEEKDAY_BUCKETS, d)
        self.device = nn.Embedding(cfg.n_devices, d)
        self.region = nn.Embedding(cfg.n_regions, d)
        self.mlp = nn.Sequential(
            nn.Linear(4 * d, 4 * d), nn.GELU(), nn.Linear(4 * d, cfg.embedding_dim)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def weights(self, context: torch.Tensor) -> torch.Tensor:
        features = torch.cat(
            [
                self.hour(context[..., 0]),
                self.weekday(context[..., 1]),
                self.device(context[..., 2]),
                self.region(context[..., 3]),
            ],
            dim=-1,
        )
        return 2.0 * torch.sigmoid(self.mlp(features))

    def forward(self, user_embedding: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return user_embedding * self.weights(context)


class Recommender(nn.Module):
    """Everything trained together: item fusion, user tower, context weighting.

    `text_features` (the frozen MiniLM embedding of every catalogue item, row 0 = padding) and
    `side` (frozen EfficientNet-Lite0 features of the items with photos, and attribute ids) are
    buffers: the pretrained encoders run once per item, not per step.
    """

    def __init__(
        self, cfg: ModelConfig, text_features: torch.Tensor, side: ItemSide | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        side = side if side is not None else ItemSide.empty(cfg.image_dim)
        self.register_buffer("text_features", text_features, persistent=False)
        self.register_buffer("image_rows", side.image_rows, persistent=False)
        self.register_buffer("image_features", side.image_features, persistent=False)
        self.register_buffer("attribute_ids", side.attribute_ids, persistent=False)
        self.fusion = ItemFusion(cfg)
        self.user_tower = UserTower(cfg)
        self.context_weighting = ContextWeighting(cfg)
        self.item_ids = (
            nn.Embedding(cfg.n_items + 1, cfg.embedding_dim) if cfg.id_embeddings else None
        )
        if self.item_ids is not None:
            nn.init.zeros_(self.item_ids.weight)

    def content_table(self) -> torch.Tensor:
        """The fusion over every catalogue item's content, [N+1, D] (row 0 not yet zeroed).

        Computed as `ItemFusion.forward` computes one item, with the image term added only on
        the rows that have an image. In training, image dropout hides a share of those images.
        Without gradients (export, evaluation) it runs `TABLE_CHUNK_ROWS` rows at a time into
        one [N+1, D] tensor, so the projection's hidden layer ([rows, projection_hidden]) never
        exists for the whole catalogue: at ten million items it alone would take 10 GiB.
        """
        n_rows = self.text_features.shape[0]
        if torch.is_grad_enabled() or self.training or n_rows <= TABLE_CHUNK_ROWS:
            return self._content_rows(0, n_rows)
        features = self.text_features
        table = torch.empty(
            n_rows, self.cfg.embedding_dim, dtype=features.dtype, device=features.device
        )
        for start in range(0, n_rows, TABLE_CHUNK_ROWS):
            stop = min(start + TABLE_CHUNK_ROWS, n_rows)
            table[start:stop] = self._content_rows(start, stop)
        return table

    def _content_rows(self, start: int, stop: int) -> torch.Tensor:
        """`content_table`'s rows start..stop-1."""
        whole = start == 0 and stop == self.text_features.shape[0]
        table = self.fusion.text(self.text_features if whole else self.text_features[start:stop])
        if self.attribute_ids is not None:
            ids = self.attribute_ids if whole else self.attribute_ids[start:stop]
            table = table + self.fusion.attribute_vectors(ids)
        if self.image_rows.numel():
            rows, features = self.image_rows, self.image_features
            if not whole:
                inside = (rows >= start) & (rows < stop)
                rows, features = rows[inside] - start, features[inside]
            if rows.numel():
                image = self.fusion.image(features)
                if self.training and self.cfg.image_dropout > 0:
                    draw = torch.rand(image.shape[0], 1, device=image.device)
                    image = image * (draw >= self.cfg.image_dropout).to(image.dtype)
                table = table.index_add(0, rows, image)
        return table

    def added_item_offset(self) -> torch.Tensor | None:
        """The new-item boost's shift [D] (`ltrec.new_item_ids`) that the item encoder adds to
        every item added after training, or None without one. It lifts such an item as a
        candidate; where an added item is read as a history event or a query (the user encoder,
        the item lookup), it is taken back out (`UserEncoder`, `ItemLookup`)."""
        offset = getattr(self.fusion, "new_item_offset", None)
        if offset is None or getattr(self.fusion, "new_item_ids", None) is None:
            return None
        if not np.any(offset):
            return None
        return torch.as_tensor(np.asarray(offset), dtype=torch.float32)

    def item_table(self) -> torch.Tensor:
        """Item vectors of the whole catalogue, [N+1, D], row 0 zero (padding)."""
        table = self.content_table()
        if self.item_ids is not None:
            ids = self.item_ids.weight
            if self.training and self.cfg.id_dropout > 0:
                kept = torch.rand(ids.shape[0], 1, device=ids.device) >= self.cfg.id_dropout
                ids = ids * kept.to(ids.dtype)
            if torch.is_grad_enabled() or self.training:
                table = table + ids
            else:  # in place: no second catalogue-sized tensor
                table += ids
        if torch.is_grad_enabled() or self.training:
            keep = torch.ones(table.shape[0], 1, dtype=table.dtype, device=table.device)
            keep[contract.PADDING_INDEX] = 0.0
            return table * keep
        table[contract.PADDING_INDEX] = 0.0
        return table


def overlay_rows(
    table: torch.Tensor, extra: torch.Tensor | None, indices: torch.Tensor
) -> torch.Tensor:
    """Rows of `table` (indices 0..N) followed by the rows of `extra` (N+1..N+M).

    Items added after training (the gateway's item overlay) arrive per request as `extra`, [M, D]
    shared by the rows of `indices` or [B, M, D] per row (as the served, batching models take
    it); the trained table is not copied to append them: each index is gathered from the side it
    falls in (a zero row stands in on the other side, so that M = 0 needs no special case).
    """
    if extra is None:
        return F.embedding(indices, table)
    n_rows = table.shape[0]
    if extra.dim() == 3:
        rows = torch.cat([extra, extra.new_zeros(extra.shape[0], 1, extra.shape[2])], dim=1)
        relative = (indices - n_rows).clamp(min=0).clamp(max=extra.shape[1])
        added = torch.gather(rows, 1, relative.unsqueeze(-1).expand(-1, -1, extra.shape[2]))
        trained = F.embedding(indices.clamp(max=n_rows - 1), table)
        return torch.where((indices >= n_rows).unsqueeze(-1), added, trained)
    padded = torch.cat([extra, torch.zeros_like(table[:1])], dim=0)
    trained = F.embedding(indices.clamp(max=n_rows - 1), table)
    added = F.embedding((indices - n_rows).clamp(min=0).clamp(max=extra.shape[0]), padded)
    return torch.where((indices >= n_rows).unsqueeze(-1), added, trained)


def _offset_buffer(module: nn.Module, offset: torch.Tensor | None) -> None:
    """`added_item_offset` [D], or None without one (the graph then has no subtraction)."""
    module.register_buffer(
        "added_item_offset", None if offset is None else offset.detach().float().clone()
    )


def _unshifted(module: nn.Module, extra: torch.Tensor | None) -> torch.Tensor | None:
    """An added item's vector as a history event or a query: without the new-item boost's shift
    (`Recommender.added_item_offset`)."""
    offset = module.added_item_offset
    if extra is None or offset is None:
        return extra
    assert isinstance(offset, torch.Tensor)
    return extra - offset.to(extra.dtype)


class UserEncoder(nn.Module):
    """Exported user encoder: history indices -> user embedding (item table baked in).

    `extra_item_vectors` [M, D] are items added after training; history index N+1+j is row j.
    `added_item_offset` (`Recommender.added_item_offset`) is taken out of them: the new-item
    boost's shift lifts an added item as a candidate, not as an event of a history.
    """

    def __init__(
        self,
        item_table: torch.Tensor,
        user_tower: UserTower,
        added_item_offset: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("item_table", item_table.detach().clone())
        _offset_buffer(self, added_item_offset)
        self.user_tower = user_tower

    def forward(
        self,
        history_items: torch.Tensor,
        history_event_types: torch.Tensor,
        extra_item_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = _unshifted(self, extra_item_vectors)
        vectors = overlay_rows(self.item_table, extra, history_items)
        return self.user_tower(vectors, history_items, history_event_types)


class ItemLookup(nn.Module):
    """Exported for SimilarItems: the catalogue indices of a row's query items [B, L] (a basket;
    `PADDING_INDEX` pads) -> the mean of their vectors [B, D] (zeros for an all-padding row).
    Added items' vectors without the new-item boost's shift (`added_item_offset`, as
    `UserEncoder`): it lifts an item as a candidate, not as a query (SimilarItems, Audience).

    The mean, not the sum: a candidate's score is then the mean of its single-item SimilarItems
    scores against the basket items, on their scale, so SimilarItems' default long-tail weight
    keeps its meaning; and a one-item basket is exactly that item's vector.
    """

    def __init__(
        self, item_table: torch.Tensor, added_item_offset: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("item_table", item_table.detach().clone())
        _offset_buffer(self, added_item_offset)

    def forward(
        self, query_items: torch.Tensor, extra_item_vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = _unshifted(self, extra_item_vectors)  # a query, not a candidate: no shift
        vectors = overlay_rows(self.item_table, extra, query_items)  # [B, L, D]
        mask = (query_items != contract.PADDING_INDEX).to(vectors.dtype).unsqueeze(-1)
        count = mask.sum(dim=1).clamp(min=1.0)
        return (vectors * mask).sum(dim=1) / count


class Scorer(nn.Module):
    """Reference scorer (torch); export writes the same computation as an ONNX graph.

    score_i = <u, e_i> - w * log(1 + popularity_i); padding, history and excluded items get -inf,
    and so do the items `item_eligible` (the business filter, [B, N+1+M] or [B, 1], broadcast)
    leaves out; top-k; and, per returned item, the history position with the most similar item
    (cosine), which the gateway turns into an explanation. Items added after training
    (`extra_item_vectors`, `extra_popularity`) follow the trained catalogue as indices N+1..N+M.
    """

    def __init__(self, item_table: torch.Tensor, popularity: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("item_table", item_table.detach().clone())
        self.register_buffer("log_popularity", torch.log1p(popularity.float()).unsqueeze(0))
        base = torch.zeros(1, item_table.shape[0])
        base[0, contract.PADDING_INDEX] = float("-inf")
        self.register_buffer("base_mask", base)

    def scores(
        self,
        user: torch.Tensor,
        history_items: torch.Tensor,
        exclude_items: torch.Tensor,
        long_tail_weight: torch.Tensor,
        extra_item_vectors: torch.Tensor | None = None,
        extra_popularity: torch.Tensor | None = None,
        item_eligible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        table, log_popularity, base_mask = self._tables(extra_item_vectors, extra_popularity)
        raw = user @ table.T
        adjusted = raw - long_tail_weight * log_popularity + base_mask
        masked_idx = torch.cat([history_items, exclude_items], dim=1)
        scores = adjusted.scatter(1, masked_idx, float("-inf"))
        if item_eligible is None:
            return scores
        return scores.masked_fill(~item_eligible.bool(), float("-inf"))

    def _tables(
        self, extra_item_vectors: torch.Tensor | None, extra_popularity: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The catalogue with the overlay appended (indices N+1..N+M), as the export sees it."""
        if extra_item_vectors is None:
            return self.item_table, self.log_popularity, self.base_mask
        if extra_popularity is None:
            extra_popularity = torch.zeros(extra_item_vectors.shape[0])
        extra_log = torch.log1p(extra_popularity.float()).unsqueeze(0)
        return (
            torch.cat([self.item_table, extra_item_vectors], dim=0),
            torch.cat([self.log_popularity, extra_log], dim=1),
            torch.cat([self.base_mask, torch.zeros_like(extra_log)], dim=1),
        )

    def forward(
        self,
        user: torch.Tensor,
        history_items: torch.Tensor,
        exclude_items: torch.Tensor,
        long_tail_weight: torch.Tensor,
        k: int,
        extra_item_vectors: torch.Tensor | None = None,
        extra_popularity: torch.Tensor | None = None,
        item_eligible: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.scores(
            user,
            history_items,
            exclude_items,
            long_tail_weight,
            extra_item_vectors,
            extra_popularity,
            item_eligible,
        )
        top_scores, top_items = scores.topk(k, dim=1)
        table, _, _ = self._tables(extra_item_vectors, extra_popularity)
        recommended = F.normalize(F.embedding(top_items, table), dim=-1)
        history = F.normalize(F.embedding(history_items, table), dim=-1)
        sims = recommended @ history.transpose(1, 2)
        pad = torch.where(history_items == contract.PADDING_INDEX, float("-inf"), 0.0)
        reasons = (sims + pad.unsqueeze(1)).argmax(dim=2)
        return top_items, top_scores, reasons


class AudienceScorer(nn.Module):
    """Reference (torch) of the exported audience scorer (Audience, ForecastDemand).

    For each query item q and user u (their context-weighted vectors): the model's probability
    that the user's next interaction is q, `p(q|u) = softmax over the catalogue of <u, e_i>`,
    the training objective read back (no long-tail term: popularity is part of what the model
    predicts). The catalogue is the trained table plus the overlay, without padding and the
    `exclude_items` [1, E] (the gateway's hidden items). Each user's expected interactions with
    q are `activity_u * p(q|u)` (`user_activity`: the user's events in the history store's
    retention window); per query, the top `k` users by it (positions in `users`, best first)
    and its sum over the users (the item's expected interactions).
    """

    def __init__(self, item_table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("item_table", item_table.detach().clone())

    def log_normalisers(
        self,
        users: torch.Tensor,
        exclude_items: torch.Tensor,
        extra_item_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log sum_i exp(<u, e_i>) over the catalogue of each user, [U]."""
        table = self.item_table
        if extra_item_vectors is not None:
            table = torch.cat([table, extra_item_vectors], dim=0)
        logits = users @ table.T
        masked = torch.cat(
            [exclude_items, torch.full_like(exclude_items[:, :1], contract.PADDING_INDEX)], dim=1
        )
        logits = logits.scatter(1, masked.expand(users.shape[0], -1), float("-inf"))
        return torch.logsumexp(logits, dim=1)

    def forward(
        self,
        query: torch.Tensor,
        users: torch.Tensor,
        user_activity: torch.Tensor,
        exclude_items: torch.Tensor,
        k: int,
        extra_item_vectors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_p = query @ users.T - self.log_normalisers(users, exclude_items, extra_item_vectors)
        log_expected = log_p + torch.log(user_activity).unsqueeze(0)
        top_log, top_users = log_expected.topk(k, dim=1)
        return top_users, top_log.exp(), log_expected.exp().sum(dim=1)
