"""The dataset layer: format errors name file/row/column, cleaning is counted, order is fixed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ltrec.data import (
    EVENT_TYPES,
    DatasetError,
    item_texts,
    leave_one_out,
    load_dataset,
    price_buckets,
    write_dataset,
)
from ltrec.datasets.commands import main
from ltrec.datasets.movielens import convert_movielens_1m, split_genres
from ltrec_core import contract

ITEMS_CSV = """item_id,title,description,category,brand,price,image
i1,Red Shoe,A shoe that is red,Clothing|Shoes,Acme,10.0,img/i1.jpg
i2,Blue Hat,,Clothing|Hats,,25.5,
i3,Green Scarf,Warm,,Knitco,,/abs/i3.png
"""

EVENTS_CSV = """user_id,item_id,timestamp,event_type,device,region
u2,i1,100,view,mobile,eu
u1,i2,50,VIEW,desktop,
u2,i2,90,cart,,us
u1,i1,50,Purchase,desktop,eu
u1,i3,10,rating,,
"""


def write_files(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def csv_to_parquet(root: Path, name: str, numeric: dict[str, str] | None = None) -> None:
    """Replace `name`.csv with `name`.parquet holding the same values (typed where asked)."""
    frame = pd.read_csv(root / f"{name}.csv", dtype=str, keep_default_na=False, na_values=[""])
    for column, dtype in (numeric or {}).items():
        frame[column] = frame[column].astype(dtype)
    frame.to_parquet(root / f"{name}.parquet", index=False)
    (root / f"{name}.csv").unlink()


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    return write_files(tmp_path / "shop", {"items.csv": ITEMS_CSV, "events.csv": EVENTS_CSV})


def test_event_types_come_from_the_serving_contract() -> None:
    assert EVENT_TYPES is contract.EVENT_TYPES


def test_loads_columns_types_and_order(shop: Path) -> None:
    ds = load_dataset(shop)

    assert list(ds.items.columns) == [
        "item_id",
        "title",
        "description",
        "category",
        "brand",
        "price",
        "image",
    ]
    assert ds.items["item_id"].tolist() == ["i1", "i2", "i3"]
    assert ds.items["brand"].tolist() == ["Acme", None, "Knitco"]
    assert ds.items["price"].tolist()[:2] == [10.0, 25.5]
    assert np.isnan(ds.items["price"].iloc[2])
    assert ds.items["image"].tolist() == [str(shop / "img/i1.jpg"), None, "/abs/i3.png"]

    events = ds.events
    assert list(events.columns) == [
        "user_id",
        "item_id",
        "timestamp",
        "event_type",
        "device",
        "region",
        "item_index",
        "event_index",
    ]
    assert events["timestamp"].dtype == np.int64
    # u2 appears first in the file, so its events come first; each user by timestamp.
    assert events["user_id"].tolist() == ["u2", "u2", "u1", "u1", "u1"]
    assert events["timestamp"].tolist() == [90, 100, 10, 50, 50]
    # Equal timestamps (u1 at 50) keep their file order: i2 (row 2) before i1 (row 4).
    assert events["item_id"].tolist() == ["i2", "i1", "i3", "i2", "i1"]
    assert events["event_type"].tolist() == ["cart", "view", "rating", "view", "purchase"]
    assert events["item_index"].tolist() == [2, 1, 3, 2, 1]
    assert events["event_index"].tolist() == [2, 1, 4, 1, 3]
    assert events["device"].tolist() == [None, "mobile", None, "desktop", "desktop"]
    assert events["region"].tolist() == ["us", "eu", None, None, "eu"]
    assert ds.users is None
    assert ds.root == shop


def test_many_equal_timestamps_keep_file_order(tmp_path: Path) -> None:
    shuffled = [7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6]
    items = "item_id,title\n" + "".join(f"i{n},Item {n}\n" for n in range(12))
    rows = "".join(f"u1,i{n},7,view\n" for n in shuffled)
    events = "user_id,item_id,timestamp,event_type\n" + rows + "u1,i0,6,cart\n"
    root = write_files(tmp_path, {"items.csv": items, "events.csv": events})

    ds = load_dataset(root)

    assert ds.events["timestamp"].tolist() == [6] + [7] * 12
    assert ds.events["item_id"].tolist() == ["i0"] + [f"i{n}" for n in shuffled]
    assert ds.events["item_index"].tolist() == [1] + [n + 1 for n in shuffled]


def test_missing_context_columns_are_added_as_none(tmp_path: Path) -> None:
    events = "user_id,item_id,timestamp,event_type\nu1,i1,5,view\n"
    root = write_files(tmp_path, {"items.csv": "item_id,title\ni1,A\n", "events.csv": events})

    ds = load_dataset(root)

    assert ds.events["device"].tolist() == [None]
    assert ds.events["region"].tolist() == [None]
    assert ds.items["description"].tolist() == [None]
    assert np.isnan(ds.items["price"].iloc[0])


def test_csv_and_parquet_load_the_same_content(shop: Path, tmp_path: Path) -> None:
    users = "user_id,age,zip\n007,25,02139\nu2,,\n"
    write_files(shop, {"users.csv": users})
    from_csv = load_dataset(shop)

    parquet = write_files(
        tmp_path / "pq", {"items.csv": ITEMS_CSV, "events.csv": EVENTS_CSV, "users.csv": users}
    )
    csv_to_parquet(parquet, "items", {"price": "float64"})
    csv_to_parquet(parquet, "events", {"timestamp": "int64"})
    csv_to_parquet(parquet, "users")
    from_parquet = load_dataset(parquet)

    assert sorted(p.name for p in parquet.iterdir()) == [
        "events.parquet",
        "items.parquet",
        "users.parquet",
    ]
    # Relative image paths resolve against each directory; everything else is identical.
    from_parquet.items["image"] = from_parquet.items["image"].str.replace(
        str(parquet), str(shop), regex=False
    )
    pd.testing.assert_frame_equal(from_csv.items, from_parquet.items)
    pd.testing.assert_frame_equal(from_csv.events, from_parquet.events)
    assert from_csv.users is not None and from_parquet.users is not None
    pd.testing.assert_frame_equal(from_csv.users, from_parquet.users)
    assert from_csv.users["zip"].tolist() == ["02139", None]
    assert from_csv.report.to_dict() == from_parquet.report.to_dict()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_write_dataset_round_trips(shop: Path, tmp_path: Path, fmt: str) -> None:
    ds = load_dataset(shop)
    out = tmp_path / "out"
    write_files(out, {"items.csv": "stale", "events.csv": "stale"})

    write_dataset(ds.items, ds.events, out, fmt=fmt)
    again = load_dataset(out)

    assert sorted(p.name for p in out.iterdir()) == [f"events.{fmt}", f"items.{fmt}"]
    pd.testing.assert_frame_equal(ds.events, again.events)
    assert again.items["item_id"].tolist() == ds.items["item_id"].tolist()
    assert again.report.ignored_columns == {}


def test_ids_keep_leading_zeros_and_are_stripped(tmp_path: Path) -> None:
    items = "item_id,title\n007,Spy Kit\n7,Seven\n"
    events = "user_id,item_id,timestamp,event_type\n0042, 007 ,1,view\n42,7,2,view\n"
    root = write_files(tmp_path, {"items.csv": items, "events.csv": events})

    ds = load_dataset(root)

    assert ds.items["item_id"].tolist() == ["007", "7"]
    assert ds.events["user_id"].tolist() == ["0042", "42"]
    assert ds.events["item_id"].tolist() == ["007", "7"]
    assert ds.events["item_index"].tolist() == [1, 2]


def test_parquet_integer_ids_become_strings(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    pd.DataFrame({"item_id": [5, 6], "title": ["A", "B"]}).to_parquet(tmp_path / "items.parquet")
    pd.DataFrame(
        {
            "user_id": [1.0, np.nan, 2.0],
            "item_id": [6, 5, 5],
            "timestamp": [3, 4, 5],
            "event_type": ["view", "view", "cart"],
        }
    ).to_parquet(tmp_path / "events.parquet")

    ds = load_dataset(tmp_path)

    assert ds.items["item_id"].tolist() == ["5", "6"]
    assert ds.events["user_id"].tolist() == ["1", "2"]
    assert ds.events["item_index"].tolist() == [2, 1]
    assert ds.report.dropped["events_missing_user_id"] == 1


EVENT_HEADER = "user_id,item_id,timestamp,event_type\n"


@pytest.mark.parametrize(
    ("events", "message"),
    [
        (
            EVENT_HEADER + "u1,i1,1,view\nu1,i1,2,view\nu1,i2,abc,view\nu1,i1,xyz,view\n",
            "events.csv row 3, column timestamp: expected integer seconds >= 0, got 'abc'",
        ),
        (
            EVENT_HEADER + "u1,i1,1,view\nu1,i1,-5,view\n",
            "events.csv row 2, column timestamp: expected integer seconds >= 0, got '-5'",
        ),
        (
            EVENT_HEADER + "u1,i1,1,view\nu1,i1,2,view\nu1,i1,3,view\nu1,i1,1.5,view\n",
            "events.csv row 4, column timestamp: expected integer seconds >= 0, got '1.5'",
        ),
        (
            EVENT_HEADER + "u1,i1,1,view\nu1,i1,2,click\n",
            "events.csv row 2, column event_type: expected one of view, cart, purchase, rating "
            "(any case), got 'click'",
        ),
        (
            # The first offending row wins even when a later column fails earlier in the file.
            EVENT_HEADER + "u1,i1,1,view\nu1,i1,2,like\nu1,i1,-1,view\n",
            "events.csv row 2, column event_type: expected one of view, cart, purchase, rating "
            "(any case), got 'like'",
        ),
        (
            # A bad value is an error even on a row that cleaning would drop (unknown item).
            EVENT_HEADER + "u1,i1,1,view\nu1,nope,oops,view\n",
            "events.csv row 2, column timestamp: expected integer seconds >= 0, got 'oops'",
        ),
        (
            "user_id,item_id,event_type\nu1,i1,view\n",
            "events.csv, column timestamp: required column is missing",
        ),
        (
            "user_id,item_id,timestamp,event_type,rating\nu1,i1,1,view,5\nu1,i1,2,view,five\n",
            "events.csv row 2, column rating: expected a number, got 'five'",
        ),
    ],
)
def test_event_errors_name_file_row_and_column(tmp_path: Path, events: str, message: str) -> None:
    root = write_files(tmp_path, {"items.csv": "item_id,title\ni1,A\ni2,B\n", "events.csv": events})

    with pytest.raises(DatasetError) as raised:
        load_dataset(root)

    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (
            "item_id,title,price\ni1,A,1\ni2,B,2\ni3,C,cheap\n",
            "items.csv row 3, column price: expected a price >= 0, got 'cheap'",
        ),
        (
            "item_id,title,price\ni1,A,-0.5\n",
            "items.csv row 1, column price: expected a price >= 0, got '-0.5'",
        ),
        ("item_id,name\ni1,A\n", "items.csv, column title: required column is missing"),
    ],
)
def test_item_errors_name_file_row_and_column(tmp_path: Path, items: str, message: str) -> None:
    root = write_files(tmp_path, {"items.csv": items, "events.csv": EVENT_HEADER})

    with pytest.raises(DatasetError) as raised:
        load_dataset(root)

    assert str(raised.value) == message


def test_parquet_error_row_is_position_plus_one(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    pd.DataFrame({"item_id": ["i1"], "title": ["A"]}).to_parquet(tmp_path / "items.parquet")
    pd.DataFrame(
        {
            "user_id": ["u1"] * 4,
            "item_id": ["i1"] * 4,
            "timestamp": [1.0, 2.0, 3.0, 3.25],
            "event_type": ["view"] * 4,
        }
    ).to_parquet(tmp_path / "events.parquet")

    with pytest.raises(DatasetError, match=r"^events\.parquet row 4, column timestamp: .*'3\.25'$"):
        load_dataset(tmp_path)


def test_whole_number_float_timestamps_are_accepted(tmp_path: Path) -> None:
    events = EVENT_HEADER + "u1,i1,978300760.0,view\n"
    root = write_files(tmp_path, {"items.csv": "item_id,title\ni1,A\n", "events.csv": events})

    assert load_dataset(root).events["timestamp"].tolist() == [978300760]


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "items.parquet").write_bytes(b"this is not parquet")
    (tmp_path / "events.csv").write_text(EVENT_HEADER)

    with pytest.raises(DatasetError, match=r"^items\.parquet: cannot read file"):
        load_dataset(tmp_path)


def test_csv_rows_with_surplus_fields_are_rejected(tmp_path: Path) -> None:
    events = EVENT_HEADER + "u1,i1,1,view,extra,more\n"
    root = write_files(tmp_path, {"items.csv": "item_id,title\ni1,A\n", "events.csv": events})

    with pytest.raises(DatasetError, match=r"^events\.csv: cannot read file: .*more fields"):
        load_dataset(root)


def test_both_or_neither_format_names_the_directory(tmp_path: Path) -> None:
    write_files(tmp_path, {"items.csv": "item_id,title\n", "events.csv": EVENT_HEADER})
    pd.DataFrame({"item_id": [], "title": []}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DatasetError, match="both items.csv and items.parquet") as raised:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(raised.value)

    (tmp_path / "events.csv").unlink()
    (tmp_path / "items.parquet").unlink()
    with pytest.raises(DatasetError, match="no events.csv or events.parquet") as raised:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(raised.value)


def test_every_cleaning_reason_is_counted(tmp_path: Path) -> None:
    items = (
        "item_id,title,colour\n"
        "i1,A,red\n"
        ",No Id,blue\n"  # missing item_id
        "i2,   ,green\n"  # blank title
        "i3,,green\n"  # missing title
        "i1,A again,red\n"  # duplicate item_id
        "i4,D,\n"
    )
    events = (
        "user_id,item_id,timestamp,event_type,session\n"
        "u1,i1,1,view,s\n"
        ",i1,2,view,s\n"  # missing user_id
        "u1,,3,view,s\n"  # missing item_id
        "u1,i1,,view,s\n"  # missing timestamp
        "u1,i1,4,,s\n"  # missing event_type
        "  ,,,,s\n"  # several missing: counted once, as the first (user_id)
        "u1,i2,5,view,s\n"  # unknown item (its item row was dropped)
        "u1,zz,6,view,s\n"  # unknown item
        "u1,i1,1,VIEW,t\n"  # duplicate of row 1 (event_type is case-insensitive)
        "u1,i1,1,cart,s\n"  # not a duplicate: another event type
        "u2,i4,9,purchase,s\n"
    )
    users = "user_id,age\nu1,30\n,40\nu1,31\nu3,50\n"
    root = write_files(tmp_path, {"items.csv": items, "events.csv": events, "users.csv": users})

    ds = load_dataset(root)
    report = ds.report

    assert report.dropped == {
        "items_missing_item_id": 1,
        "items_missing_title": 2,
        "items_duplicate_item_id": 1,
        "events_missing_user_id": 2,
        "events_missing_item_id": 1,
        "events_missing_timestamp": 1,
        "events_missing_event_type": 1,
        "events_unknown_item": 2,
        "events_duplicate": 1,
        "users_missing_user_id": 1,
        "users_duplicate_user_id": 1,
    }
    assert (report.items, report.events, report.users, report.user_profiles) == (2, 3, 2, 2)
    assert report.ignored_columns == {"items.csv": ["colour"], "events.csv": ["session"]}
    assert ds.items["title"].tolist() == ["A", "D"]
    assert ds.events[["user_id", "item_id", "event_type"]].values.tolist() == [
        ["u1", "i1", "view"],
        ["u1", "i1", "cart"],
        ["u2", "i4", "purchase"],
    ]
    assert ds.users is not None and ds.users["age"].tolist() == ["30", "50"]

    text = str(report)
    assert text.splitlines()[0] == "kept 2 items, 3 events, 2 users, 2 user profiles"
    assert "events_unknown_item 2" in text
    assert "ignored columns in events.csv: session" in text
    assert json.loads(json.dumps(report.to_dict()))["dropped"]["events_duplicate"] == 1


def test_clean_dataset_reports_nothing_dropped(shop: Path) -> None:
    report = load_dataset(shop).report
    assert set(report.dropped.values()) == {0}
    assert str(report).splitlines() == ["kept 3 items, 5 events, 2 users", "dropped: nothing"]


def test_leave_one_out_exact_rows() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b", "b", "c", "c", "c"],
            "item_id": ["1", "2", "3", "4", "5", "6", "7", "8", "9"],
            "timestamp": [1, 2, 3, 4, 1, 2, 5, 5, 6],
        }
    )

    split = leave_one_out(events)

    assert split.train["item_id"].tolist() == ["1", "2", "5", "6", "7"]
    assert split.valid["item_id"].tolist() == ["3", "8"]
    assert split.test["item_id"].tolist() == ["4", "9"]
    assert split.valid["user_id"].tolist() == ["a", "c"]
    assert split.test["user_id"].tolist() == ["a", "c"]
    assert list(split.train.index) == list(range(5))
    assert len(split.train) + len(split.valid) + len(split.test) == len(events)


def test_leave_one_out_on_loaded_dataset_uses_its_order(shop: Path) -> None:
    split = leave_one_out(load_dataset(shop).events)

    # u2 has 2 events (all train); u1 has 3: i3@10 train, i2@50 valid, i1@50 test (file order).
    assert split.train[["user_id", "item_id"]].values.tolist() == [
        ["u2", "i2"],
        ["u2", "i1"],
        ["u1", "i3"],
    ]
    assert split.valid["item_id"].tolist() == ["i2"]
    assert split.test["item_id"].tolist() == ["i1"]


def test_price_buckets_use_catalogue_terciles() -> None:
    prices = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, None, 100.0, 2.0])

    assert price_buckets(prices) == [
        "budget",
        "budget",
        "mid-range",
        "mid-range",
        "premium",
        "premium",
        None,
        "premium",
        "budget",
    ]
    assert price_buckets(pd.Series([9.0, 9.0, np.nan])) == ["mid-range", "mid-range", None]
    assert price_buckets(pd.Series([np.nan, np.nan])) == [None, None]


def test_item_texts(shop: Path) -> None:
    ds = load_dataset(shop)

    texts = item_texts(ds.items)

    assert texts == [
        "Red Shoe. Category: Clothing > Shoes. Brand: Acme. Price: budget. A shoe that is red",
        "Blue Hat. Category: Clothing > Hats. Price: premium.",
        "Green Scarf. Brand: Knitco. Warm",
    ]


def test_item_texts_truncates_long_descriptions_at_a_word() -> None:
    items = pd.DataFrame({"title": ["Toy Story (1995)!"], "description": ["word " * 200]})

    (text,) = item_texts(items)

    assert text.startswith("Toy Story (1995)! word word")
    assert text.endswith("word...")
    assert len(text) < len("Toy Story (1995)! ") + 305


def test_split_genres_keeps_hyphenated_genres_whole() -> None:
    assert split_genres("Crime Film-Noir Sci-Fi Children's") == [
        "Crime",
        "Film-Noir",
        "Sci-Fi",
        "Children's",
    ]
    assert split_genres(None) == []


def test_cli_check(shop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(shop)]) == 0
    assert "kept 3 items, 5 events, 2 users" in capsys.readouterr().out

    bad = write_files(
        tmp_path / "bad", {"items.csv": ITEMS_CSV, "events.csv": EVENT_HEADER + "u,i1,x,view\n"}
    )
    assert main(["check", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "events.csv row 1, column timestamp" in captured.err
    assert captured.out == ""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_movielens_1m_conversion(tmp_path: Path, fmt: str) -> None:
    started = time.perf_counter()
    out = convert_movielens_1m(tmp_path / "ml-1m", fmt=fmt)
    converted = time.perf_counter()
    ds = load_dataset(out)
    loaded = time.perf_counter()
    print(f"ml-1m {fmt}: convert {converted - started:.1f}s, load {loaded - converted:.1f}s")

    assert ds.report.events == 1_000_209
    assert ds.report.users == 6_040
    assert ds.report.items >= 3_706
    assert ds.events["item_id"].nunique() == 3_706
    assert set(ds.report.dropped.values()) == {0}
    assert ds.users is not None and len(ds.users) == 6_040
    assert (out / "SOURCE.md").is_file()
    assert json.loads((out / "source.json").read_text())["counts"]["events"] == 1_000_209

    toy_story = ds.items.set_index("item_id").loc["Toy Story (1995)"]
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["category"] == "Animation|Children's|Comedy"
    assert ds.items["category"].str.contains("Film-Noir", regex=False).sum() == 44
    assert set(ds.events["event_type"]) == {"rating"}
    assert set(ds.events["region"]) == {f"zip{d}" for d in range(10)}
    assert ds.events["device"].isna().all()
    assert ds.events["rating"].between(1, 5).all()
    first = ds.events.iloc[0]
    assert first["user_id"] == "1m_1"
    assert ds.events.groupby("user_id", sort=False)["timestamp"].is_monotonic_increasing.all()
    assert loaded - converted < 10


@pytest.mark.parametrize("module", ["ltrec.train", "experiments.report.cli"])
def test_training_commands_reject_a_bad_dataset_with_a_clear_error(
    module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad dataset directory is a one-line error and exit code 2, not a traceback."""
    import importlib

    main = importlib.import_module(module).main
    missing = tmp_path / "no-such-dataset"
    assert main(["--data", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {missing}: not a dataset directory" in capsys.readouterr().err
