"""The checkpoint: what training writes and the export, evaluation and benchmarks read.

One file, ``checkpoint.pt`` (`torch.save` of a dict): the model's weights, the item-side arrays
the model is rebuilt from, and the metadata (`ltrec_core.artifacts.CheckpointMetadata`: catalogue,
vocabularies, model settings, training summary). `save_checkpoint` is the one writer and
`read_checkpoint` the one reader; `load_checkpoint` also rebuilds the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltrec.models import ItemSide, ModelConfig, Recommender
from ltrec_core.artifacts import CHECKPOINT_ARRAYS, CheckpointMetadata, Vocabularies


@dataclass
class Checkpoint:
    """A checkpoint in memory. Arrays are indexed by catalogue index (row 0 is padding)."""

    metadata: CheckpointMetadata
    state_dict: dict[str, torch.Tensor]
    text_features: np.ndarray  # [N+1, text_dim]
    # INT64 [n_img] indices with a photo and FP32 [n_img, 1280] their image features; None in
    # checkpoints from before the item fusion (which cannot be loaded any more).
    image_rows: np.ndarray | None
    image_features: np.ndarray | None
    attribute_ids: np.ndarray | None  # INT64 [N+1, ATTRIBUTE_SLOTS]
    popularity: np.ndarray  # [N+1] training interactions
    long_tail: np.ndarray  # [N+1] bool
    # INT64 [N+1]: the model's exposure of each item (`ltrec.evaluation.exposure_counts`), the
    # long-tail term's count; None in checkpoints from before it, whose term uses `popularity`.
    exposure: np.ndarray | None = None

    @property
    def long_tail_counts(self) -> np.ndarray:
        """What the served long-tail term penalises, `w * log(1 + count)`, per catalogue index."""
        return self.popularity if self.exposure is None else self.exposure

    # The metadata's fields, read through.
    @property
    def model_config(self) -> dict[str, Any]:
        return self.metadata.model_config

    @property
    def item_ids(self) -> list[str]:
        return self.metadata.item_ids

    @property
    def titles(self) -> list[str]:
        return self.metadata.titles

    @property
    def texts(self) -> list[str]:
        return self.metadata.texts

    @property
    def image_paths(self) -> list[str | None]:
        return self.metadata.image_paths

    @property
    def vocabularies(self) -> Vocabularies:
        return self.metadata.vocabularies

    @property
    def summary(self) -> dict[str, Any]:
        return self.metadata.summary

    def to_dict(self) -> dict[str, Any]:
        """The stored form, keys in the order training has always written them."""
        meta = self.metadata.to_json()
        return {
            "model_config": meta.pop("model_config"),
            "state_dict": self.state_dict,
            "text_features": self.text_features,
            "image_rows": self.image_rows,
            "image_features": self.image_features,
            "attribute_ids": self.attribute_ids,
            "popularity": self.popularity,
            "long_tail": self.long_tail,
            "exposure": self.exposure,
            **meta,
        }

    def __getitem__(self, key: str) -> Any:
        """The stored form's value under `key`, for scripts written against the dict."""
        return self.to_dict()[key]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "checkpoint") -> Checkpoint:
        metadata = CheckpointMetadata.from_json(
            {k: v for k, v in raw.items() if k not in CHECKPOINT_ARRAYS}, where
        )
        return cls(
            metadata=metadata,
            state_dict=raw["state_dict"],
            text_features=raw["text_features"],
            image_rows=raw.get("image_rows"),
            image_features=raw.get("image_features"),
            attribute_ids=raw.get("attribute_ids"),
            popularity=raw["popularity"],
            long_tail=raw["long_tail"],
            exposure=raw.get("exposure"),
        )


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    torch.save(checkpoint.to_dict(), path)


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint without its model (`load_checkpoint` rebuilds that too)."""
    raw = torch.load(path, map_location="cpu", weights_only=False)
    return Checkpoint.from_dict(raw, str(path))


def checkpoint_side(ckpt: Checkpoint) -> ItemSide:
    if ckpt.image_rows is None:
        raise ValueError(
            "this checkpoint predates the item fusion (text + image + attributes); "
            "retrain it: remove it and run `make train`"
        )
    attributes = ckpt.attribute_ids
    return ItemSide(
        torch.from_numpy(np.asarray(ckpt.image_rows, dtype=np.int64)),
        torch.from_numpy(np.asarray(ckpt.image_features, dtype=np.float32)),
        None if attributes is None else torch.from_numpy(np.asarray(attributes, dtype=np.int64)),
    )


class SplitMismatch(ValueError):
    """A checkpoint was trained on another catalogue or training split than the one given."""


def load_checkpoint_for(
    path: Path, item_ids: list[str], popularity: np.ndarray
) -> tuple[Recommender, Checkpoint]:
    """`load_checkpoint`, refused (`SplitMismatch`) unless the checkpoint was trained on this
    catalogue (`item_ids`) and training split (`popularity`, per catalogue index)."""
    model, ckpt = load_checkpoint(path)
    if ckpt.item_ids != item_ids or not np.array_equal(ckpt.popularity, popularity):
        raise SplitMismatch(
            f"{path} was not trained on this split (catalogue or training popularity differ)"
        )
    return model, ckpt


def load_checkpoint(path: Path) -> tuple[Recommender, Checkpoint]:
    ckpt = read_checkpoint(path)
    cfg = ModelConfig(**ckpt.model_config)
    model = Recommender(cfg, torch.from_numpy(ckpt.text_features), checkpoint_side(ckpt))
    # The checkpoint's tensors become the model's (no copy): at millions of items the ID table
    # alone is gigabytes, and a copy would live as long as the checkpoint object.
    model.load_state_dict(ckpt.state_dict, assign=True)
    imputed = ckpt.summary.get("new_item_ids") or {}
    model.fusion.new_item_scale = float(imputed.get("scale", 1.0))
    if imputed.get("offset") is not None:
        model.fusion.new_item_offset = np.asarray(imputed["offset"], dtype=np.float64)
    model.eval()
    return model, ckpt
