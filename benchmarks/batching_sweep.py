"""The sweep of Triton's dynamic batcher: which `triton_config.Batching` (preferred batch sizes,
max queue delay, instances per batching model) serves Recommend fastest, on this machine.

    python -m benchmarks.batching_sweep --checkpoint artifacts/ml-1m/checkpoint.pt
        # reports/bench/batching_sweep.{md,json}; about 10 minutes on 2 cores
    python -m benchmarks.batching_sweep --quick
        # 2 settings, few requests, a tiny checkpoint when there is no trained one:
        # reports/bench-quick/batching_sweep.{md,json} (git-ignored)

For each setting the checkpoint is exported with it (`export(..., batching=...)`), Triton and the
gateway start on that repository (`benchmarks.processes`), and the same closed-loop `Recommend`
load (real MovieLens-1M histories of 50 events, k = 10, the requests of `make bench`) runs at
concurrency 1, 8 and 32. Each run reports throughput, p50 and p99, its throughput against the
default setting's (`DEFAULT_BATCHING`) at the same concurrency, and, from Triton's statistics
API, how many executions the scorer needed for the requests it answered: fewer executions than
requests means batches formed. A baseline without the batcher shows what batching buys; the
default runs first and again last, so the spread between its two rows shows how much the
machine drifted during the sweep. The figures are only as steady as the machine is quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import tritonclient.grpc as triton_grpc

from benchmarks import clients
from benchmarks.bench import machine
from benchmarks.processes import serving_stack, tiny_checkpoint
from benchmarks.stats import fmt, ratio
from benchmarks.workload import Workload, build_workload
from export_scripts.triton_config import DEFAULT_BATCHING, Batching
from ltrec_core import contract

OUTPUT_NAME = "batching_sweep"
# Preferred batch sizes swept: none (the batcher forms the largest batch it can), the default's,
# and a wider ladder from 4 up to the scorer's largest batch.
PREFERRED_SIZES: tuple[tuple[int, ...], ...] = ((), (8, 16, 32), (4, 8, 16, 32, 64))
QUEUE_DELAYS_US = (0, 100, 500)
INSTANCES = (1, 2)
NO_BATCHER = Batching(preferred_batch_sizes=(), dynamic=False)


@dataclass(frozen=True)
class Plan:
    settings: tuple[Batching, ...]  # in the order run; the default first
    requests: int  # per setting and concurrency
    warmup: int
    concurrency: tuple[int, ...]
    repeat_default: bool  # run the default again at the end (drift during the sweep)


def full_grid(
    preferred: tuple[tuple[int, ...], ...] = PREFERRED_SIZES,
    delays_us: tuple[int, ...] = QUEUE_DELAYS_US,
    instances: tuple[int, ...] = INSTANCES,
) -> tuple[Batching, ...]:
    """The default, the baseline without a batcher, then every combination (the default once)."""
    grid = [DEFAULT_BATCHING, NO_BATCHER]
    for sizes in preferred:
        for delay in delays_us:
            for count in instances:
                setting = Batching(sizes, delay, count)
                if setting not in grid:
                    grid.append(setting)
    return tuple(grid)


FULL = Plan(
    settings=full_grid(), requests=600, warmup=30, concurrency=(1, 8, 32), repeat_default=True
)
QUICK = Plan(
    settings=(DEFAULT_BATCHING, NO_BATCHER),
    requests=160,
    warmup=10,
    concurrency=(1, 8, 32),
    repeat_default=False,
)


def label(batching: Batching) -> str:
    """A setting in words, for the log and the summary lines."""
    cells = describe(batching)
    if not batching.dynamic:
        return f"no batcher, {cells['instances']} instance(s)"
    return f"{cells['batcher']}, delay {cells['delay']} µs, {cells['instances']} instance(s)"


def describe(batching: Batching) -> dict[str, str]:
    """Table cells of a setting."""
    if not batching.dynamic:
        return {"batcher": "off", "delay": "–", "instances": str(batching.instances)}
    sizes = batching.preferred_batch_sizes
    return {
        "batcher": "preferred " + "/".join(map(str, sizes)) if sizes else "no preferred sizes",
        "delay": str(batching.max_queue_delay_microseconds),
        "instances": str(batching.instances),
    }


def triton_counts(url: str) -> dict[str, int]:
    """Cumulative counts from Triton's statistics API: Recommend requests the ensemble answered,
    and rows and executions of the scorer (one row per request; an execution runs a batch).
    Read until two reads agree: Triton may record a request just after its answer left."""
    last: dict[str, int] = {}
    with triton_grpc.InferenceServerClient(url) as client:
        for _ in range(40):
            (ensemble,) = client.get_inference_statistics(contract.ENSEMBLE_MODEL).model_stats
            (scorer,) = client.get_inference_statistics(contract.SCORER_MODEL).model_stats
            counts = {
                "requests": ensemble.inference_stats.success.count,
                "scorer_rows": scorer.inference_count,
                "scorer_executions": scorer.execution_count,
            }
            if counts == last:
                break
            last = counts
            time.sleep(0.05)
    return last


def sweep_setting(
    batching: Batching,
    repo: Path,
    requests: list[Any],
    plan: Plan,
    logs: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Start the stack on `repo` (exported with `batching`), run the load at each concurrency."""
    row: dict[str, Any] = {
        "setting": asdict(batching),
        **describe(batching),
        "load_before": os.getloadavg()[0],
        "runs": [],
    }
    started = time.monotonic()
    with serving_stack(repo, logs) as stack:
        row["stack_start_seconds"] = time.monotonic() - started
        url = stack.triton.grpc_url
        before: dict[str, int] = {}  # the counts once the warm-up is done

        def on_start() -> None:
            before.update(triton_counts(url))

        for c in plan.concurrency:
            run = asyncio.run(
                clients.recommend(
                    stack.gateway.address, requests, c, warmup=plan.warmup, on_start=on_start
                )
            )
            after = triton_counts(url)
            counts = {key: after[key] - before[key] for key in after}
            summary = run.summary
            row["runs"].append(
                {
                    **summary.to_dict(),
                    **counts,
                    "rows_per_execution": ratio(
                        counts["scorer_rows"], counts["scorer_executions"] or None
                    ),
                    "first_error": run.first_error,
                }
            )
            log(
                f"  c={c:<3} {summary.throughput_rps:7.1f} req/s  p50 {summary.p50_ms:6.2f}  "
                f"p99 {summary.p99_ms:6.2f} ms  scorer {counts['scorer_executions']} executions "
                f"for {counts['scorer_rows']} rows"
                + (f"  {summary.errors} errors, first: {run.first_error}" if summary.errors else "")
            )
    row["load_after"] = os.getloadavg()[0]
    return row


