"""A tiny synthetic dataset end to end: the `tiny_data` fixture (registered in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ltrec.prepared
import ltrec.train
from ltrec.data import write_dataset

N_ITEMS = 40


@pytest.fixture
def tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """40 items in 4 genres, 30 users who mostly stay in one genre, popularity skewed.

    Text features are stood in by random vectors (with a genre component) instead of MiniLM, so
    the test needs no model load.
    """
    rng = np.random.default_rng(0)
    genres = ["drama", "comedy", "horror", "sci-fi"]
    items = pd.DataFrame(
        {
            "item_id": [f"m{i}" for i in range(N_ITEMS)],
            "title": [f"Movie {i}" for i in range(N_ITEMS)],
            "category": [genres[i % 4] for i in range(N_ITEMS)],
        }
    )
    weights = 1.0 / np.arange(1, N_ITEMS + 1)  # Zipf-like popularity
    rows = []
    for u in range(30):
        genre = u % 4
        own = np.flatnonzero(np.arange(N_ITEMS) % 4 == genre)
        p = weights[own] / weights[own].sum()
        n = int(rng.integers(5, 10))
        picks = rng.choice(own, size=n, replace=False, p=p)
        for t, i in enumerate(picks):
            rows.append((f"u{u}", f"m{i}", 1_000_000 + 3600 * t + u, "view", "mobile", "r1"))
    events = pd.DataFrame(
        rows, columns=["user_id", "item_id", "timestamp", "event_type", "device", "region"]
    )
    write_dataset(items, events, tmp_path / "data", fmt="csv")

    def fake_features(texts: list[str], cache_dir: Path, max_tokens: int = 64) -> np.ndarray:
        genre = np.array([[g in t for g in genres] for t in texts], dtype=np.float32)
        noise = np.random.default_rng(1).standard_normal((len(texts), 380)).astype(np.float32)
        return np.concatenate([genre * 3.0, noise * 0.1], axis=1)

    monkeypatch.setattr(ltrec.prepared, "cached_text_features", fake_features)
    return tmp_path / "data"
