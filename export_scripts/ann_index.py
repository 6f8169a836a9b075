"""The ANN scorer's files: the Faiss index of the folded catalogue and what the re-rank reads.

The index kind and its parameters were chosen by measurement (`python -m benchmarks.ann_sweep`,
reports/bench/ann_sweep.md: generated catalogues, 300 real queries, the scorer's 107 candidates
re-ranked exactly, 2 shared cores; CPU seconds of the build, search on one thread):

    100k items  HNSW M16/efC128  build 18 CPU s   efSearch 256: recall@10 0.987, p50 0.35 ms
                IVF-Flat 1264    build  6 CPU s   nprobe 256:   recall@10 0.998, p50 0.38 ms
    1M items    IVF-Flat 4000    build 56 CPU s   nprobe 256:   recall@10 0.974, p50 1.1 ms
                                                  nprobe 128:   0.909; nprobe 512: 0.996, 5 ms
                HNSW M16/efC128  over 38 min wall (not swept again; about 10x the 100k build
                                 in CPU at the least)

    10M items   IVF-Flat 4096    build 110 CPU s  nprobe 256:   recall@10 0.983, p50 15 ms
                                                  nprobe 512:   0.997, p50 29 ms, p99 49-58 ms

(the same at long-tail weight 0 and at the default). Served through the gateway, nprobe 256
gave recall@10 0.951 and 0.944 against the exact scan (two runs at 1M): on the 0.95 line, so the
default probes 512 lists (0.996 in the sweep, 5 ms). Served at 10M (`reports/bench-10m`), the
served queries are harder than the sweep's: 262 lists gave 0.912 (0.983 in the sweep), 512 gave
0.969 at p99 39 ms, each query's lists searched by every core (`ann_scorer`). A probe scans
N / lists rows, so the default is a scan budget (`nprobe_for`: 1.3M rows, at most 512 lists):
512 lists up to 10M items, fewer beyond.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from export_scripts import ann_scorer
from ltrec_core import contract

# Faiss' OpenMP threads sleep rather than spin while they wait (read when faiss loads, after
# this import): on 2 cores shared with other work, spinning threads made an IVF build 2-4x
# slower (the same IVF1024 train and add: 6.0 s and 3.0 s spinning, 2.6 s and 0.7 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

INDEX_KINDS = ("auto", "hnsw", "ivf")
IVF_ENCODINGS = ("flat", "sq8")  # what an IVF list stores: fp32 rows, or 8 bits a dimension
# "auto": HNSW below this many rows, IVF-Flat from here (the module docstring's figures).
IVF_MIN_ITEMS = 100_000


# IVF search budget: about this many rows scanned per query (nprobe lists of N / lists rows), at
# most IVF_MAX_NPROBE lists. Up to 10M items (4096 lists of about 2,400 rows) the cap binds: served
# at 10M, 512 lists gave recall@10 0.969 against the exact scan at p99 39 ms (the scorer splits a
# query's lists between the cores), where a 640k-row budget (262 lists) gave 0.912
# (reports/bench-10m). Past that the budget keeps a query's scan, and its latency, bounded.
IVF_SCAN_ROWS = 1_300_000
IVF_MAX_NPROBE = 512


def nprobe_for(n_rows: int, lists: int) -> int:
    """Lists an IVF search probes by default: `IVF_SCAN_ROWS` rows' worth, at most
    `IVF_MAX_NPROBE` and every list, at least one."""
    if n_rows < 1 or lists < 1:
        raise ValueError(f"n_rows and lists must be at least 1, got {n_rows} and {lists}")
    return max(1, min(IVF_MAX_NPROBE, lists, IVF_SCAN_ROWS * lists // n_rows))


def ivf_lists_for(n_items: int) -> int:
    """IVF lists for `n_items`: about 4·sqrt(N), at least 39 training points a list (faiss'
    lower bound for k-means), at most 4096: assigning every row costs N · lists (56 CPU s at
    1M items and 4000 lists), so 10M items with 4096 lists is about ten times that, not forty."""
    return max(1, min(int(4 * np.sqrt(n_items)), n_items // 39, 4096))


@dataclass(frozen=True)
class IndexSpec:
    kind: str = "auto"
    hnsw_m: int = 16  # graph degree
    ef_construction: int = 128
    ef_search: int = 512
    ivf_lists: int = 0  # 0: ivf_lists_for(N)
    ivf_encoding: str = "flat"
    # 0: nprobe_for(N, lists): 512 at 1M items, 4000 lists (recall@10 0.996; served, 256 gave
    # 0.944-0.951) and at 10M (served 0.969, p99 39 ms), fewer beyond
    nprobe: int = 0
    threads: int = 0  # build threads; 0: faiss' default (all cores)

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.ivf_encoding not in IVF_ENCODINGS:
            raise ValueError(
                f"ivf_encoding must be one of {IVF_ENCODINGS}, got {self.ivf_encoding!r}"
            )
        for name in ("hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.nprobe < 0:
            raise ValueError(f"nprobe must be at least 0 (0: by catalogue size), got {self.nprobe}")

    def resolve(self, n_rows: int) -> IndexSpec:
        """The spec for an index of `n_rows` rows: the kind chosen ("auto") and the lists."""
        kind = self.kind
        if kind == "auto":
            kind = "ivf" if n_rows >= IVF_MIN_ITEMS else "hnsw"
        if kind != "ivf":
            return replace(self, kind=kind)
        lists = self.ivf_lists or ivf_lists_for(n_rows)
        return replace(
            self, kind=kind, ivf_lists=lists, nprobe=self.nprobe or nprobe_for(n_rows, lists)
        )


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
    spec = spec.resolve(n)
    folded = np.ascontiguousarray(folded, dtype=np.float32)
    index: Any
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    else:
        encoding = {"flat": "Flat", "sq8": "SQ8"}[spec.ivf_encoding]
        index = faiss.index_factory(
            dim, f"IVF{spec.ivf_lists},{encoding}", faiss.METRIC_INNER_PRODUCT
        )
        sample = folded[np.random.default_rng(0).permutation(n)[: max(spec.ivf_lists * 64, 10_000)]]
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
    spec = spec.resolve(len(table))
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
        "index": asdict(spec),
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
