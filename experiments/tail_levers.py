"""What tail accuracy each score-time long-tail lever buys, and at what overall cost, on one
trained checkpoint: the frontier behind the main view's tail target.

Three levers, each a per-item term added to the model's scores (the history still excluded):

- ``exposure``: ``- w * log(1 + exposure)``, the served long-tail term (the checkpoint's counts);
- ``popularity``: ``- w * log(1 + training popularity)``, the term before exposure;
- ``step``: ``+ b`` on every long-tail item (outside the most popular 20%, the report's tail
  mask), which moves tail items up past head items without reordering either group: the most
  direct lever on tail-target NDCG@10 there is.

Each row gives NDCG@10, tail-target and head-target NDCG@10 and Coverage@10, with the changes
from the plain model; then, per lever, the overall NDCG@10 it gives up for a given tail gain
(linear between grid points; ``--tail-gain``, default 20%, the 1.2x of issue 12). Figures are on
validation unless ``--split test`` (read test only to report, never to choose)::

    python -m experiments.tail_levers --checkpoint artifacts/ml-1m/checkpoint.pt --data data/ml-1m

Rows of reports run with ``--tail-levers`` compare without scoring again: the most tail NDCG@10
each row's levers reach at the other rows' overall NDCG@10 (``--compare
reports/parts/A/report.json:ours_converged reports/parts/B/report.json:sasrec``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ltrec import evaluation as ev

GRIDS: dict[str, tuple[float, ...]] = {
    "exposure": (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
    "popularity": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
    "step": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7),
}
# The tail gain whose overall cost is read off by default: issue 12's 1.2x.
TAIL_GAIN = 0.2


def tail_step(score_fn: ev.ScoreFn, tail: np.ndarray, boost: float) -> ev.ScoreFn:
    """score + boost on every long-tail item (`tail`, [N+1] bool)."""
    lift = boost * np.asarray(tail, dtype=np.float64)

    def score(cases: ev.EvalCases, rows: np.ndarray) -> np.ndarray:
        return score_fn(cases, rows).astype(np.float64) + lift

    return score


def figures(score_fn: ev.ScoreFn, cases: ev.EvalCases, popularity: np.ndarray) -> dict:
    """NDCG@10 overall, on tail targets and on head targets, and Coverage@10: the report's
    own row figures (`ltrec.evaluation.measure`), the ones a lever is read against."""
    got, _ = ev.measure(
        score_fn, cases, popularity, ev.long_tail_mask(popularity), "levers", progress=False
    )
    ndcg = f"ndcg@{ev.K}"
    return {
        "ndcg": got[ndcg],
        "tail": got["tail"][ndcg],
        "head": got["head"][ndcg],
        "coverage": got[f"coverage@{ev.K}"],
    }


def frontier(
    score_fn: ev.ScoreFn,
    cases: ev.EvalCases,
    popularity: np.ndarray,
    exposure: np.ndarray,
    grids: Mapping[str, Sequence[float]] = GRIDS,
) -> dict:
    """The plain model's figures and every lever's at each grid point."""
    raw = ev.cached(score_fn)
    tail = ev.long_tail_mask(popularity)
    made = {
        "exposure": lambda w: ev.long_tail_adjusted(raw, exposure, w),
        "popularity": lambda w: ev.long_tail_adjusted(raw, popularity, w),
        "step": lambda b: tail_step(raw, tail, b),
    }
    levers = {
        name: [{"weight": float(w), **figures(made[name](w), cases, popularity)} for w in grid]
        for name, grid in grids.items()
    }
    return {"plain": figures(raw, cases, popularity), "levers": levers}


def cost_of_tail_gain(plain: dict, rows: list[dict], gain: float) -> float | None:
    """The relative overall NDCG@10 change at which the lever's tail NDCG@10 first reaches
    (1 + gain) x the plain model's, linear between grid points; None when no grid point does,
    or when the plain model has no tail NDCG@10 to gain on."""
    if plain["tail"] <= 0 or plain["ndcg"] <= 0:
        return None
    want = (1.0 + gain) * plain["tail"]
    points = [(0.0, plain["tail"], plain["ndcg"])] + [
        (r["weight"], r["tail"], r["ndcg"]) for r in rows
    ]
    for (_, t0, n0), (_, t1, n1) in zip(points, points[1:], strict=False):
        if t0 < want <= t1:
            ndcg = n0 + (n1 - n0) * (want - t0) / (t1 - t0)
            return ndcg / plain["ndcg"] - 1.0
    return 0.0 if plain["tail"] >= want else None


def tail_at_overall(plain: dict, rows: list[dict], floor: float) -> float | None:
    """The most tail-target NDCG@10 a lever reaches while overall NDCG@10 stays at or above
    `floor`: over the plain model and the lever's grid points in order, linear between
    neighbours (a segment that crosses the floor counts up to the crossing); None when no point
    of the lever is at or above the floor."""
    points = [(plain["tail"], plain["ndcg"])] + [(r["tail"], r["ndcg"]) for r in rows]
    best = [t for t, n in points if n >= floor]
    for (t0, n0), (t1, n1) in zip(points, points[1:], strict=False):
        if (n0 - floor) * (n1 - floor) < 0:  # the segment crosses the floor
            best.append(t0 + (t1 - t0) * (floor - n0) / (n1 - n0))
    return max(best) if best else None


def compare(named: Mapping[str, dict], split: str) -> list[str]:
    """Two or more rows' lever frontiers (`--tail-levers` in their reports) side by side: each
    row's plain figures, and the most tail NDCG@10 each of its levers reaches at every other
    row's plain overall NDCG@10, as a multiple of that row's tail NDCG@10."""
    lines = []
    for name, result in named.items():
        plain = result[split]["plain"]
        lines.append(f"{name}: NDCG@10 {plain['ndcg']:.4f}, tail NDCG@10 {plain['tail']:.4f}")
    for name, result in named.items():
        for other, theirs in named.items():
            if other == name:
                continue
            floor = theirs[split]["plain"]
            for lever, rows in result[split]["levers"].items():
                got = tail_at_overall(result[split]["plain"], rows, floor["ndcg"])
                said = (
                    "not reached"
                    if got is None
                    else f"{got:.4f} ({got / floor['tail']:.2f}x {other}'s)"
                )
                lines.append(
                    f"{name} at {other}'s NDCG@10 ({floor['ndcg']:.4f}), {lever}: tail NDCG@10 "
                    + said
                )
    return lines


def _report_row(text: str) -> tuple[str, dict]:
    """`PATH:ROW` -> (its name, the row's `tail_levers` from the report.json at PATH)."""
    import json

    path, sep, row = text.rpartition(":")
    if not sep or not path or not row:
        raise ValueError(f"{text!r}: give REPORT_JSON:ROW")
    try:
        report = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    models = report.get("models") if isinstance(report, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"{path} is not a report.json (it has no models)")
    if row not in models:
        raise ValueError(f"{path} has no row {row!r}")
    if not models[row].get("tail_levers"):
        raise ValueError(f"{path}: row {row!r} has no tail levers (run the report --tail-levers)")
    return f"{row} ({Path(path).parent.name})", models[row]["tail_levers"]


def render(result: dict, gain: float) -> list[str]:
    plain = result["plain"]
    lines = [
        "| lever | weight | NDCG@10 | change | tail NDCG@10 | change | head NDCG@10 "
        "| Coverage@10 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| none | 0 | {plain['ndcg']:.4f} | | {plain['tail']:.4f} | | {plain['head']:.4f} "
        f"| {plain['coverage']:.3f} |",
    ]
    for name, rows in result["levers"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['weight']:g} | {r['ndcg']:.4f} | "
                f"{r['ndcg'] / plain['ndcg'] - 1:+.2%} | {r['tail']:.4f} | "
                f"{r['tail'] / plain['tail'] - 1:+.2%} | {r['head']:.4f} | {r['coverage']:.3f} |"
            )
    lines.append("")
    for name, rows in result["levers"].items():
        cost = cost_of_tail_gain(plain, rows, gain)
        said = "is not reached on the grid" if cost is None else f"costs NDCG@10 {cost:+.2%}"
        lines.append(f"{name}: tail NDCG@10 +{gain:.0%} {said}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--data", type=Path, help="dataset directory")
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"))
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--tail-gain", type=float, default=TAIL_GAIN)
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="REPORT_JSON:ROW",
        help="no scoring: compare rows whose report ran with --tail-levers: the most tail "
        "NDCG@10 each row's levers reach at each other row's overall NDCG@10",
    )
    args = parser.parse_args(argv)
    if args.tail_gain <= 0:
        parser.error(f"--tail-gain must be above 0, got {args.tail_gain}")
    if args.compare:
        if len(args.compare) < 2:
            parser.error("--compare: give at least two REPORT_JSON:ROW")
        if args.checkpoint is not None or args.data is not None:
            parser.error("--compare reads reports: it takes no --checkpoint or --data")
        try:
            named = dict(_report_row(text) for text in args.compare)
            if len(named) < len(args.compare):
                raise ValueError("a row is given twice")
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            print(f"error: --compare: {exc}", file=sys.stderr)
            return 2
        print("\n".join(compare(named, args.split)))
        return 0
    if args.checkpoint is None or args.data is None:
        parser.error("give --checkpoint and --data (or --compare)")

    from ltrec.checkpoint import SplitMismatch
    from ltrec.data import DatasetError
    from ltrec.prepared import prepare_for_checkpoint
    from ltrec.scoring import model_score_fn

    try:
        prepared, model, ckpt = prepare_for_checkpoint(args.data, args.cache, args.checkpoint)
    except (DatasetError, SplitMismatch, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cases = ev.validation_cases(prepared) if args.split == "valid" else ev.held_out_cases(prepared)
    result = frontier(
        model_score_fn(model, int(ckpt.model_config["max_history"])),
        cases,
        prepared.popularity,
        np.asarray(ckpt.long_tail_counts),
    )
    print(f"{args.checkpoint}, {args.split} ({len(cases)} users)")
    print("\n".join(render(result, args.tail_gain)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
