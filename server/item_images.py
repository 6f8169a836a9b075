"""Where an UpsertItems item's image comes from, and whether the gateway may use it.

An item's image is its `image` bytes or, when those are empty, the file its `image_path` names
under the gateway's image directory (`LTREC_IMAGE_ROOT`). Paths are resolved (symlinks
included) before they are checked, so neither "..", a symlink nor an absolute path reaches a
file outside the root; URLs are never fetched (the gateway makes no outbound requests on a
caller's behalf). A usable image becomes the image encoder's input row (`ltrec_core.images`); an
unusable one is an `ImageProblem` that names the field, and the item is encoded without it, so
one bad image never fails the other items of a call.

Reading, decoding and resizing are CPU and disk work: `ItemImages.load` runs them in a worker
thread, off the event loop. Reasons never carry the path or the item id (the caller sent them),
and nothing here logs either.
"""

from __future__ import annotations

import asyncio
import logging
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from ltrec_core import images
from server.errors import StartupError

logger = logging.getLogger(__name__)

# A file under the root may be a full-resolution product shot, larger than the 1 MiB a request
# may carry; beyond this it is refused before it is read.
MAX_IMAGE_FILE_BYTES = 16 * 1024 * 1024
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Outcome = Literal["unreadable", "not_allowed"]


@dataclass(frozen=True)
class ImageProblem:
    """Why item `index`'s image is not used; `outcome` is the metric label."""

    index: int
    reason: str
    outcome: Outcome


@dataclass(frozen=True)
class LoadedImage:
    """One item's image: the encoder input FP32 [3, IMAGE_SIZE, IMAGE_SIZE], a problem, or
    neither (the item came without an image)."""

    pixels: npt.NDArray[np.float32] | None = None
    problem: ImageProblem | None = None


class _Refused(Exception):
    def __init__(self, reason: str, outcome: Outcome) -> None:
        super().__init__(reason)
        self.outcome: Outcome = outcome


class ItemImages:
    """Loads items' images from their bytes or from files under `root` (None: no files)."""

    def __init__(self, root: Path | None) -> None:
        self._root: Path | None = None
        if root is not None:
            try:
                resolved = Path(root).resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                raise StartupError(f"LTREC_IMAGE_ROOT: cannot use {root}: {exc}") from exc
            if not resolved.is_dir():
                raise StartupError(f"LTREC_IMAGE_ROOT: {root} is not a directory")
            self._root = resolved
            logger.info("item images: image_path is read under %s", resolved)

    async def load(self, sources: Sequence[tuple[bytes, str]]) -> list[LoadedImage]:
        """(image bytes, image_path) per item, in item order -> one `LoadedImage` per item."""
        if not any(data or path for data, path in sources):
            return [LoadedImage() for _ in sources]
        return await asyncio.to_thread(self._load_all, list(sources))

    def _load_all(self, sources: list[tuple[bytes, str]]) -> list[LoadedImage]:
        return [self._load_one(index, data, path) for index, (data, path) in enumerate(sources)]

    def _load_one(self, index: int, data: bytes, path: str) -> LoadedImage:
        if data:  # the bytes win over image_path
            field = f"items[{index}].image"
        elif path:
            field = f"items[{index}].image_path"
        else:
            return LoadedImage()
        try:
            image = images.decode_image(data) if data else self._read(path)
            # Converted at once: the decoded full-size image is not kept beside the others.
            pixels = images.to_model_input(image)
        except images.ImageError as exc:
            return LoadedImage(problem=ImageProblem(index, f"{field}: {exc}", "unreadable"))
        except _Refused as exc:
            return LoadedImage(problem=ImageProblem(index, f"{field}: {exc}", exc.outcome))
        except Exception as exc:  # Pillow's decoders raise odd types (struct.error, EOFError)
            logger.warning("item images: the decoder raised %s; image reported", type(exc).__name__)
            reason = f"{field}: not a readable image ({type(exc).__name__})"
            return LoadedImage(problem=ImageProblem(index, reason, "unreadable"))
        return LoadedImage(pixels=pixels)

    def _read(self, path: str) -> Image.Image:
        if _URL.match(path):
            raise _Refused("URLs are not fetched; send the image bytes in image", "not_allowed")
        if self._root is None:
            raise _Refused("LTREC_IMAGE_ROOT is not set on this gateway", "not_allowed")
        try:
            resolved = (self._root / path).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a symlink loop
            raise _Refused(f"not a usable path ({type(exc).__name__})", "not_allowed") from exc
        if not resolved.is_relative_to(self._root):
            raise _Refused("the path leads outside LTREC_IMAGE_ROOT", "not_allowed")
        try:
            info = resolved.stat()
        except FileNotFoundError as exc:
            raise images.ImageError("image file not found", "missing") from exc
        except OSError as exc:
            raise images.ImageError(f"image file not readable ({type(exc).__name__})") from exc
        if not stat.S_ISREG(info.st_mode):
            raise images.ImageError("not a regular file")
        if info.st_size > MAX_IMAGE_FILE_BYTES:
            raise images.ImageError(
                f"image file of {info.st_size} bytes exceeds {MAX_IMAGE_FILE_BYTES} bytes",
                "too_large",
            )
        return images.load_image_file(resolved)
