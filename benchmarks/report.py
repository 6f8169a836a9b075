"""The benchmark's tables (Markdown, printed and written), its JSON and its plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from benchmarks.stats import fmt, markdown_table
from ltrec_core import contract

SYSTEM_LABELS = {
    "floor": "floor (in-process onnxruntime)",
    "triton": "Triton ensemble, direct",
    "gateway": "gateway `Recommend`",
    "naive": "naive peer (torch eager)",
}
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"


def per_process(values: dict[str, float] | None, digits: int = 0) -> str:
    """{'gateway': 45.2, 'triton': 88.0} -> 'gateway 45 · triton 88'."""
    if not values:
        return "–"
    return " · ".join(f"{name} {fmt(float(v), digits)}" for name, v in values.items())


def systems_table(rows: list[dict[str, Any]]) -> str:
    cells = [
        {
            "system": SYSTEM_LABELS.get(r["system"], r["system"]),
            "concurrency": r["concurrency"],
            "p50": r["p50_ms"],
            "p99": r["p99_ms"],
            "rps": r["throughput_rps"],
            "p50x": r.get("p50_vs_floor"),
            "rpsx": r.get("rps_vs_floor"),
            "cpu": per_process(r.get("cpu_percent")),
            "cpu_req": r.get("cpu_ms_per_request"),
            "rss": per_process(r.get("peak_rss_mib")),
        }
        for r in rows
    ]
    return markdown_table(
        cells,
        [
            ("system", "system"),
            ("concurrency", "conc."),
            ("p50", "p50 ms"),
            ("p99", "p99 ms"),
            ("rps", "req/s"),
            ("p50x", "p50 ÷ floor"),
            ("rpsx", "req/s ÷ floor"),
            ("cpu", "CPU % per process"),
            ("cpu_req", "server CPU ms/req"),
            ("rss", "peak RSS MiB per process"),
        ],
    )


def history_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        rows,
        [
            ("history", "history"),
            ("floor_p50_ms", "floor p50"),
            ("floor_p99_ms", "floor p99"),
            ("triton_p50_ms", "Triton p50"),
            ("triton_p99_ms", "Triton p99"),
            ("gateway_p50_ms", "gateway p50"),
            ("gateway_p99_ms", "gateway p99"),
        ],
    )


def scale_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        rows,
        [
            ("items", "items"),
            ("scan", "scan"),
            ("export_seconds", "export s"),
            ("repository_mib", "repo MiB"),
            ("triton_rss_mib", "Triton RSS MiB"),
            ("triton_peak_rss_mib", "Triton peak MiB"),
            ("triton_peak_batched_rss_mib", f"Triton peak MiB, {contract.MAX_BATCH_SIZE} at once"),
            ("floor_p50_ms", "floor p50"),
            ("triton_p50_ms", "Triton p50"),
            ("gateway_p50_ms", "gateway p50"),
            ("gateway_p99_ms", "gateway p99"),
            ("gateway_rps", "gateway req/s"),
            ("recall_vs_fp32", "recall@k vs fp32"),
            ("recall_vs_fp32_weight_0", "recall@k vs fp32, weight 0"),
            ("reference", "exact reference"),
            ("ann_index", "ANN index"),
        ],
    )


def training_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        [
            {
                "processes": r["processes"],
                "wall": f"{r['wall_s']:.1f}",
                "train": f"{r['train_s']:.1f}",
                "final": f"{r['final_ndcg']:.4f}",
                "best": f"{r['best_ndcg']:.4f}",
            }
            for r in rows
        ],
        [
            ("processes", "processes"),
            ("wall", "wall s (launch included)"),
            ("train", "training loop s"),
            ("final", "final validation NDCG@10"),
            ("best", "best validation NDCG@10"),
        ],
    )


def targets_table(targets: list[dict[str, Any]]) -> str:
    return markdown_table(
        targets,
        [("target", "target"), ("measured", "measured"), ("met", "met")],
    )


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# Benchmark ({'quick' if results['quick'] else 'full'} mode)",
        "",
        f"{'Quick' if results['quick'] else 'Full'} mode (`make bench"
        f"{'-quick' if results['quick'] else ''}`) on {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']:.0f} GiB; {m['date']}; "
        f"load average before/after {m['load_before']:.2f}/{m['load_after']:.2f}. "
        f"Model: {results['model']['description']}. Requests: {results['workload']}.",
        "",
    ]
    if results.get("systems"):
        lines += [
            "## Serving paths, side by side",
            "",
            "Ratios are to the in-process floor at the same concurrency. CPU % is per process "
            "tree over the measured run (200 % = both cores); the client (this benchmark, one "
            "asyncio process) is on the same machine.",
            "",
            systems_table(results["systems"]),
            "",
            f"Same recommendations: {results['agreement']['text']}.",
            "",
            gateway_breakdown(results["systems"]),
            "",
        ]
    if results.get("history"):
        lines += [
            "## History length (concurrency 1, ms; the model reads the last "
            f"{results['model'].get('max_history', '?')} events)",
            "",
            history_table(results["history"]),
            "",
        ]
    if results.get("scale"):
        lines += [
            "## Catalogue size (generated item vectors, concurrency 1, ms; the batched peak after "
            f"{contract.MAX_BATCH_SIZE} requests at once)",
            "",
            scale_table(results["scale"]),
            "",
        ]
    if results.get("training"):
        first = results["training"][0]
        lines += [
            "## Multi-process training (torchrun, DDP over gloo; the tests' tiny dataset: "
            f"{first['users']} users, {first['epochs']} epochs, the same global batch of "
            f"{first['batch_size']} users and seed)",
            "",
            training_table(results["training"]),
            "",
        ]
    if results.get("targets"):
        lines += ["## Targets", "", targets_table(results["targets"]), ""]
    lines += [f"Total benchmark time: {results['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def gateway_breakdown(rows: list[dict[str, Any]]) -> str:
    """Where a gateway request's time goes at concurrency 1, from the gateway's own metrics."""
    row = next((r for r in rows if r["system"] == "gateway" and r["concurrency"] == 1), None)
    stages = row.get("gateway_stage_ms") if row else None
    if not row or not stages:
        return ""
    handler = stages["handler"]
    inner = ", ".join(f"{k} {stages[k]:.2f}" for k in ("validate", "features", "triton"))
    own = handler - sum(stages[k] for k in ("validate", "features", "triton", "postprocess"))
    return (
        f"Inside the gateway at concurrency 1 (mean ms per request, from its own metrics): "
        f"handler {handler:.2f} ({inner}, postprocess {stages['postprocess']:.2f}, "
        f"the rest {own:.2f}); outside it (gRPC both ways, the access log line) "
        f"{row['mean_ms'] - handler:.2f} of the client's mean {row['mean_ms']:.2f}."
    )


def update_readme(readme: Path, section: str) -> bool:
    """Replaces the text between the bench markers; False when the markers are missing."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        return False
    readme.write_text(
        pattern.sub(lambda _m: f"{README_BEGIN}\n{section.strip()}\n{README_END}", text)
    )
    return True


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    rows = results.get("systems") or []
    throughput, latency, scale = axes
    for system, label in SYSTEM_LABELS.items():
        mine = [r for r in rows if r["system"] == system]
        if not mine:
            continue
        conc = [r["concurrency"] for r in mine]
        throughput.plot(conc, [r["throughput_rps"] for r in mine], "o-", label=label)
        (line,) = latency.plot(conc, [r["p50_ms"] for r in mine], "o-", label=f"{label} p50")
        latency.plot(conc, [r["p99_ms"] for r in mine], "x--", color=line.get_color())
    for ax, title, ylabel in (
        (throughput, "Throughput", "requests / s"),
        (latency, "Latency (p50 solid, p99 dashed)", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        levels = sorted({r["concurrency"] for r in rows})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    throughput.legend(fontsize=8)

    scale_rows = results.get("scale") or []
    if scale_rows:
        for scan in sorted({r["scan"] for r in scale_rows}):
            mine = [r for r in scale_rows if r["scan"] == scan]
            items = [r["items"] for r in mine]
            (line,) = scale.plot(
                items, [r["gateway_p50_ms"] for r in mine], "o-", label=f"gateway p50 ({scan})"
            )
            scale.plot(
                items,
                [r["gateway_p99_ms"] for r in mine],
                "x--",
                color=line.get_color(),
                label=f"gateway p99 ({scan})",
            )
        scale.set_xscale("log")
        scale.set_xlabel("catalogue items")
        scale.set_ylabel("ms (concurrency 1)")
        scale.set_title("Catalogue size: latency and Triton memory")
        scale.grid(True, which="both", alpha=0.3)
        memory = scale.twinx()
        fp32 = [r for r in scale_rows if r["scan"] == scale_rows[0]["scan"]]
        memory.plot(
            [r["items"] for r in fp32],
            [r["triton_peak_rss_mib"] for r in fp32],
            "s:",
            color="grey",
            label="Triton peak RSS MiB",
        )
        memory.set_ylabel("Triton peak RSS (MiB)")
        handles = scale.get_legend_handles_labels()
        extra = memory.get_legend_handles_labels()
        scale.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left")
    else:
        scale.set_visible(False)
    fig.suptitle(f"ltrec serving benchmark — {results['machine']['summary']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
