"""Events read in chunks: the same frames and report as the whole-file loader, at any chunk size.

`tests.support.reference_loader` is the whole-file loader as it shipped; every test here compares
against it (or against exact expected rows), so a chunk-boundary bug shows up as a difference.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ltrec.data import Dataset, DatasetError, convert_dataset, load_dataset
from ltrec.datasets.commands import main
from tests.support.reference_loader import reference_load_dataset

ITEMS = "item_id,title\n" + "".join(f"i{n},Item {n}\n" for n in range(6))


def write(root: Path, events: str, items: str = ITEMS, users: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.csv").write_text(items)
    (root / "events.csv").write_text(events)
    if users is not None:
        (root / "users.csv").write_text(users)
    return root


def assert_same(got: Dataset, want: Dataset) -> None:
    pd.testing.assert_frame_equal(got.events, want.events)
    pd.testing.assert_frame_equal(got.items, want.items)
    if want.users is None:
        assert got.users is None
    else:
        assert got.users is not None
        pd.testing.assert_frame_equal(got.users, want.users)
    assert got.report == want.report


# Bad rows in every chunk whatever the chunk size: missing values, blanks, unknown items and
# duplicates of rows several chunks earlier.
MESSY = (
    "user_id,item_id,timestamp,event_type,device,region,rating\n"
    "u1,i1,5,view,mobile,eu,1\n"  # 1
    ",i1,6,view,,,\n"  # 2 missing user
    "u2,i2,7,cart, desktop ,us,2.5\n"  # 3
    "u1,i9,8,view,,,\n"  # 4 unknown item
    "u1, i1 ,5,VIEW,tablet,,\n"  # 5 duplicate of row 1 (stripped, any case)
    "u3,,9,view,,,\n"  # 6 missing item
    "u2,i3,1,purchase,,asia,\n"  # 7 u2 again, earlier than row 3
    "u1,i2,,view,,,\n"  # 8 missing timestamp
    "  ,,,,,,\n"  # 9 all missing: counted once, as user
    "u3,i4,3,,,,\n"  # 10 missing event type
    "u1,i3,5,cart,mobile,eu,\n"  # 11 same time as row 1, kept after it
    "u2,i2,7,cart,,,\n"  # 12 duplicate of row 3
    "u4,i5,2,rating,,,4\n"  # 13
    "u1,i1,5,view,,,\n"  # 14 duplicate of row 1 again
    "u1,i1,4,view,,,\n"  # 15 not a duplicate: another time
)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 4, 7, 14, 15, 1000])
def test_any_chunk_size_matches_the_whole_file_loader(tmp_path: Path, chunk_rows: int) -> None:
    root = write(tmp_path / "shop", MESSY, users="user_id,age\nu1,3\nu1,4\n,5\n")

    got = load_dataset(root, chunk_rows=chunk_rows)

    assert_same(got, reference_load_dataset(root))
    assert got.report.dropped["events_missing_user_id"] == 2
    assert got.report.dropped["events_missing_item_id"] == 1
    assert got.report.dropped["events_missing_timestamp"] == 1
    assert got.report.dropped["events_missing_event_type"] == 1
    assert got.report.dropped["events_unknown_item"] == 1
    assert got.report.dropped["events_duplicate"] == 3
    assert got.events[["user_id", "item_id", "timestamp"]].values.tolist() == [
        ["u1", "i1", 4],
        ["u1", "i1", 5],
        ["u1", "i3", 5],
        ["u2", "i3", 1],
        ["u2", "i2", 7],
        ["u4", "i5", 2],
    ]
    assert got.events["device"].tolist() == [None, "mobile", "mobile", None, "desktop", None]


def test_a_user_split_across_chunks_is_one_sequence_in_first_seen_order(tmp_path: Path) -> None:
    """u2's events straddle three chunks of 2 with an earlier timestamp last; u1 is first seen in
    the second chunk only because u2's first row there is dropped."""
    events = (
        "user_id,item_id,timestamp,event_type\n"
        "u2,i1,30,view\n"
        "u1,i9,1,view\n"  # unknown item: u1's first row does not count for the order
        "u3,i2,5,view\n"
        "u2,i2,20,view\n"
        "u1,i3,2,view\n"
        "u2,i3,10,view\n"
    )
    root = write(tmp_path / "shop", events)

    got = load_dataset(root, chunk_rows=2)

    assert_same(got, reference_load_dataset(root))
    assert got.events["user_id"].tolist() == ["u2", "u2", "u2", "u3", "u1"]
    assert got.events["timestamp"].tolist() == [10, 20, 30, 5, 2]


def test_first_broken_row_is_named_across_chunks(tmp_path: Path) -> None:
    rows = "".join(f"u1,i1,{t},view\n" for t in range(7))
    root = write(
        tmp_path / "shop", "user_id,item_id,timestamp,event_type\n" + rows + "u1,i1,x,view\n"
    )

    for chunk_rows in (1, 3, 100):
        with pytest.raises(DatasetError, match=r"^events\.csv row 8, column timestamp: .*'x'"):
            load_dataset(root, chunk_rows=chunk_rows)


