"""A small shop whose items carry real photos, for end-to-end tests of image-bearing items.

MovieLens has no images, so the image path of training and serving needs a catalogue that does.
The photos are the sample images bundled with scikit-image (`skimage.data`, loaded offline; each
loader's docstring gives the image's source and licence), downscaled to at most 320 px so the
directory stays a few MB.

Usage::

    python -m ltrec.datasets photo-shop --out data/photo-shop [--users 400] [--seed 0]

The directory holds ``items.csv``, ``events.csv``, ``images/*.png``, ``manifest.json`` and
``source.json``:

- 72 items in 6 themes (cat supplies, coffee, space, motorcycle gear, photography, equestrian),
  12 per theme, each theme's products pictured by a matching photo; several items share a photo.
- 48 items have an ``image`` cell and 24 have none. Of the 48, exactly two are broken on purpose,
  because training must report them and treat those items as image-less:

  * missing: ``p029`` (70 mm Refractor Telescope) points at ``images/p029.png``, never written;
  * corrupt: ``p004`` (Multi-Level Cat Tree) points at ``images/p004.png``, which holds the PNG
    signature followed by garbage bytes, so it cannot be decoded.

- Events: each user has one or two favourite themes and 8-30 events (views, some followed by a
  cart and a purchase of the same item) with strictly increasing timestamps, a device and a
  region. Within a theme, item popularity follows a Zipf law so some items are rare. Every item
  has at least one event except 5 cold items (``p011``, ``p024``, ``p034``, ``p047``, ``p058``),
  which exist in the catalogue only.

The catalogue (items, images, manifest's item lists) is fixed; ``--seed`` shapes only the events
and the same seed gives byte-identical files. ``manifest.json`` lists, among other things, the
item ids under ``images.good`` / ``images.missing`` / ``images.corrupt`` / ``images.none``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ltrec.data import write_dataset
from ltrec.datasets.photo_shop_products import CORRUPT, MISSING, THEMES, Product, Theme

__all__ = [
    "CORRUPT",
    "DEVICES",
    "MAX_EVENTS",
    "MIN_EVENTS",
    "MISSING",
    "REGIONS",
    "THEMES",
    "build_photo_catalogue",
]


PHOTO_MAX_SIDE = 320
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 2024-03-01 00:00:00 UTC: events start within 60 days after it.
BASE_TIMESTAMP = 1_709_251_200
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet")
DEVICE_SHARE: tuple[float, ...] = (0.55, 0.35, 0.10)
REGIONS: tuple[str, ...] = ("eu-west", "eu-north", "us-east", "us-west", "apac")
REGION_SHARE: tuple[float, ...] = (0.30, 0.15, 0.25, 0.20, 0.10)
MIN_EVENTS, MAX_EVENTS = 8, 30
# Off-theme browsing: its chance per visit and its cap, so favourites are always the bulk.
OFF_THEME_CHANCE = 0.1
OFF_THEME_MAX_SHARE = 0.2
CART_CHANCE = 0.18
PURCHASE_AFTER_CART_CHANCE = 0.45
ZIPF_EXPONENT = 1.2
MIN_USERS = 20


def item_id(index: int) -> str:
    """``p001``...: zero-padded, so the loader's keep-ids-as-text rule is exercised too."""
    return f"p{index + 1:03d}"


def _catalogue() -> list[tuple[str, Theme, Product]]:
    rows: list[tuple[str, Theme, Product]] = []
    for theme in THEMES:
        for product in theme.products:
            rows.append((item_id(len(rows)), theme, product))
    return rows


def _load_photo(name: str) -> Image.Image:
    import skimage.data  # imported here: only building the directory needs scikit-image

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    if array.dtype == np.bool_:  # horse is a binary silhouette
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(np.ascontiguousarray(array))
    image.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def _corrupt_bytes() -> bytes:
    """A PNG signature (so the file looks like a PNG) followed by bytes no decoder accepts."""
    garbage = np.random.default_rng(20240301).integers(0, 256, size=2048, dtype=np.uint8)
    return PNG_SIGNATURE + b"this is not image data" + garbage.tobytes()