def _slug(batching: Batching) -> str:
    if not batching.dynamic:
        return f"off-i{batching.instances}"
    sizes = "-".join(map(str, batching.preferred_batch_sizes)) or "max"
    return f"p{sizes}-d{batching.max_queue_delay_microseconds}-i{batching.instances}"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each run's throughput against the default's first row at the same concurrency."""
    reference = next(r for r in rows if setting_of(r) == DEFAULT_BATCHING)
    by_c = {run["concurrency"]: run["throughput_rps"] for run in reference["runs"]}
    for row in rows:
        for run in row["runs"]:
            run["rps_vs_default"] = ratio(run["throughput_rps"], by_c.get(run["concurrency"]))


def setting_of(row: dict[str, Any]) -> Batching:
    """A result row's setting (JSON has lists where the dataclass has tuples)."""
    setting = dict(row["setting"])
    setting["preferred_batch_sizes"] = tuple(setting["preferred_batch_sizes"])
    return Batching(**setting)


def run(
    plan: Plan,
    checkpoint: Path,
    data: Path,
    workdir: Path,
    log: Callable[[str], None],
    *,
    quick: bool = False,
) -> dict[str, Any]:
    from export_scripts.export import export

    started = time.monotonic()
    info = machine()
    settings = list(plan.settings)
    if plan.repeat_default:
        settings.append(DEFAULT_BATCHING)
    repo = workdir / "model_repository"
    workload: Workload | None = None
    rows = []
    for i, batching in enumerate(settings, 1):
        log(f"[{i}/{len(settings)}] {label(batching)}")
        metadata = export(
            checkpoint, repo, text_encoder=False, batching=batching, log=lambda _m: None
        )
        if workload is None:  # the same catalogue in every export: the same requests
            workload = build_workload(repo, plan.requests, events_path=data / "events.parquet")
        logs = workdir / "logs" / f"{i:02d}-{_slug(batching)}"
        row = sweep_setting(batching, repo, workload.requests, plan, logs, log)
        row["export_seconds"] = metadata["export_seconds"]
        row["repeat"] = i > len(plan.settings)
        rows.append(row)
    assert workload is not None
    add_ratios(rows)
    info["load_after"] = os.getloadavg()[0]
    return {
        "quick": quick,
        "machine": info,
        "model": {"checkpoint": str(checkpoint), "catalogue_size": workload.catalogue_size},
        "workload": (
            f"{'real' if workload.real_histories else 'sampled'} histories of "
            f"{workload.history_length} events, k = {workload.k}, {plan.requests:,} requests "
            f"per setting and concurrency after {plan.warmup} warm-up requests"
        ),
        "plan": {**asdict(plan), "settings": [asdict(s) for s in plan.settings]},
        "default": asdict(DEFAULT_BATCHING),
        "rows": rows,
        "seconds": time.monotonic() - started,
    }


