"""Stores that do not grow forever: item store compaction (`ltrec_core.item_log`) and feedback
retention (`ltrec_core.feedback_log.retire`), in process. The crash tests (SIGKILL mid-way) are
`tests/integration/test_store_upkeep_crash.py`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from ltrec_core import feedback_log, item_log
from ltrec_core.feedback_log import read_records, record_consumed, retire
from ltrec_core.item_text import ItemFields
from ltrec_core.records import ItemDeleteRecord, ReadStats
from ltrec_core.segment_log import SegmentWriter, encode_lines
from server.catalogue import load_model_repository
from server.stores.feedback import FeedbackStore
from server.stores.items import ItemStore, NewItem
from tests.support.gateway import DIM, run_async, write_repository
from tests.support.store_logs import ItemWriter, apply, erasure, feedback, state_of, upsert


def lines_of(directory: Path) -> list[bytes]:
    """Every complete line of every segment (no snapshot): the whole history."""
    out: list[bytes] = []
    for path in item_log.snapshots(directory).values():
        raise AssertionError(f"unexpected snapshot {path}")
    for path in sorted(directory.glob("items-*.jsonl")):
        out.extend(path.read_bytes().splitlines())
    return out


def reference(lines: list[bytes]) -> dict:
    state: dict = {}
    for line in lines:
        apply(state, line)
    return state


# --- item store compaction ---------------------------------------------------------------------


def test_compaction_keeps_each_items_winner_and_deletes_what_it_covers(tmp_path: Path) -> None:
    a, b = ItemWriter(tmp_path, "a", 600), ItemWriter(tmp_path, "b", 600)
    for n in range(30):
        a.write([upsert(f"x{n % 7}", f"a{n}")])
        b.write([upsert(f"x{n % 5}", f"b{n}")])
        if n % 4 == 0:
            b.write([ItemDeleteRecord(item_id=f"x{n % 7}", request_id=f"bd{n}")])
    b.write([upsert("x0", "b-open")])  # b's last segment is still open (not full)
    a.log.close()  # a shut down (sealed)
    expected = reference(lines_of(tmp_path))
    segments_before = sorted(p.name for p in tmp_path.glob("items-*.jsonl"))
    open_b = max(p for p in segments_before if p.startswith("items-b-"))
    folded_lines = len(lines_of(tmp_path)) - len((tmp_path / open_b).read_bytes().splitlines())

    done = item_log.compact(tmp_path)

    assert done is not None and done.generation == 1
    assert done.records_read == folded_lines and done.records_kept == 7
    left = sorted(p.name for p in tmp_path.iterdir())
    # Everything of a and all but b's open segment are folded into the snapshot, and gone.
    assert left == [open_b, "items.snapshot-000001.jsonl"]
    assert done.segments == len(segments_before) - 1
    assert done.bytes_after < done.bytes_before
    assert state_of(tmp_path) == expected
    # The snapshot holds one line per item, the winner among what it covers (deletes included).
    snapshot = item_log.read_snapshot(tmp_path / "items.snapshot-000001.jsonl")
    ids = [json.loads(line)["item_id"] for line in snapshot.lines]
    assert len(ids) == len(set(ids)) == 7
    assert snapshot.sequences["a"] == a.log.sequence and snapshot.sequences["b"] < b.log.sequence
    # Nothing more to fold until b closes its segment; then the next generation.
    assert item_log.compact(tmp_path) is None
    b.write([upsert("late", "late")])
    b.log.close()
    expected = reference(
        list(snapshot.lines)
        + [*(tmp_path / open_b).read_bytes().splitlines()]
        + [
            line
            for p in tmp_path.glob("items-b-*.jsonl")
            if p.name != open_b
            for line in p.read_bytes().splitlines()
        ]
    )
    again = item_log.compact(tmp_path)
    assert again is not None and again.generation == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.snapshot-000002.jsonl"]
    assert state_of(tmp_path) == expected and expected["late"][1] == "item_upsert"


def test_a_poller_mid_read_neither_loses_nor_double_applies_records(tmp_path: Path) -> None:
    writer = ItemWriter(tmp_path, "a", 500)
    poller = item_log.ItemLogReader(tmp_path)
    seen: dict = {}
    from_segments: list[tuple[str, bytes]] = []

    def poll() -> None:
        for path, line in poller.read():
            apply(seen, line)
            if not path.name.startswith("items.snapshot"):
                from_segments.append((path.name, line))

    for n in range(40):
        writer.write([upsert(f"x{n % 9}", f"r{n}")])
        if n % 5 == 0:
            poll()
        if n % 13 == 12:  # the writer rotates; a compactor folds what the poller half read
            writer.log.close()
            history = reference(lines_of_all(tmp_path))
            assert item_log.compact(tmp_path) is not None
            assert state_of(tmp_path) == history
    writer.log.close()
    poll()
    assert seen == state_of(tmp_path)
    # A segment line is read once: the poller drops a segment once a snapshot covers it.
    assert len(from_segments) == len(set(from_segments))
    assert poller.snapshot.generation == 3 and poller.snapshots_loaded == 3


def lines_of_all(directory: Path) -> list[bytes]:
    snapshot = item_log.latest_snapshot(directory)
    out = list(snapshot.lines)
    for path in sorted(directory.glob("items-*.jsonl")):
        if not snapshot.covers(path):
            out.extend(path.read_bytes().splitlines())
    return out


def test_a_poller_that_finds_a_segment_gone_reads_it_from_the_new_snapshot(
    tmp_path: Path,
) -> None:
    writer = ItemWriter(tmp_path, "a", 10_000)
    writer.write([upsert("x", "r1")])
    poller = item_log.ItemLogReader(tmp_path)
    seen: dict = {}
    reading = poller.read()
    # The poller has listed the directory (no snapshot) and is about to read the segment...
    path, line = next(reading)
    apply(seen, line)
    writer.write([upsert("y", "r2")])
    writer.log.close()
    assert item_log.compact(tmp_path) is not None  # ...which is folded and deleted meanwhile
    for _, line in reading:
        apply(seen, line)
    assert set(seen) == {"x"}
    for _, line in poller.read():  # the next poll loads generation 1
        apply(seen, line)
    assert set(seen) == {"x", "y"} and seen == state_of(tmp_path)


def test_a_snapshot_that_is_not_whole_is_refused(tmp_path: Path) -> None:
    writer = ItemWriter(tmp_path, "a")
    writer.write([upsert("x", "r1"), upsert("y", "r2")])
    writer.log.close()
    item_log.compact(tmp_path)
    path = tmp_path / "items.snapshot-000001.jsonl"
    data = path.read_bytes()
    os.chmod(path, 0o640)
    path.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 1])  # one record short
    with pytest.raises(item_log.ItemLogError, match="not a whole item snapshot"):
        list(item_log.ItemLogReader(tmp_path).read())


def test_a_compactor_that_loses_the_race_changes_nothing(tmp_path: Path) -> None:
    writer = ItemWriter(tmp_path, "a")
    writer.write([upsert("x", "r1")])
    writer.log.close()
    # Another compactor published generation 1 first (here: an empty one covering nothing).
    (tmp_path / "items.snapshot-000001.jsonl").write_bytes(item_log.Snapshot(1).encode())
    before = sorted(p.name for p in tmp_path.iterdir())
    assert item_log.compact(tmp_path, now=0) is not None  # based on generation 1: makes 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.snapshot-000002.jsonl"]
    assert before != ["items.snapshot-000002.jsonl"]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@run_async
async def test_the_item_store_compacts_past_its_threshold_and_replicas_follow(
    tmp_path: Path,
) -> None:
    repository = write_repository(tmp_path / "model_repository")
    metadata, trained = load_model_repository(repository)
    store_dir = tmp_path / "items"
    a = ItemStore(
        store_dir,
        trained,
        metadata,
        replica="a",
        poll_interval_seconds=0.02,
        compact_tail_records=6,
    )
    b = ItemStore(store_dir, trained, metadata, replica="b", poll_interval_seconds=0.02)
    a.open()
    b.open()
    compactions = metric("ltrec_gateway_item_store_compactions_total", result="ok")
    await a.start()
    await b.start()
    try:
        for n in range(8):
            item = NewItem(f"new-{n}", ItemFields(title=f"New {n}"), f"New {n}.")
            await a.upsert([item], np.full((1, DIM), n, dtype=np.float32), f"r{n}")
        await b.delete(["new-3"], "d1")
        deadline = time.monotonic() + 10
        while not item_log.snapshots(store_dir) or b.catalogue.size != a.catalogue.size:
            assert time.monotonic() < deadline, "no compaction, or b did not follow"
            await asyncio_sleep(0.02)
        await asyncio_sleep(0.2)
        assert a.catalogue.item_ids == b.catalogue.item_ids
        assert "new-3" not in a.catalogue.index_of and "new-7" in a.catalogue.index_of
        assert metric("ltrec_gateway_item_store_compactions_total", result="ok") > compactions
        assert metric("ltrec_gateway_item_store_bytes") > 0
    finally:
        await a.close()
        await b.close()
    # A replica restarted under a compacted name continues after the covered sequence, and a
    # fresh replica rebuilds the same items from snapshot + tail.
    covered = item_log.covered_sequence(store_dir, "a")
    assert covered >= 1
    again = ItemStore(store_dir, trained, metadata, replica="a")
    again.open()
    assert again.catalogue.item_ids == a.catalogue.item_ids
    await again.start()
    await again.delete(["new-0"], "d2")
    await again.close()
    assert (store_dir / f"items-a-{covered + 1:06d}.jsonl").is_file() or any(
        int(p.name[8:14]) > covered for p in store_dir.glob("items-a-*.jsonl")
    )


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


# --- feedback retention ------------------------------------------------------------------------


def write_feedback(directory: Path, replica: str, records: list[dict], close: bool = True) -> None:
    log = SegmentWriter(directory, feedback_log.SEGMENT_PREFIX, replica, 10**9)
    log.open()
    log.write(encode_lines(records))
    if close:
        log.close()


def age(directory: Path, seconds: float) -> None:
    then = time.time() - seconds
    for path in directory.glob("feedback-*.jsonl"):
        os.utime(path, (then, then))


def request_ids(directory: Path) -> list[str]:
    return [r["request_id"] for r in read_records(directory)]


def test_only_consumed_closed_segments_older_than_retention_are_retired(tmp_path: Path) -> None:
    write_feedback(tmp_path, "a", [feedback("f1", "u1")])
    write_feedback(tmp_path, "a", [feedback("f2", "u2"), erasure("e1", "k" * 16)])
    write_feedback(tmp_path, "a", [feedback("f3", "u3")], close=False)  # a's open segment
    write_feedback(tmp_path, "b", [feedback("f4", "u4")])
    age(tmp_path, 3600)
    # Nothing was consumed: nothing is retired, however old.
    assert retire(tmp_path, 60) == feedback_log.Retirement(0, 0, 0)
    consumed: dict[str, int] = {}
    assert len(list(read_records(tmp_path, consumed=consumed))) == 5
    record_consumed(tmp_path, consumed)
    write_feedback(tmp_path, "a", [feedback("f5", "u5")])  # after the retraining: not consumed
    age(tmp_path, 3600)
    # Younger than the retention time: kept.
    assert retire(tmp_path, 7200).segments == 0
    retired = retire(tmp_path, 60)
    # a-1 and a-2 (consumed, closed, not a's last); a-3 is no longer a's last, but grew after
    # the retraining read it? No: a-3 was consumed whole and a-4 now follows it, so it goes too.
    # b-1 is b's last segment: kept, so a restarted b never reuses its sequence number.
    left = sorted(p.name for p in tmp_path.glob("feedback-*.jsonl"))
    assert retired.segments == 3 and retired.erasures_carried == 1
    assert left == [
        "feedback-_erasures-000001.jsonl",
        "feedback-a-000004.jsonl",
        "feedback-b-000001.jsonl",
    ]
    # The tombstone outlives its segment; unconsumed records are all there.
    stats = ReadStats()
    assert sorted(r["request_id"] for r in read_records(tmp_path, stats)) == ["e1", "f4", "f5"]
    assert stats.by_kind == {"user_erasure": 1, "feedback": 2}


def test_tombstones_are_carried_once_across_passes(tmp_path: Path) -> None:
    for n in range(3):
        write_feedback(tmp_path, "a", [feedback(f"f{n}", "u"), erasure(f"e{n}", "k" * 16)])
        write_feedback(tmp_path, "a", [feedback(f"g{n}", "u")])
        consumed: dict[str, int] = {}
        list(read_records(tmp_path, consumed=consumed))
        record_consumed(tmp_path, consumed)
        age(tmp_path, 100)
        retire(tmp_path, 10)
    names = sorted(p.name for p in tmp_path.glob("feedback-*.jsonl"))
    assert names == ["feedback-_erasures-000003.jsonl", "feedback-a-000006.jsonl"]
    assert sorted(request_ids(tmp_path)) == ["e0", "e1", "e2", "g2"]


def test_a_retraining_reading_during_retirement_still_sees_every_tombstone(
    tmp_path: Path,
) -> None:
    write_feedback(tmp_path, "a", [feedback("f1", "u")])
    write_feedback(tmp_path, "b", [erasure("e1", "k" * 16)])
    write_feedback(tmp_path, "b", [feedback("f2", "u")])
    consumed: dict[str, int] = {}
    list(read_records(tmp_path, consumed=consumed))
    record_consumed(tmp_path, consumed)
    age(tmp_path, 100)
    reading = read_records(tmp_path)
    first = next(reading)  # listed every segment, read a's
    assert first["request_id"] == "f1"
    assert retire(tmp_path, 10).erasures_carried == 1  # b-1 deleted before it was read
    assert [r["request_id"] for r in reading] == ["f2", "e1"]


def test_a_consumption_record_that_is_not_one_stops_retention(tmp_path: Path) -> None:
    write_feedback(tmp_path, "a", [feedback("f1", "u")])
    (tmp_path / feedback_log.CONSUMED_FILE).write_text("[]")
    with pytest.raises(ValueError, match="consumption record"):
        retire(tmp_path, 0)


@run_async
async def test_the_feedback_store_retires_and_reports_its_size(tmp_path: Path) -> None:
    write_feedback(tmp_path, "gw", [feedback("f1", "u")])
    consumed: dict[str, int] = {}
    list(read_records(tmp_path, consumed=consumed))
    record_consumed(tmp_path, consumed)
    age(tmp_path, 100)
    retired_before = metric("ltrec_gateway_feedback_segments_retired_total")
    store = FeedbackStore(tmp_path, replica="gw", retention_seconds=10)
    store.open()
    await store.start()
    await store.append([feedback("f2", "u")])
    await store.survey()  # (the pass at start may have retired it already)
    await store.close()
    assert metric("ltrec_gateway_feedback_segments_retired_total") == retired_before + 1
    assert metric("ltrec_gateway_feedback_store_segments") == 1
    assert metric("ltrec_gateway_feedback_store_bytes") == sum(
        p.stat().st_size for p in tmp_path.glob("feedback-*.jsonl")
    )
    assert request_ids(tmp_path) == ["f2"]
