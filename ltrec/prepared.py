"""A dataset directory turned into everything training and export need (`Prepared`).

Loading and splitting the data, the frozen text and image features (cached), the hashed
attributes, popularity, vocabularies and training sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ltrec.checkpoint import Checkpoint, load_checkpoint_for
from ltrec.data import LeaveOneOut, item_texts, leave_one_out, load_dataset, price_buckets
from ltrec.image_encoder import cached_image_features
from ltrec.models import ItemSide, Recommender
from ltrec.sequences import Sequences, build_sequences, build_vocabulary
from ltrec.text_encoder import cached_text_features
from ltrec_core import contract
from ltrec_core.artifacts import CatalogueFields
from ltrec_core.item_attributes import attribute_ids


@dataclass
class Prepared:
    """Everything training and export need from a dataset directory."""

    data_dir: Path
    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    image_paths: list[str | None]  # as given (resolved), readable or not
    item_fields: CatalogueFields  # category, brand, price bucket (the gateway filters on them)
    text_features: np.ndarray  # [N+1, 384], row 0 zeros
    image_rows: np.ndarray  # INT64 [n_img] catalogue indices (1..N) with a readable image
    image_features: np.ndarray  # FP32 [n_img, 1280] EfficientNet-Lite0 features of those
    attribute_ids: np.ndarray  # INT64 [N+1, ATTRIBUTE_SLOTS], row 0 padding
    popularity: np.ndarray  # [N+1] training interactions per item, row 0 zero
    device_vocab: list[str]
    region_vocab: list[str]
    split: LeaveOneOut
    train_sequences: Sequences
    report: dict
    report_text: str


def prepare(data_dir: Path, cache_dir: Path) -> Prepared:
    dataset = load_dataset(data_dir)
    split = leave_one_out(dataset.events)
    n_items = len(dataset.items)
    texts = item_texts(dataset.items)
    fields = item_fields(dataset.items)
    features = np.zeros((n_items + 1, 384), dtype=np.float32)
    features[1:] = cached_text_features(texts, cache_dir)
    images = cached_image_features(dataset.items["image"].tolist(), cache_dir)
    attributes = np.zeros((n_items + 1, contract.ATTRIBUTE_SLOTS), dtype=np.int64)
    attributes[1:] = item_attribute_ids(fields)
    report: dict[str, Any] = dataset.report.to_dict()
    report["images"] = {
        "items_with_image": int(dataset.items["image"].notna().sum()),
        **images.counts,
    }
    report_text = str(dataset.report)
    if report["images"]["items_with_image"]:
        problems = "".join(f", {n} {reason}" for reason, n in sorted(images.problems.items()))
        report_text += (
            f"\nimages: {report['images']['items_with_image']} items have one, "
            f"{images.counts['encoded']} encoded{problems} (treated as image-less)"
        )
    popularity = np.bincount(split.train["item_index"].to_numpy(), minlength=n_items + 1)
    popularity[contract.PADDING_INDEX] = 0
    device_vocab = build_vocabulary(dataset.events.get("device"))
    region_vocab = build_vocabulary(dataset.events.get("region"))
    return Prepared(
        data_dir=Path(data_dir),
        item_ids=dataset.items["item_id"].astype(str).tolist(),
        titles=dataset.items["title"].astype(str).tolist(),
        texts=texts,
        image_paths=[None if pd.isna(p) else str(p) for p in dataset.items["image"].tolist()],
        item_fields=fields,
        text_features=features,
        image_rows=images.rows + 1,
        image_features=images.features,
        attribute_ids=attributes,
        popularity=popularity.astype(np.int64),
        device_vocab=device_vocab,
        region_vocab=region_vocab,
        split=split,
        train_sequences=build_sequences(split.train, device_vocab, region_vocab),
        report=report,
        report_text=report_text,
    )


def prepare_for_checkpoint(
    data_dir: Path, cache_dir: Path, checkpoint: Path
) -> tuple[Prepared, Recommender, Checkpoint]:
    """The dataset (`prepare`) and the checkpoint trained on it (`load_checkpoint_for`): a
    command's start. Raises DatasetError or SplitMismatch, whose messages say what is wrong."""
    prepared = prepare(data_dir, cache_dir)
    model, ckpt = load_checkpoint_for(checkpoint, prepared.item_ids, prepared.popularity)
    return prepared, model, ckpt


def item_fields(items: pd.DataFrame) -> CatalogueFields:
    """Each item row's category, brand and price bucket (the catalogue's own terciles), "" where
    missing: what the attribute ids hash and what the gateway's business filters compare."""
    n = len(items)
    prices = price_buckets(items["price"]) if "price" in items.columns else [None] * n

    def column(name: str) -> list[str]:
        if name not in items.columns:
            return [""] * n
        return ["" if pd.isna(v) else str(v) for v in items[name].tolist()]

    return CatalogueFields(
        categories=column("category"),
        brands=column("brand"),
        price_buckets=[price or "" for price in prices],
    )


def dataset_item_fields(data_dir: Path, item_ids: list[str]) -> CatalogueFields:
    """`item_fields` of the dataset in `data_dir`, which must hold exactly `item_ids` in that
    order (ValueError otherwise): the fields of a checkpoint written before it stored them."""
    items = load_dataset(data_dir).items
    if items["item_id"].astype(str).tolist() != item_ids:
        raise ValueError("its items are not the checkpoint's (other ids or another order)")
    return item_fields(items)


def item_attribute_ids(fields: CatalogueFields) -> np.ndarray:
    """`ltrec_core.item_attributes.attribute_ids` of every item, INT64 [n, ATTRIBUTE_SLOTS]."""
    rows = [
        attribute_ids(category, brand, price)
        for category, brand, price in zip(
            fields.categories, fields.brands, fields.price_buckets, strict=True
        )
    ]
    n = len(fields.categories)
    return np.asarray(rows, dtype=np.int64).reshape(n, contract.ATTRIBUTE_SLOTS)


def item_side(prepared: Prepared) -> ItemSide:
    """The non-text item inputs of `prepared` as the model takes them."""
    return ItemSide(
        torch.from_numpy(prepared.image_rows),
        torch.from_numpy(prepared.image_features),
        torch.from_numpy(prepared.attribute_ids),
    )
