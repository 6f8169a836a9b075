"""Retraining on feedback: the gateway's store merged into a dataset, then before/after compared."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ltrec.checkpoint import load_checkpoint
from ltrec.data import load_dataset, write_dataset
from ltrec.evaluation import events_in_order, make_cases, target_ranks
from ltrec.prepared import Prepared, prepare
from ltrec.retrain import REPORT_FILE, main, merge
from ltrec.scoring import model_score_fn
from ltrec.train import TrainConfig, train
from ltrec_core.erasure import KEY_FILE, ErasureError, load_or_create_key, tombstone, user_key
from ltrec_core.feedback_log import segments
from server.stores.feedback import FeedbackStore

T0 = 2_000_000_000  # after every base event


def record(user: str, item: str, kind: str, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "feedback",
        "request_id": f"req-{n}",
        "user_id": user,
        "item_id": item,
        "type": kind,
        "timestamp": T0 + n,
        "position": 0,
        "device": "tablet",
        "region": "r1",
        "model_version": "v1",
        "received_at": T0 + n,
        **extra,
    }


def write_store(directory: Path, records: list[dict[str, Any]]) -> None:
    async def write() -> None:
        store = FeedbackStore(directory, replica="gw-0")
        store.open()
        await store.start()
        store.offer({"kind": "served", "request_id": "req-0", "user_id": "u0", "items": ["m1"]})
        await store.append(records)
        await store.close()

    asyncio.run(write())


FEEDBACK = [
    record("u0", "m4", "impression", 1),  # exposure only
    record("u0", "m4", "click", 2),  # -> view
    record("u0", "m8", "cart", 3),
    record("u0", "m8", "purchase", 4),
    record("u1", "no-such-item", "click", 5),  # unknown item: dropped, counted
    record("newcomer", "m2", "purchase", 6),  # a user the base data has never seen
    record("newcomer", "m3", "click", 7),
    record("newcomer", "m5", "click", 8),
]


def test_merge_turns_interactions_into_events_and_counts_the_rest(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = tmp_path / "feedback"
    write_store(store, FEEDBACK)
    with segments(store)[-1].open("ab") as handle:
        handle.write(b'{"kind":"feedback","request_id":"torn"')  # a crash mid-write
    out = tmp_path / "merged"
    report = merge(tiny_data, store, out)

    base = load_dataset(tiny_data)
    merged = load_dataset(out)
    assert len(merged.items) == len(base.items)
    added = merged.events[merged.events["timestamp"] >= T0]
    assert added[["user_id", "item_id", "event_type", "device"]].values.tolist() == [
        ["u0", "m4", "view", "tablet"],
        ["u0", "m8", "cart", "tablet"],
        ["u0", "m8", "purchase", "tablet"],
        ["newcomer", "m2", "purchase", "tablet"],
        ["newcomer", "m3", "view", "tablet"],
        ["newcomer", "m5", "view", "tablet"],
    ]
    assert len(merged.events) == len(base.events) + 6
    # The feedback events are the newest of u0's history: they come last in its order.
    u0 = merged.events[merged.events["user_id"] == "u0"]
    assert u0["item_id"].tolist()[-3:] == ["m4", "m8", "m8"]
    fb = report["feedback"]
    assert fb["feedback_by_type"] == {"cart": 1, "click": 4, "impression": 1, "purchase": 2}
    assert (fb["served_lists"], fb["events"], fb["events_unknown_item"]) == (1, 7, 1)
    assert (fb["events_added"], fb["users_with_feedback"], fb["new_users"]) == (6, 2, 1)
    assert fb["unreadable_lines"] == 1
    assert json.loads((out / REPORT_FILE).read_text()) == report


def test_merge_refuses_to_overwrite_the_base_data(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "feedback"
    write_store(store, FEEDBACK[:2])
    args = ["merge", "--data", str(tiny_data), "--feedback", str(store)]
    assert main([*args, "--out", str(tiny_data)]) == 2
    assert "must not overwrite the base data" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 2
    assert "no feedback store here" in capsys.readouterr().err


def test_merge_leaves_out_erased_users_and_refuses_erasures_it_cannot_check(
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A tombstone (ForgetUser's erasure record) erases every record of its user: before it,
    after it, and one that holds the user's keyed hash instead of the id."""
    store = tmp_path / "feedback"
    store.mkdir()
    key = load_or_create_key(store, "gw-0")
    assert load_or_create_key(store, "gw-1") == key  # made once, then shared
    erased = tombstone("newcomer", key, "erase-1", T0).to_json()
    hashed = record(user_key("newcomer", key), "m9", "purchase", 9)
    write_store(store, [*FEEDBACK, erased, record("newcomer", "m6", "cart", 10), hashed])
    out = tmp_path / "merged"
    report = merge(tiny_data, store, out)
    added = load_dataset(out).events
    added = added[added["timestamp"] >= T0]
    assert added[["user_id", "item_id", "event_type"]].values.tolist() == [
        ["u0", "m4", "view"],
        ["u0", "m8", "cart"],
        ["u0", "m8", "purchase"],
    ]
    fb = report["feedback"]
    assert (fb["erasure_records"], fb["erased_users"], fb["erased_feedback_records"]) == (1, 1, 5)
    assert (fb["users_with_feedback"], fb["new_users"]) == (1, 0)
    assert fb["feedback_by_type"] == {"cart": 1, "click": 2, "impression": 1, "purchase": 1}
    assert b"newcomer" not in b"".join(
        line for p in segments(store) for line in p.read_bytes().splitlines() if b"erasure" in line
    )

    # Fails closed: without the key, or with another one, the erased cannot be told apart.
    args = ["merge", "--data", str(tiny_data), "--feedback", str(store), "--out", str(out)]
    (store / KEY_FILE).rename(tmp_path / "kept.key")
    with pytest.raises(ErasureError, match=f"erasure records but no {KEY_FILE}"):
        merge(tiny_data, store, out)
    load_or_create_key(store, "gw-0")  # a new, different key
    assert main(args) == 2
    assert "was written with key" in capsys.readouterr().err
    (store / KEY_FILE).write_text("not a key\n")
    assert main(args) == 2
    assert "not an erasure key" in capsys.readouterr().err
    (tmp_path / "kept.key").replace(store / KEY_FILE)
    assert main(args) == 0


