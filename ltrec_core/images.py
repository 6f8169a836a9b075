"""Product images -> the image encoder's input, defined once for training, export, tests and the
gateway.

Decoding and geometry live here (Pillow and numpy, no torch, so the gateway can use it): any
format Pillow reads, EXIF orientation applied, converted to RGB (grey, palette and alpha images
included; alpha is composited on white, as product shots usually are), the shorter side resized
to `contract.IMAGE_SIZE` with bicubic filtering, then centre-cropped to a square. The result is
float32 RGB in [0, 1], channels first. The ImageNet normalisation is part of the exported image
encoder graph, so it cannot drift between torch and Triton.

A file or payload that cannot be read as an image raises `ImageError`; callers report it and
treat the item as image-less.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from ltrec_core import contract

# Decompression bombs: refuse anything over this many pixels (a 1 MiB PNG can expand to GBs).
MAX_PIXELS = 40_000_000
# A strip a few bytes long (40,000,000x1) passes the pixel limit, but scaling its shorter side to
# IMAGE_SIZE would make billions of pixels; a product image is never this elongated.
MAX_ASPECT_RATIO = 20


class ImageError(ValueError):
    """An image that cannot be used; the message says why, without the image's name.

    `kind` is one of "missing" (no such file), "unreadable" (not an image, or truncated) and
    "too_large" (over MAX_PIXELS): a small fixed set, fit for counters and reports.
    """

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes) -> Image.Image:
    """Image bytes (JPEG, PNG, WebP, ...) -> an RGB Pillow image."""
    if not data:
        raise ImageError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(
                    f"image of {image.width}x{image.height} pixels exceeds {MAX_PIXELS} pixels",
                    "too_large",
                )
            if max(image.size) > MAX_ASPECT_RATIO * max(1, min(image.size)):
                raise ImageError(
                    f"image of {image.width}x{image.height} pixels is more than "
                    f"{MAX_ASPECT_RATIO} times as long as it is wide",
                    "too_large",
                )
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"not a readable image ({type(exc).__name__})") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError("image exceeds the pixel limit", "too_large") from exc
    return _to_rgb(image)


def load_image_file(path: str | Path) -> Image.Image:
    """An image file -> an RGB Pillow image; `ImageError` when missing or unreadable."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageError("image file not found", "missing") from exc
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise ImageError(f"image file not readable ({type(exc).__name__})") from exc
    return decode_image(data)


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_model_input(image: Image.Image, size: int = contract.IMAGE_SIZE) -> npt.NDArray[np.float32]:
    """RGB image -> FP32 [3, size, size] in [0, 1]: shorter side to `size`, centre crop."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def image_batch(images: list[Image.Image]) -> npt.NDArray[np.float32]:
    """Several images -> the encoder input FP32 [n, 3, IMAGE_SIZE, IMAGE_SIZE]."""
    size = contract.IMAGE_SIZE
    if not images:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.stack([to_model_input(image) for image in images])
