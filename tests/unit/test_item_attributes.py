"""`ltrec_core.item_attributes`: the hashed attribute ids training and the gateway both compute."""

from __future__ import annotations

import pytest

from ltrec_core import contract
from ltrec_core.item_attributes import attribute_ids, attribute_tokens, token_id

SLOTS = contract.ATTRIBUTE_SLOTS


def test_tokens_are_brand_price_then_category_parts_normalised() -> None:
    tokens = attribute_tokens(" Books |  Crime  Fiction|| books ", "  ACME   Corp ", " Premium ")
    assert tokens == [
        "brand:acme corp",
        "price:premium",
        "category:books",  # the repeated part is kept once
        "category:crime fiction",
    ]
    assert attribute_tokens(None, None, None) == []
    assert attribute_tokens("|", "   ", "") == []


def test_ids_are_stable_across_releases() -> None:
    # CRC-32 buckets: a change here re-buckets every trained item (retrain, do not edit).
    assert [token_id(t) for t in ("brand:acme", "price:premium", "category:books")] == [
        72,
        454,
        854,
    ]
    assert attribute_ids("Books", "Acme", "premium") == [72, 454, 854] + [0] * (SLOTS - 3)


def test_ids_are_padded_to_the_slots_with_zeros_in_token_order() -> None:
    ids = attribute_ids("Animation|Children's", "", "")
    assert len(ids) == SLOTS
    assert ids[:2] == [token_id("category:animation"), token_id("category:children's")]
    assert ids[2:] == [contract.PADDING_INDEX] * (SLOTS - 2)
    assert attribute_ids(None, None, None) == [0] * SLOTS


def test_a_deep_category_is_cut_to_the_slots_after_brand_and_price() -> None:
    parts = [f"level {i}" for i in range(12)]
    ids = attribute_ids("|".join(parts), "Acme", "budget")
    assert len(ids) == SLOTS and 0 not in ids
    assert ids[:2] == [token_id("brand:acme"), token_id("price:budget")]
    assert ids[2:] == [token_id(f"category:{p}") for p in parts[: SLOTS - 2]]


@pytest.mark.parametrize("token", ["brand:x", "price:mid-range", "category:ünïcode", ""])
def test_ids_are_in_the_buckets_never_padding(token: str) -> None:
    assert 1 <= token_id(token) <= contract.ATTRIBUTE_BUCKETS - 1
