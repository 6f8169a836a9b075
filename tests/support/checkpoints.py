"""A random tiny checkpoint with exactly the keys training saves (export and benchmark tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ltrec.evaluation import long_tail_mask
from ltrec.models import ModelConfig, Recommender
from ltrec_core import contract

N_ITEMS = 40


CFG = ModelConfig(
    n_items=N_ITEMS,
    n_devices=3,
    n_regions=3,
    text_dim=24,
    embedding_dim=16,
    projection_hidden=32,
    n_layers=1,
    n_heads=2,
    max_history=12,
    context_dim=4,
)


VOCABULARIES = {
    "event_types": list(contract.EVENT_TYPES),
    "device": ["desktop", "mobile"],
    "region": ["eu", "us"],
}


# Titles the CSV must quote: commas, quotes, a line break, non-ASCII.
SPECIAL_TITLES = {
    1: "Heat, The (1995)",
    2: 'Say "Hi", Bob',
    3: "Amélie, Le fabuleux destin",
    4: "Two\nlines",
}


# Catalogue fields (category, brand, price bucket) by item: three categories under two roots,
# four brands, the three price buckets; every fifth item has none of them.
def item_fields(index: int) -> tuple[str, str, str]:
    if index % 5 == 0:
        return ("", "", "")
    category = ("Books|Fiction", "Books|Fiction|Crime", "Music|Jazz")[index % 3]
    brand = ("Acme", "Globex", "Initech", "Umbrella")[index % 4]
    return category, brand, ("budget", "mid-range", "premium")[index % 3]


def write_checkpoint(path: Path) -> dict:
    """A random checkpoint with exactly the keys `ltrec.train.train` saves."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    text_features = rng.standard_normal((N_ITEMS + 1, CFG.text_dim)).astype(np.float32)
    text_features[contract.PADDING_INDEX] = 0.0
    model = Recommender(CFG, torch.from_numpy(text_features))
    with torch.no_grad():
        # Both start at zero; random values make the parity checks non-trivial.
        assert model.item_ids is not None
        model.item_ids.weight.normal_(std=0.5)
        model.context_weighting.mlp[-1].weight.normal_(std=0.5)
        model.context_weighting.mlp[-1].bias.normal_(std=0.5)
    popularity = rng.integers(0, 500, size=N_ITEMS + 1).astype(np.int64)
    popularity[contract.PADDING_INDEX] = 0
    # The model's exposure of each item, the served long-tail term's count: unlike popularity,
    # so a test can tell which one a graph or file carries (0 where nobody trained on the item).
    exposure = np.where(popularity > 0, rng.integers(0, 300, size=N_ITEMS + 1), 0).astype(np.int64)
    item_ids = [f"item-{i}" for i in range(1, N_ITEMS + 1)]
    titles = [SPECIAL_TITLES.get(i, f"Title {i}") for i in range(1, N_ITEMS + 1)]
    summary = {
        "text_model": "sentence-transformers/all-MiniLM-L6-v2",
        "train_config": {"epochs": 1, "lr": 0.002, "model": {}},
        "model_config": CFG.to_dict(),
        "best": {"epoch": 1, "recall@10": 0.1, "ndcg@10": 0.05},
        "most_popular_valid": {"recall@10": 0.05, "ndcg@10": 0.02},
        "epochs": [{"epoch": 1, "loss": 3.0}],
        "stop_reason": "epochs",
        "train_seconds": 1.5,
        "data": {"dir": "data/tiny", "cleaning": {}},
    }
    ckpt = {
        "model_config": CFG.to_dict(),
        "state_dict": model.state_dict(),
        "text_features": text_features,
        "image_rows": np.zeros(0, dtype=np.int64),
        "image_features": np.zeros((0, CFG.image_dim), dtype=np.float32),
        "attribute_ids": np.zeros((N_ITEMS + 1, contract.ATTRIBUTE_SLOTS), dtype=np.int64),
        "popularity": popularity,
        "long_tail": long_tail_mask(popularity),
        "exposure": exposure,
        "item_ids": item_ids,
        "titles": titles,
        "texts": [f"{t} | category" for t in titles],
        "image_paths": [None] * N_ITEMS,
        "vocabularies": VOCABULARIES,
        "summary": summary,
        "item_fields": {
            name: [item_fields(i)[column] for i in range(1, N_ITEMS + 1)]
            for column, name in enumerate(("categories", "brands", "price_buckets"))
        },
    }
    torch.save(ckpt, path)
    return ckpt
