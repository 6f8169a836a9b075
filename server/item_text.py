"""A new item's text, as training rendered it, tokenized for the item encoder in Triton.

`item_text` must produce exactly the text `ltrec.data.item_texts` gives a row with the same
fields (a unit test compares them), or added items would be encoded off the distribution the
projection was trained on. The gateway never imports torch or `ltrec`: tokenization uses the
`tokenizers` package on the `tokenizer.json` the export writes beside the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from server import contract
from server.errors import StartupError

# ltrec.data.PRICE_BUCKETS and DESCRIPTION_CHARS (the gateway cannot import ltrec).
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
    if len(text) <= limit:
        return text
    cut = text[:limit]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:.") + "..."


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def item_text(fields: ItemFields) -> str:
    """Labelled short sentences, missing parts left out (see `ltrec.data.item_texts`)."""
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


class ItemTokenizer:
    """Batches of item texts -> `input_ids`, `attention_mask` (INT64 [batch, tokens]), padded to
    the longest text and truncated at the model's `text_max_tokens`, as in training."""

    def __init__(self, path: Path, max_tokens: int) -> None:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception for unreadable files
            raise StartupError(f"{path}: cannot load the item text tokenizer: {exc}") from exc
        tokenizer.enable_truncation(max_length=max_tokens)
        pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
        self._tokenizer = tokenizer

    @classmethod
    def from_repository(cls, repository: Path, max_tokens: int) -> ItemTokenizer | None:
        """None when the repository has no item encoder (exported without it)."""
        path = repository / contract.ITEM_ENCODER_MODEL / contract.TOKENIZER_DIR
        if not (path / "tokenizer.json").is_file():
            return None
        return cls(path / "tokenizer.json", max_tokens)

    def __call__(self, texts: list[str]) -> dict[str, npt.NDArray[np.int64]]:
        encodings = self._tokenizer.encode_batch(texts)
        return {
            contract.TEXT_INPUT_IDS: np.asarray([e.ids for e in encodings], dtype=np.int64),
            contract.TEXT_ATTENTION_MASK: np.asarray(
                [e.attention_mask for e in encodings], dtype=np.int64
            ),
        }
