"""`python -m server.stores`: the stores' upkeep on demand, beside running gateways or offline.

    python -m server.stores compact --items-dir items
    python -m server.stores retire --feedback-dir feedback --retention-seconds 604800

`compact` folds the item store's closed segments into a new snapshot (`ltrec_core.item_log`);
`retire` deletes the feedback segments retraining consumed that are older than the retention
time (`ltrec_core.feedback_log`). Both are what the gateway does on its own (LTREC_ITEMS_COMPACT_*,
LTREC_FEEDBACK_RETENTION_SECONDS), safe while gateways write and poll. Exit 0 (one line of
figures), 2 on an unusable directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ltrec_core import feedback_log, item_log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.stores", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compact", help="fold the item store into a new snapshot")
    c.add_argument("--items-dir", type=Path, required=True, help="LTREC_ITEMS_DIR")
    r = commands.add_parser("retire", help="delete consumed feedback segments")
    r.add_argument("--feedback-dir", type=Path, required=True, help="LTREC_FEEDBACK_DIR")
    r.add_argument("--retention-seconds", type=float, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "compact":
            if not args.items_dir.is_dir():
                raise OSError(f"{args.items_dir}: no item store here")
            done = item_log.compact(args.items_dir)
            if done is None:
                print("nothing to compact (or another compactor published first)")
            else:
                print(
                    f"generation {done.generation}: {done.segments} segments, "
                    f"{done.records_read} records read, {done.records_kept} kept, "
                    f"{done.unreadable_lines} unreadable lines; "
                    f"{done.bytes_before} -> {done.bytes_after} bytes"
                )
        else:
            if args.retention_seconds < 0:
                parser.error(f"--retention-seconds must be >= 0, got {args.retention_seconds}")
            if not args.feedback_dir.is_dir():
                raise OSError(f"{args.feedback_dir}: no feedback store here")
            retired = feedback_log.retire(args.feedback_dir, args.retention_seconds)
            print(
                f"retired {retired.segments} segments ({retired.bytes} bytes), "
                f"{retired.erasures_carried} erasure records carried"
            )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
