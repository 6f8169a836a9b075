"""Gateway configurations side by side: one Triton, one gateway process per configuration in
front of it, the same Recommend requests, the configurations interleaved round by round (on a
shared machine a slow minute hits every configuration alike), ratios to the first.

    python -m benchmarks.gateway_ab      # coalescing off vs on (LTREC_TRITON_COALESCE)
    python -m benchmarks.gateway_ab --config off:LTREC_TRITON_COALESCE=false \\
        --config on:LTREC_TRITON_COALESCE=true --config on+uvloop:LTREC_EVENT_LOOP=uvloop

Each configuration is `name:VAR=value,VAR=value` (the gateway's `LTREC_*` variables). Per round
and concurrency: direct Triton (the same tensors over tritonclient, the overhead's reference at
concurrency 1), then every configuration, in an order that alternates round by round. Prints the
median over rounds of p50 and throughput, each configuration's ratio to the first, the gateway's
overhead over direct Triton, and whether the configurations' top-k lists are identical.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import clients
from benchmarks.processes import tiny_checkpoint
from benchmarks.workload import build_workload
from triton_local.server import TritonServer
from triton_local.stack import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ("off:LTREC_TRITON_COALESCE=false", "on:LTREC_TRITON_COALESCE=true")


@dataclass(frozen=True)
class Config:
    name: str
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Config:
        name, _, assignments = text.partition(":")
        env = {}
        for assignment in filter(None, assignments.split(",")):
            var, sep, value = assignment.partition("=")
            if not sep or not var.startswith("LTREC_"):
                raise argparse.ArgumentTypeError(f"--config {text!r}: VAR=value with LTREC_ VARs")
            env[var] = value
        if not name:
            raise argparse.ArgumentTypeError(f"--config {text!r} has no name")
        return cls(name, env)


def export_repository(checkpoint: Path, workdir: Path) -> Path:
    """The checkpoint exported as `make bench` does (no text encoder); reused when present."""
    from export_scripts.export import export

    repo = workdir / "model_repository"
    if not (repo / "ltrec_metadata.json").is_file():
        if not checkpoint.is_file():
            print(f"no checkpoint at {checkpoint}: the tiny one (as bench --quick)", flush=True)
            checkpoint = tiny_checkpoint(workdir)
        print(f"exporting {checkpoint} to {repo}", flush=True)
        export(checkpoint.resolve(), repo, text_encoder=False, log=lambda _m: None)
    return repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/ml-1m/checkpoint.pt"))
    parser.add_argument("--events", type=Path, default=Path("data/ml-1m/events.parquet"))
    parser.add_argument("--workdir", type=Path, default=Path("build/gateway-ab"))
    parser.add_argument("--requests", type=int, default=400, help="per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--config", type=Config.parse, action="append", dest="configs")
    parser.add_argument(
        "--floor", action="store_true", help="also the in-process floor, and ratios to it"
    )
    args = parser.parse_args(argv)
    configs: list[Config] = args.configs or [Config.parse(c) for c in DEFAULT_CONFIGS]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    repo = export_repository(args.checkpoint, workdir)
    workload = build_workload(repo, args.requests, events_path=args.events)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)

    triton = TritonServer(repo, build_dir=ROOT / "build" / "triton", log_path=logs / "triton.log")
    gateways: dict[str, GatewayProcess] = {}
    # (system, concurrency) -> p50 ms and req/s per round
    p50: dict[tuple[str, int], list[float]] = {}
    rps: dict[tuple[str, int], list[float]] = {}
    answers: dict[str, dict[int, object]] = {}
    try:
        triton.start()
        triton.wait_ready(timeout_s=300)
        for config in configs:
            state = workdir / "state" / config.name
            gateway = GatewayProcess(
                repo,
                triton.grpc_url,
                log_path=logs / f"gateway-{config.name}.log",
                env={"LTREC_ALLOW_PLAINTEXT": "true", **config.env},
                feedback_dir=state / "feedback",
                items_dir=state / "items",
                history_path=state / "history" / "history.sqlite3",
            )
            gateways[config.name] = gateway
            gateway.start()
            gateway.wait_serving(timeout_s=300)
        for round_ in range(args.rounds):
            for c in args.concurrency:
                keep = args.requests if c == max(args.concurrency) else 0
                run = asyncio.run(
                    clients.triton_direct(triton.grpc_url, workload.tensors, c, warmup=20)
                )
                p50.setdefault(("triton", c), []).append(run.summary.p50_ms)
                rps.setdefault(("triton", c), []).append(run.summary.throughput_rps)
                order = configs if round_ % 2 == 0 else configs[::-1]
                for config in order:
                    address = gateways[config.name].address
                    run = asyncio.run(
                        clients.recommend(address, workload.requests, c, warmup=20, keep=keep)
                    )
                    if run.first_error:
                        print(
                            f"  {config.name} c={c}: {run.summary.errors} errors, first: "
                            f"{run.first_error}",
                            flush=True,
                        )
                    p50.setdefault((config.name, c), []).append(run.summary.p50_ms)
                    rps.setdefault((config.name, c), []).append(run.summary.throughput_rps)
                    if keep:
                        answers[config.name] = run.results
                print(
                    f"round {round_ + 1} c={c}: "
                    + "  ".join(
                        f"{name} {p50[(name, c)][-1]:.2f} ms {rps[(name, c)][-1]:.0f}/s"
                        for name in ["triton", *(cfg.name for cfg in configs)]
                    ),
                    flush=True,
                )
    finally:
        for gateway in gateways.values():
            gateway.stop()
        triton.stop()

    floor: dict[int, float] = {}
    if args.floor:
        from benchmarks.bench import run_floor

        for row in run_floor(repo, workload, tuple(args.concurrency), 0, workdir):
            floor[row["concurrency"]] = row["throughput_rps"]
            print(f"floor c={row['concurrency']}: {row['throughput_rps']:.0f} req/s", flush=True)

    first = configs[0].name
    print(
        f"\nmedians over {args.rounds} rounds, {args.requests} requests each (ratios to {first!r}):"
    )
    print("| config | c | p50 ms | req/s | p50 / first | req/s / first | overhead p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        base_p50 = statistics.median(p50[(first, c)])
        base_rps = statistics.median(rps[(first, c)])
        direct = statistics.median(p50[("triton", c)])
        print(
            f"| triton (direct) | {c} | {direct:.2f} | "
            f"{statistics.median(rps[('triton', c)]):.0f} | | | |"
        )
        for config in configs:
            m_p50 = statistics.median(p50[(config.name, c)])
            m_rps = statistics.median(rps[(config.name, c)])
            print(
                f"| {config.name} | {c} | {m_p50:.2f} | {m_rps:.0f} | {m_p50 / base_p50:.2f} | "
                f"{m_rps / base_rps:.2f} | {m_p50 - direct:+.2f} |"
                + (f" {m_rps / floor[c]:.2f} x floor |" if c in floor else "")
            )
    reference = answers.get(first, {})
    for config in configs[1:]:
        got = answers.get(config.name, {})
        common = sorted(set(reference) & set(got))
        same = sum(reference[i] == got[i] for i in common)
        print(
            f"top-{workload.k} lists of {config.name!r} identical to {first!r}'s: "
            f"{same}/{len(common)} (c={max(args.concurrency)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
