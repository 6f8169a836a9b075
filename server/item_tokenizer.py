"""A new item's text tokenized for the item encoder in Triton, as training tokenized it.

The gateway never imports torch or `ltrec`: tokenization uses the `tokenizers` package on the
`tokenizer.json` the export writes beside the encoder; the text itself is
`ltrec_core.item_text.item_text`, the rendering training used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from ltrec_core import contract
from server.errors import StartupError


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
