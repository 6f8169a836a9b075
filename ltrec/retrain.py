"""Retraining on served feedback: merge the gateway's feedback store into a dataset, compare models.

The gateway appends served lists and Feedback records to its store (`server.stores.feedback`; the
format is `ltrec_core.feedback_log`). Here they become training data:

    python -m ltrec.retrain merge --data data/ml-1m --feedback feedback --out data/ml-1m-feedback
    python -m ltrec.train --data data/ml-1m-feedback --out artifacts/ml-1m-retrained
    python -m ltrec.retrain compare --data data/ml-1m-feedback \\
        --before artifacts/ml-1m/checkpoint.pt --after artifacts/ml-1m-retrained/checkpoint.pt \\
        --out reports/retrain

(`make retrain` runs the three.) `merge` writes a dataset directory in the usual format: the base
items, and the base events plus one event per click (as ``view``), cart and purchase. Impressions
are exposure, not interactions, and are counted but not turned into events; events for items not
in the catalogue are dropped and counted (the cleaning report of `load_dataset` counts them).
Users erased by ForgetUser are left out: every feedback record and served list whose user matches
an erasure record of the log is skipped and counted (`ltrec_core.erasure`); a log whose erasure
records cannot be checked (its key file missing or replaced) is refused rather than merged.
Once the merged dataset is written, `merge` records in the feedback directory what it read
(`ltrec_core.feedback_log.record_consumed`): the gateway's retention retires only segments a
retraining consumed. `compare` evaluates both checkpoints on the merged data's leave-one-out test
split (full ranking, as in `docs/evaluation.md`), overall and on the users who gave feedback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from ltrec.checkpoint import load_checkpoint
from ltrec.data import EVENT_COLUMNS, DatasetError, load_dataset, write_dataset
from ltrec.evaluation import (
    ScoreFn,
    events_in_order,
    long_tail_mask,
    make_cases,
    measure,
    most_popular,
)
from ltrec.prepared import prepare
from ltrec.scoring import model_score_fn
from ltrec_core.erasure import ErasureError, Erasures
from ltrec_core.feedback_log import read_records, record_consumed
from ltrec_core.records import (
    ERASURE,
    FEEDBACK,
    SERVED,
    FeedbackRecord,
    ReadStats,
    RecordError,
    UserErasureRecord,
)

# Feedback type -> dataset event type; impressions have none.
EVENT_TYPE_OF_FEEDBACK = {"click": "view", "cart": "cart", "purchase": "purchase"}
REPORT_FILE = "feedback_report.json"


def feedback_events(
    feedback_dir: Path, consumed: dict[str, int] | None = None
) -> tuple[pd.DataFrame, dict]:
    """Events from the store's feedback records, and counts of what was read and skipped;
    `consumed` receives the bytes read per segment (`record_consumed`).

    The erasures are known only once the whole log is read (a tombstone may come after the
    user's records, or from another replica), so records are filtered at the end.
    """
    stats = ReadStats()
    erasures = Erasures(feedback_dir)
    feedback: list[FeedbackRecord] = []
    served_by_user: Counter[str] = Counter()
    for record in read_records(feedback_dir, stats, consumed):
        if record["kind"] == ERASURE:
            erasures.add(UserErasureRecord.from_json(record))
        elif record["kind"] == SERVED:
            served_by_user[str(record.get("user_id", ""))] += 1
        elif record["kind"] == FEEDBACK:
            feedback.append(FeedbackRecord.from_json(record))
    kept = [f for f in feedback if not erasures.erased(f.user_id)]
    served_erased = sum(n for user, n in served_by_user.items() if erasures.erased(user))
    types: Counter[str] = Counter(f.type for f in kept)
    rows = [
        {
            "user_id": f.user_id,
            "item_id": f.item_id,
            "timestamp": f.timestamp,
            "event_type": EVENT_TYPE_OF_FEEDBACK[f.type],
            "device": f.device or None,
            "region": f.region or None,
        }
        for f in kept
        if f.type in EVENT_TYPE_OF_FEEDBACK
    ]
    events = pd.DataFrame(
        rows, columns=["user_id", "item_id", "timestamp", "event_type", "device", "region"]
    )
    counts = {
        "segments": stats.segments,
        "records": stats.records,
        "served_lists": sum(served_by_user.values()) - served_erased,
        "feedback_by_type": dict(sorted(types.items())),
        "unreadable_lines": stats.unreadable_lines,
        "events": len(events),
        "erasure_records": erasures.records,
        "erased_users": len(erasures.user_keys),
        "erased_feedback_records": len(feedback) - len(kept),
        "erased_served_lists": served_erased,
    }
    return events, counts


def merge(data_dir: Path, feedback_dir: Path, out_dir: Path) -> dict:
    """Writes base + feedback as a dataset directory; returns (and writes) the merge report."""
    base = load_dataset(data_dir)
    consumed: dict[str, int] = {}
    new, counts = feedback_events(feedback_dir, consumed)
    catalogue = set(base.items["item_id"].astype(str))
    known = new["item_id"].isin(catalogue)
    base_events = base.events[[c for c in EVENT_COLUMNS if c in base.events.columns]]
    merged = pd.concat([base_events, new[known]], ignore_index=True)
    for column in ("device", "region"):
        if column in merged and merged[column].isna().all():
            merged = merged.drop(columns=column)
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(data_dir).resolve():
        raise DatasetError(f"{out_dir}: the merged dataset must not overwrite the base data")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    write_dataset(base.items, merged, out_dir)
    base_users = set(base.events["user_id"].astype(str))
    report = {
        "base": {"dir": str(data_dir), "events": len(base.events), "users": len(base_users)},
        "feedback": {
            "dir": str(feedback_dir),
            **counts,
            "events_unknown_item": int((~known).sum()),
            "events_added": int(known.sum()),
            "users_with_feedback": int(new.loc[known, "user_id"].nunique()),
            "new_users": int(len(set(new.loc[known, "user_id"]) - base_users)),
        },
        "merged": {"dir": str(out_dir), "events": len(merged)},
    }
    # Only once the merged data is written: what retention may retire (`feedback_log.retire`).
    # A store mounted read-only here keeps everything (nothing recorded, nothing retired).
    try:
        record_consumed(feedback_dir, consumed)
        report["feedback"]["consumption_recorded"] = True
    except OSError as exc:
        print(f"warning: {feedback_dir}: consumption not recorded ({exc})", file=sys.stderr)
        report["feedback"]["consumption_recorded"] = False
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def compare(
    data_dir: Path, before: Path, after: Path, cache_dir: Path, progress: bool = True
) -> dict:
    """Test figures of both checkpoints (and most-popular) on `data_dir`'s leave-one-out split."""
    prepared = prepare(data_dir, cache_dir)
    split = prepared.split
    popularity = prepared.popularity
    tail = long_tail_mask(popularity)
    history = events_in_order(split.train, split.valid)
    report_path = Path(data_dir) / REPORT_FILE
    merged_report = json.loads(report_path.read_text()) if report_path.exists() else {}
    feedback_users = _feedback_users(data_dir, merged_report)
    in_feedback = split.test["user_id"].astype(str).isin(feedback_users).to_numpy()

    rows: dict[str, dict] = {}
    scorers: list[tuple[str, Path | None, ScoreFn, dict]] = [
        ("most_popular", None, most_popular(popularity), {"device": [], "region": []})
    ]
    for name, checkpoint in (("before", before), ("after", after)):
        model, ckpt = load_checkpoint(checkpoint)
        if ckpt.item_ids != prepared.item_ids:
            raise DatasetError(f"{checkpoint}: trained on another catalogue than {data_dir}")
        score_fn = model_score_fn(model, ckpt.model_config["max_history"])
        scorers.append((name, checkpoint, score_fn, ckpt.vocabularies.to_json()))
    for name, path, score_fn, vocab in scorers:
        # Context ids follow each model's own vocabularies.
        cases = make_cases(history, split.test, vocab["device"], vocab["region"])
        figures, _ = measure(score_fn, cases, popularity, tail, name, progress)
        subset: dict[str, float] = {}
        if in_feedback.any():
            sub_cases = make_cases(
                history, split.test[in_feedback], vocab["device"], vocab["region"]
            )
            sub, _ = measure(score_fn, sub_cases, popularity, tail, f"{name}, feedback", progress)
            subset = {k: sub[k] for k in ("ndcg@10", "recall@10")}
        rows[name] = {
            "checkpoint": None if path is None else str(path),
            "test": figures,
            "feedback_users": {**subset, "cases": int(in_feedback.sum())},
        }
    return {
        "data": {
            "dir": str(data_dir),
            "test_cases": len(split.test),
            "feedback_user_cases": int(in_feedback.sum()),
            "merge": merged_report,
        },
        "models": rows,
    }


def _feedback_users(data_dir: Path, merged_report: dict) -> set[str]:
    feedback_dir = merged_report.get("feedback", {}).get("dir")
    if not feedback_dir or not Path(feedback_dir).is_dir():
        return set()
    events, _ = feedback_events(Path(feedback_dir))
    return set(events["user_id"].astype(str))


def markdown(report: dict) -> str:
    lines = [
        "# Before and after retraining on feedback",
        "",
        f"Data: `{report['data']['dir']}`, leave-one-out test split, full ranking, "
        f"{report['data']['test_cases']} test cases ({report['data']['feedback_user_cases']} of "
        "users who gave feedback).",
        "",
        "| model | Recall@10 | NDCG@10 | Recall@50 | NDCG@50 | tail NDCG@10 | Coverage@10 "
        "| feedback users NDCG@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["models"].items():
        t = row["test"]
        fb = row["feedback_users"].get("ndcg@10")
        lines.append(
            f"| {name} | {t['recall@10']:.4f} | {t['ndcg@10']:.4f} | {t['recall@50']:.4f} "
            f"| {t['ndcg@50']:.4f} | {t['tail']['ndcg@10']:.4f} | {t['coverage@10']:.4f} "
            f"| {'-' if fb is None else f'{fb:.4f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltrec.retrain",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("merge", help="base dataset + feedback store -> dataset directory")
    m.add_argument("--data", type=Path, required=True, help="base dataset directory")
    m.add_argument("--feedback", type=Path, required=True, help="the gateway's feedback store")
    m.add_argument("--out", type=Path, required=True, help="merged dataset directory (replaced)")
    c = commands.add_parser("compare", help="two checkpoints on a dataset's test split")
    c.add_argument("--data", type=Path, required=True, help="the merged dataset directory")
    c.add_argument("--before", type=Path, required=True)
    c.add_argument("--after", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True, help="where report.{md,json} go")
    c.add_argument("--cache", type=Path, default=Path("artifacts/cache"))
    c.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            if not args.feedback.is_dir():
                print(f"error: {args.feedback}: no feedback store here", file=sys.stderr)
                return 2
            report = merge(args.data, args.feedback, args.out)
            fb = report["feedback"]
            print(
                f"merged {fb['events_added']} feedback events from {fb['segments']} segments "
                f"({fb['feedback_by_type']}, {fb['served_lists']} served lists, "
                f"{fb['events_unknown_item']} for unknown items dropped, "
                f"{fb['unreadable_lines']} unreadable lines; {fb['erased_feedback_records']} "
                f"feedback records of {fb['erased_users']} erased users skipped) into "
                f"{args.out}: {report['merged']['events']} events"
            )
        else:
            report = compare(args.data, args.before, args.after, args.cache, not args.no_progress)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "report.json").write_text(json.dumps(report, indent=2, default=float))
            text = markdown(report)
            (args.out / "report.md").write_text(text)
            print(text)
    except (DatasetError, ErasureError, RecordError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