def _write_images(
    out_dir: Path, catalogue: list[tuple[str, Theme, Product]]
) -> tuple[dict[str, str], dict[str, str]]:
    """Write the photos and the corrupt file; return (photo -> path, item -> image cell)."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    photos: dict[str, str] = {}
    cells: dict[str, str] = {}
    for iid, _, product in catalogue:
        if product.photo is None:
            continue
        if product.photo in (MISSING, CORRUPT):
            relative = f"images/{iid}.png"
            if product.photo == MISSING:
                (out_dir / relative).unlink(missing_ok=True)  # a stale file would hide the case
            else:
                (out_dir / relative).write_bytes(_corrupt_bytes())
            cells[iid] = relative
            continue
        if product.photo not in photos:
            relative = f"images/{product.photo}.png"
            _load_photo(product.photo).save(out_dir / relative, format="PNG", optimize=True)
            photos[product.photo] = relative
        cells[iid] = photos[product.photo]
    return photos, cells


# --- Events -------------------------------------------------------------------------------------


def _zipf_weights(n: int, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights over n items with the popularity ranks shuffled, so the head item varies."""
    ranks = rng.permutation(n) + 1
    weights = 1.0 / ranks.astype(np.float64) ** ZIPF_EXPONENT
    return weights / weights.sum()


@dataclass
class _Event:
    item_id: str
    timestamp: int
    event_type: str
    device: str


def _user_events(
    rng: np.random.Generator,
    favourites: list[int],
    theme_items: list[list[str]],
    theme_weights: list[np.ndarray],
    primary_device: str,
) -> list[_Event]:
    n_events = int(rng.integers(MIN_EVENTS, MAX_EVENTS + 1))
    max_off_theme = int(n_events * OFF_THEME_MAX_SHARE)
    favourite_share = np.array([0.65, 0.35]) if len(favourites) == 2 else np.array([1.0])
    others = [t for t in range(len(THEMES)) if t not in favourites]
    now = BASE_TIMESTAMP + int(rng.integers(0, 60 * 86_400))
    device = primary_device
    events: list[_Event] = []
    off_theme = 0
    while len(events) < n_events:
        if events and rng.random() < 0.3:  # a new session, hours to days later
            now += 3_600 + int(rng.exponential(1.5 * 86_400))
            device = primary_device if rng.random() < 0.85 else str(rng.choice(DEVICES))
        elif events:
            now += int(rng.integers(20, 400))
        # Off-theme visits are a view only, so each one is one event against the cap.
        if off_theme < max_off_theme and rng.random() < OFF_THEME_CHANCE:
            theme = int(rng.choice(others))
            off_theme += 1
        else:
            theme = favourites[int(rng.choice(len(favourites), p=favourite_share))]
        iid = str(rng.choice(theme_items[theme], p=theme_weights[theme]))
        events.append(_Event(iid, now, "view", device))
        if theme in favourites and len(events) < n_events and rng.random() < CART_CHANCE:
            now += int(rng.integers(30, 180))
            events.append(_Event(iid, now, "cart", device))
            if len(events) < n_events and rng.random() < PURCHASE_AFTER_CART_CHANCE:
                now += int(rng.integers(60, 600))
                events.append(_Event(iid, now, "purchase", device))
    return events


def _cover_every_warm_item(
    rng: np.random.Generator,
    histories: dict[str, list[_Event]],
    favourites: dict[str, list[int]],
    theme_of: dict[str, int],
    warm: list[str],
) -> None:
    """Give every warm item an event by re-pointing a lone view of an item seen elsewhere too.

    Only users whose favourites include the item's theme are touched, and only their views of a
    favourite theme (preferably the item's own) that no cart/purchase of the same item follows,
    so the favourite-theme share and the view -> cart -> purchase chains stay as generated. With
    very few users there may be no such view; then a fan with room gets an extra closing view.
    """
    counts: dict[str, int] = dict.fromkeys(warm, 0)
    for history in histories.values():
        for event in history:
            counts[event.item_id] += 1
    for target in warm:
        if counts[target]:
            continue
        theme = theme_of[target]
        fans = [str(u) for u in rng.permutation(list(histories)) if theme in favourites[str(u)]]
        candidates = [
            event
            for user in fans
            for event, following in zip(histories[user], [*histories[user][1:], None], strict=True)
            if event.event_type == "view"
            and theme_of[event.item_id] in favourites[user]
            and counts[event.item_id] >= 2
            and (following is None or following.item_id != event.item_id)
        ]
        if candidates:
            same_theme = [e for e in candidates if theme_of[e.item_id] == theme]
            event = (same_theme or candidates)[0]
            counts[event.item_id] -= 1
            event.item_id = target
        else:  # few users: nothing to re-point, so a fan with room gets one more view
            room = [u for u in fans if len(histories[u]) < MAX_EVENTS]
            if not room:
                raise ValueError(
                    f"users={len(histories)} is too few to give every catalogue item an event"
                )
            history = min((histories[u] for u in room), key=len)
            last = history[-1]
            history.append(_Event(target, last.timestamp + 120, "view", last.device))
        counts[target] += 1


