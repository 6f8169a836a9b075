"""A tiny synthetic dataset end to end: the `tiny_data` fixture (registered in conftest.py), and
`write_tiny_data` for tests that train in other processes."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
import torch

import ltrec.models
import ltrec.prepared
import ltrec.text_encoder
import ltrec.train
from ltrec.data import item_texts, load_dataset, write_dataset
from ltrec.sequences import Sequences

N_ITEMS = 40
GENRES = ["drama", "comedy", "horror", "sci-fi"]


def fake_text_features(texts: list[str], cache_dir: Path, max_tokens: int = 64) -> np.ndarray:
    """Stands in for MiniLM: the genre as a one-hot (times 3) plus small noise, so tests need no
    model load."""
    genre = np.array([[g in t for g in GENRES] for t in texts], dtype=np.float32)
    noise = np.random.default_rng(1).standard_normal((len(texts), 380)).astype(np.float32)
    return np.concatenate([genre * 3.0, noise * 0.1], axis=1)


def write_tiny_data(
    out: Path, n_users: int = 30, n_items: int = N_ITEMS, cache_dir: Path | None = None
) -> Path:
    """`n_items` items in 4 genres, `n_users` users who mostly stay in one genre, popularity
    skewed; returns `out`. With `cache_dir`, the stand-in text features are written where
    `prepare(out, cache_dir)` finds them, so a process the test starts (torchrun) prepares the
    same data without MiniLM."""
    rng = np.random.default_rng(0)
    items = pd.DataFrame(
        {
            "item_id": [f"m{i}" for i in range(n_items)],
            "title": [f"Movie {i}" for i in range(n_items)],
            "category": [GENRES[i % 4] for i in range(n_items)],
        }
    )
    weights = 1.0 / np.arange(1, n_items + 1)  # Zipf-like popularity
    rows = []
    for u in range(n_users):
        genre = u % 4
        own = np.flatnonzero(np.arange(n_items) % 4 == genre)
        p = weights[own] / weights[own].sum()
        n = int(rng.integers(5, 10))
        picks = rng.choice(own, size=n, replace=False, p=p)
        for t, i in enumerate(picks):
            rows.append((f"u{u}", f"m{i}", 1_000_000 + 3600 * t + u, "view", "mobile", "r1"))
    events = pd.DataFrame(
        rows, columns=["user_id", "item_id", "timestamp", "event_type", "device", "region"]
    )
    write_dataset(items, events, out, fmt="csv")
    if cache_dir is not None:

        def encode(texts: list[str], max_tokens: int) -> np.ndarray:
            return fake_text_features(texts, cache_dir, max_tokens)

        with patch.object(ltrec.text_encoder, "encode_texts", encode):
            ltrec.text_encoder.cached_text_features(item_texts(load_dataset(out).items), cache_dir)
    return out


def sequences(lengths: list[int]) -> Sequences:
    """Training sequences of these lengths, every event its own item (so positions show)."""
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    n = int(offsets[-1])
    items = np.arange(1, n + 1, dtype=np.int64)  # every event its own item: positions show
    return Sequences(
        users=np.array([f"u{i}" for i in range(len(lengths))], dtype=object),
        offsets=offsets,
        items=items,
        event_types=(items % 3 + 1).astype(np.int64),
        context=np.stack([items % 24, items % 7, items % 2, items % 5], axis=1).astype(np.int64),
    )


@pytest.fixture
def tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """40 items in 4 genres, 30 users who mostly stay in one genre, popularity skewed.

    Text features are stood in by random vectors (with a genre component) instead of MiniLM, so
    the test needs no model load.
    """
    data = write_tiny_data(tmp_path / "data")
    monkeypatch.setattr(ltrec.prepared, "cached_text_features", fake_text_features)
    return data


LossInputs = tuple[
    ltrec.models.Recommender, tuple[torch.Tensor, ...], Sequences, torch.Tensor, torch.Tensor
]


def toy_loss_inputs(set_pooling: bool = False) -> LossInputs:
    """A small seeded model (30 items), one training batch of three users' windows (6, 9 and 4
    random items), and a uniform target distribution: what `ltrec.train._loss` takes.
    Returns (model, batch, sequences, q, log q)."""
    cfg = ltrec.models.ModelConfig(
        n_items=30, n_devices=3, n_regions=6, embedding_dim=16, n_heads=2, set_pooling=set_pooling
    )
    torch.manual_seed(0)
    model = ltrec.models.Recommender(cfg, torch.randn(31, 384)).eval()
    seqs = sequences([6, 9, 4])
    seqs.items[:] = np.random.default_rng(0).integers(1, 31, len(seqs.items))
    batch = next(ltrec.train._batches(seqs, 10, 8, np.random.default_rng(0)))
    q = torch.full((31,), 1 / 30)
    q[0] = 0
    return model, tuple(batch), seqs, q, torch.log(q.clamp(min=1e-12))
