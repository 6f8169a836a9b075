"""The item fusion (text + image + attributes): a missing image is not a garbage image, the
catalogue table and the exported per-item encoder compute the same vectors, and the image
encoder is the real pretrained EfficientNet-Lite0 with the shared preprocessing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ltrec.models import ItemFusion, ItemSide, ModelConfig, Recommender
from ltrec_core import contract
from ltrec_core.item_attributes import attribute_ids

CFG = ModelConfig(
    n_items=6,
    n_devices=2,
    n_regions=2,
    text_dim=8,
    embedding_dim=16,
    projection_hidden=16,
    n_layers=1,
    n_heads=2,
    max_history=5,
    context_dim=4,
    image_dim=12,
    id_embeddings=False,
)


def _randomise(module: torch.nn.Module) -> None:
    """Trained-looking weights: the zero-initialised image and attribute parts matter now."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(std=0.5)


def _side() -> ItemSide:
    torch.manual_seed(0)
    attributes = torch.tensor(
        [[0] * contract.ATTRIBUTE_SLOTS]
        + [attribute_ids(f"Genre{i % 3}|Sub{i}", "Acme" if i % 2 else "", "") for i in range(6)]
    )
    return ItemSide(torch.tensor([2, 5]), torch.rand(2, CFG.image_dim) * 3, attributes)


def test_untrained_image_and_attribute_parts_add_exactly_nothing() -> None:
    torch.manual_seed(0)
    text = torch.randn(CFG.n_items + 1, CFG.text_dim)
    with_side = Recommender(CFG, text, _side()).eval()
    without = Recommender(CFG, text).eval()
    without.load_state_dict(with_side.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(with_side.item_table(), without.item_table())


def test_catalogue_table_equals_the_per_item_fusion_the_encoder_exports() -> None:
    torch.manual_seed(0)
    text = torch.randn(CFG.n_items + 1, CFG.text_dim)
    side = _side()
    model = Recommender(CFG, text, side).eval()
    _randomise(model.fusion)
    has_image = torch.zeros(CFG.n_items + 1, 1)
    has_image[side.image_rows] = 1.0
    dense = torch.zeros(CFG.n_items + 1, CFG.image_dim)
    dense[side.image_rows] = side.image_features
    assert side.attribute_ids is not None
    with torch.no_grad():
        table = model.item_table()
        per_item = model.fusion(text, dense, has_image, side.attribute_ids)
    torch.testing.assert_close(table[1:], per_item[1:])
    # The image moved exactly the image-bearing rows.
    no_image = Recommender(
        CFG,
        text,
        dataclasses.replace(
            side, image_rows=side.image_rows[:0], image_features=side.image_features[:0]
        ),
    )
    no_image.load_state_dict(model.state_dict())
    with torch.no_grad():
        moved = (no_image.eval().item_table() - table).norm(dim=1) > 1e-4
    assert moved.nonzero().flatten().tolist() == [2, 5]


def test_a_missing_image_gives_the_text_and_attribute_vector_whatever_the_features() -> None:
    fusion = ItemFusion(CFG).eval()
    _randomise(fusion)
    text = torch.randn(1, CFG.text_dim)
    attrs = torch.tensor([attribute_ids("Books|Crime", "Acme", "budget")])
    with torch.no_grad():
        blank = fusion(text, torch.zeros(1, CFG.image_dim), torch.zeros(1, 1), attrs)
        noise = fusion(text, torch.randn(1, CFG.image_dim) * 100, torch.zeros(1, 1), attrs)
        real = fusion(text, torch.randn(1, CFG.image_dim), torch.ones(1, 1), attrs)
    torch.testing.assert_close(blank, noise)
    assert (real - blank).norm() > 1e-3
    # Attributes count: a different brand changes the vector.
    other = torch.tensor([attribute_ids("Books|Crime", "Other", "budget")])
    with torch.no_grad():
        assert (
            fusion(text, torch.zeros(1, CFG.image_dim), torch.zeros(1, 1), other) - blank
        ).norm() > 1e-3


def test_image_dropout_hides_images_in_training_only() -> None:
    torch.manual_seed(0)
    text = torch.randn(CFG.n_items + 1, CFG.text_dim)
    cfg = dataclasses.replace(CFG, image_dropout=1.0, dropout=0.0)
    side = _side()
    model = Recommender(cfg, text, side)
    _randomise(model.fusion)
    no_images = dataclasses.replace(
        side, image_rows=side.image_rows[:0], image_features=side.image_features[:0]
    )
    plain = Recommender(cfg, text, no_images)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.train()
        plain.train()
        torch.testing.assert_close(model.item_table(), plain.item_table())  # every image hidden
        model.eval()
        plain.eval()
        assert (model.item_table() - plain.item_table()).norm() > 1e-3


@pytest.fixture(scope="module")
def image_encoder():  # type: ignore[no-untyped-def]
    from ltrec.image_encoder import load_image_encoder

    return load_image_encoder()


def test_pretrained_image_encoder_knows_a_cat_from_a_coffee(image_encoder) -> None:  # type: ignore[no-untyped-def]
    """Real ImageNet weights through the shared preprocessing: skimage's cat photo lands next
    to a flipped, resized copy of itself and away from the coffee photo."""
    import skimage.data

    from ltrec_core.images import image_batch

    cat = Image.fromarray(skimage.data.chelsea())
    variant = cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 200))
    coffee = Image.fromarray(skimage.data.coffee())
    with torch.no_grad():
        f = image_encoder(torch.from_numpy(image_batch([cat, variant, coffee])))
    assert f.shape == (3, contract.IMAGE_FEATURE_DIM)
    f = torch.nn.functional.normalize(f, dim=1)
    assert float(f[0] @ f[1]) > float(f[0] @ f[2]) + 0.1
    # And the classifier head of the same backbone calls the cat a cat (ImageNet 281-285).
    normalised = (torch.from_numpy(image_batch([cat])) - image_encoder.mean) / image_encoder.std
    with torch.no_grad():
        top = int(image_encoder.backbone(normalised).argmax())
    assert 281 <= top <= 285


def test_encode_images_reports_missing_and_unreadable_files(tmp_path, image_encoder) -> None:  # type: ignore[no-untyped-def]
    from ltrec.image_encoder import encode_images

    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    result = encode_images(
        [str(good), None, str(tmp_path / "missing.jpg"), str(corrupt)], progress=False
    )
    assert result.rows.tolist() == [0]
    assert result.features.shape == (1, contract.IMAGE_FEATURE_DIM)
    assert result.problems == {"missing": 1, "unreadable": 1}


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5])
def test_item_table_without_gradients_is_computed_in_chunks_with_the_same_rows(
    monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    """Export and evaluation build the table a chunk of rows at a time (a ten-million-item
    catalogue's hidden layer would not fit in memory): same vectors, images and attributes in
    chunks that hold none, one or both image rows, ID vectors added, padding row zero."""
    import ltrec.models as models

    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, id_embeddings=True)
    text = torch.randn(cfg.n_items + 1, cfg.text_dim)
    model = Recommender(cfg, text, _side()).eval()
    _randomise(model)
    with torch.no_grad():
        whole = model.item_table()
        monkeypatch.setattr(models, "TABLE_CHUNK_ROWS", chunk_rows)
        chunked = model.item_table()
    assert whole.abs().sum() > 0
    torch.testing.assert_close(chunked, whole)
    assert torch.all(chunked[contract.PADDING_INDEX] == 0)
    # With gradients (training) the table is still one differentiable computation.
    table = model.item_table()
    assert table.requires_grad
    torch.testing.assert_close(table.detach(), whole)
