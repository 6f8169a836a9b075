"""`make bench`: the gateway measured against the floor, direct Triton and a naive peer, then
against history length and catalogue size, on this machine, side by side in one run.

    python -m benchmarks.bench            # full: reports/bench/{results.md,results.json,bench.png}
    python -m benchmarks.bench --quick    # a few minutes: reports/bench-quick/ (git-ignored)

Systems, on the same requests (real MovieLens-1M histories, the gateway's own tensors):
  floor    the exported ONNX graphs chained in-process with onnxruntime (`benchmarks.floor`)
  triton   the `recommend` ensemble straight over gRPC with tritonclient (no gateway)
  gateway  `Recommend` end to end over gRPC
  naive    a tutorial-style gRPC server running the torch towers eagerly (`benchmarks.naive_server`)
at concurrency 1, 8 and 32 (closed loop). Then history lengths 10/50/200 and synthetic catalogues
of 10k/100k/1M generated item vectors (`benchmarks.synthetic_catalogue`), exported like a
trained model, the 1M one also through the ANN scorer, and (full mode only) 10M through the ANN
scorer; then training in one process and under torchrun.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import clients, procstat, report
from benchmarks.load import Run
from benchmarks.processes import ROOT, Stack, naive_peer, serving_stack, tiny_checkpoint
from benchmarks.stats import ratio
from benchmarks.synthetic_catalogue import export_synthetic
from benchmarks.workload import Workload, build_workload
from ltrec_core import contract
from server.catalogue import load_model_repository

Client = Callable[[Callable[[], None]], Coroutine[Any, Any, Run]]


@dataclass(frozen=True)
class Plan:
    requests: int  # per system and concurrency
    floor_requests: int  # the floor is cheap: more requests steady its figures
    concurrency: tuple[int, ...]
    history_lengths: tuple[int, ...]
    history_requests: int
    # (items, the scorer: "fp32"/"int8" exact scan precision, or "ann" for the Faiss index; an
    # ann row's recall is against the fp32 row of the same size, which must come first)
    scales: tuple[tuple[int, str], ...]
    scale_requests: int
    keep: int  # answers kept per run to compare recommendations
    warmup: int


# Catalogue sizes both modes run; an ann row's recall is against the fp32 row of its size.
SCALES = (
    (10_000, "fp32"),
    (100_000, "fp32"),
    (1_000_000, "fp32"),
    (1_000_000, "int8"),
    (1_000_000, "ann"),
)
FULL = Plan(
    requests=2000,
    floor_requests=10_000,
    concurrency=(1, 8, 32),
    history_lengths=(10, 50, 200),
    history_requests=1000,
    scales=(
        *SCALES,
        # The large catalogue, through the ANN scorer only (an exact fp32 scorer of this
        # size does not fit 2 cores' budget): checked against a numpy scan of its vectors. About
        # 9 minutes, 13 GB of repository on disk for the while, 12 GB of Triton memory.
        (10_000_000, "ann"),
    ),
    scale_requests=500,
    keep=200,
    warmup=50,
)
QUICK = replace(
    FULL,
    scales=SCALES,
    requests=300,
    floor_requests=2000,
    history_requests=200,
    scale_requests=120,
    keep=100,
    warmup=20,
)
SECTIONS = ("systems", "history", "scale", "training")


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = procstat.parse_status_kib(Path("/proc/meminfo").read_text(), "MemTotal")
    cores = os.cpu_count() or 1
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gib": memory_kib / 2**20,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": os.getloadavg()[0],
        "summary": f"{cpu}, {cores} cores, {memory_kib / 2**20:.0f} GiB",
    }


def measure(
    client: Client, pids: dict[str, int], gateway_metrics_url: str = ""
) -> tuple[Run, dict[str, Any]]:
    """Runs a client; CPU and memory of each named process tree (and of this client process)
    over the measured requests only (meters start after the warm-up), and with a gateway's
    metrics page, the mean time per request of each gateway stage."""
    meters = {name: procstat.CpuMeter(pid) for name, pid in pids.items()}
    me = os.getpid()
    marks: dict[str, float] = {}
    stages: dict[str, float] = {}

    def on_start() -> None:
        if gateway_metrics_url:
            stages.update(gateway_seconds(gateway_metrics_url))
        for meter in meters.values():
            meter.start()
        marks["client_cpu"] = procstat.read_pids([me]).cpu_seconds
        marks["t0"] = time.perf_counter()

    run = asyncio.run(client(on_start))
    wall = time.perf_counter() - marks["t0"]
    client_cpu = procstat.read_pids([me]).cpu_seconds - marks["client_cpu"]
    peaks = {name: meter.stop().peak_rss_mib for name, meter in meters.items()}
    cpu_percent = {name: 100 * m.cpu_seconds / wall for name, m in meters.items()}
    server_cpu = sum(m.cpu_seconds for m in meters.values())
    row = {
        **run.summary.to_dict(),
        "cpu_percent": {**cpu_percent, "client": 100 * client_cpu / wall},
        "cpu_ms_per_request": 1e3 * server_cpu / run.summary.requests,
        "peak_rss_mib": peaks,
    }
    if gateway_metrics_url:
        after = gateway_seconds(gateway_metrics_url)
        answered = run.summary.requests + run.summary.errors
        row["gateway_stage_ms"] = {k: 1e3 * (after[k] - stages[k]) / answered for k in after}
    return run, row


GATEWAY_METRICS = (
    ("ltrec_gateway_request_duration_seconds", 'code="OK",method="Recommend"', "handler"),
    ("ltrec_gateway_stage_duration_seconds", 'stage="validate"', "validate"),
    ("ltrec_gateway_stage_duration_seconds", 'stage="features"', "features"),
    ("ltrec_gateway_stage_duration_seconds", 'stage="triton"', "triton"),
    ("ltrec_gateway_stage_duration_seconds", 'stage="postprocess"', "postprocess"),
)


def gateway_seconds(metrics_url: str) -> dict[str, float]:
    """Cumulative seconds the gateway reports per stage (its own Prometheus histograms)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for metric, labels, name in GATEWAY_METRICS:
        found[name] = procstat.prometheus_sums(text, metric).get(labels, float("nan"))
    return found