# --- Building -----------------------------------------------------------------------------------


def build_photo_catalogue(out_dir: Path, users: int = 400, seed: int = 0) -> Path:
    """Write the dataset directory (see the module docstring) and return it."""
    if users < MIN_USERS:
        raise ValueError(f"users must be >= {MIN_USERS}, got {users}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    catalogue = _catalogue()
    photos, cells = _write_images(out_dir, catalogue)

    items = pd.DataFrame(
        {
            "item_id": [iid for iid, _, _ in catalogue],
            "title": [p.title for _, _, p in catalogue],
            "description": [p.description for _, _, p in catalogue],
            "category": [p.category for _, _, p in catalogue],
            "brand": [p.brand for _, _, p in catalogue],
            "price": [p.price for _, _, p in catalogue],
            "image": [cells.get(iid) for iid, _, _ in catalogue],
        }
    )

    theme_index = {theme.name: t for t, theme in enumerate(THEMES)}
    theme_of = {iid: theme_index[theme.name] for iid, theme, _ in catalogue}
    cold = [iid for iid, _, p in catalogue if p.cold]
    warm = [iid for iid, _, p in catalogue if not p.cold]
    rng = np.random.default_rng(seed)
    theme_items = [[iid for iid in warm if theme_of[iid] == t] for t in range(len(THEMES))]
    theme_weights = [_zipf_weights(len(ids), rng) for ids in theme_items]
    share = np.array([theme.share for theme in THEMES])
    share = share / share.sum()

    histories: dict[str, list[_Event]] = {}
    favourites: dict[str, list[int]] = {}
    regions: dict[str, str] = {}
    for u in range(users):
        user = f"u{u + 1:04d}"
        n_favourites = 1 if rng.random() < 0.55 else 2
        favourites[user] = [
            int(t) for t in rng.choice(len(THEMES), size=n_favourites, replace=False, p=share)
        ]
        if u < len(THEMES) and u not in favourites[user]:
            # Every theme gets a fan, or a small --users could leave a theme with no events.
            favourites[user][0] = u
        regions[user] = str(rng.choice(REGIONS, p=REGION_SHARE))
        device = str(rng.choice(DEVICES, p=DEVICE_SHARE))
        histories[user] = _user_events(rng, favourites[user], theme_items, theme_weights, device)
    _cover_every_warm_item(rng, histories, favourites, theme_of, warm)

    rows = [
        (user, e.item_id, e.timestamp, e.event_type, e.device, regions[user])
        for user, history in histories.items()
        for e in history
    ]
    events = pd.DataFrame(
        rows, columns=["user_id", "item_id", "timestamp", "event_type", "device", "region"]
    )
    # Exports are usually in time order; stable, so ties keep user order and the file is fixed.
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    write_dataset(items, events, out_dir, fmt="csv")

    def by_image(kind: str) -> list[str]:
        if kind == "none":
            return [iid for iid, _, p in catalogue if p.photo is None]
        if kind == "good":
            return [iid for iid, _, p in catalogue if p.photo not in (None, MISSING, CORRUPT)]
        marker = MISSING if kind == "missing" else CORRUPT
        return [iid for iid, _, p in catalogue if p.photo == marker]

    manifest = {
        "generator": "ltrec.datasets.photo_shop",
        "seed": seed,
        "counts": {
            "items": len(items),
            "events": len(events),
            "users": users,
            "themes": len(THEMES),
            "photos": len(photos),
        },
        "images": {kind: by_image(kind) for kind in ("good", "missing", "corrupt", "none")},
        "image_paths": cells,
        "photos": photos,
        "cold_items": cold,
        "themes": {
            theme.name: {
                "title": theme.title,
                "items": [iid for iid in items["item_id"] if theme_of[iid] == t],
            }
            for t, theme in enumerate(THEMES)
        },
        "user_themes": {
            user: [THEMES[t].name for t in themes] for user, themes in favourites.items()
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # The stamp `make` expects of a dataset directory (ltrec.datasets.movielens writes it too).
    source = {
        "name": "photo-shop (generated sample catalogue)",
        "source": "ltrec.datasets.photo_shop; photos from scikit-image's skimage.data",
        "seed": seed,
        "counts": manifest["counts"],
    }
    (out_dir / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    return out_dir
