"""Compaction and retention killed anywhere lose nothing acknowledged, and a polling reader stays
consistent (`ltrec_core.item_log`, `ltrec_core.feedback_log.retire`).

Like `test_feedback_durability.py`: real processes, SIGKILL. A writer process appends records
through the stores' segment log and prints each record once its write returned (fsync'd: what
the gateway acknowledges); a compactor (or retirer) process runs in a loop and is SIGKILLed at
random moments, restarted, killed again; a reader polls in this process throughout. At the end
the writer is killed too, one last pass runs to completion, and every acknowledged record must be
where it belongs.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ltrec_core import feedback_log, item_log
from ltrec_core.feedback_log import read_records, record_consumed
from tests.support.store_logs import apply, state_of

pytestmark = [pytest.mark.integration]

KILLS = 12


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.store_logs", *args],
        stdout=subprocess.PIPE,
        text=True,
    )


class Acks(threading.Thread):
    """Collects the request ids a writer process printed (acknowledged)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.ids: list[str] = []

    def run(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.endswith("\n"):  # a line cut by the kill was not acknowledged
                self.ids.extend(line.strip().split(","))


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def kill_repeatedly(command: list[str], rng: random.Random) -> int:
    """Starts `command`, lets it finish a first pass, kills it at a random moment of its next
    ones, KILLS times; returns the passes it finished in all."""
    passes = 0
    for _ in range(KILLS):
        process = start(*command)
        assert process.stdout is not None
        assert process.stdout.readline(), "the pass loop died"
        time.sleep(rng.uniform(0.0, 0.3))
        kill(process)
        passes += 1 + len(process.stdout.read().splitlines())
    return passes


def test_items_survive_compactions_killed_anywhere_and_a_poller_stays_consistent(
    tmp_path: Path,
) -> None:
    rng = random.Random(16)
    writers = [start("write-items", str(tmp_path), name) for name in ("a", "b")]
    acks = [Acks(w) for w in writers]
    for a in acks:
        a.start()
    polled: dict = {}
    sizes: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def poll() -> None:
        reader = item_log.ItemLogReader(tmp_path)
        try:
            while not stop.is_set():
                for _, line in reader.read():
                    apply(polled, line)
                assert len(polled) >= (sizes[-1] if sizes else 0), "the poller lost items"
                sizes.append(len(polled))
                time.sleep(0.005)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    passes = kill_repeatedly(["compact", str(tmp_path)], rng)
    for w in writers:
        kill(w)
    for a in acks:
        a.join(timeout=10)
    done = item_log.compact(tmp_path)  # the restart: one pass to completion
    time.sleep(0.1)
    stop.set()
    poller.join(timeout=30)
    assert not errors, errors

    final = state_of(tmp_path)
    acked = [i for a in acks for i in a.ids]
    assert len(acked) > 200, "the writers hardly wrote"
    # The compactions published, killed or not. The restart's pass may find nothing to fold
    # (None) when the writers closed no segment since the last pass: a slow machine.
    latest = item_log.latest_snapshot(tmp_path).generation
    assert done is None or done.generation == latest
    assert latest > KILLS, f"compactions rarely published: generation {latest}"
    # Every acknowledged upsert is there, live, unless an acknowledged (or the in-flight)
    # delete of its item came later; nothing else changes an item.
    lost = []
    for request in acked:
        kind, item = request.split(" ")
        entry = final.get(item)
        if entry is None:
            lost.append(request)
        elif kind == "d":
            assert entry[1:] == ("item_delete", request), (request, entry)
        else:
            assert entry[2] in (request, f"d {item}"), (request, entry)
    assert not lost, f"{len(lost)} acknowledged records lost, e.g. {lost[:5]}"
    # The poller, which read throughout, agrees with a reader starting now.
    assert polled == final
    print(
        f"\ncompaction kill test: {len(acked)} acknowledged, {KILLS} compactors killed after "
        f"{passes} passes, generation {latest}, {len(final)} items, 0 lost"
    )


def test_feedback_survives_retention_killed_anywhere_and_tombstones_stay(tmp_path: Path) -> None:
    rng = random.Random(8)
    writer = start("write-feedback", str(tmp_path), "gw")
    acks = Acks(writer)
    acks.start()
    consumed_ids: set[str] = set()
    stop = threading.Event()
    errors: list[BaseException] = []
    tombstones_seen: list[int] = []

    def retrain() -> None:
        """Retrainings in a loop: read everything, record what was read."""
        try:
            while not stop.is_set():
                known = {i for i in acks.ids if i.startswith("e-")}
                consumed: dict[str, int] = {}
                ids = [r["request_id"] for r in read_records(tmp_path, consumed=consumed)]
                missing = known - set(ids)
                assert not missing, f"a reader missed tombstones {sorted(missing)[:5]}"
                tombstones_seen.append(len(known))
                consumed_ids.update(ids)
                record_consumed(tmp_path, consumed)
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=retrain)
    time.sleep(0.3)
    reader.start()
    passes = kill_repeatedly(["retire", str(tmp_path)], rng)
    kill(writer)
    acks.join(timeout=10)
    stop.set()
    reader.join(timeout=60)
    assert not errors, errors
    retired = feedback_log.retire(tmp_path, 0.0)  # the restart: one pass to completion
    del retired

    acked = set(acks.ids)
    stored = {r["request_id"] for r in read_records(tmp_path)}
    assert len(acked) > 200 and passes > KILLS
    # Retired: only what a retraining had read. Every tombstone is kept.
    lost = acked - stored - consumed_ids
    assert not lost, f"{len(lost)} acknowledged, never consumed records lost: {sorted(lost)[:5]}"
    tombstones = {i for i in acked if i.startswith("e-")}
    assert tombstones and tombstones <= stored
    assert len(stored) < len(acked), "retention retired nothing"
    assert max(tombstones_seen) > 0
    print(
        f"\nretention kill test: {len(acked)} acknowledged, {len(acked - stored)} retired after "
        f"consumption, {len(tombstones)} tombstones all kept, {KILLS} retirers killed after "
        f"{passes} passes"
    )
