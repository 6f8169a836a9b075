"""Structured item attributes -> hashed attribute ids for the item fusion, defined once.

Each attribute becomes a token (`brand:<brand>`, `price:<bucket>`, then `category:<part>` for
every part of the category path), lower-cased and whitespace-collapsed, hashed with CRC-32
into ids 1..ATTRIBUTE_BUCKETS-1 (0 is padding), at most ATTRIBUTE_SLOTS per item. Hashing needs
no vocabulary, so an item added after training with a brand nobody has seen still gets ids (it
shares a bucket with some other token; the text carries the rest). Training (`ltrec`) and the
gateway both call `attribute_ids`, so an added item is encoded exactly as a trained one.

The same normalisation (`label`, `category_path`) is what the gateway's business filters compare
(`server.item_filter`): "Books | Fiction" and "books|fiction" are one category to both.
"""

from __future__ import annotations

import zlib

from ltrec_core import contract


def label(text: str | None) -> str:
    """A brand or a category part as compared: whitespace collapsed, lower case ("" for None)."""
    return " ".join(str(text or "").split()).lower()


def category_path(category: str | None) -> tuple[str, ...]:
    """ "Books | Fiction||Crime" -> ("books", "fiction", "crime"): the path's non-empty parts."""
    return tuple(part for part in map(label, str(category or "").split("|")) if part)


def attribute_tokens(
    category: str | None, brand: str | None, price_bucket: str | None
) -> list[str]:
    tokens: list[str] = []
    if label(brand):
        tokens.append(f"brand:{label(brand)}")
    if price_bucket:
        tokens.append(f"price:{str(price_bucket).strip().lower()}")
    tokens += [f"category:{part}" for part in category_path(category)]
    return list(dict.fromkeys(tokens))


def token_id(token: str) -> int:
    return 1 + zlib.crc32(token.encode("utf-8")) % (contract.ATTRIBUTE_BUCKETS - 1)


def attribute_ids(category: str | None, brand: str | None, price_bucket: str | None) -> list[int]:
    """Exactly ATTRIBUTE_SLOTS ids, padded with 0; a category path deeper than the slots left
    after brand and price is cut (ML-1M's longest genre list has 6 parts)."""
    ids = [token_id(t) for t in attribute_tokens(category, brand, price_bucket)]
    ids = ids[: contract.ATTRIBUTE_SLOTS]
    return ids + [contract.PADDING_INDEX] * (contract.ATTRIBUTE_SLOTS - len(ids))
