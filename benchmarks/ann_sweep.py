"""The sweep that chose the ANN index: recall against the exact scan, search latency, build time
and size of HNSW and IVF (fp32 or 8-bit lists) on generated catalogues, on this machine (2 cores).

    python -m benchmarks.ann_sweep --items 100000 1000000   # reports/bench/ann_sweep.{md,json}

Queries are real: the trained user encoder and context weighting on real MovieLens-1M histories
(the trained catalogue's space, whose mean and covariance the generated vectors share). Recall@10
is measured at long-tail weight 0 and at the checkpoint's default, with the candidate count the
scorer fetches for an unfiltered request (`ann_scorer`) re-ranked exactly; latency is one query at
a time on one thread. HNSW is built only up to `--hnsw-max-items` (at a million items it took
over 38 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.floor import InProcessRecommender
from benchmarks.synthetic_catalogue import generated_item_table, zipf_popularity
from benchmarks.workload import build_workload
from export_scripts import ann_scorer
from export_scripts.ann_index import IndexSpec, build_index, ivf_lists_for
from export_scripts.export import checkpoint_long_tail_weight, export

K = 10
HISTORY = 50  # the scale bench's history length: blocked items the scorer over-fetches for


IVF_ENCODINGS = ("flat", "sq8")


def sweep_specs(
    items: int, hnsw_max_items: int, ivf_encodings: tuple[str, ...] = IVF_ENCODINGS
) -> list[tuple[IndexSpec, tuple[int, ...]]]:
    """(index, the efSearch or nprobe values searched) measured at `items`."""
    lists = ivf_lists_for(items)
    specs: list[tuple[IndexSpec, tuple[int, ...]]] = []
    if items <= hnsw_max_items:
        specs.append((IndexSpec(kind="hnsw", hnsw_m=16, ef_construction=128), (128, 256, 512)))
    if "flat" in ivf_encodings:
        specs.append(
            (IndexSpec(kind="ivf", ivf_lists=lists, ivf_encoding="flat"), (64, 128, 256, 512))
        )
    if "sq8" in ivf_encodings:
        specs.append((IndexSpec(kind="ivf", ivf_lists=lists, ivf_encoding="sq8"), (256,)))
    return specs


def real_queries(checkpoint: Path, data: Path, workdir: Path, n: int) -> np.ndarray:
    """[n, D] context-weighted user embeddings of real histories (kept in `workdir`)."""
    cached = workdir / f"queries-{n}.npy"
    if cached.is_file() and cached.stat().st_mtime > checkpoint.stat().st_mtime:
        return np.load(cached)
    repo = workdir / "trained_repository"
    export(checkpoint, repo, text_encoder=False, log=lambda _m: None)
    workload = build_workload(repo, n, events_path=data / "events.parquet")
    model = InProcessRecommender(repo)
    rows = [model.weighted_user(t)[0] for t in workload.tensors]
    queries = np.stack(rows).astype(np.float32)
    np.save(cached, queries)
    return queries


def exact_top(folded: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k rows (padding row 0 left out), by brute force in chunks."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), k), dtype=np.int64)
    chunk = 500_000
    for start in range(1, len(folded), chunk):
        scores = queries @ folded[start : start + chunk].T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        ids = np.concatenate([best_ids, part + start], axis=1)
        keep = np.argsort(-scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, keep, 1)
        best_ids = np.take_along_axis(ids, keep, 1)
    return best_ids


def run(
    sizes: list[int],
    checkpoint: Path,
    data: Path,
    workdir: Path,
    n_queries: int,
    hnsw_max_items: int,
    ivf_encodings: tuple[str, ...] = IVF_ENCODINGS,
) -> dict[str, Any]:
    import torch

    from ltrec.checkpoint import load_checkpoint

    queries = real_queries(checkpoint, data, workdir, n_queries)
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        reference = model.item_table().numpy()
    default_weight = checkpoint_long_tail_weight(checkpoint) or 0.0
    weights = sorted({0.0, default_weight})
    fetch = int((K + HISTORY + 1) * ann_scorer.SearchSettings(tensors={}).overfetch) + 16
    return {
        "queries": n_queries,
        "fetch": fetch,
        "weights": weights,
        "machine_cores": os.cpu_count(),
        "load": os.getloadavg()[0],
        "sizes": [
            sweep_size(items, reference, queries, weights, fetch, hnsw_max_items, ivf_encodings)
            for items in sizes
        ],
    }


def sweep_size(
    items: int,
    reference: np.ndarray,
    queries: np.ndarray,
    weights: list[float],
    fetch: int,
    hnsw_max_items: int,
    ivf_encodings: tuple[str, ...] = IVF_ENCODINGS,
) -> dict[str, Any]:
    import faiss

    n_queries = len(queries)
    rng = np.random.default_rng(0)
    table = generated_item_table(reference, items, rng)
    log_pop = np.log1p(zipf_popularity(items, rng).astype(np.float32))
    scale = ann_scorer.popularity_scale(table, log_pop)
    folded = ann_scorer.fold_items(table, log_pop, scale)
    del table
    truth = {
        w: exact_top(folded, ann_scorer.fold_queries(queries, np.full((n_queries, 1), w), scale), K)
        for w in weights
    }
    exact_ms = []
    timed = queries[:50]
    for q in ann_scorer.fold_queries(timed, np.zeros((len(timed), 1)), scale):
        started = time.perf_counter()
        exact_top(folded, q.reshape(1, -1), K)
        exact_ms.append((time.perf_counter() - started) * 1000)
    rows = []
    for spec, search_values in sweep_specs(items, hnsw_max_items, ivf_encodings):
        faiss.omp_set_num_threads(2)
        started, cpu_started = time.monotonic(), time.process_time()
        index = build_index(folded, spec)
        build_seconds = time.monotonic() - started
        build_cpu_seconds = time.process_time() - cpu_started
        faiss.omp_set_num_threads(1)
        hnsw = spec.kind == "hnsw"
        for value in search_values:
            row: dict[str, Any] = {
                "items": items,
                "index": "hnsw" if hnsw else f"ivf {spec.ivf_encoding}",
                "params": f"M {spec.hnsw_m}, efC {spec.ef_construction}"
                if hnsw
                else f"{spec.ivf_lists} lists",
                "search": f"efSearch {value}" if hnsw else f"nprobe {value}",
                "build_seconds": build_seconds,
                "build_cpu_seconds": build_cpu_seconds,
                "index_mib": faiss.serialize_index(index).nbytes / 2**20,
            }
            if hnsw:
                params: Any = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                    efSearch=max(value, fetch)
                )
            else:
                params = faiss.SearchParametersIVF(nprobe=value)  # type: ignore[call-arg]
            for w in weights:
                q = ann_scorer.fold_queries(queries, np.full((n_queries, 1), w), scale)
                latencies = []
                found = []
                for i in range(n_queries):
                    started = time.perf_counter()
                    _, ids = index.search(q[i : i + 1], fetch, params=params)
                    latencies.append((time.perf_counter() - started) * 1000)
                    cand = ids[0][ids[0] > 0]
                    top = cand[np.argsort(-(folded[cand] @ q[i]))[:K]]
                    found.append(len(set(top.tolist()) & set(truth[w][i].tolist())) / K)
                row[f"recall_w{w:g}"] = float(np.mean(found))
                row[f"p50_ms_w{w:g}"] = float(np.percentile(latencies, 50))
                row[f"p99_ms_w{w:g}"] = float(np.percentile(latencies, 99))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del index
    return {
        "items": items,
        "exact_scan_p50_ms": float(np.percentile(exact_ms, 50)),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    weights = result["weights"]
    head = ["items", "index", "params", "search", "build s", "build CPU s", "index MiB"]
    for w in weights:
        head += [f"recall@10 w={w:g}", f"p50 ms w={w:g}", f"p99 ms w={w:g}"]
    exact = ", ".join(
        f"{size['items']:,} items {size['exact_scan_p50_ms']:.1f} ms" for size in result["sizes"]
    )
    lines = [
        f"# ANN sweep: generated items, {result['queries']} real queries",
        "",
        f"Candidates fetched per query: {result['fetch']} (k = {K}, {HISTORY} history items "
        f"blocked, the scorer's over-fetch), re-ranked exactly. Exact scan (numpy, 1 query, "
        f"p50): {exact}. Search on 1 thread, build on {result['machine_cores']} cores shared with "
        f"other work (load average {result['load']:.1f}): build CPU seconds are the figure to "
        "compare, wall seconds and p99 depend on the load.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for size in result["sizes"]:
        for r in size["rows"]:
            cells = [
                f"{r['items']:,}",
                r["index"],
                r["params"],
                r["search"],
                f"{r['build_seconds']:.0f}",
                f"{r['build_cpu_seconds']:.0f}",
                f"{r['index_mib']:.0f}",
            ]
            for w in weights:
                cells += [
                    f"{r[f'recall_w{w:g}']:.3f}",
                    f"{r[f'p50_ms_w{w:g}']:.2f}",
                    f"{r[f'p99_ms_w{w:g}']:.2f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--hnsw-max-items", type=int, default=250_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument(
        "--ivf-encodings",
        nargs="+",
        choices=IVF_ENCODINGS,
        default=list(IVF_ENCODINGS),
        help="IVF list encodings built (sq8 doubles the build time at 10M items)",
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/ml-1m/checkpoint.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--workdir", type=Path, default=Path("build/ann-sweep"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(
        args.items,
        args.checkpoint,
        args.data,
        args.workdir,
        args.queries,
        args.hnsw_max_items,
        tuple(args.ivf_encodings),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (args.out / "ann_sweep.md").write_text(text)
    (args.out / "ann_sweep.json").write_text(json.dumps(result, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
