"""Convert a generated event log of N events and print wall time, CPU time, peak RSS and events/s.

    python -m benchmarks.convert --events 10000000            # default 100M; --keep to keep files

The log is written chunk by chunk (a generator that fits in memory at any N) as a shop would
export it: CSV with string ids, Zipf-like users and items, a little dirt (0.1 % missing user ids,
0.1 % unknown items, 0.1 % duplicated rows) so every cleaning rule does work. The conversion is
`python -m ltrec.datasets convert` in a child process, so its peak RSS is its own
(`RUSAGE_CHILDREN`), not the generator's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ltrec_core.contract import EVENT_TYPES

DIRT = 0.001
DEVICES = ("mobile", "desktop", "tablet")
REGIONS = tuple(f"r{n}" for n in range(20))


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def write_log(
    root: Path, events: int, users: int, items: int, chunk_rows: int, seed: int = 0
) -> None:
    """items.csv and events.csv of `events` rows in `root`."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    item_numbers = np.arange(items)
    pacsv.write_csv(
        pa.table({"item_id": _ids("i", item_numbers), "title": _ids("Item ", item_numbers)}),
        root / "items.csv",
    )
    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("timestamp", pa.int64()),
            ("event_type", pa.string()),
            ("device", pa.string()),
            ("region", pa.string()),
        ]
    )
    options = pacsv.WriteOptions(quoting_style="none")
    with pacsv.CSVWriter(root / "events.csv", schema, write_options=options) as writer:
        for start in range(0, events, chunk_rows):
            n = min(chunk_rows, events - start)
            user = (rng.zipf(1.2, n) - 1) % users
            item = (rng.zipf(1.1, n) - 1) % items
            # Unknown items: numbers past the catalogue.
            item = np.where(rng.random(n) < DIRT, items + item, item)
            duplicate = rng.random(n) < DIRT
            duplicate[0] = False
            user[duplicate] = user[np.flatnonzero(duplicate) - 1]
            item[duplicate] = item[np.flatnonzero(duplicate) - 1]
            timestamp = 1_600_000_000 + rng.integers(0, 10_000_000, n)
            timestamp[duplicate] = timestamp[np.flatnonzero(duplicate) - 1]
            kind = rng.choice(len(EVENT_TYPES), n, p=[0.7, 0.15, 0.1, 0.05])
            kind[duplicate] = kind[np.flatnonzero(duplicate) - 1]
            user_ids = _ids("u", user)
            missing = pa.array(rng.random(n) < DIRT)
            user_ids = pc.if_else(missing, pa.scalar(None, pa.string()), user_ids)
            writer.write_table(
                pa.table(
                    {
                        "user_id": user_ids,
                        "item_id": _ids("i", item),
                        "timestamp": timestamp,
                        "event_type": pa.array(EVENT_TYPES).take(kind),
                        "device": pa.array(DEVICES).take(rng.integers(0, len(DEVICES), n)),
                        "region": pa.array(REGIONS).take(rng.integers(0, len(REGIONS), n)),
                    },
                    schema=schema,
                )
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000_000)
    parser.add_argument("--users", type=int, default=None, help="default events / 50")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="default a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)
    users = args.users or max(1, args.events // 50)
    work = args.dir or Path(tempfile.mkdtemp(prefix="ltrec-convert-"))
    source, out = work / "log", work / "clean"
    try:
        started = time.perf_counter()
        write_log(source, args.events, users, args.items, args.chunk_rows)
        generated = time.perf_counter() - started
        size = (source / "events.csv").stat().st_size
        print(
            f"generated {args.events:,} events ({users:,} users, {args.items:,} items), "
            f"{size / 1e9:.2f} GB CSV in {generated:.0f} s",
            flush=True,
        )
        command = [
            sys.executable,
            "-m",
            "ltrec.datasets",
            "convert",
            str(source),
            "--output",
            str(out),
            "--chunk-rows",
            str(args.chunk_rows),
            "--json",
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        cpu = (usage.ru_utime - before.ru_utime) + (usage.ru_stime - before.ru_stime)
        report = json.loads(done.stdout[done.stdout.index("{") :])
        print(f"command: {' '.join(command[1:])}")
        print(f"kept {report['events']:,} events, {report['users']:,} users; dropped", end=" ")
        print(", ".join(f"{k} {v:,}" for k, v in report["dropped"].items() if v) or "nothing")
        # On a shared machine wall time measures the neighbours; CPU time measures the work.
        print(
            "| events | chunk rows | wall s | CPU s | peak RSS GiB | events/s wall | events/CPU-s |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {args.events:,} | {args.chunk_rows:,} | {wall:.0f} | {cpu:.0f} | "
            f"{usage.ru_maxrss / 2**20:.2f} | {args.events / wall:,.0f} | "
            f"{args.events / max(cpu, 1e-9):,.0f} |"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work if args.dir is None else source.parent / "log", ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
