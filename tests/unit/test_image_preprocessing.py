"""`ltrec_core.images`: any image Pillow reads -> the image encoder's input, or `ImageError`."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltrec_core import contract, images
from tests.support.images import image_bytes, noise_png

SHAPE = (3, contract.IMAGE_SIZE, contract.IMAGE_SIZE)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def model_input(data: bytes) -> np.ndarray:
    return images.to_model_input(images.decode_image(data))


def check(array: np.ndarray) -> None:
    assert array.shape == SHAPE and array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 1.0


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGB", (255, 0, 0), (1.0, 0.0, 0.0)),
        ("L", 128, (128 / 255,) * 3),  # grey: the same value in every channel
        ("RGBA", (0, 0, 255, 0), (1.0, 1.0, 1.0)),  # fully transparent: white behind it
        ("RGBA", (0, 0, 255, 255), (0.0, 0.0, 1.0)),
        ("LA", (0, 0), (1.0, 1.0, 1.0)),
    ],
)
def test_modes_become_rgb_in_the_unit_range(
    mode: str, colour: tuple[int, ...] | int, expected: tuple[float, float, float]
) -> None:
    array = model_input(image_bytes((40, 30), colour, mode))
    check(array)
    np.testing.assert_allclose(array.mean(axis=(1, 2)), expected, atol=1 / 255)


def test_palette_images_with_and_without_transparency() -> None:
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    for transparency in (None, 1):
        buffer = io.BytesIO()
        extra = {} if transparency is None else {"transparency": transparency}
        palette.save(buffer, format="PNG", **extra)
        array = model_input(buffer.getvalue())
        check(array)
        want = (0.0, 1.0, 0.0) if transparency is None else (1.0, 1.0, 1.0)
        np.testing.assert_allclose(array.mean(axis=(1, 2)), want, atol=1 / 255)


def test_exif_orientation_is_applied() -> None:
    # 60x30, top half red, bottom half blue; EXIF 6 = "rotate 90 degrees clockwise to view",
    # so the viewer sees 30x60 with red on the right. Without the rotation the centre crop would
    # be red on top instead.
    image = Image.new("RGB", (60, 30), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 60, 15))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    array = model_input(buffer.getvalue())
    check(array)
    middle = contract.IMAGE_SIZE // 2
    np.testing.assert_allclose(array[:, middle, 20], (0.0, 0.0, 1.0), atol=0.1)  # left: blue
    np.testing.assert_allclose(array[:, middle, -20], (1.0, 0.0, 0.0), atol=0.1)  # right: red
    np.testing.assert_allclose(array[:, 20, middle], array[:, -20, middle], atol=0.1)


def test_the_shorter_side_is_resized_and_the_centre_cropped() -> None:
    # 300x100: a green band in the middle third, red outside it; the crop keeps the middle.
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    array = model_input(buffer.getvalue())
    check(array)
    np.testing.assert_allclose(array[:, 5:-5, 5:-5].mean(axis=(1, 2)), (0, 1, 0), atol=0.02)


def test_a_one_pixel_image_works() -> None:
    array = model_input(image_bytes((1, 1), (10, 20, 30)))
    check(array)
    np.testing.assert_allclose(array[:, 0, 0], np.array([10, 20, 30]) / 255, atol=1e-6)


def test_elongated_images_up_to_the_aspect_limit_work() -> None:
    check(model_input(image_bytes((images.MAX_ASPECT_RATIO, 1), 7, "L", "GIF")))
    check(model_input(image_bytes((3, 3 * images.MAX_ASPECT_RATIO))))


def test_image_batch_stacks_model_inputs() -> None:
    decoded = [images.decode_image(image_bytes((5, 7))), images.decode_image(noise_png())]
    batch = images.image_batch(decoded)
    assert batch.shape == (2, *SHAPE) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], images.to_model_input(decoded[1]))
    assert images.image_batch([]).shape == (0, *SHAPE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"definitely not an image", "not a readable image (UnidentifiedImageError)"),
        (noise_png()[:600], "not a readable image"),  # truncated mid-pixels
        (noise_png()[:40], "not a readable image"),  # truncated in the header
        (png_header_only(8000, 6000), "image of 8000x6000 pixels exceeds 40000000 pixels"),
        (png_header_only(100_000, 100_000), "exceeds the pixel limit"),
        # Few pixels, but a shorter side of 1 would be scaled to 224 (billions of pixels).
        (image_bytes((40_000, 1), 7, "L", "GIF"), "more than 20 times as long as it is wide"),
        (png_header_only(3, 1_000_000), "3x1000000 pixels is more than 20 times"),
    ],
    ids=[
        "empty",
        "garbage",
        "truncated",
        "truncated header",
        "over the limit",
        "bomb",
        "strip",
        "tall strip",
    ],
)
def test_unreadable_images_raise_image_error(data: bytes, message: str) -> None:
    with pytest.raises(images.ImageError) as caught:
        images.decode_image(data)
    assert message in str(caught.value)


def test_image_files_are_read_and_missing_ones_are_image_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.webp"
    path.write_bytes(image_bytes((9, 9), (0, 0, 255), fmt="WEBP", lossless=True))
    assert images.load_image_file(path).size == (9, 9)
    with pytest.raises(images.ImageError, match="image file not found"):
        images.load_image_file(tmp_path / "missing.png")
    with pytest.raises(images.ImageError, match="not readable"):
        images.load_image_file(tmp_path)