def run_floor(
    repo: Path, workload: Workload, concurrency: tuple[int, ...], keep: int, workdir: Path
) -> list[dict[str, Any]]:
    """`benchmarks.floor` in its own process, so that its CPU and memory are its own."""
    tensors = workdir / "tensors.pkl"
    out = workdir / "floor.json"
    tensors.write_bytes(pickle.dumps(workload.tensors))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.floor",
            f"--model-repository={repo}",
            f"--tensors={tensors}",
            f"--out={out}",
            f"--keep={keep}",
            "-c",
            *map(str, concurrency),
        ],
        cwd=ROOT,
        check=True,
    )
    runs: list[dict[str, Any]] = json.loads(out.read_text())
    tensors.unlink()
    for r in runs:
        wall = r["requests"] / r["throughput_rps"]
        cpu_seconds = r.pop("cpu_seconds")
        r["cpu_percent"] = {"floor": 100 * cpu_seconds / wall}
        r["cpu_ms_per_request"] = 1e3 * cpu_seconds / r["requests"]
        r["peak_rss_mib"] = {"floor": r["peak_rss_mib"]}
    return runs


def same_lists(a: dict[int, Any], b: dict[int, Any]) -> tuple[int, int]:
    """(requests whose answers are identical, requests compared)."""
    common = sorted(set(a) & set(b))
    return sum(list(a[i]) == list(b[i]) for i in common), len(common)


