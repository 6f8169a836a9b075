"""New items -> item vectors through Triton: the image encoder, then the item encoder.

The item encoder (MiniLM + the trained fusion) is the model that encoded the trained catalogue,
and it takes the same three views of an item: the text (`ltrec_core.item_text`), the hashed
attributes (`ltrec_core.item_attributes`) and the pooled image features with a `has_image` flag.
Items without a usable image get zero features and `has_image` 0, as image-less items had in
training. Only the rows with an image go to the image encoder, and not at all when none has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ltrec_core import contract
from ltrec_core.item_attributes import attribute_ids
from ltrec_core.item_text import ItemFields
from server.errors import BackendError
from server.item_tokenizer import ItemTokenizer
from server.triton_client import TritonClient


@dataclass(frozen=True)
class ItemRow:
    """What the item encoder reads of one item."""

    text: str
    attribute_ids: tuple[int, ...]  # contract.ATTRIBUTE_SLOTS ids, 0 = padding
    # The image encoder's input FP32 [3, IMAGE_SIZE, IMAGE_SIZE]; None: no usable image.
    image: npt.NDArray[np.float32] | None = None
    # Or the image encoder's output FP32 [IMAGE_FEATURE_DIM], kept from an earlier encoding
    # (re-encoding after a rollout: the image encoder is frozen, the fusion is not).
    image_features: npt.NDArray[np.float32] | None = None

    @classmethod
    def of(
        cls,
        fields: ItemFields,
        text: str,
        image: npt.NDArray[np.float32] | None = None,
        image_features: npt.NDArray[np.float32] | None = None,
    ) -> ItemRow:
        ids = attribute_ids(fields.category, fields.brand, fields.price_bucket)
        return cls(text, tuple(ids), image, image_features)


@dataclass(frozen=True)
class Encoded:
    """Item vectors [n, D], and each row's image features (None: the row has no image)."""

    vectors: npt.NDArray[np.float32]
    image_features: list[npt.NDArray[np.float32] | None]


class TritonItemEncoder:
    """Item rows -> item vectors [n, D]; one image encoder call (rows with an image) and one
    item encoder call (all rows), each under the caller's deadline and the encode timeout."""

    def __init__(
        self,
        tokenizer: ItemTokenizer,
        triton: TritonClient,
        embedding_dim: int,
        timeout_seconds: float,
    ) -> None:
        self._tokenizer = tokenizer
        self._triton = triton
        self._dim = embedding_dim
        self._timeout_seconds = timeout_seconds

    async def encode(
        self, rows: Sequence[ItemRow], *, deadline: float | None = None, request_id: str = ""
    ) -> npt.NDArray[np.float32]:
        return (await self.encode_items(rows, deadline=deadline, request_id=request_id)).vectors

    async def encode_items(
        self, rows: Sequence[ItemRow], *, deadline: float | None = None, request_id: str = ""
    ) -> Encoded:
        n = len(rows)
        features = np.zeros((n, contract.IMAGE_FEATURE_DIM), dtype=np.float32)
        has_image = np.zeros((n, 1), dtype=np.float32)
        kept = [i for i, row in enumerate(rows) if row.image_features is not None]
        for i in kept:
            features[i] = rows[i].image_features
        with_image = [
            i for i, row in enumerate(rows) if row.image is not None and row.image_features is None
        ]
        if with_image:
            features[with_image] = await self._image_features(
                [rows[i].image for i in with_image], deadline, request_id
            )
        has_image[kept + with_image] = 1.0
        inputs: dict[str, np.ndarray] = dict(self._tokenizer([row.text for row in rows]))
        inputs[contract.IMAGE_FEATURES] = features
        inputs[contract.HAS_IMAGE] = has_image
        inputs[contract.ATTRIBUTE_IDS] = np.asarray(
            [row.attribute_ids for row in rows], dtype=np.int64
        ).reshape(n, contract.ATTRIBUTE_SLOTS)
        outputs = await self._triton.infer(
            inputs,
            deadline=deadline,
            request_id=request_id,
            model_name=contract.ITEM_ENCODER_MODEL,
            output_names=(contract.ITEM_VECTOR,),
            timeout_seconds=self._timeout_seconds,
        )
        vectors = _checked(
            outputs, contract.ITEM_ENCODER_MODEL, contract.ITEM_VECTOR, (n, self._dim)
        )
        return Encoded(vectors, [features[i] if has_image[i, 0] else None for i in range(n)])

    async def _image_features(
        self,
        pixels: list[npt.NDArray[np.float32] | None],
        deadline: float | None,
        request_id: str,
    ) -> npt.NDArray[np.float32]:
        batch = np.stack([p for p in pixels if p is not None]).astype(np.float32, copy=False)
        outputs = await self._triton.infer(
            {contract.IMAGE: batch},
            deadline=deadline,
            request_id=request_id,
            model_name=contract.IMAGE_ENCODER_MODEL,
            output_names=(contract.IMAGE_FEATURES,),
            timeout_seconds=self._timeout_seconds,
        )
        return _checked(
            outputs,
            contract.IMAGE_ENCODER_MODEL,
            contract.IMAGE_FEATURES,
            (len(batch), contract.IMAGE_FEATURE_DIM),
        )


def _checked(
    outputs: dict[str, np.ndarray], model: str, name: str, shape: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """The output, if it has the expected shape and is finite; the backend's fault if not."""
    array = outputs.get(name)
    if array is None or array.shape != shape:
        got = None if array is None else array.shape
        raise BackendError(f"{model} returned {name} of shape {got}, expected {shape}")
    if not np.isfinite(array).all():
        raise BackendError(f"{model} returned non-finite {name}")
    return np.asarray(array, dtype=np.float32)
