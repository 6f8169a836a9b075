"""The report's command line (`python -m experiments.report`): run it, or merge reports run in
parts, and write report.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from experiments.report.fitting import parse_settings, with_settings
from experiments.report.markdown import markdown
from experiments.report.merge import merge_reports
from experiments.report.plot import plot
from experiments.report.settings import (
    MODELS,
    NEURAL,
    SHORT_VIEW_ONLY,
    ReportConfig,
    quick_config,
)
from experiments.report.views import run_report
from ltrec.data import DatasetError


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset directory")
    parser.add_argument("--out", type=Path, required=True, help="where report.{md,json,png} go")
    parser.add_argument(
        "--cache", type=Path, default=Path("artifacts/cache"), help="text feature cache"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="use this trained model as 'ours' (main view)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI size: 300 users, 2 epochs, tiny models"
    )
    parser.add_argument("--users", type=int, help="subsample this many users")
    parser.add_argument("--epochs", type=int, help="epochs per neural model")
    parser.add_argument("--max-minutes", type=float, help="training budget per neural model")
    parser.add_argument(
        "--patience", type=int, help="epochs without a validation gain that stop a neural row"
    )
    parser.add_argument(
        "--settings",
        action="append",
        default=[],
        metavar="ROW:KEY=VALUE,...",
        help="fix a neural row's settings instead of screening them (e.g. the choice of an "
        "earlier run's screen): sasrec:lr=1e-3,dropout=0.2,batch_size=64",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--screen-epochs",
        type=int,
        help="epochs of each screened setting of a row with a settings grid (default "
        f"{ReportConfig.screen_epochs})",
    )
    parser.add_argument(
        "--models",
        help=f"comma-separated rows to run (default all; 'ours' always): {', '.join(MODELS)}",
    )
    parser.add_argument(
        "--views",
        default="main,cold,short",
        help="comma-separated views to run: main (accuracy, long tail, weight sweep, "
        "SimilarItems), cold (the cold-start view), short (short, order-free histories); a "
        "report run in parts may leave main to another part (--merge)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="REPORT_JSON",
        help="no training: merge the rows of report.json files run in parts (--models) on the "
        "same data into one report in --out (the first file's long-tail sweep is kept; a row "
        "in several files is taken from the first)",
    )
    parser.add_argument(
        "--tail-levers",
        action="store_true",
        help="main view: also measure each neural row's score-time long-tail levers (the "
        "exposure and popularity terms, a step on long-tail items) on validation and test: "
        "what tail NDCG@10 each buys and what it costs overall (python -m "
        "experiments.tail_levers does it for a checkpoint)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            merged = merge_reports([json.loads(path.read_text()) for path in args.merge])
        except (OSError, ValueError) as exc:
            print(f"error: --merge: {exc}", file=sys.stderr)
            return 2
        merged["merged_from"] = [str(path) for path in args.merge]
        write_report(merged, args.out)
        print(markdown(merged))
        print(f"wrote {args.out / 'report.md'}, report.json, report.png", file=sys.stderr)
        return 0
    if args.screen_epochs is not None and args.screen_epochs < 1:
        parser.error(f"--screen-epochs must be at least 1, got {args.screen_epochs}")
    views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    unknown_views = sorted(set(views) - {"main", "cold", "short"})
    if not views:
        parser.error("--views: name at least one of main, cold, short")
    if unknown_views:
        parser.error(f"--views: unknown {', '.join(unknown_views)}; choose from main, cold, short")
    names = tuple(MODELS)
    if args.models:
        chosen = {name.strip() for name in args.models.split(",") if name.strip()}
        unknown = sorted(chosen - set(MODELS))
        if unknown:
            parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
        names = tuple(name for name in MODELS if name in chosen or name == "ours")
    cfg = quick_config() if args.quick else ReportConfig()
    overrides: dict[str, float | int] = {"seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    if args.patience is not None:
        if args.patience < 1:
            parser.error(f"--patience must be at least 1, got {args.patience}")
        overrides["patience"] = args.patience
    fixed: dict[str, dict[str, float | str]] = {}
    for text in args.settings:
        try:
            row, point = parse_settings(text)
        except ValueError as exc:
            parser.error(f"--settings: {exc}")
        if row not in NEURAL:
            parser.error(f"--settings: {row!r} is not a neural row ({', '.join(NEURAL)})")
        if row not in names:
            parser.error(f"--settings: {row!r} is not among the rows run (--models)")
        if row == "ours" and args.checkpoint is not None:
            parser.error("--settings: 'ours' comes from --checkpoint, it is not trained here")
        if row in fixed:
            parser.error(f"--settings: {row!r} is given twice")
        if row in SHORT_VIEW_ONLY:
            parser.error(f"--settings: {row!r} trains our row's settings with the teacher off")
        try:  # a setting the training would refuse stops the run here, not hours into it
            with_settings(cfg.train, point)
        except ValueError as exc:
            parser.error(f"--settings: {row}: {exc}")
        fixed[row] = point
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **overrides),  # type: ignore[arg-type]
        train_overrides=overrides,
        seed=args.seed,
        users=args.users if args.users is not None else cfg.users,
        models=names,
        views=views,
        screen_epochs=args.screen_epochs if args.screen_epochs else cfg.screen_epochs,
        fixed_settings=fixed,
        tail_levers=args.tail_levers,
    )
    try:
        report = run_report(
            args.data, cfg, args.cache, args.checkpoint, not args.no_progress, args.quick
        )
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {args.out / 'report.md'}, report.json, report.png", file=sys.stderr)
    return 0