def systems_section(
    plan: Plan,
    repo: Path,
    checkpoint: Path,
    workload: Workload,
    floor_workload: Workload,
    workdir: Path,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    _, catalogue = load_model_repository(repo)
    floor_by_c: dict[int, dict[str, Any]] = {}
    floor_answers: dict[int, list[str]] = {}
    rows: list[dict[str, Any]] = []
    kept: dict[str, dict[int, Any]] = {}
    with (
        serving_stack(repo, workdir / "logs") as stack,
        naive_peer(checkpoint, repo, workdir / "logs") as (naive_address, naive_pid),
    ):
        for c in plan.concurrency:
            # The floor at each concurrency just before the systems compared with it (the
            # servers idle meanwhile): a machine whose speed drifts over the run moves both.
            (floor_row,) = run_floor(
                repo, floor_workload, (c,), plan.keep if not floor_by_c else 0, workdir
            )
            answers = floor_row.pop("top_items")
            if not floor_by_c:
                floor_answers = {
                    int(i): [catalogue.item_ids[j] for j in items] for i, items in answers.items()
                }
            floor_by_c[c] = floor_row
            rows.append({"system": "floor", **floor_row})
            log(
                f"  floor    c={c:<3} p50 {floor_row['p50_ms']:7.2f} ms  p99 "
                f"{floor_row['p99_ms']:7.2f} ms  {floor_row['throughput_rps']:8.1f} req/s"
            )
            keep = plan.keep if c == 8 else 0
            runs: list[tuple[str, Client, dict[str, int]]] = [
                (
                    "triton",
                    _triton_client(stack, workload, c, plan.warmup, keep),
                    {"triton": stack.triton_pid},
                ),
                (
                    "gateway",
                    _recommend_client(stack.gateway.address, workload, c, plan.warmup, keep),
                    {"gateway": stack.gateway_pid, "triton": stack.triton_pid},
                ),
                (
                    "naive",
                    _recommend_client(naive_address, workload, c, plan.warmup, keep),
                    {"naive": naive_pid},
                ),
            ]
            for name, client, pids in runs:
                url = stack.gateway_metrics_url if name == "gateway" else ""
                run, row = measure(client, pids, url)
                if run.first_error:
                    log(f"  {name} c={c}: {run.summary.errors} errors, first: {run.first_error}")
                if keep:
                    kept[name] = run.results
                floor = floor_by_c.get(c)
                row["p50_vs_floor"] = ratio(row["p50_ms"], floor["p50_ms"] if floor else None)
                row["rps_vs_floor"] = ratio(
                    row["throughput_rps"], floor["throughput_rps"] if floor else None
                )
                rows.append({"system": name, **row})
                log(
                    f"  {name:8} c={c:<3} p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
                    f"  {row['throughput_rps']:8.1f} req/s"
                )
    rows.sort(key=lambda r: (list(report.SYSTEM_LABELS).index(r["system"]), r["concurrency"]))
    naive_same, compared = same_lists(kept.get("naive", {}), kept.get("gateway", {}))
    floor_same, floor_compared = same_lists(floor_answers, kept.get("gateway", {}))
    triton_same, triton_compared = same_lists(
        {i: [catalogue.item_ids[j] for j in v] for i, v in kept.get("triton", {}).items()},
        kept.get("gateway", {}),
    )
    agreement = {
        "naive_identical": naive_same,
        "floor_identical": floor_same,
        "triton_identical": triton_same,
        "compared": compared,
        "text": (
            f"top-{workload.k} lists identical to the gateway's on {naive_same}/{compared} "
            f"requests for the naive peer (torch), {floor_same}/{floor_compared} for the floor, "
            f"{triton_same}/{triton_compared} for direct Triton"
        ),
    }
    return rows, agreement


def _triton_client(stack: Stack, workload: Workload, c: int, warmup: int, keep: int) -> Client:
    def client(on_start: Callable[[], None]) -> Coroutine[Any, Any, Run]:
        return clients.triton_direct(
            stack.triton.grpc_url,
            workload.tensors,
            c,
            warmup=warmup,
            keep=keep,
            on_start=on_start,
        )

    return client


def _recommend_client(address: str, workload: Workload, c: int, warmup: int, keep: int) -> Client:
    def client(on_start: Callable[[], None]) -> Coroutine[Any, Any, Run]:
        return clients.recommend(
            address, workload.requests, c, warmup=warmup, keep=keep, on_start=on_start
        )

    return client


def history_section(
    plan: Plan, repo: Path, events: Path, workdir: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    loaded = load_model_repository(repo)
    with serving_stack(repo, workdir / "logs-history") as stack:
        for length in plan.history_lengths:
            workload = build_workload(
                repo,
                plan.history_requests,
                history_length=length,
                events_path=events,
                loaded=loaded,
            )
            (floor,) = run_floor(repo, workload, (1,), 0, workdir)
            triton, _ = measure(_triton_client(stack, workload, 1, plan.warmup, 0), {})
            gateway, _ = measure(
                _recommend_client(stack.gateway.address, workload, 1, plan.warmup, 0), {}
            )
            row = {
                "history": length,
                "real_histories": workload.real_histories,
                "floor_p50_ms": floor["p50_ms"],
                "floor_p99_ms": floor["p99_ms"],
                "triton_p50_ms": triton.summary.p50_ms,
                "triton_p99_ms": triton.summary.p99_ms,
                "gateway_p50_ms": gateway.summary.p50_ms,
                "gateway_p99_ms": gateway.summary.p99_ms,
            }
            rows.append(row)
            log(
                f"  history {length:<4} floor {row['floor_p50_ms']:.2f}  Triton "
                f"{row['triton_p50_ms']:.2f}  gateway {row['gateway_p50_ms']:.2f} ms (p50)"
            )
    return rows


def _at_weight(workload: Workload, weight: float) -> Workload:
    """The same requests with every long-tail weight set to `weight`."""
    tensors = [
        {**t, contract.LONG_TAIL_WEIGHT: np.full_like(t[contract.LONG_TAIL_WEIGHT], weight)}
        for t in workload.tensors
    ]
    return replace(workload, tensors=tensors)


def scale_section(
    plan: Plan, checkpoint: Path, workdir: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # exact fp32 answers per catalogue size, at the default weight and at 0
    reference: dict[int, dict[str, dict[int, list[str]]]] = {}
    reference_kind: dict[int, str] = {}
    ann_sizes = {items for items, scan in plan.scales if scan == "ann"}
    for items, scan in plan.scales:
        folder = workdir / f"scale-{items}-{scan}"
        shutil.rmtree(folder, ignore_errors=True)
        log(f"  {items:,} items ({scan}): generating and exporting")
        ann = scan == "ann"
        repo, exported = export_synthetic(
            checkpoint,
            items,
            folder,
            scan="fp32" if ann else scan,
            retrieval="ann" if ann else "exact",
        )
        loaded = load_model_repository(repo)
        ids = loaded[1].item_ids
        # Same seed, same catalogue ids: every run of one size gets the same requests.
        workload = build_workload(repo, plan.scale_requests, history_length=50, loaded=loaded)
        weights = {"default": loaded[0].default_long_tail_weight, "zero": 0.0}
        floor: dict[str, Any] = {}
        recall: dict[str, float | None] = {"default": None, "zero": None}
        if ann and items not in reference:
            # No served fp32 row of this size (at 10M it would not fit the 2-core budget): the
            # exact answers by a numpy scan of the scorer's own fp32 vectors, in-process.
            started = time.monotonic()
            reference[items] = {
                key: exact_answers(repo, workload, weight, ids) for key, weight in weights.items()
            }
            reference_kind[items] = "numpy scan"
            log(f"  exact reference (numpy scan, in-process) in {time.monotonic() - started:.0f} s")
        if not ann:
            (floor,) = run_floor(repo, workload, (1,), plan.scale_requests, folder)
            answers = {int(i): [ids[j] for j in v] for i, v in floor["top_items"].items()}
            if scan == "fp32":
                reference[items] = {"default": answers}
                reference_kind[items] = "served fp32"
                if items in ann_sizes:
                    zero = _at_weight(workload, 0.0)
                    (at_zero,) = run_floor(repo, zero, (1,), plan.scale_requests, folder)
                    reference[items]["zero"] = {
                        int(i): [ids[j] for j in v] for i, v in at_zero["top_items"].items()
                    }
            elif items in reference:
                recall["default"] = _recall(reference[items]["default"], answers)
        with serving_stack(repo, folder / "logs") as stack:
            loaded_rss = procstat.read_tree(stack.triton_pid)
            keep = plan.scale_requests if ann else 0
            triton, _ = measure(_triton_client(stack, workload, 1, plan.warmup, keep), {})
            if ann and items in reference:
                for key, weight in weights.items():
                    run = triton
                    if key == "zero":
                        run, _ = measure(
                            _triton_client(stack, _at_weight(workload, weight), 1, 0, keep), {}
                        )
                    got = {
                        i: [ids[j] for j in np.asarray(r).reshape(-1)]
                        for i, r in run.results.items()
                    }
                    recall[key] = _recall(reference[items][key], got)
            gateway, _ = measure(
                _recommend_client(stack.gateway.address, workload, 1, plan.warmup, 0), {}
            )
            peak = procstat.read_tree(stack.triton_pid)
            # The runs above send one request at a time; as many at once as the ensemble's largest
            # batch show what batched scans hold (onnxruntime's arena keeps its largest).
            measure(_triton_client(stack, workload, contract.MAX_BATCH_SIZE, 0, 0), {})
            batched = procstat.read_tree(stack.triton_pid)
        row = {
            "items": items,
            "scan": scan,
            **exported,
            "triton_rss_mib": loaded_rss.rss_mib,
            "triton_peak_rss_mib": peak.peak_rss_mib,
            "triton_peak_batched_rss_mib": batched.peak_rss_mib,
            "floor_p50_ms": floor.get("p50_ms"),
            "floor_p99_ms": floor.get("p99_ms"),
            "triton_p50_ms": triton.summary.p50_ms,
            "triton_p99_ms": triton.summary.p99_ms,
            "gateway_p50_ms": gateway.summary.p50_ms,
            "gateway_p99_ms": gateway.summary.p99_ms,
            "gateway_rps": gateway.summary.throughput_rps,
            "recall_vs_fp32": recall["default"],
            "recall_vs_fp32_weight_0": recall["zero"],
            "reference": reference_kind.get(items) if ann else None,
            "ann_index": _ann_index_text(exported["ann"]) if ann else None,
        }
        rows.append(row)
        log(
            f"  {items:,} items ({scan}): export {row['export_seconds']:.1f} s, Triton "
            f"{row['triton_peak_rss_mib']:.0f} MiB peak "
            f"({row['triton_peak_batched_rss_mib']:.0f} at concurrency {contract.MAX_BATCH_SIZE}), "
            f"gateway p50 {row['gateway_p50_ms']:.2f}"
            f" p99 {row['gateway_p99_ms']:.2f} ms"
            + (f", recall vs fp32 {recall['default']:.4f}" if recall["default"] is not None else "")
            + (f" (weight 0: {recall['zero']:.4f})" if recall["zero"] is not None else "")
        )
        shutil.rmtree(repo, ignore_errors=True)  # hundreds of MB at a million items
    return rows


def _ann_index_text(ann: dict[str, Any]) -> str:
    """The ANN scorer's index as the export built it (its metadata's `ann.index`)."""
    spec = ann.get("index", {})
    if spec.get("kind") == "hnsw":
        return f"hnsw M {spec['hnsw_m']}, efSearch {spec['ef_search']}"
    return f"ivf {spec['ivf_encoding']}, {spec['ivf_lists']} lists, nprobe {spec['nprobe']}"


def exact_answers(
    repo: Path, workload: Workload, weight: float, ids: list[str]
) -> dict[int, list[str]]:
    """Each request's exact top-k at `weight` (history and exclusions left out, as the scorer
    does): the weighted user from the exported ONNX graphs, scored against every row of the ANN
    scorer's fp32 vectors and log-popularity (`ann_index.exact_top_k`)."""
    from benchmarks.floor import InProcessRecommender
    from export_scripts import ann_index, ann_scorer

    folder = repo / contract.SCORER_MODEL / "1"
    vectors = np.load(folder / ann_scorer.VECTORS_FILE, mmap_mode="r")
    log_popularity = np.load(folder / ann_scorer.LOG_POPULARITY_FILE)
    model = InProcessRecommender(repo, scorer=False)
    users = np.concatenate([model.weighted_user(t) for t in workload.tensors])
    del model
    blocked = [
        set(np.concatenate([t[contract.HISTORY_ITEMS][0], t[contract.EXCLUDE_ITEMS][0]]).tolist())
        for t in workload.tensors
    ]
    k = workload.k
    fetch = k + max(len(b) for b in blocked)
    answers: dict[int, list[str]] = {}
    batch = 64  # bounded temporaries: [batch, chunk] scores
    for start in range(0, len(users), batch):
        top = ann_index.exact_top_k(
            vectors, log_popularity, users[start : start + batch], weight, fetch
        )
        for i, rows in enumerate(top.tolist(), start):
            answers[i] = [ids[r] for r in rows if r not in blocked[i]][:k]
    return answers


def _recall(reference: dict[int, list[str]], answers: dict[int, list[str]]) -> float:
    """Mean share of the reference top-k found in the other top-k (same requests)."""
    shares = [
        len(set(reference[i]) & set(answers[i])) / len(reference[i])
        for i in reference
        if i in answers and reference[i]
    ]
    return sum(shares) / len(shares)


TEN_MILLION = 10_000_000  # the large-catalogue target size


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {(r["system"], r["concurrency"]): r for r in results.get("systems", [])}
    targets: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool | None) -> None:
        targets.append({"target": target, "measured": measured, "met": met})

    gateway1, triton1 = rows.get(("gateway", 1)), rows.get(("triton", 1))
    if gateway1 and triton1:
        overhead = gateway1["p50_ms"] - triton1["p50_ms"]
        add(
            "gateway overhead over direct Triton ≤ 1 ms (p50, concurrency 1)",
            f"{overhead:.2f} ms ({gateway1['p50_ms']:.2f} vs {triton1['p50_ms']:.2f})",
            overhead <= 1.0,
        )
    gateway32, floor32 = rows.get(("gateway", 32)), rows.get(("floor", 32))
    if gateway32 and floor32:
        share = gateway32["throughput_rps"] / floor32["throughput_rps"]
        add(
            "Recommend throughput ≥ ½ the floor's (concurrency 32)",
            f"{share:.2f} ({gateway32['throughput_rps']:.0f} vs "
            f"{floor32['throughput_rps']:.0f} req/s)",
            share >= 0.5,
        )
    gateway8, naive8 = rows.get(("gateway", 8)), rows.get(("naive", 8))
    if gateway8 and naive8:
        agreement = results["agreement"]
        times = gateway8["throughput_rps"] / naive8["throughput_rps"]
        same = agreement["naive_identical"] == agreement["compared"] > 0
        add(
            "≥ 10× the naive peer's throughput (concurrency 8), same recommendations",
            f"{times:.1f}× ({gateway8['throughput_rps']:.0f} vs "
            f"{naive8['throughput_rps']:.0f} req/s); identical lists "
            f"{agreement['naive_identical']}/{agreement['compared']}",
            times >= 10 and same,
        )
    million = [r for r in results.get("scale", []) if r["items"] >= 1_000_000]
    for r in million:
        if r["scan"] == "ann":
            recalls = (r.get("recall_vs_fp32"), r.get("recall_vs_fp32_weight_0"))
            known = [x for x in recalls if x is not None]
            add(
                f"{r['items'] / 1e6:g}M items (ANN): Recall@10 vs exact ≥ 0.95 at the default "
                "weight and at 0, Recommend p99 < 50 ms (concurrency 1); Triton memory reported",
                "recall "
                + " / ".join("–" if x is None else f"{x:.3f}" for x in recalls)
                + f" (exact: {r.get('reference') or '–'}), p99 {r['gateway_p99_ms']:.1f} ms, "
                f"Triton peak {r['triton_peak_rss_mib']:.0f} MiB",
                len(known) == 2 and min(known) >= 0.95 and r["gateway_p99_ms"] < 50,
            )
            continue
        add(
            f"{r['items'] / 1e6:g}M items ({r['scan']}): Recommend p99 < 50 ms (concurrency 1), "
            "Triton < 2 GB",
            f"p99 {r['gateway_p99_ms']:.1f} ms, Triton peak {r['triton_peak_rss_mib']:.0f} MiB",
            r["gateway_p99_ms"] < 50 and r["triton_peak_rss_mib"] < 2000,
        )
    training = {r["processes"]: r for r in results.get("training", [])}
    if 1 in training and 2 in training:
        one, two = training[1], training[2]
        gap = abs(two["final_ndcg"] - one["final_ndcg"])
        add(
            "`torchrun --nproc_per_node 2` on the tiny dataset: final validation NDCG@10 within "
            "0.01 of one process, wall time reported",
            f"{two['final_ndcg']:.4f} vs {one['final_ndcg']:.4f} (gap {gap:.4f}); wall "
            f"{two['wall_s']:.1f} s vs {one['wall_s']:.1f} s",
            gap <= 0.01,
        )
    scale = results.get("scale")
    if scale and not any(r["scan"] == "ann" and r["items"] >= TEN_MILLION for r in scale):
        add(
            f"{TEN_MILLION / 1e6:g}M items (ANN): Recall@10 vs exact ≥ 0.95 at the default weight "
            "and at 0, Recommend p99 < 50 ms (concurrency 1); Triton memory reported",
            f"not measured in this run (`--sections scale --scales {TEN_MILLION}:ann`)",
            None,
        )
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests: a few minutes")
    parser.add_argument("--out", type=Path, help="default reports/bench (quick: bench-quick)")
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/ml-1m/checkpoint.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--update-readme", type=Path, help="rewrite its bench section")
    parser.add_argument(
        "--scales",
        nargs="+",
        metavar="ITEMS:SCORER",
        help="catalogue sizes instead of the plan's, e.g. 10000000:fp32 10000000:ann (the 10M "
        "run: too slow and too large for `make bench` on 2 cores)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.scales:
        scales = []
        for spec in args.scales:
            items, _, scorer = spec.partition(":")
            if not items.isdigit() or scorer not in ("fp32", "int8", "ann"):
                parser.error(f"--scales takes ITEMS:fp32|int8|ann, got {spec!r}")
            scales.append((int(items), scorer))
        plan = replace(plan, scales=tuple(scales))
    out = args.out or Path("reports/bench-quick" if args.quick else "reports/bench")
    started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    checkpoint = args.checkpoint
    model_note = f"trained checkpoint {checkpoint}"
    if not checkpoint.is_file():
        if not args.quick:
            log(f"error: no checkpoint at {checkpoint}: run `make train` (or use --quick)")
            return 2
        log(f"no checkpoint at {checkpoint}: training a tiny one (quick mode)")
        checkpoint = tiny_checkpoint(workdir)
        model_note = "tiny checkpoint trained on a MovieLens-1M slice (quick mode, no trained one)"
    checkpoint = checkpoint.resolve()

    from export_scripts.export import export

    repo = workdir / "model_repository"
    log(f"exporting {checkpoint} to {repo}")
    metadata = export(checkpoint, repo, text_encoder=False, log=lambda _m: None)
    events = args.data / "events.parquet"
    loaded = load_model_repository(repo)
    floor_workload = build_workload(repo, plan.floor_requests, events_path=events, loaded=loaded)
    workload = floor_workload.head(plan.requests)  # the floor's first requests, the same ones
    results: dict[str, Any] = {
        "quick": args.quick,
        "machine": info,
        "model": {
            "description": (
                f"{model_note}; {metadata['n_items']:,} items, {metadata['embedding_dim']}-d, "
                f"export {metadata['export_seconds']:.1f} s"
            ),
            "model_version": metadata["model_version"],
            "n_items": metadata["n_items"],
            "max_history": metadata["max_history"],
            "export_seconds": metadata["export_seconds"],
        },
        "workload": (
            f"{'real' if workload.real_histories else 'sampled'} histories of "
            f"{workload.history_length} events, k = {workload.k}, {plan.requests:,} requests per "
            f"system and concurrency ({plan.floor_requests:,} for the floor)"
        ),
        "plan": plan.__dict__,
    }
    if "systems" in args.sections:
        log("serving paths:")
        results["systems"], results["agreement"] = systems_section(
            plan, repo, checkpoint, workload, floor_workload, workdir, log
        )
    if "history" in args.sections:
        log("history length:")
        results["history"] = history_section(plan, repo, events, workdir, log)
    if "scale" in args.sections:
        log("catalogue size:")
        results["scale"] = scale_section(plan, checkpoint, workdir, log)
    if "training" in args.sections:
        log("multi-process training (torchrun, the tiny dataset):")
        from benchmarks import ddp

        results["training"] = ddp.compare((1, 2))
        for row in results["training"]:
            log(
                f"  {row['processes']} process(es): wall {row['wall_s']:.1f} s, final "
                f"validation NDCG@10 {row['final_ndcg']:.4f}"
            )
    results["machine"]["load_after"] = os.getloadavg()[0]
    results["targets"] = evaluate_targets(results)
    results["seconds"] = time.monotonic() - started

    out.mkdir(parents=True, exist_ok=True)
    text = report.markdown(results)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report.plot(results, out / "bench.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'bench.png'}")
    if args.update_readme:
        # without the title line, its headings one level down inside the README's section
        section = text.split("\n", 2)[2].replace("\n## ", "\n### ")
        if report.update_readme(args.update_readme, section):
            print(f"updated the benchmark section of {args.update_readme}")
        else:
            log(f"{args.update_readme} has no {report.README_BEGIN} marker; not updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
