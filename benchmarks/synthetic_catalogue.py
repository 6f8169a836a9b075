"""Synthetic catalogues for the scale benchmark: generated item vectors, not trained ones.

A synthetic checkpoint keeps the trained user tower and context weighting (same weights, same
sizes) and replaces the catalogue: `n_items` item vectors drawn from a Gaussian with the trained
item table's mean and covariance (so scores have the trained scale), Zipf-like popularity, and a
text projection that contributes nothing (`text_dim` 1, zero weights), so the item table is
exactly the generated vectors. The ordinary export (`export_scripts.export`) then writes, checks
against torch and times the repository as for a trained model.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export_scripts.export import export
from ltrec.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ltrec.evaluation import long_tail_mask
from ltrec.models import ModelConfig, Recommender
from ltrec_core import contract
from ltrec_core.artifacts import CatalogueFields, CheckpointMetadata

ZIPF_EXPONENT = 1.1
MAX_INTERACTIONS = 50_000


def generated_item_table(
    reference: np.ndarray, n_items: int, rng: np.random.Generator
) -> np.ndarray:
    """[n_items + 1, D] float32, row 0 (padding) zero, rows drawn like `reference`'s real rows."""
    real = reference[1:].astype(np.float64)
    mean = real.mean(axis=0)
    cov = np.cov(real, rowvar=False) + 1e-6 * np.eye(real.shape[1])
    factor = np.linalg.cholesky(cov)
    table = np.zeros((n_items + 1, real.shape[1]), dtype=np.float32)
    chunk = 65_536  # bounded temporary memory for a million rows
    for start in range(1, n_items + 1, chunk):
        stop = min(start + chunk, n_items + 1)
        noise = rng.standard_normal((stop - start, real.shape[1]))
        table[start:stop] = (mean + noise @ factor.T).astype(np.float32)
    return table


def zipf_popularity(n_items: int, rng: np.random.Generator) -> np.ndarray:
    """Interactions per item, heavy-tailed like real catalogues; index 0 (padding) is 0."""
    ranks = rng.permutation(n_items) + 1
    popularity = np.zeros(n_items + 1, dtype=np.int64)
    popularity[1:] = np.floor(MAX_INTERACTIONS / ranks**ZIPF_EXPONENT).astype(np.int64)
    return popularity


def synthetic_checkpoint(source: Path, n_items: int, path: Path, seed: int = 0) -> Checkpoint:
    """Writes a checkpoint with `source`'s towers and a generated catalogue of `n_items`."""
    model, ckpt = load_checkpoint(source)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        reference = model.item_table().numpy()
    table = generated_item_table(reference, n_items, rng)
    cfg = dataclasses.replace(
        ModelConfig(**ckpt.model_config), n_items=n_items, text_dim=1, id_embeddings=True
    )
    text_features = np.zeros((n_items + 1, 1), dtype=np.float32)
    synthetic = Recommender(cfg, torch.from_numpy(text_features))
    state = synthetic.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith(("user_tower.", "context_weighting.")):
            state[name] = value
    for name in list(state):
        if name.startswith("fusion."):
            state[name] = torch.zeros_like(state[name])
    state["item_ids.weight"] = torch.from_numpy(table)
    synthetic.load_state_dict(state)
    popularity = zipf_popularity(n_items, rng)
    ids = [f"syn-{i}" for i in range(1, n_items + 1)]
    summary = {**ckpt.summary, "data": {"dir": f"synthetic:{n_items}", "cleaning": {}}}
    summary["model_config"] = cfg.to_dict()
    synthetic_ckpt = Checkpoint(
        metadata=CheckpointMetadata(
            model_config=cfg.to_dict(),
            item_ids=ids,
            titles=[f"Synthetic item {i}" for i in range(1, n_items + 1)],
            texts=[""] * n_items,
            image_paths=[None] * n_items,
            vocabularies=ckpt.vocabularies,
            summary=summary,
            item_fields=CatalogueFields.empty(n_items),
        ),
        state_dict=synthetic.state_dict(),
        text_features=text_features,
        image_rows=np.zeros(0, dtype=np.int64),
        image_features=np.zeros((0, cfg.image_dim), dtype=np.float32),
        attribute_ids=None,
        popularity=popularity,
        long_tail=long_tail_mask(popularity),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(synthetic_ckpt, path)
    return synthetic_ckpt


def export_synthetic(
    source: Path,
    n_items: int,
    workdir: Path,
    *,
    scan: str = "fp32",
    retrieval: str = "exact",
    seed: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """Synthetic checkpoint + the ordinary export; returns the repository and timings."""
    started = time.monotonic()
    checkpoint = workdir / "checkpoint.pt"
    synthetic_checkpoint(source, n_items, checkpoint, seed)
    generated = time.monotonic() - started
    repo = workdir / "model_repository"
    metadata = export(
        checkpoint,
        repo,
        text_encoder=False,
        catalogue_scan=scan,
        retrieval=retrieval,
        log=lambda _m: None,
    )
    checkpoint.unlink()  # as large as the catalogue; the repository is what is served
    return repo, {
        "generate_seconds": generated,
        "export_seconds": float(metadata["export_seconds"]),
        "repository_mib": sum(f["bytes"] for f in metadata["files"].values()) / 2**20,
        "scorer_mib": sum(p.stat().st_size for p in (repo / contract.SCORER_MODEL / "1").iterdir())
        / 2**20,
        "ann": metadata.get("ann", {}),
    }
