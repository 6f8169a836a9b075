"""The photo shop's products: 72 items in 6 themes, each theme's products pictured by a matching
`skimage.data` photo (`ltrec.datasets.photo_shop` builds the shop from them)."""

from __future__ import annotations

from dataclasses import dataclass

# Stand-ins for a photo name in the item table: the item gets an image path that is broken.
MISSING = "<missing>"
CORRUPT = "<corrupt>"


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