def test_parquet_float_ids_are_decided_on_the_whole_column(tmp_path: Path) -> None:
    """7.0 is "7" only when every id in the file is whole: a later chunk holding 7.5 must turn the
    first chunk's 7.0 into "7.0" as the whole-file read does."""
    root = tmp_path / "shop"
    root.mkdir()
    items = pd.DataFrame({"item_id": ["7", "7.0", "7.5", "8"], "title": ["a", "b", "c", "d"]})
    items.to_parquet(root / "items.parquet", index=False)
    for item_ids, kept in (([7.0, np.nan, 7.5], ["7.0", "7.5"]), ([7.0, np.nan, 8.0], ["7", "8"])):
        events = pd.DataFrame(
            {
                "user_id": [1, 1, 2],
                "item_id": item_ids,
                "timestamp": [1.0, 2.0, 3.0],
                "event_type": ["view"] * 3,
            }
        )
        events.to_parquet(root / "events.parquet", index=False, row_group_size=1)

        got = load_dataset(root, chunk_rows=1)

        assert_same(got, reference_load_dataset(root))
        assert got.events["item_id"].tolist() == kept
        assert got.events["user_id"].tolist() == ["1", "2"]


def test_empty_log_matches(tmp_path: Path) -> None:
    root = write(tmp_path / "shop", "user_id,item_id,timestamp,event_type\n")
    got = load_dataset(root, chunk_rows=2)
    assert_same(got, reference_load_dataset(root))
    assert got.report.events == 0


def test_chunk_rows_must_be_positive(tmp_path: Path) -> None:
    root = write(tmp_path / "shop", "user_id,item_id,timestamp,event_type\nu1,i1,1,view\n")
    with pytest.raises(ValueError, match=r"chunk_rows must be >= 1, got 0"):
        load_dataset(root, chunk_rows=0)


def random_log(rng: random.Random, n: int) -> str:
    """Events with every kind of dirt, few users and times so duplicates are common."""

    def pick(values: list[str]) -> str:
        return rng.choice(values)

    users = ["u1", "u2", " u2", "u3", "007", "", "  "]
    items = ["i0", "i1", "i2 ", "i5", "zz", ""]
    times = ["1", "2", "2.0", "3", ""]
    types = ["view", "VIEW", "cart", " purchase", ""]
    devices = ["", "mobile", "desktop", " tv "]
    rows = [
        ",".join((pick(users), pick(items), pick(times), pick(types), pick(devices), pick(times)))
        for _ in range(n)
    ]
    return "user_id,item_id,timestamp,event_type,device,rating\n" + "\n".join(rows) + "\n"


@pytest.mark.parametrize("seed", range(4))
def test_random_dirty_logs_match_at_random_chunk_sizes(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    root = write(tmp_path / "shop", random_log(rng, 80))
    want = reference_load_dataset(root)
    assert want.report.dropped["events_duplicate"] > 0  # the log exercises the global rule

    for chunk_rows in (1, rng.randint(2, 20), rng.randint(21, 79)):
        assert_same(load_dataset(root, chunk_rows=chunk_rows), want)


def test_compact_frame_holds_the_same_values_in_small_dtypes(tmp_path: Path) -> None:
    root = write(tmp_path / "shop", MESSY)
    plain = load_dataset(root).events

    compact = load_dataset(root, chunk_rows=4, compact=True).events

    assert compact["user_id"].cat.codes.dtype == np.int8
    assert compact["item_index"].dtype == np.int32
    assert compact["event_index"].dtype == np.int8
    assert compact["timestamp"].dtype == np.int64
    assert isinstance(compact["event_type"].dtype, pd.CategoricalDtype)
    for column in ("user_id", "item_id", "event_type"):
        assert compact[column].astype("str").tolist() == plain[column].tolist()
    for column in ("device", "region"):
        values = compact[column].astype(object)
        assert values.where(values.notna(), None).tolist() == plain[column].tolist()
    assert compact["item_index"].tolist() == plain["item_index"].tolist()
    assert compact["event_index"].tolist() == plain["event_index"].tolist()


def test_convert_writes_row_groups_that_load_to_the_same_frames(tmp_path: Path) -> None:
    source = write(tmp_path / "shop", MESSY, users="user_id,age\nu1,3\n")
    out = tmp_path / "clean"

    report = convert_dataset(source, out, chunk_rows=2)

    assert report == load_dataset(source).report
    assert pq.ParquetFile(out / "events.parquet").metadata.num_row_groups == 3
    converted = load_dataset(out)
    want = load_dataset(source)
    pd.testing.assert_frame_equal(converted.events, want.events)
    pd.testing.assert_frame_equal(converted.items, want.items)
    assert converted.users is not None and want.users is not None
    pd.testing.assert_frame_equal(converted.users, want.users)
    assert set(converted.report.dropped.values()) == {0}
    with pytest.raises(ValueError, match="out_dir must differ"):
        convert_dataset(source, source)


def test_cli_convert_and_check_with_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "shop", MESSY)
    out = tmp_path / "clean"

    assert main(["convert", str(source), "--output", str(out), "--chunk-rows", "3"]) == 0
    printed = capsys.readouterr().out
    assert "kept 6 items, 6 events, 3 users" in printed
    assert "events_duplicate 3" in printed
    assert main(["check", str(out), "--chunk-rows", "2"]) == 0
    assert "dropped: nothing" in capsys.readouterr().out
    assert main(["check", str(source), "--chunk-rows", "0"]) == 2
    assert "chunk_rows must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_movielens_1m_matches_the_whole_file_loader(tmp_path: Path) -> None:
    """A million real events, read in chunks that split users, against the whole-file read."""
    from ltrec.datasets.movielens import convert_movielens_1m

    root = convert_movielens_1m(tmp_path / "ml-1m")

    got = load_dataset(root, chunk_rows=300_007)

    assert_same(got, reference_load_dataset(root))
    assert got.report.events == 1_000_209
