"""The photo catalogue: loadable, images decode except the two broken on purpose, seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ltrec.data import Dataset, load_dataset
from ltrec.datasets.commands import photo_shop_main as main
from ltrec.datasets.photo_shop import (
    DEVICES,
    MAX_EVENTS,
    MIN_EVENTS,
    REGIONS,
    build_photo_catalogue,
)

USERS = 400


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_photo_catalogue(tmp_path_factory.mktemp("shop"), users=USERS, seed=7)


@pytest.fixture(scope="module")
def dataset(built: Path) -> Dataset:
    return load_dataset(built)


@pytest.fixture(scope="module")
def manifest(built: Path) -> dict:
    return json.loads((built / "manifest.json").read_text())


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_loads_cleanly_with_the_stated_counts(dataset: Dataset, manifest: dict) -> None:
    report = dataset.report
    assert not any(report.dropped.values()), report
    assert report.ignored_columns == {}
    assert 60 <= report.items <= 90
    assert 5 <= len(manifest["themes"]) <= 6
    assert report.users == USERS
    assert manifest["counts"] == {
        "items": report.items,
        "events": report.events,
        "users": USERS,
        "themes": len(manifest["themes"]),
        "photos": len(manifest["photos"]),
    }
    themed = [iid for theme in manifest["themes"].values() for iid in theme["items"]]
    assert sorted(themed) == sorted(dataset.items["item_id"])
    assert dataset.items["category"].str.count(r"\|").ge(1).all()
    assert dataset.items["price"].gt(0).all()
    assert dataset.items["brand"].notna().all() and dataset.items["description"].notna().all()


def test_images_decode_except_the_missing_and_corrupt_ones(
    built: Path, dataset: Dataset, manifest: dict
) -> None:
    images = manifest["images"]
    assert len(images["missing"]) == 1 and len(images["corrupt"]) == 1
    kinds = [iid for ids in images.values() for iid in ids]
    assert sorted(kinds) == sorted(dataset.items["item_id"])  # each item in exactly one list
    with_image = len(dataset.items) - len(images["none"])
    assert 0.55 <= with_image / len(dataset.items) <= 0.75

    path = dict(zip(dataset.items["item_id"], dataset.items["image"], strict=True))
    for iid in images["none"]:
        assert path[iid] is None
    for iid in images["good"]:
        assert Path(path[iid]).is_relative_to(built / "images")
        with Image.open(path[iid]) as image:
            image.load()
            assert min(image.size) >= 32 and max(image.size) <= 320
    (missing,) = images["missing"]
    assert manifest["image_paths"][missing].endswith(".png")
    assert not Path(path[missing]).exists()
    (corrupt,) = images["corrupt"]
    assert Path(path[corrupt]).suffix == ".png" and Path(path[corrupt]).stat().st_size > 0
    with pytest.raises(OSError), Image.open(path[corrupt]) as image:
        image.load()

    written = {p.name for p in (built / "images").glob("*.png")}
    assert written == {Path(p).name for p in manifest["photos"].values()} | {
        Path(path[corrupt]).name
    }
    assert len(set(manifest["image_paths"].values())) < len(manifest["image_paths"])  # shared
    assert sum(len(b) for b in files(built).values()) < 5_000_000


def test_events_cover_all_but_the_cold_items_with_a_long_tail(
    dataset: Dataset, manifest: dict
) -> None:
    events = dataset.events
    counts = events["item_id"].value_counts()
    cold = set(manifest["cold_items"])
    assert len(cold) == 5
    assert set(counts.index) == set(dataset.items["item_id"]) - cold
    # The broken-image items must be trained on, or nothing has to report them.
    assert set(manifest["images"]["missing"] + manifest["images"]["corrupt"]) <= set(counts.index)
    for theme in manifest["themes"].values():
        warm = counts.reindex([i for i in theme["items"] if i not in cold])
        assert warm.max() >= 5 * warm.min(), theme["title"]

    per_user = events.groupby("user_id").size()
    assert per_user.between(MIN_EVENTS, MAX_EVENTS).all()
    assert (
        events.groupby("user_id")["timestamp"].apply(lambda t: t.diff().dropna().gt(0).all()).all()
    )
    assert set(events["device"]) == set(DEVICES)
    assert set(events["region"]) <= set(REGIONS)
    share = events["event_type"].value_counts(normalize=True)
    assert share["view"] > 0.7 and share["cart"] > share["purchase"] > 0


def test_users_mostly_browse_their_favourite_themes(dataset: Dataset, manifest: dict) -> None:
    theme_of = {iid: name for name, t in manifest["themes"].items() for iid in t["items"]}
    favourites = manifest["user_themes"]
    assert set(favourites) == set(dataset.events["user_id"])
    assert {len(themes) for themes in favourites.values()} == {1, 2}
    events = dataset.events
    on_theme = pd.Series(
        [
            theme_of[i] in favourites[u]
            for u, i in zip(events["user_id"], events["item_id"], strict=True)
        ],
        index=events.index,
    )
    per_user = on_theme.groupby(events["user_id"]).mean()
    assert per_user.min() >= 0.75
    assert on_theme.mean() >= 0.85
    assert per_user.lt(1).sum() > USERS // 4  # some exploration happens


def test_same_seed_same_bytes_and_seed_changes_only_events(tmp_path: Path, built: Path) -> None:
    again = build_photo_catalogue(tmp_path / "again", users=USERS, seed=7)
    assert files(again) == files(built)
    other = files(build_photo_catalogue(tmp_path / "other", users=USERS, seed=8))
    first = files(built)
    assert other["events.csv"] != first["events.csv"]
    assert {k: v for k, v in other.items() if k.startswith(("items", "images"))} == {
        k: v for k, v in first.items() if k.startswith(("items", "images"))
    }


def test_command_line_with_the_fewest_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path / "cli"), "--users", "20", "--seed", "4"]) == 0
    assert "72 items in 6 themes" in capsys.readouterr().out
    small = load_dataset(tmp_path / "cli")
    cold = json.loads((tmp_path / "cli" / "manifest.json").read_text())["cold_items"]
    assert small.report.users == 20
    assert set(small.events["item_id"]) == set(small.items["item_id"]) - set(cold)
    assert small.events.groupby("user_id").size().between(MIN_EVENTS, MAX_EVENTS).all()
    assert main(["--out", str(tmp_path / "few"), "--users", "3"]) == 2
    assert "users must be >= 20, got 3" in capsys.readouterr().err
