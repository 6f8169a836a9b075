"""A small shop whose items carry real photos, for end-to-end tests of image-bearing items.

MovieLens has no images, so the image path of training and serving needs a catalogue that does.
The photos are the sample images bundled with scikit-image (`skimage.data`, loaded offline; each
loader's docstring gives the image's source and licence), downscaled to at most 320 px so the
directory stays a few MB.

Usage::

    python -m ltrec.photo_catalogue --out data/photo-shop [--users 400] [--seed 0]

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

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ltrec.data import write_dataset

__all__ = [
    "CORRUPT",
    "DEVICES",
    "MAX_EVENTS",
    "MIN_EVENTS",
    "MISSING",
    "REGIONS",
    "THEMES",
    "build_photo_catalogue",
    "main",
]

# Stand-ins for a photo name in the item table: the item gets an image path that is broken.
MISSING = "<missing>"
CORRUPT = "<corrupt>"

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


@dataclass(frozen=True)
class Product:
    title: str
    category: str
    brand: str
    price: float
    photo: str | None  # a skimage.data name, MISSING, CORRUPT, or None for no image
    description: str
    cold: bool = False


@dataclass(frozen=True)
class Theme:
    name: str
    title: str
    share: float  # how often users pick it as a favourite, relative to the others
    products: tuple[Product, ...]


P = Product

# One row per product, kept compact: the formatter would spread each over eight lines.
# fmt: off
THEMES: tuple[Theme, ...] = (
    Theme(
        "cats",
        "Cat supplies",
        0.22,
        (
            P("Feather Wand Cat Teaser", "Pets|Cats|Toys", "Whisker & Co", 8.99, "chelsea",
              "Telescoping wand with a replaceable feather lure; keeps indoor cats chasing."),
            P("Catnip Mouse Toys, 3-Pack", "Pets|Cats|Toys", "Whisker & Co", 6.49, "chelsea",
              "Felt mice filled with organic catnip, sized for batting and carrying."),
            P("Sisal Scratching Post 80 cm", "Pets|Cats|Furniture", "PurrHaus", 34.90, "chelsea",
              "Tall natural-sisal post on a weighted base that does not tip over mid-stretch."),
            P("Multi-Level Cat Tree with Hammock", "Pets|Cats|Furniture", "PurrHaus", 89.00,
              CORRUPT,
              "Four platforms, a condo and a hammock; plush covered, for multi-cat homes."),
            P("Grain-Free Salmon Dry Food 2 kg", "Pets|Cats|Food", "Tabby Table", 24.50,
              "chelsea",
              "Complete dry food with salmon as the first ingredient, no grain fillers."),
            P("Chicken Pate Wet Food, 12 x 85 g", "Pets|Cats|Food", "Tabby Table", 15.99, None,
              "Smooth chicken pate in single-serve trays for adult cats."),
            P("Clumping Clay Litter 10 L", "Pets|Cats|Litter", "CleanPaws", 12.99, None,
              "Low-dust bentonite litter that forms firm clumps for easy scooping."),
            P("Hooded Litter Box with Filter", "Pets|Cats|Litter", "CleanPaws", 39.95, "chelsea",
              "Covered tray with a swing door and a carbon filter to keep odours in."),
            P("Self-Grooming Corner Brush", "Pets|Cats|Grooming", "PurrHaus", 9.49, "chelsea",
              "Mounts on a wall corner so cats can rub and groom themselves."),
            P("Deshedding Comb for Long-Haired Cats", "Pets|Cats|Grooming", "FurFree", 14.99,
              None, "Rotating stainless pins lift loose undercoat without pulling."),
            P("Window-Mounted Cat Perch", "Pets|Cats|Furniture", "PurrHaus", 42.00, "chelsea",
              "Suction-cup window shelf holding up to 18 kg; a sunny lookout for birdwatching.",
              cold=True),
            P("Ceramic Cat Water Fountain 2 L", "Pets|Cats|Feeding", "CleanPaws", 36.50, None,
              "Quiet pump and a replaceable filter keep water moving, which cats prefer."),
        ),
    ),
    Theme(
        "coffee",
        "Coffee",
        0.22,
        (
            P("Ethiopia Yirgacheffe Whole Bean 500 g", "Grocery|Coffee|Whole Bean",
              "Highland Roasters", 16.90, "coffee",
              "Light roast with jasmine and lemon notes; washed process, roasted weekly."),
            P("Colombia Supremo Whole Bean 1 kg", "Grocery|Coffee|Whole Bean",
              "Highland Roasters", 27.50, "coffee",
              "Medium roast, caramel and cocoa, an everyday cup for filter or espresso."),
            P("Espresso Blend Ground 250 g", "Grocery|Coffee|Ground", "Crema Bros", 8.40,
              "coffee", "Dark Italian-style blend, fine ground for moka pots and machines."),
            P("Decaf Swiss Water Ground 250 g", "Grocery|Coffee|Ground", "Crema Bros", 9.20, None,
              "Chemical-free decaffeinated Brazilian beans, medium grind."),
            P("Cold Brew Coarse Grind 1 kg", "Grocery|Coffee|Ground", "Highland Roasters", 21.00,
              None, "Coarse grind for 12-hour steeping; smooth and low in acidity."),
            P("Stainless Pour-Over Dripper", "Home|Kitchen|Coffee Makers", "Kettle & Bean", 24.99,
              "coffee", "Double-mesh cone that needs no paper filters; brews one or two cups."),
            P("8-Cup French Press", "Home|Kitchen|Coffee Makers", "Kettle & Bean", 32.00,
              "coffee", "Borosilicate glass carafe with a four-layer stainless filter."),
            P("Conical Burr Grinder", "Home|Kitchen|Grinders", "Crema Bros", 119.00, "coffee",
              "40 grind settings from espresso to cold brew, with a timed dose."),
            P("Hand Crank Ceramic Burr Grinder", "Home|Kitchen|Grinders", "Kettle & Bean", 45.50,
              None, "Portable manual grinder with adjustable ceramic burrs."),
            P("Gooseneck Kettle 1 L", "Home|Kitchen|Kettles", "Kettle & Bean", 54.90, "coffee",
              "Precise pouring spout and a built-in thermometer for pour-over brewing."),
            P("Double-Walled Glass Cups, Set of 2", "Home|Kitchen|Mugs", "Crema Bros", 19.99,
              "coffee", "Insulated 250 ml glasses that keep coffee hot and hands cool."),
            P("Paper Filters Size 02, 100 Count", "Home|Kitchen|Coffee Accessories",
              "Kettle & Bean", 5.49, None, "Unbleached cone filters for size 02 drippers.",
              cold=True),
        ),
    ),
    Theme(
        "space",
        "Space posters and telescopes",
        0.16,
        (
            P("Astronaut Spacewalk Poster 50x70 cm", "Home|Decor|Posters", "Orbit Prints", 19.90,
              "astronaut", "NASA archive photo of an astronaut in orbit, printed on matte paper."),
            P("Rocket Launch Poster 50x70 cm", "Home|Decor|Posters", "Orbit Prints", 19.90,
              "rocket", "A crewed launch lifting off the pad, from the NASA image archive."),
            P("Hubble Deep Field Canvas Print 60x60 cm", "Home|Decor|Wall Art", "Orbit Prints",
              64.00, "hubble_deep_field",
              "Thousands of distant galaxies from the Hubble Space Telescope, on canvas."),
            P("Full Moon Canvas Print 40x40 cm", "Home|Decor|Wall Art", "Orbit Prints", 39.00,
              "moon", "High-contrast lunar surface print with craters and maria in sharp detail."),
            P("70 mm Refractor Telescope with Tripod", "Electronics|Optics|Telescopes",
              "StarGazer", 149.00, MISSING,
              "Beginner refractor with two eyepieces and a finder scope; sets up in minutes."),
            P("130 mm Newtonian Reflector Telescope", "Electronics|Optics|Telescopes",
              "StarGazer", 289.00, "moon",
              "Equatorial mount and 130 mm mirror for planets, nebulae and the Moon."),
            P("Moon Filter 1.25 inch", "Electronics|Optics|Telescope Accessories", "StarGazer",
              14.50, "moon", "Neutral-density filter that cuts lunar glare for easy viewing."),
            P("Saturn V Model Rocket Kit 1:200", "Toys|Models|Rockets", "Launchpad Models", 74.99,
              "rocket", "Detailed snap-together kit with display stand and decals."),
            P("Glow-in-the-Dark Star Map", "Home|Decor|Posters", "Orbit Prints", 12.00, None,
              "Northern-hemisphere constellations that glow after lights-out."),
            P("Planisphere Star Finder", "Books|Science|Astronomy", "StarGazer", 17.50, None,
              "Rotating sky chart showing which stars are up at any date and hour.", cold=True),
            P("Pocket Guide to the Night Sky", "Books|Science|Astronomy", "Nightfall Press", 11.99,
              None, "Month-by-month star charts and observing tips for the naked eye."),
            P("Kids' Astronaut Costume", "Toys|Dress-Up", "Launchpad Models", 29.99, None,
              "White flight suit with mission patches and a soft helmet, ages 4-8."),
        ),
    ),
    Theme(
        "motorcycles",
        "Motorcycle gear",
        0.14,
        (
            P("Full-Face Touring Helmet", "Automotive|Motorcycle|Helmets", "Ridgeline", 219.00,
              "stereo_motorcycle", "ECE 22.06 shell with a drop-down sun visor and quiet vents."),
            P("Modular Flip-Up Helmet", "Automotive|Motorcycle|Helmets", "Ridgeline", 259.00,
              "stereo_motorcycle", "Chin bar flips up for stops; Pinlock-ready visor."),
            P("Leather Riding Gloves", "Automotive|Motorcycle|Gloves", "Throttle Gear", 49.90,
              "stereo_motorcycle", "Goatskin palm, knuckle armour and touchscreen fingertips."),
            P("Waterproof Winter Gloves", "Automotive|Motorcycle|Gloves", "Throttle Gear", 59.90,
              None, "Insulated gauntlets with a breathable waterproof membrane."),
            P("Armoured Textile Jacket", "Automotive|Motorcycle|Jackets", "Throttle Gear",
              189.00, "stereo_motorcycle",
              "Four-season jacket with CE level 2 armour and a removable thermal liner."),
            P("Mesh Summer Jacket", "Automotive|Motorcycle|Jackets", "Throttle Gear", 139.00,
              None, "Full-mesh panels for airflow, with shoulder and elbow protectors."),
            P("Magnetic Tank Bag 15 L", "Automotive|Motorcycle|Luggage", "Roadpack", 69.00,
              "stereo_motorcycle", "Expandable tank bag with a clear map pocket and rain cover."),
            P("Throw-Over Saddlebags", "Automotive|Motorcycle|Luggage", "Roadpack", 119.00,
              "stereo_motorcycle", "Pair of 20 L panniers that fit most bikes without racks."),
            P("Chain Cleaning and Lube Kit", "Automotive|Motorcycle|Maintenance", "Torque Lab",
              24.99, "stereo_motorcycle", "Degreaser, three-sided brush and O-ring safe lube."),
            P("Rear Paddock Stand", "Automotive|Motorcycle|Maintenance", "Torque Lab", 79.00,
              None, "Steel stand with swingarm forks for chain and wheel work."),
            P("Disc Brake Lock with Alarm", "Automotive|Motorcycle|Security", "Torque Lab", 45.00,
              "stereo_motorcycle", "110 dB alarm disc lock with a reminder cable.", cold=True),
            P("Bluetooth Helmet Intercom", "Automotive|Motorcycle|Electronics", "Ridgeline",
              129.00, None, "Rider-to-passenger intercom with music and navigation audio."),
        ),
    ),
    Theme(
        "photography",
        "Photography",
        0.14,
        (
            P("35 mm Film Camera Body (Refurbished)", "Electronics|Photography|Cameras",
              "Lumen Optics", 249.00, "camera",
              "Serviced manual-focus SLR with a working light meter; a classic for film."),
            P("Mirrorless Camera Kit with 15-45 mm Lens", "Electronics|Photography|Cameras",
              "Lumen Optics", 649.00, "camera",
              "24 MP APS-C sensor, 4K video and a compact kit zoom."),
            P("Macro 100 mm f/2.8 Lens", "Electronics|Photography|Lenses", "Lumen Optics",
              429.00, "coins",
              "1:1 magnification for coins, stamps and insects; sample shot shown."),
            P("Coin Photography Light Box 40 cm", "Electronics|Photography|Lighting",
              "Studio Nine", 59.00, "coins",
              "Foldable LED tent with dark and white backdrops for small collectibles."),
            P("Colour Calibration Target", "Electronics|Photography|Accessories", "Studio Nine",
              39.00, "colorwheel",
              "Reference colour chart for accurate white balance and profiles."),
            P("RGB LED Video Light", "Electronics|Photography|Lighting", "Studio Nine", 89.00,
              "colorwheel", "Full-colour pocket light with 0-360 degree hue control."),
            P("Microscope Camera Adapter", "Electronics|Photography|Accessories", "Lumen Optics",
              74.00, "immunohistochemistry",
              "Mounts a camera body on a microscope eyepiece tube for photomicrography."),
            P("Brick Wall Vinyl Backdrop 1.5 x 2 m", "Electronics|Photography|Backdrops",
              "Studio Nine", 34.00, "brick",
              "Washable printed backdrop for portraits and product shots."),
            P("Aluminium Travel Tripod", "Electronics|Photography|Tripods", "Trailpod", 119.00,
              None, "Folds to 40 cm, extends to 150 cm, with an arca-swiss ball head."),
            P("64 GB SD Card, V30", "Electronics|Photography|Memory Cards", "Flashkeep", 15.99,
              None, "UHS-I card fast enough for 4K video recording.", cold=True),
            P("Lens Cleaning Kit", "Electronics|Photography|Accessories", "Studio Nine", 12.49,
              None, "Blower, brush, microfibre cloths and cleaning fluid in a pouch."),
            P("Padded Camera Backpack", "Electronics|Photography|Bags", "Trailpod", 84.00, None,
              "Customisable dividers for two bodies and four lenses, plus a laptop sleeve."),
        ),
    ),
    Theme(
        "equestrian",
        "Equestrian",
        0.12,
        (
            P("All-Purpose Leather Saddle 17 in", "Sports|Equestrian|Saddlery", "Meadowbrook",
              799.00, "horse", "Hand-stitched leather saddle with an adjustable gullet."),
            P("Snaffle Bridle with Reins", "Sports|Equestrian|Saddlery", "Meadowbrook", 89.00,
              "horse", "Padded headpiece and rubber-grip reins; cob and full sizes."),
            P("Quilted Saddle Pad", "Sports|Equestrian|Saddlery", "Paddock & Pony", 39.90,
              "horse", "Breathable cotton pad with girth straps and a wither cut-out."),
            P("Fleece Cooler Rug", "Sports|Equestrian|Horse Rugs", "Paddock & Pony", 69.00,
              "horse", "Wicks sweat after exercise; cross surcingles and a tail cord."),
            P("Waterproof Turnout Rug 200 g", "Sports|Equestrian|Horse Rugs", "Paddock & Pony",
              129.00, None, "Ripstop outer, medium fill and a shoulder gusset for movement."),
            P("Riding Helmet, VG1 Certified", "Sports|Equestrian|Rider Wear", "Canterline", 149.00,
              "horse", "Low-profile ventilated helmet with a washable liner."),
            P("Full-Seat Breeches", "Sports|Equestrian|Rider Wear", "Canterline", 79.00, None,
              "Silicone full seat for grip, four-way stretch fabric."),
            P("Tall Leather Riding Boots", "Sports|Equestrian|Rider Wear", "Canterline", 249.00,
              "horse", "Field boots with a back zip and a spur rest."),
            P("Grooming Kit with Tote", "Sports|Equestrian|Grooming", "Meadowbrook", 34.50,
              "horse", "Curry comb, dandy and body brushes, mane comb and hoof pick."),
            P("Hoof Pick with Brush", "Sports|Equestrian|Grooming", "Meadowbrook", 4.99, None,
              "Steel pick with a stiff brush on the back."),
            P("Pasture Seed Mix for Horses 10 kg", "Garden|Pasture|Seed", "Greenfield", 54.00,
              "grass", "Hard-wearing, low-sugar grass blend for paddocks and grazing."),
            P("Slow-Feed Hay Net", "Sports|Equestrian|Stable", "Paddock & Pony", 22.00, None,
              "Small-mesh net that makes hay last longer and reduces waste."),
        ),
    ),
)
# fmt: on


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
        "generator": "ltrec.photo_catalogue",
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
    # The stamp `make` expects of a dataset directory (ltrec.movielens writes the same file).
    source = {
        "name": "photo-shop (generated sample catalogue)",
        "source": "ltrec.photo_catalogue; photos from scikit-image's skimage.data",
        "seed": seed,
        "counts": manifest["counts"],
    }
    (out_dir / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltrec.photo_catalogue", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--users", type=int, default=400, help=f"users (>= {MIN_USERS})")
    parser.add_argument("--seed", type=int, default=0, help="shapes the events only")
    args = parser.parse_args(argv)
    try:
        out = build_photo_catalogue(args.out, users=args.users, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    print(
        f"wrote {out}: {counts['items']} items in {counts['themes']} themes, "
        f"{counts['events']} events from {counts['users']} users, {counts['photos']} photos"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
