"""An item's text as the item encoder reads it, defined once for training and the gateway.

Training (`ltrec.data.item_texts`, one row of the items table at a time) and the gateway (an
item added by UpsertItems) both render through `item_text`, so an added item is encoded on the
distribution the projection was trained on. Structured fields become short labelled sentences
because BERT-family encoders are trained on prose; missing parts are left out rather than
rendered as "unknown", which would make unrelated items look alike.
"""

from __future__ import annotations

from dataclasses import dataclass

# The price terciles' names (`ltrec.data.price_buckets` assigns them) and the description's length.
PRICE_BUCKETS: tuple[str, str, str] = ("budget", "mid-range", "premium")
DESCRIPTION_CHARS = 300


@dataclass(frozen=True)
class ItemFields:
    """The text fields of one item; empty strings are missing fields."""

    title: str
    description: str = ""
    category: str = ""
    brand: str = ""
    price_bucket: str = ""  # one of PRICE_BUCKETS, or empty


def _truncate(text: str, limit: int = DESCRIPTION_CHARS) -> str:
    """Cut at a word boundary so the encoder never sees half a word."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:.") + "..."


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def item_text(fields: ItemFields) -> str:
    """Labelled short sentences, missing parts left out."""
    parts: list[str] = []
    if fields.title.strip():
        parts.append(_sentence(fields.title.strip()))
    path = [p.strip() for p in fields.category.strip().split("|") if p.strip()]
    if path:
        parts.append(f"Category: {' > '.join(path)}.")
    if fields.brand.strip():
        parts.append(f"Brand: {fields.brand.strip()}.")
    if fields.price_bucket:
        parts.append(f"Price: {fields.price_bucket}.")
    if fields.description.strip():
        parts.append(_truncate(" ".join(fields.description.split())))
    return " ".join(parts)
