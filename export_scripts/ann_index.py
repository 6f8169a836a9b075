"""The ANN scorer's files: the Faiss index of the folded catalogue and what the re-rank reads.

The index kind and its parameters were chosen by measurement (`python -m benchmarks.ann_sweep`,
reports/bench/ann_sweep.md): HNSW over the folded vectors (inner product), which at a million
generated items reached the recall target at the lowest latency; IVF stays selectable.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export_scripts import ann_scorer
from ltrec_core import contract

INDEX_KINDS = ("hnsw", "ivf")


@dataclass(frozen=True)
class IndexSpec:
    kind: str = "hnsw"
    hnsw_m: int = 16  # graph degree
    ef_construction: int = 128
    ef_search: int = 512
    ivf_lists: int = 0  # 0: 4·sqrt(N)
    nprobe: int = 32
    threads: int = 0  # build threads; 0: faiss' default (all cores)

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {self.kind!r}")


DEFAULT_SPEC = IndexSpec()


def scorer_tensors() -> dict[str, str]:
    """The ANN scorer's roles -> the contract's tensor names (the exact scorer's io)."""
    return {
        "user": contract.WEIGHTED_USER_EMBEDDING,
        "history": contract.HISTORY_ITEMS,
        "exclude": contract.EXCLUDE_ITEMS,
        "weight": contract.LONG_TAIL_WEIGHT,
        "top_k": contract.TOP_K,
        "extra_vectors": contract.EXTRA_ITEM_VECTORS,
        "extra_popularity": contract.EXTRA_POPULARITY,
        "eligible": contract.ITEM_ELIGIBLE,
        "top_items": contract.TOP_ITEMS,
        "top_scores": contract.TOP_SCORES,
        "reasons": contract.REASON_POSITIONS,
    }


def build_index(folded: np.ndarray, spec: IndexSpec = DEFAULT_SPEC) -> Any:
    """An inner-product index over `folded` rows (`ann_scorer.fold_items`), row i with id i."""
    import faiss

    if spec.threads:
        faiss.omp_set_num_threads(spec.threads)
    n, dim = folded.shape
    folded = np.ascontiguousarray(folded, dtype=np.float32)
    index: Any
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    else:
        lists = spec.ivf_lists or max(1, min(int(4 * np.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = folded[np.random.default_rng(0).permutation(n)[: max(lists * 64, 10_000)]]
        index.train(sample)
        index.nprobe = spec.nprobe
    chunk = 262_144
    for start in range(0, n, chunk):
        index.add(folded[start : start + chunk])
    return index


def write_ann_scorer(
    directory: Path,
    item_table: np.ndarray,
    popularity: np.ndarray,
    spec: IndexSpec = DEFAULT_SPEC,
    log: Any = print,
) -> dict[str, Any]:
    """The ANN scorer's version folder: `model.py` (`ann_scorer`), the index, the vectors and
    log-popularity of the exact re-rank, and the search settings. Returns build figures."""
    import faiss

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(ann_scorer.__file__), directory / "model.py")
    table = np.ascontiguousarray(item_table, dtype=np.float32)
    log_popularity = np.log1p(np.asarray(popularity, dtype=np.float32))
    np.save(directory / ann_scorer.VECTORS_FILE, table)
    np.save(directory / ann_scorer.LOG_POPULARITY_FILE, log_popularity)
    started = time.monotonic()
    scale = ann_scorer.popularity_scale(table, log_popularity)
    index = build_index(ann_scorer.fold_items(table, log_popularity, scale), spec)
    build_seconds = time.monotonic() - started
    faiss.write_index(index, str(directory / ann_scorer.INDEX_FILE))
    settings = ann_scorer.SearchSettings(
        tensors=scorer_tensors(),
        ef_search=spec.ef_search,
        nprobe=spec.nprobe,
        popularity_scale=scale,
        index=asdict(spec),
    )
    (directory / ann_scorer.SETTINGS_FILE).write_text(settings.to_json())
    log(f"ANN index ({spec.kind}) of {len(table) - 1:,} items built in {build_seconds:.1f} s")
    return {
        "kind": spec.kind,
        "build_seconds": round(build_seconds, 2),
        "index_bytes": (directory / ann_scorer.INDEX_FILE).stat().st_size,
    }


# An export whose index finds less than this share of the exact top 10 on its check is broken,
# not approximate, and fails.
MIN_CHECK_RECALL = 0.8


def exact_top_k(
    table: np.ndarray, log_popularity: np.ndarray, users: np.ndarray, weight: float, k: int
) -> np.ndarray:
    """[B, k] trained rows with the best exact adjusted scores (padding left out), in chunks."""
    best_scores = np.full((len(users), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(users), 0), dtype=np.int64)
    chunk = 262_144
    for start in range(1, len(table), chunk):
        stop = min(start + chunk, len(table))
        scores = users @ table[start:stop].T - weight * log_popularity[start:stop]
        take = min(k, stop - start)
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        ids = np.concatenate([best_ids, part + start], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, keep, 1)
        best_ids = np.take_along_axis(ids, keep, 1)
    return best_ids


def check_recall(
    directory: Path, weights: tuple[float, ...], rng: np.random.Generator, n: int = 32, k: int = 10
) -> dict[str, float]:
    """Recall@k of the written scorer against the exact scan, on users drawn like the items
    (the bench measures it on real users), per long-tail weight."""
    scorer = ann_scorer.AnnScorer.load(directory)
    table = np.asarray(scorer.vectors)
    k = min(k, len(table) - 1)
    rows = rng.integers(1, len(table), size=(n, 8))
    users = table[rows].mean(axis=1) * np.sqrt(8)  # an item's scale, not a single item's
    figures = {}
    for weight in weights:
        truth = exact_top_k(table, scorer.log_popularity, users, weight, k)
        got, _, _ = scorer.score(
            users.astype(np.float32),
            np.zeros((n, 1), dtype=np.int64),
            np.zeros((n, 1), dtype=np.int64),
            np.full((n, 1), weight, dtype=np.float32),
            k,
            np.zeros((0, table.shape[1]), dtype=np.float32),
            np.zeros(0, dtype=np.float32),
            np.ones((n, 1), dtype=bool),
        )
        found = [
            len(set(g) & set(t)) / k for g, t in zip(got.tolist(), truth.tolist(), strict=True)
        ]
        figures[f"recall@{k}_weight_{weight:g}"] = round(float(np.mean(found)), 4)
    return figures
