"""A slice of real MovieLens-1M and a tiny model trained on it: what the serving tests export.

A few hundred users and a one-epoch, 16-dimensional model keep training to seconds on two cores;
the item texts still go through the real MiniLM (`prepare`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from ltrec.data import load_dataset, write_dataset
from ltrec.datasets.movielens import convert_movielens_1m
from ltrec.image_encoder import load_image_encoder
from ltrec.models import ItemEncoder, Recommender
from ltrec.prepared import Prepared, prepare
from ltrec.text_encoder import load_text_model, tokenize
from ltrec.train import TrainConfig, train
from ltrec_core import contract
from ltrec_core.images import image_batch

N_USERS = 150


def ml1m_slice(root: Path, n_users: int = N_USERS) -> tuple[Prepared, pd.Series]:
    """The first `n_users` users of ML-1M and the items they rated, prepared for training under
    `root`; returns it with those users' ids."""
    full = convert_movielens_1m(root / "ml-1m-full")
    dataset = load_dataset(full)
    users = dataset.events["user_id"].drop_duplicates().iloc[:n_users]
    events = dataset.events[dataset.events["user_id"].isin(users)]
    items = dataset.items[dataset.items["item_id"].isin(events["item_id"])]
    small = root / "ml-1m-small"
    write_dataset(items, events, small)
    return prepare(small, root / "cache"), users


def train_tiny(prepared: Prepared, out_dir: Path, *, seed: int = 0) -> Path:
    """One epoch of a one-layer, 16-dimensional model; returns the checkpoint's path. Different
    seeds give different checkpoints, hence different exported model versions."""
    cfg = TrainConfig(
        epochs=1,
        batch_size=64,
        seed=seed,
        model={"embedding_dim": 16, "n_layers": 1, "n_heads": 2, "max_history": 20},
    )
    train(prepared, cfg, out_dir, progress=False)
    return out_dir / "checkpoint.pt"


def encode_new_items(
    model: Recommender,
    texts: list[str],
    attributes: list[list[int]] | None = None,
    images: list[Image.Image | None] | None = None,
) -> torch.Tensor:
    """Item vectors of items added after training, computed in torch as the gateway computes
    them through Triton: MiniLM + the trained fusion, the image (if any) through
    EfficientNet-Lite0 with `ltrec_core.images`' preprocessing, attribute ids as given."""
    tokenizer, minilm = load_text_model()
    batch = tokenize(tokenizer, texts, model.cfg.text_max_tokens)
    n = len(texts)
    features = torch.zeros(n, model.cfg.image_dim)
    has_image = torch.zeros(n, 1)
    rows = [i for i, image in enumerate(images or []) if image is not None]
    with torch.no_grad():
        if rows:
            pixels = image_batch([images[i] for i in rows])  # type: ignore[index,misc]
            features[rows] = load_image_encoder()(torch.from_numpy(pixels))
            has_image[rows] = 1.0
        ids = torch.tensor(
            attributes if attributes is not None else [[0] * contract.ATTRIBUTE_SLOTS] * n
        )
        encoder = ItemEncoder(minilm, model.fusion).eval()
        return encoder(batch["input_ids"], batch["attention_mask"], features, has_image, ids)