# Genre-0 users (u0, u4, ..., u28) stay in genre 0 in the base data; in the feedback each of them
# buys this comedy (genre 1), so only the feedback can make the model recommend it to them.
FANS = [f"u{u}" for u in range(0, 30, 4)]
PROMOTED = "m37"


def promoted_ranks(prepared: Prepared, checkpoint: Path) -> np.ndarray:
    """Rank of PROMOTED among each fan's candidates, given the fan's base history: the same
    input for the model before and after retraining."""
    model, ckpt = load_checkpoint(checkpoint)
    split = prepared.split
    targets = split.test[split.test["user_id"].isin(FANS)].assign(
        item_index=prepared.item_ids.index(PROMOTED) + 1
    )
    vocab = ckpt["vocabularies"]
    cases = make_cases(
        events_in_order(split.train, split.valid), targets, vocab["device"], vocab["region"]
    )
    assert len(cases) == len(FANS)
    score_fn = model_score_fn(model, ckpt["model_config"]["max_history"])
    rows = np.arange(len(cases))
    return target_ranks(score_fn(cases, rows), cases, rows)


def test_retrain_and_compare_before_and_after(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = TrainConfig(
        epochs=2,
        batch_size=16,
        patience=5,
        model={
            "embedding_dim": 16,
            "n_layers": 1,
            "n_heads": 1,
            "max_history": 20,
            # Off: the predicted ID vectors of items without training events are refitted by
            # each training on its own set of trained items, which moves many of this tiny
            # catalogue's competitors between the two runs; this test isolates the feedback.
            "new_item_id_map": False,
        },
    )
    cache = tmp_path / "cache"
    base = prepare(tiny_data, cache)
    torch.manual_seed(0)  # `train` draws the initial weights from the global generator
    train(base, cfg, tmp_path / "before", progress=False)
    store = tmp_path / "feedback"
    # Every genre-0 user buys PROMOTED, then clicks two more genre-0 items (which become the
    # validation and test targets; the purchase is a training event).
    write_store(
        store,
        [
            record(user, item, kind, 10 * k + j, device="mobile")
            for k, user in enumerate(FANS)
            for j, (item, kind) in enumerate(
                [(PROMOTED, "purchase"), ("m20", "click"), ("m24", "click")]
            )
        ],
    )
    merged = tmp_path / "merged"
    assert (
        main(["merge", "--data", str(tiny_data), "--feedback", str(store), "--out", str(merged)])
        == 0
    )
    # The feedback is in the merged data: 3 events per fan, the purchases among the training
    # events (base data has no genre-0 user with a comedy).
    base_events, merged_events = load_dataset(tiny_data).events, load_dataset(merged).events
    assert len(merged_events) == len(base_events) + 3 * len(FANS)

    def fan_purchases(events: pd.DataFrame) -> int:
        return int((events["user_id"].isin(FANS) & (events["item_id"] == PROMOTED)).sum())

    assert (fan_purchases(base_events), fan_purchases(merged_events)) == (0, len(FANS))
    retrained = prepare(merged, cache)
    promoted = retrained.item_ids.index(PROMOTED) + 1
    assert fan_purchases(retrained.split.train) == len(FANS)
    assert retrained.popularity[promoted] >= base.popularity[promoted] + len(FANS)
    torch.manual_seed(0)  # the same initial weights: only the data differ
    train(retrained, cfg, tmp_path / "after", progress=False)
    before, after = tmp_path / "before" / "checkpoint.pt", tmp_path / "after" / "checkpoint.pt"
    # What the feedback changed: the fans' recommendations now rank PROMOTED higher.
    ranks_before, ranks_after = promoted_ranks(base, before), promoted_ranks(base, after)
    assert (ranks_after < ranks_before).all(), (ranks_before, ranks_after)
    assert np.median(ranks_after) <= np.median(ranks_before) / 2, (ranks_before, ranks_after)
    out = tmp_path / "report"
    args = ["compare", "--data", str(merged), "--out", str(out), "--cache", str(cache)]
    assert main([*args, "--before", str(before), "--after", str(after), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    users = pd.read_parquet(merged / "events.parquet")["user_id"].nunique()
    assert report["data"]["test_cases"] == users == 30
    assert report["data"]["feedback_user_cases"] == 8  # users 0, 4, ..., 28
    assert report["data"]["merge"]["feedback"]["events_added"] == 3 * len(FANS)
    assert set(report["models"]) == {"most_popular", "before", "after"}
    for row in report["models"].values():
        assert 0 <= row["test"]["ndcg@10"] <= row["test"]["recall@10"] <= 1
        assert row["feedback_users"]["cases"] == 8
        assert 0 <= row["feedback_users"]["ndcg@10"] <= 1
    md = (out / "report.md").read_text()
    assert "| before |" in md and "| after |" in md and "| most_popular |" in md
    # A checkpoint of another catalogue is refused.
    other = tmp_path / "other"
    items = load_dataset(tiny_data).items.iloc[:-1]
    events = load_dataset(tiny_data).events
    write_dataset(items, events[events["item_id"].isin(items["item_id"])], other)
    assert (
        main([*args[:2], str(other), *args[3:], "--before", str(before), "--after", str(after)])
        == 2
    )
