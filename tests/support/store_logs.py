"""Item and feedback log records written the way the gateway's stores write them, the state a
reader should arrive at, and a worker process for the crash tests (`tests/integration/
test_store_upkeep_crash.py`):

    python -m tests.support.store_logs write-items DIR REPLICA     # prints acked requests (a,b)
    python -m tests.support.store_logs write-feedback DIR REPLICA  # the same, feedback lines
    python -m tests.support.store_logs compact DIR                 # compacts in a loop
    python -m tests.support.store_logs retire DIR                  # retires in a loop
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from ltrec_core import feedback_log, item_log
from ltrec_core.records import (
    FeedbackRecord,
    ItemDeleteRecord,
    ItemUpsertRecord,
    LogPosition,
    UserErasureRecord,
)
from ltrec_core.segment_log import SegmentWriter, encode_lines

Key = tuple[float, str, int, int]


def upsert(item_id: str, request_id: str) -> ItemUpsertRecord:
    return ItemUpsertRecord(
        item_id=item_id,
        title=f"T {item_id}",
        description="",
        category="",
        brand="",
        price_bucket="",
        attributes={},
        image_path="",
        image_bytes=0,
        image_encoded=False,
        text=f"T {item_id}.",
        vector="AAAAAA==",
        image_features=None,
        model_version="1",
        request_id=request_id,
    )


class ItemWriter:
    """Appends item records with their positions, as `server.stores.items.ItemStore` does."""

    def __init__(self, directory: Path, replica: str, max_segment_bytes: int = 4096) -> None:
        self.replica = replica
        self.log = SegmentWriter(directory, item_log.SEGMENT_PREFIX, replica, max_segment_bytes)
        self.log.open()
        covered = item_log.covered_sequence(directory, replica)
        self.log.sequence = max(self.log.sequence, covered)
        self._segment = self._line = 0

    def write(self, records: list[ItemUpsertRecord | ItemDeleteRecord]) -> None:
        segment = self.log.begin()
        if segment != self._segment:
            self._segment, self._line = segment, 0
        placed = []
        for record in records:
            self._line += 1
            position = LogPosition(time.time(), self.replica, segment, self._line)
            placed.append(_place(record, position))
        self.log.write(encode_lines([r.to_json() for r in placed]))


def _place(
    record: ItemUpsertRecord | ItemDeleteRecord, position: LogPosition
) -> ItemUpsertRecord | ItemDeleteRecord:
    return dataclasses.replace(record, position=position)


def apply(state: dict[str, tuple[Key, str, str]], line: bytes) -> None:
    """Last writer wins: item id -> (key, kind, request_id)."""
    try:
        raw = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    key = (raw["ts"], raw["replica"], raw["segment"], raw["line"])
    current = state.get(raw["item_id"])
    if current is None or current[0] < key:
        state[raw["item_id"]] = (key, raw["kind"], raw["request_id"])


def state_of(directory: Path) -> dict[str, tuple[Key, str, str]]:
    """What a reader starting now arrives at."""
    state: dict[str, tuple[Key, str, str]] = {}
    for _, line in item_log.ItemLogReader(directory).read():
        apply(state, line)
    return state


def feedback(request_id: str, user_id: str) -> dict[str, Any]:
    return FeedbackRecord(
        request_id=request_id,
        user_id=user_id,
        item_id="i1",
        type="click",
        timestamp=1,
        position=0,
        device="",
        region="",
        model_version="1",
        received_at=time.time(),
    ).to_json()


def erasure(request_id: str, key_id: str) -> dict[str, Any]:
    return UserErasureRecord(
        user_key=hashlib.sha256(request_id.encode()).hexdigest(),
        key_id=key_id,
        request_id=request_id,
        erased_at=time.time(),
    ).to_json()


def _write_items(directory: Path, replica: str) -> None:
    writer = ItemWriter(directory, replica)
    n = 0
    while True:
        n += 1
        records: list[ItemUpsertRecord | ItemDeleteRecord] = [
            upsert(f"{replica}-{n}", f"u {replica}-{n}")
        ]
        if n > 10 and n % 3 == 0:  # delete an earlier item of this writer
            item = f"{replica}-{n - 10}"
            records.append(ItemDeleteRecord(item_id=item, request_id=f"d {item}"))
        writer.write(records)
        print(",".join(r.request_id for r in records), flush=True)
        time.sleep(0.002)


def _write_feedback(directory: Path, replica: str) -> None:
    log = SegmentWriter(directory, feedback_log.SEGMENT_PREFIX, replica, 4096)
    log.open()
    n = 0
    while True:
        n += 1
        records = [feedback(f"f-{n}", f"user-{n % 7}")]
        if n % 25 == 0:
            records.append(erasure(f"e-{n}", "k" * 16))
        log.write(encode_lines(records))
        print(",".join(r["request_id"] for r in records), flush=True)
        time.sleep(0.002)


def main(argv: list[str]) -> int:
    command, directory = argv[0], Path(argv[1])
    if command == "write-items":
        _write_items(directory, argv[2])
    elif command == "write-feedback":
        _write_feedback(directory, argv[2])
    elif command == "compact":
        while True:
            done = item_log.compact(directory)
            print("compacted" if done else "nothing", flush=True)
    elif command == "retire":
        while True:
            retired = feedback_log.retire(directory, 0.0)
            print(f"retired {retired.segments}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
