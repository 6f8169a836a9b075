"""Small image files in memory, for the image preprocessing and the gateway's UpsertItems tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image_bytes(
    size: tuple[int, int] = (32, 24),
    colour: tuple[int, ...] | int = (200, 30, 30),
    mode: str = "RGB",
    fmt: str = "PNG",
    **save: object,
) -> bytes:
    """A small in-memory image file (used by the gateway tests too)."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def noise_png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