def markdown(result: dict[str, Any]) -> str:
    concurrency = result["plan"]["concurrency"]
    head = ["batcher", "delay µs", "instances"]
    for c in concurrency:
        head += [f"c={c} req/s", f"c={c} × default", f"c={c} p50 ms", f"c={c} p99 ms"]
        head += [f"c={c} scorer executions / requests"]
    lines = [
        f"# Triton dynamic batching sweep{' (quick)' if result['quick'] else ''}",
        "",
        f"{result['machine']['summary']}, {result['machine']['date']}; load average "
        f"{result['machine']['load_before']:.1f} before, {result['machine']['load_after']:.1f} "
        f"after ({result['seconds'] / 60:.1f} minutes). Model: {result['model']['checkpoint']} "
        f"({result['model']['catalogue_size']:,} items). Load: `Recommend` through the gateway, "
        f"closed loop, {result['workload']}.",
        "",
        "Settings apply to every batching model (user encoder, context weighting, scorer, item "
        "lookup). × default: throughput against the default's first row "
        f"({_default_text(result['default'])}) at the same concurrency; scorer executions / "
        "requests: Triton's statistics API over the measured requests (fewer executions than "
        "requests: batches formed). The default runs first and, in a full sweep, again last "
        "(repeat): the gap between the two is the drift of the machine during the sweep.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---:|---:|" + "---:|" * (len(head) - 3),
    ]
    for row in result["rows"]:
        batcher = row["batcher"]
        if setting_of(row) == DEFAULT_BATCHING:
            batcher += " (default, repeat)" if row.get("repeat") else " (default)"
        cells = [batcher, row["delay"], row["instances"]]
        for run in row["runs"]:
            vs = run.get("rps_vs_default")
            cells += [
                fmt(run["throughput_rps"], 0),
                "–" if vs is None else f"{vs:.2f}",
                fmt(run["p50_ms"]),
                fmt(run["p99_ms"]),
                f"{run['scorer_executions']:,} / {run['scorer_rows']:,}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_best_lines(result)]
    errors = [
        f"{row['batcher']}, c={run['concurrency']}: {run['errors']} ({run['first_error']})"
        for row in result["rows"]
        for run in row["runs"]
        if run["errors"]
    ]
    if errors:
        lines += ["", "Failed requests: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def _default_text(default: dict[str, Any]) -> str:
    sizes = "/".join(map(str, default["preferred_batch_sizes"])) or "none"
    return (
        f"preferred {sizes}, delay {default['max_queue_delay_microseconds']} µs, "
        f"{default['instances']} instance per model"
    )


def _best_lines(result: dict[str, Any]) -> list[str]:
    """The highest throughput at each concurrency (which setting, and by how much)."""
    lines = []
    for c in result["plan"]["concurrency"]:
        candidates = [
            (run["throughput_rps"], run.get("rps_vs_default"), row)
            for row in result["rows"]
            for run in row["runs"]
            if run["concurrency"] == c
        ]
        rps, vs, row = max(candidates, key=lambda t: t[0])
        versus = "" if vs is None else f", {vs:.2f}× the default"
        lines.append(
            f"- Highest throughput at c={c}: {label(setting_of(row))} ({rps:.0f} req/s{versus})."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 settings, few requests")
    parser.add_argument("--out", type=Path, help="default reports/bench (quick: bench-quick)")
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/ml-1m/checkpoint.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--workdir", type=Path, help="default build/batching-sweep[-quick]")
    parser.add_argument("--requests", type=int, help="per setting and concurrency")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help="default 1 8 32 (closed-loop callers)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.requests is not None:
        if args.requests < 1:
            parser.error(f"--requests must be >= 1, got {args.requests}")
        plan = replace(plan, requests=args.requests)
    if args.concurrency:
        if min(args.concurrency) < 1:
            parser.error(f"--concurrency values must be >= 1, got {args.concurrency}")
        plan = replace(plan, concurrency=tuple(args.concurrency))
    out = args.out or Path("reports/bench-quick" if args.quick else "reports/bench")
    workdir = args.workdir or Path(f"build/batching-sweep{'-quick' if args.quick else ''}")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    checkpoint = args.checkpoint
    if not checkpoint.is_file():
        if not args.quick:
            log(f"error: no checkpoint at {checkpoint}: run `make train` (or use --quick)")
            return 2
        log(f"no checkpoint at {checkpoint}: training a tiny one (quick mode)")
        checkpoint = tiny_checkpoint(workdir)
    result = run(plan, checkpoint.resolve(), args.data, workdir, log, quick=args.quick)
    text = markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{OUTPUT_NAME}.md").write_text(text)
    (out / f"{OUTPUT_NAME}.json").write_text(json.dumps(result, indent=2))
    print(text)
    print(f"wrote {out / f'{OUTPUT_NAME}.md'}, {out / f'{OUTPUT_NAME}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
