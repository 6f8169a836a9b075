"""Items added or hidden after training: UpsertItems, DeleteItems, SimilarItems and the item store.

The gateway runs in-process against the fake Triton of `test_gateway` (whose fake item encoder
answers a vector derived from the tokens, and whose fake image encoder answers features derived
from the pixels); the real encoders and graphs are exercised by `tests/integration/`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from prometheus_client import REGISTRY

from ltrec_core import contract, images
from ltrec_core.item_attributes import attribute_ids
from ltrec_core.item_text import ItemFields, item_text
from server import item_images
from server.app import create_server
from server.catalogue import load_model_repository
from server.config import GatewayConfig
from server.errors import StartupError
from server.gen.ltrec.v1 import recommender_pb2
from server.interceptors import INTERNAL_MESSAGE
from server.item_images import ImageProblem, ItemImages, LoadedImage
from server.item_tokenizer import ItemTokenizer
from server.stores.items import DELETE, UPSERT, ItemStore, decode_vector, encode_vector
from tests.support.gateway import (
    DIM,
    ITEMS,
    METADATA,
    FakeTransport,
    fake_image_features,
    fake_item_vectors,
    outputs,
    run_async,
    running_gateway,
    unpadded,
    write_repository,
)
from tests.support.images import image_bytes, noise_png

N = len(ITEMS)
VIEW = recommender_pb2.EVENT_TYPE_VIEW


def item(item_id: str, title: str = "Space Film (2031)", **fields: Any) -> recommender_pb2.Item:
    return recommender_pb2.Item(item_id=item_id, title=title, **fields)


def upsert(*items: recommender_pb2.Item) -> recommender_pb2.UpsertItemsRequest:
    return recommender_pb2.UpsertItemsRequest(items=items, request_id="up-1")


def recommend(*history: str, k: int = 3) -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(
        k=k, history=[recommender_pb2.HistoryEvent(item_id=i, event_type=VIEW) for i in history]
    )


def sent(fake: FakeTransport, model: str = contract.ENSEMBLE_MODEL) -> dict[str, np.ndarray]:
    return fake.ranking_calls(model)[-1].inputs


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "model_repository")


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- UpsertItems -> Recommend ------------------------------------------------------------------


@run_async
async def test_an_upserted_item_is_encoded_stored_and_recommended_at_once(repository: Path) -> None:
    # reason positions index the left-padded history sent: [0, i1, new-1]
    fake = FakeTransport(outputs([N + 2, 4], [2.0, 1.0], [1, 1]))
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.UpsertItems(
            upsert(
                item("new-1", "Toy Story 5 (2031)", category="Animation|Children's"),
                item("new-2", description="A new space film.", brand="Acme", image=b"\x89PNG"),
            ),
            timeout=5,
        )
        assert (reply.upserted, reply.created, reply.images_not_encoded) == (2, 2, 1)
        assert reply.images_encoded == 0  # b"\x89PNG" is not a whole image
        assert [(p.index, p.reason) for p in reply.image_problems] == [
            (1, "items[1].image: not a readable image (UnidentifiedImageError)")
        ]
        assert reply.model_version == METADATA["model_version"] and reply.request_id == "up-1"
        (encode,) = fake.calls
        assert encode.model_name == contract.ITEM_ENCODER_MODEL
        ids = encode.inputs[contract.TEXT_INPUT_IDS]
        assert ids.dtype == np.int64 and ids.shape[0] == 2
        assert encode.inputs[contract.TEXT_ATTENTION_MASK].shape == ids.shape
        # The caller's deadline (5 s, less the time spent before the call: tokenizing can be
        # slow on a loaded machine), not the encoder's own 10-second limit. gRPC's server-side
        # deadline comes from a coarse clock, so time_remaining() may read a little over the
        # 5 s sent (5.0007 s was seen in CI); 50 ms of slack is still far below the 10 s limit.
        assert 1.0 < encode.client_timeout <= 5.05

        response = await gw.stub.Recommend(recommend("i1", "new-1"), timeout=5)
    tensors = sent(fake)
    # The new items are indices N+1, N+2; their vectors and popularity go with the request.
    assert unpadded(tensors[contract.HISTORY_ITEMS]) == ([[1, N + 1]])
    np.testing.assert_allclose(tensors[contract.EXTRA_ITEM_VECTORS], [fake_item_vectors(ids)])
    np.testing.assert_array_equal(tensors[contract.EXTRA_POPULARITY], [[0.0, 0.0]])
    assert tensors[contract.EXTRA_POPULARITY].dtype == np.float32
    assert [(i.item_id, i.title, i.long_tail) for i in response.items] == [
        ("new-2", "Space Film (2031)", True),
        ("i4", "Sabrina (1995)", True),
    ]
    assert response.items[0].reason == 'Because you viewed "Toy Story (1995)"'
    # On disk: the encoded vector and the fields, not the image bytes.
    (segment,) = (repository.parent / "items").iterdir()
    records = [json.loads(line) for line in segment.read_text().splitlines()]
    assert [r["item_id"] for r in records] == ["new-1", "new-2"]
    assert records[0]["text"] == "Toy Story 5 (2031). Category: Animation > Children's."
    assert records[1]["image_bytes"] == 4 and records[1]["image_encoded"] is False
    assert "PNG" not in segment.read_text()


@run_async
async def test_upserting_a_trained_item_replaces_it_and_keeps_its_popularity(
    repository: Path,
) -> None:
    fake = FakeTransport(outputs([3, N + 1], [2.0, 1.0], [0, 0]))
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.UpsertItems(upsert(item("i3", "Casino, restored (1995)")))
        assert (reply.upserted, reply.created) == (1, 0)
        response = await gw.stub.Recommend(recommend("i3"), timeout=5)
    tensors = sent(fake)
    assert unpadded(tensors[contract.HISTORY_ITEMS]) == ([[N + 1]])  # the new version
    assert unpadded(tensors[contract.EXCLUDE_ITEMS]) == ([[3]])  # the old one, hidden
    np.testing.assert_array_equal(tensors[contract.EXTRA_POPULARITY], [[300.0]])
    assert response.items == []  # index 3 hidden, N+1 in the history: both dropped


# --- Images ------------------------------------------------------------------------------------

RED_PNG = image_bytes((40, 30), (220, 20, 20))


def pixels(data: bytes) -> np.ndarray:
    """What the gateway sends the image encoder for one image."""
    return images.to_model_input(images.decode_image(data))


def images_total(outcome: str) -> float:
    return REGISTRY.get_sample_value("ltrec_gateway_item_images_total", {"outcome": outcome}) or 0.0


def encoder_calls(fake: FakeTransport) -> tuple[list[Any], Any]:
    """(image encoder calls, the one item encoder call) of one UpsertItems."""
    image_calls = [c for c in fake.calls if c.model_name == contract.IMAGE_ENCODER_MODEL]
    (item_call,) = [c for c in fake.calls if c.model_name == contract.ITEM_ENCODER_MODEL]
    return image_calls, item_call


def stored_records(repository: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for segment in sorted((repository.parent / "items").iterdir()):
        for line in segment.read_text().splitlines():
            record = json.loads(line)
            records[record["item_id"]] = record
    return records


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """<tmp>/images/shoes/red.png and a secret image beside the root, not under it."""
    root = tmp_path / "images"
    (root / "shoes").mkdir(parents=True)
    (root / "shoes" / "red.png").write_bytes(RED_PNG)
    (tmp_path / "secret.png").write_bytes(image_bytes((8, 8), (0, 0, 0)))
    return root


@run_async
async def test_an_image_is_encoded_and_its_features_go_to_the_item_encoder(
    repository: Path,
) -> None:
    fake = FakeTransport()
    encoded_before = images_total("encoded")
    fields = {"category": "Shoes|Running", "brand": "Acme", "price_bucket": 3}
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.UpsertItems(
            upsert(item("shoe-1", "Red runner", image=RED_PNG, **fields)), timeout=5
        )
    assert (reply.images_encoded, reply.images_not_encoded, list(reply.image_problems)) == (
        1,
        0,
        [],
    )
    (image_call,), item_call = encoder_calls(fake)
    assert [c.model_name for c in fake.calls] == [
        contract.IMAGE_ENCODER_MODEL,
        contract.ITEM_ENCODER_MODEL,
    ]
    sent_image = image_call.inputs[contract.IMAGE]
    assert sent_image.shape == (1, 3, 224, 224) and sent_image.dtype == np.float32
    np.testing.assert_allclose(sent_image[0], pixels(RED_PNG))
    tensors = item_call.inputs
    np.testing.assert_array_equal(tensors[contract.HAS_IMAGE], [[1.0]])
    np.testing.assert_array_equal(tensors[contract.IMAGE_FEATURES], fake_image_features(sent_image))
    np.testing.assert_array_equal(
        tensors[contract.ATTRIBUTE_IDS], [attribute_ids("Shoes|Running", "Acme", "premium")]
    )
    # Both calls run under the caller's deadline and carry the request id.
    for call in (image_call, item_call):
        assert call.client_timeout == pytest.approx(5, abs=0.5)
        assert call.request_id == "up-1"
    assert stored_records(repository)["shoe-1"]["image_encoded"] is True
    assert images_total("encoded") == encoded_before + 1


@run_async
async def test_undecodable_image_bytes_are_a_problem_and_the_item_is_stored_without_it(
    repository: Path,
) -> None:
    fake = FakeTransport()
    unreadable_before = images_total("unreadable")
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.UpsertItems(
            upsert(item("a"), item("b", image=b"\xff\xd8 not really a jpeg")), timeout=5
        )
        assert "b" in gw.server.items.catalogue.index_of  # served by its text and attributes
    assert (reply.upserted, reply.images_encoded, reply.images_not_encoded) == (2, 0, 1)
    (problem,) = reply.image_problems
    assert problem.index == 1
    assert problem.reason.startswith("items[1].image: not a readable image")
    image_calls, item_call = encoder_calls(fake)
    assert image_calls == []  # no usable image: no image encoder call
    np.testing.assert_array_equal(item_call.inputs[contract.HAS_IMAGE], [[0.0], [0.0]])
    assert not item_call.inputs[contract.IMAGE_FEATURES].any()
    assert stored_records(repository)["b"]["image_encoded"] is False
    assert images_total("unreadable") == unreadable_before + 1


@run_async
async def test_image_paths_are_read_under_the_image_root(
    repository: Path, image_root: Path
) -> None:
    fake = FakeTransport()
    absolute = str(image_root / "shoes" / "red.png")
    async with running_gateway(repository, fake, image_root=image_root) as gw:
        reply = await gw.stub.UpsertItems(
            upsert(
                item("rel", image_path="shoes/red.png"),
                item("dots", image_path="shoes/../shoes/./red.png"),
                item("abs", image_path=absolute),
            ),
            timeout=5,
        )
    assert (reply.images_encoded, reply.images_not_encoded) == (3, 0), reply.image_problems
    (image_call,), item_call = encoder_calls(fake)
    for row in image_call.inputs[contract.IMAGE]:
        np.testing.assert_allclose(row, pixels(RED_PNG))
    np.testing.assert_array_equal(item_call.inputs[contract.HAS_IMAGE], [[1.0]] * 3)
    record = stored_records(repository)["rel"]
    assert record["image_path"] == "shoes/red.png" and record["image_encoded"] is True


@run_async
async def test_image_paths_outside_the_root_missing_or_not_files_are_problems(
    repository: Path, image_root: Path, tmp_path: Path
) -> None:
    (image_root / "escape.png").symlink_to(tmp_path / "secret.png")
    (image_root / "loop.png").symlink_to(image_root / "loop.png")
    cases = {
        "../secret.png": "items[0].image_path: the path leads outside LTREC_IMAGE_ROOT",
        "escape.png": "items[1].image_path: the path leads outside LTREC_IMAGE_ROOT",
        str(tmp_path / "secret.png"): "items[2].image_path: the path leads outside",
        "nope/missing.png": "items[3].image_path: image file not found",
        "shoes": "items[4].image_path: not a regular file",
        "https://cdn.example.com/red.png": "items[5].image_path: URLs are not fetched",
        "file:///etc/passwd": "items[6].image_path: URLs are not fetched",
        "bad\0name.png": "items[7].image_path: not a usable path",
        "loop.png": "items[8].image_path: not a usable path",
    }
    fake = FakeTransport()
    async with running_gateway(
        repository, fake, image_root=image_root, items_max_batch=len(cases)
    ) as gw:
        reply = await gw.stub.UpsertItems(
            upsert(*(item(f"n{i}", image_path=path) for i, path in enumerate(cases))), timeout=5
        )
    assert (reply.upserted, reply.images_encoded, reply.images_not_encoded) == (9, 0, 9)
    reasons = [p.reason for p in reply.image_problems]
    for reason, expected in zip(reasons, cases.values(), strict=True):
        assert reason.startswith(expected), (reason, expected)
    # A reason never echoes the path (nor does it say whether a file outside the root exists).
    assert not any("secret" in reason or "cdn" in reason for reason in reasons)
    assert [p.index for p in reply.image_problems] == list(range(len(cases)))


@run_async
async def test_image_paths_without_an_image_root_are_problems(repository: Path) -> None:
    fake = FakeTransport()
    not_allowed_before = images_total("not_allowed")
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.UpsertItems(
            upsert(item("a"), item("b"), item("c", image_path="shoes/red.png")), timeout=5
        )
    assert [(p.index, p.reason) for p in reply.image_problems] == [
        (2, "items[2].image_path: LTREC_IMAGE_ROOT is not set on this gateway")
    ]
    assert images_total("not_allowed") == not_allowed_before + 1


@run_async
async def test_a_batch_mixing_every_case_encodes_the_usable_images_in_one_call(
    repository: Path, image_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    noise = noise_png(seed=3)
    batch = [
        item("m0", image=noise, category="Toys|Space", brand="Acme", price_bucket=1),
        item("m1", image=b"GIF89a garbage"),
        item("m2", image_path="shoes/red.png", brand="Zed"),
        item("m3", image_path="../secret.png"),
        item("m4", description="no image at all"),
        item("m5", image=RED_PNG, image_path="../secret.png"),  # the bytes win
        item("m6", image_path="shoes/blue.png"),
    ]
    before = {
        outcome: images_total(outcome) for outcome in ("encoded", "unreadable", "not_allowed")
    }
    fake = FakeTransport()
    async with running_gateway(repository, fake, image_root=image_root) as gw:
        reply = await gw.stub.UpsertItems(upsert(*batch), timeout=5)
        assert all(f"m{i}" in gw.server.items.catalogue.index_of for i in range(7))
    assert (reply.upserted, reply.images_encoded, reply.images_not_encoded) == (7, 3, 3)
    assert [p.index for p in reply.image_problems] == [1, 3, 6]
    assert "image file not found" in reply.image_problems[2].reason

    (image_call,), item_call = encoder_calls(fake)
    sent_images = image_call.inputs[contract.IMAGE]
    assert sent_images.shape == (3, 3, 224, 224)
    for row, data in zip(sent_images, (noise, RED_PNG, RED_PNG), strict=True):
        np.testing.assert_allclose(row, pixels(data))
    tensors = item_call.inputs
    has_image = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    np.testing.assert_array_equal(tensors[contract.HAS_IMAGE][:, 0], has_image)
    features = tensors[contract.IMAGE_FEATURES]
    np.testing.assert_array_equal(features[[0, 2, 5]], fake_image_features(sent_images))
    assert not features[[1, 3, 4, 6]].any()
    empty = [0] * contract.ATTRIBUTE_SLOTS
    np.testing.assert_array_equal(
        tensors[contract.ATTRIBUTE_IDS],
        [
            attribute_ids("Toys|Space", "Acme", "budget"),
            empty,
            attribute_ids("", "Zed", ""),
            empty,
            empty,
            empty,
            empty,
        ],
    )
    records = stored_records(repository)
    assert [records[f"m{i}"]["image_encoded"] for i in range(7)] == [bool(h) for h in has_image]
    # One per item with an image, by outcome; no ids or paths in labels or logs.
    assert images_total("encoded") == before["encoded"] + 3
    assert images_total("unreadable") == before["unreadable"] + 2
    assert images_total("not_allowed") == before["not_allowed"] + 1
    for family in REGISTRY.collect():
        for sample in family.samples:
            assert not {"m1", "m3", "../secret.png", "shoes/red.png"} & set(sample.labels.values())
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "secret" not in logged and "red.png" not in logged and '"m3"' not in logged


@run_async
async def test_bad_image_encoder_answers_are_internal_and_store_nothing(repository: Path) -> None:
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        for answer in (
            np.zeros((2, contract.IMAGE_FEATURE_DIM), np.float32),  # one image sent
            np.full((1, contract.IMAGE_FEATURE_DIM), np.nan, np.float32),
        ):
            fake.image_result = {contract.IMAGE_FEATURES: answer}
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.UpsertItems(upsert(item("x", image=RED_PNG)), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert caught.value.details() == INTERNAL_MESSAGE
        assert [c.model_name for c in fake.calls] == [contract.IMAGE_ENCODER_MODEL] * 2
        assert "x" not in gw.server.items.catalogue.index_of


@run_async
async def test_images_are_decoded_off_the_event_loop_and_bad_files_are_problems(
    image_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    real = images.to_model_input

    def spy(image: Any) -> np.ndarray:
        threads.append(threading.current_thread())
        return real(image)

    monkeypatch.setattr(images, "to_model_input", spy)
    monkeypatch.setattr(item_images, "MAX_IMAGE_FILE_BYTES", 100)
    (image_root / "big.png").write_bytes(b"x" * 101)
    loaded = await ItemImages(image_root).load([(RED_PNG, ""), (b"", "big.png"), (b"", "")])
    assert threads and threading.main_thread() not in threads
    assert loaded[0].pixels is not None and loaded[0].problem is None
    assert loaded[1] == LoadedImage(
        problem=ImageProblem(
            1, "items[1].image_path: image file of 101 bytes exceeds 100 bytes", "unreadable"
        )
    )
    assert loaded[2] == LoadedImage()

    # A decoder failing with an exception type decode_image does not expect is still a problem.
    def broken(image: Any) -> np.ndarray:
        raise EOFError("decoder bug")

    monkeypatch.setattr(images, "to_model_input", broken)
    (problem,) = [i.problem for i in await ItemImages(None).load([(RED_PNG, "")])]
    assert problem == ImageProblem(
        0, "items[0].image: not a readable image (EOFError)", "unreadable"
    )


def test_the_image_root_is_read_from_the_environment_and_checked_at_start(tmp_path: Path) -> None:
    plain = {"LTREC_ALLOW_PLAINTEXT": "true"}
    assert GatewayConfig.from_env(plain).image_root is None
    assert GatewayConfig.from_env(plain | {"LTREC_IMAGE_ROOT": " "}).image_root is None
    root = GatewayConfig.from_env(plain | {"LTREC_IMAGE_ROOT": str(tmp_path)}).image_root
    assert root == tmp_path
    repository = write_repository(tmp_path / "model_repository")
    for bad in (tmp_path / "missing", repository / contract.METADATA_FILE):
        config = GatewayConfig(
            grpc_host="127.0.0.1",
            grpc_port=0,
            metrics_port=0,
            model_repository=repository,
            allow_plaintext=True,
            feedback_dir=tmp_path / "feedback",
            items_dir=tmp_path / "items",
            history_sqlite_path=tmp_path / "history" / "history.sqlite3",
            image_root=bad,
        )
        with pytest.raises(StartupError, match="LTREC_IMAGE_ROOT"):
            create_server(config, transport=FakeTransport())
    assert os.listdir(tmp_path) == ["model_repository"]  # refused before any store was opened


# --- DeleteItems -------------------------------------------------------------------------------


@run_async
async def test_deleted_items_are_excluded_at_once_and_unknown_ids_are_not_found(
    repository: Path,
) -> None:
    fake = FakeTransport(outputs([2, 5], [3.0, 1.0], [0, 0]))
    async with running_gateway(repository, fake) as gw:
        await gw.stub.UpsertItems(upsert(item("new-1")))
        reply = await gw.stub.DeleteItems(
            recommender_pb2.DeleteItemsRequest(item_ids=["i2", "new-1", "i2"]), timeout=5
        )
        assert reply.deleted == 2
        response = await gw.stub.Recommend(recommend("i1"), timeout=5)
        tensors = sent(fake)
        # i2 excluded for every request; the deleted new item is out of the overlay.
        assert unpadded(tensors[contract.EXCLUDE_ITEMS]) == ([[2]])
        assert tensors[contract.EXTRA_ITEM_VECTORS].shape == (1, 0, DIM)
        assert [i.item_id for i in response.items] == ["i5"]  # i2 hidden: dropped
        # Deleting again is OK (idempotent); an id never seen is NOT_FOUND, nothing hidden.
        await gw.stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=["new-1"]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.DeleteItems(
                recommender_pb2.DeleteItemsRequest(item_ids=["i4", "nope"]), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "item_ids[1] 'nope' is not in the catalogue" in (caught.value.details() or "")
        await gw.stub.Recommend(recommend("i1"), timeout=5)
        assert unpadded(sent(fake)[contract.EXCLUDE_ITEMS]) == ([[2]])
        # An upsert brings a deleted item back.
        await gw.stub.UpsertItems(upsert(item("i2", "Heat (1995)")))
        await gw.stub.Recommend(recommend(), timeout=5)
        assert unpadded(sent(fake)[contract.EXCLUDE_ITEMS]) == ([[2]])
        assert sent(fake)[contract.EXTRA_ITEM_VECTORS].shape == (1, 1, DIM)


# --- Replicas and restarts ---------------------------------------------------------------------


@run_async
async def test_replicas_on_one_store_agree_and_items_survive_a_restart(repository: Path) -> None:
    fast = {"items_poll_interval_seconds": 0.05}
    fake_a, fake_b = FakeTransport(), FakeTransport()
    async with (
        running_gateway(repository, fake_a, feedback_replica="a", **fast) as a,
        running_gateway(repository, fake_b, feedback_replica="b", **fast) as b,
    ):
        await a.stub.UpsertItems(upsert(item("new-1")))
        await b.stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=["i6"]))
        await wait_for(lambda: a.server.items.catalogue.is_hidden(6))
        await wait_for(lambda: b.server.items.catalogue.size == N + 1)
        for gw, fake in ((a, fake_a), (b, fake_b)):
            await gw.stub.Recommend(recommend("new-1"), timeout=5)
            assert unpadded(sent(fake)[contract.HISTORY_ITEMS]) == ([[N + 1]])
            assert unpadded(sent(fake)[contract.EXCLUDE_ITEMS]) == ([[6]])
        np.testing.assert_array_equal(
            sent(fake_a)[contract.EXTRA_ITEM_VECTORS], sent(fake_b)[contract.EXTRA_ITEM_VECTORS]
        )
    names = sorted(p.name for p in (repository.parent / "items").iterdir())
    assert names == ["items-a-000001.jsonl", "items-b-000001.jsonl"]
    restarted = FakeTransport()
    async with running_gateway(repository, restarted, feedback_replica="a") as gw:
        await gw.stub.Recommend(recommend("new-1"), timeout=5)
        await gw.stub.UpsertItems(upsert(item("new-2")))
    assert unpadded(sent(restarted)[contract.HISTORY_ITEMS]) == ([[N + 1]])
    assert unpadded(sent(restarted)[contract.EXCLUDE_ITEMS]) == ([[6]])
    # A restart begins a new segment; it never appends to an old one.
    assert (repository.parent / "items" / "items-a-000002.jsonl").is_file()


def _record(kind: str, item_id: str, ts: float, replica: str, line: int, **more: Any) -> str:
    return json.dumps(
        {"kind": kind, "item_id": item_id, "ts": ts, "replica": replica, "segment": 1}
        | {"line": line, **more}
    )


def _upsert_record(item_id: str, ts: float, replica: str, line: int, **more: Any) -> str:
    fields = {
        "title": f"T {item_id}",
        "text": f"T {item_id}.",
        "vector": encode_vector(np.full(DIM, ts, dtype=np.float32)),
        "model_version": METADATA["model_version"],
    }
    return _record(UPSERT, item_id, ts, replica, line, **(fields | more))


def test_the_last_write_wins_whatever_the_read_order_and_torn_lines_are_skipped(
    repository: Path,
) -> None:
    metadata, trained = load_model_repository(repository)
    store_dir = repository.parent / "items"
    store_dir.mkdir()
    # Replica a upserts x at t=1 and deletes it at t=3; replica b upserts it at t=2, then a
    # later upsert of y at t=5 overrides b's delete of y at t=4. Each file read alone, or both
    # in either order, must end with: x deleted, y live with t=5's vector.
    a = [
        _upsert_record("x", 1.0, "a", 1),
        _record(DELETE, "x", 3.0, "a", 2),
        _upsert_record("y", 5.0, "a", 3),
    ]
    b = [_upsert_record("x", 2.0, "b", 1), _record(DELETE, "y", 4.0, "b", 2)]
    (store_dir / "items-a-000001.jsonl").write_text("\n".join(a) + "\nnot json\n")
    # b crashed mid-line: its torn tail is never applied.
    (store_dir / "items-b-000001.jsonl").write_text("\n".join(b) + '\n{"kind": "item_up')
    store = ItemStore(store_dir, trained, metadata)
    store.open()
    catalogue = store.catalogue
    assert catalogue.item_ids[N + 1 :] == ["y"]
    np.testing.assert_array_equal(catalogue.extra_vectors, [np.full(DIM, 5.0)])
    assert "x" not in catalogue.index_of and store.knows("x")
    # Reading b first, then a's lines, converges to the same state.
    other = ItemStore(store_dir, trained, metadata)
    other._apply([json.loads(line) for line in b] + [json.loads(line) for line in a])
    assert other.catalogue.item_ids == catalogue.item_ids
    np.testing.assert_array_equal(other.catalogue.extra_vectors, catalogue.extra_vectors)


@run_async
async def test_items_encoded_by_another_model_version_are_re_encoded_before_serving(
    repository: Path,
) -> None:
    store_dir = repository.parent / "items"
    store_dir.mkdir()
    stale = _upsert_record("old-model-item", 1.0, "z", 1, model_version="1999-old")
    (store_dir / "items-z-000001.jsonl").write_text(stale + "\n")
    fake = FakeTransport()
    async with running_gateway(repository, fake, items_poll_interval_seconds=0.05) as gw:
        assert gw.server.items.catalogue.size == N  # its old vector is not served
        await wait_for(lambda: gw.server.items.catalogue.size == N + 1)
    (encode,) = fake.calls
    assert encode.model_name == contract.ITEM_ENCODER_MODEL
    np.testing.assert_allclose(
        gw.server.items.catalogue.extra_vectors,
        fake_item_vectors(encode.inputs[contract.TEXT_INPUT_IDS]),
    )


@run_async
async def test_an_item_photo_survives_a_rollout_through_its_kept_image_features(
    repository: Path,
) -> None:
    """The upsert keeps the image encoder's output; a model version that did not encode the item
    re-runs only the item encoder on it, with the photo's features, not the image encoder."""
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        await gw.stub.UpsertItems(upsert(item("shoe-1", "Red runner", image=RED_PNG)), timeout=5)
    (image_call,), _ = encoder_calls(fake)
    features = fake_image_features(image_call.inputs[contract.IMAGE])[0]
    record = stored_records(repository)["shoe-1"]
    np.testing.assert_array_equal(
        decode_vector(record["image_features"], contract.IMAGE_FEATURE_DIM), features
    )
    # The same record as another model version wrote it.
    store_dir = repository.parent / "items"
    for segment in store_dir.iterdir():
        segment.unlink()
    stale = _upsert_record(
        "shoe-1", 1.0, "z", 1, model_version="1999-old", image_features=record["image_features"]
    )
    (store_dir / "items-z-000001.jsonl").write_text(stale + "\n")
    fake = FakeTransport()
    async with running_gateway(repository, fake, items_poll_interval_seconds=0.05) as gw:
        await wait_for(lambda: gw.server.items.catalogue.size == N + 1)
    (call,) = fake.calls  # the item encoder only
    assert call.model_name == contract.ITEM_ENCODER_MODEL
    np.testing.assert_array_equal(call.inputs[contract.HAS_IMAGE], [[1.0]])
    np.testing.assert_array_equal(call.inputs[contract.IMAGE_FEATURES], [features])


# --- SimilarItems ------------------------------------------------------------------------------


@run_async
async def test_similar_items_query_the_item_vector_with_the_same_exclusions(
    repository: Path,
) -> None:
    # The scorer never returns the query; the gateway drops it anyway (index 1 below).
    fake = FakeTransport(outputs([1, 4, N + 1, 0], [3.0, 2.0, 1.0, float("-inf")], [0, 0, 0, 0]))
    async with running_gateway(repository, fake) as gw:
        await gw.stub.UpsertItems(upsert(item("new-1")))
        await gw.stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=["i6"]))
        reply = await gw.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(
                item_id="i1", k=4, exclude_item_ids=["i2"], long_tail_weight=0.5, request_id="s1"
            ),
            timeout=5,
        )
        tensors = sent(fake, contract.SIMILAR_ITEMS_MODEL)
        assert set(tensors) == {
            contract.QUERY_ITEMS,
            contract.EXCLUDE_ITEMS,
            contract.LONG_TAIL_WEIGHT,
            contract.TOP_K,
            contract.EXTRA_ITEM_VECTORS,
            contract.EXTRA_POPULARITY,
            contract.ITEM_ELIGIBLE,
        }
        np.testing.assert_array_equal(tensors[contract.ITEM_ELIGIBLE], [[True]])  # no filter
        assert unpadded(tensors[contract.QUERY_ITEMS]) == ([[1]])
        assert unpadded(tensors[contract.EXCLUDE_ITEMS]) == ([[2, 6]])
        np.testing.assert_array_equal(tensors[contract.LONG_TAIL_WEIGHT], [[0.5]])
        np.testing.assert_array_equal(tensors[contract.TOP_K], [[4]])
        assert tensors[contract.EXTRA_ITEM_VECTORS].shape == (1, 1, DIM)
        assert [(i.item_id, i.reason) for i in reply.items] == [
            ("i4", 'Similar to "Toy Story (1995)"'),
            ("new-1", 'Similar to "Toy Story (1995)"'),
        ]
        assert reply.request_id == "s1" and reply.model_version == METADATA["model_version"]

        # A new item has neighbours too; an unknown or hidden one is NOT_FOUND.
        await gw.stub.SimilarItems(recommender_pb2.SimilarItemsRequest(item_id="new-1", k=4))
        assert unpadded(sent(fake, contract.SIMILAR_ITEMS_MODEL)[contract.QUERY_ITEMS]) == [[N + 1]]
        calls = len(fake.calls)
        for missing in ("nope", "i6"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.SimilarItems(
                    recommender_pb2.SimilarItemsRequest(item_id=missing, k=2), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"item_id {missing!r} is not in the catalogue" in (caught.value.details() or "")
        assert len(fake.calls) == calls


# --- Validation and errors ---------------------------------------------------------------------


def _upsert_with(**fields: Any) -> recommender_pb2.UpsertItemsRequest:
    return upsert(item("new-1", **fields))


UPSERT_CASES: dict[str, tuple[recommender_pb2.UpsertItemsRequest, str]] = {
    "no items": (recommender_pb2.UpsertItemsRequest(), "items must have between 1 and 64"),
    "too many": (
        recommender_pb2.UpsertItemsRequest(items=[item(f"n{i}") for i in range(65)]),
        "items must have between 1 and 64 items, got 65",
    ),
    "empty id": (upsert(item("")), "items[0].item_id must be non-empty"),
    "long id": (upsert(item("x" * 257)), "items[0].item_id must be at most 256 characters"),
    "repeated id": (
        upsert(item("a"), item("b"), item("a")),
        "items[2].item_id repeats items[0].item_id",
    ),
    "blank title": (upsert(item("a", "  ")), "items[0].title must be non-empty"),
    "long title": (_upsert_with(title="t" * 513), "items[0].title must be at most 512"),
    "long description": (
        _upsert_with(description="d" * 10_001),
        "items[0].description must be at most 10000 characters",
    ),
    "long category": (_upsert_with(category="c" * 513), "items[0].category must be at most 512"),
    "long brand": (_upsert_with(brand="b" * 257), "items[0].brand must be at most 256"),
    "bad price bucket": (
        _upsert_with(price_bucket=7),
        "items[0].price_bucket must be a defined PriceBucket, got 7",
    ),
    "too many attributes": (
        _upsert_with(attributes={str(i): "v" for i in range(33)}),
        "items[0].attributes must have at most 32 entries, got 33",
    ),
    "empty attribute key": (
        _upsert_with(attributes={"": "v"}),
        "items[0].attributes keys must be non-empty",
    ),
    "long attribute value": (
        _upsert_with(attributes={"colour": "v" * 1025}),
        "items[0].attributes['colour'] must be at most 1024 characters",
    ),
    "large image": (
        _upsert_with(image=b"\0" * (1024 * 1024 + 1)),
        "items[0].image must be at most 1048576 bytes, got 1048577",
    ),
    "long image path": (
        _upsert_with(image_path="p" * 1025),
        "items[0].image_path must be at most 1024 characters",
    ),
    "request_id": (
        recommender_pb2.UpsertItemsRequest(items=[item("a")], request_id="a\nb"),
        "request_id must contain printable ASCII characters only",
    ),
}


@pytest.mark.parametrize("case", UPSERT_CASES.values(), ids=UPSERT_CASES.keys())
@run_async
async def test_invalid_upserts_name_the_field_and_bound(
    repository: Path, case: tuple[recommender_pb2.UpsertItemsRequest, str]
) -> None:
    request, expected = case
    fake = FakeTransport()
    async with running_gateway(repository, fake, max_message_bytes=8 * 1024 * 1024) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.UpsertItems(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (caught.value.details() or "")
    assert fake.calls == []
    assert not (repository.parent / "items").exists() or not any(
        (repository.parent / "items").iterdir()
    )


OTHER_CASES: dict[str, tuple[str, Any, str]] = {
    "delete none": ("DeleteItems", recommender_pb2.DeleteItemsRequest(), "item_ids must have"),
    "delete empty id": (
        "DeleteItems",
        recommender_pb2.DeleteItemsRequest(item_ids=["i1", ""]),
        "item_ids[1] must be non-empty",
    ),
    "similar no item": (
        "SimilarItems",
        recommender_pb2.SimilarItemsRequest(k=3),
        "item_id must be non-empty",
    ),
    "similar k": (
        "SimilarItems",
        recommender_pb2.SimilarItemsRequest(item_id="i1", k=0),
        "k must be in [1, 500], got 0",
    ),
    "similar weight": (
        "SimilarItems",
        recommender_pb2.SimilarItemsRequest(item_id="i1", k=1, long_tail_weight=9),
        "long_tail_weight must be in [0, 2], got 9",
    ),
    "similar exclusion": (
        "SimilarItems",
        recommender_pb2.SimilarItemsRequest(item_id="i1", k=1, exclude_item_ids=[""]),
        "exclude_item_ids[0] must be non-empty",
    ),
}


@pytest.mark.parametrize("case", OTHER_CASES.values(), ids=OTHER_CASES.keys())
@run_async
async def test_invalid_deletes_and_similar_requests_name_the_field(
    repository: Path, case: tuple[str, Any, str]
) -> None:
    method, request, expected = case
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(gw.stub, method)(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (caught.value.details() or "")
    assert fake.calls == []


@run_async
async def test_upsert_errors_map_through_the_one_table(tmp_path: Path) -> None:
    # No item text encoder in the repository: UNAVAILABLE, nothing stored.
    bare = write_repository(tmp_path / "bare" / "model_repository", tokenizer=False)
    async with running_gateway(bare, FakeTransport()) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.UpsertItems(upsert(item("a")), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no item encoder" in (caught.value.details() or "")

    repository = write_repository(tmp_path / "model_repository")
    fake = FakeTransport()
    async with running_gateway(repository, fake, items_max_overlay=2) as gw:
        await gw.stub.UpsertItems(upsert(item("a"), item("b")), timeout=5)
        await gw.stub.UpsertItems(upsert(item("b", "B again")), timeout=5)  # a replacement
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.UpsertItems(upsert(item("c")), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "holds 2 of at most 2 added items" in (caught.value.details() or "")
        # An encoder answer of the wrong shape is the backend's fault: INTERNAL, nothing stored.
        await gw.stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=["a"]))
        fake.encoder_result = {contract.ITEM_VECTOR: np.zeros((1, DIM + 1), np.float32)}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.UpsertItems(upsert(item("c")), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == INTERNAL_MESSAGE
        assert "c" not in gw.server.items.catalogue.index_of


@run_async
async def test_item_metrics_count_without_ids(repository: Path) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = sample("ltrec_gateway_item_updates_total", op="upsert")
    async with running_gateway(repository, FakeTransport()) as gw:
        await gw.stub.UpsertItems(upsert(item("secret-item-id"), item("other")))
        await gw.stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=["i1"]))
        await gw.stub.SimilarItems(recommender_pb2.SimilarItemsRequest(item_id="i2", k=1))
        assert sample("ltrec_gateway_overlay_items") == 2
        assert sample("ltrec_gateway_hidden_items") == 1
    assert sample("ltrec_gateway_item_updates_total", op="upsert") == before + 2
    for method in ("UpsertItems", "DeleteItems", "SimilarItems"):
        assert sample("ltrec_gateway_requests_total", method=method, code="OK") >= 1
    for family in REGISTRY.collect():
        for s in family.samples:
            assert not {"secret-item-id", "other", "i1", "i2"} & set(s.labels.values())


# --- The text and its tokens are the training's -------------------------------------------------


def test_item_text_is_the_training_text() -> None:
    from ltrec.data import item_texts

    rows = [
        {"title": "Heat (1995)", "category": "Action|Crime| Thriller ", "brand": None},
        {"title": "Why?", "category": None, "brand": " Acme ", "description": "x " * 400},
        {"title": " Plain ", "category": "|", "brand": "", "description": "  two   words "},
    ]
    frame = pd.DataFrame(rows)
    frame["price"] = [1.0, 5.0, 9.0]  # terciles: budget, mid-range, premium
    want = item_texts(frame)
    buckets = ["budget", "mid-range", "premium"]
    got = [
        item_text(
            ItemFields(
                title=row["title"],
                description=row.get("description") or "",
                category=row["category"] or "",
                brand=row["brand"] or "",
                price_bucket=bucket,
            )
        )
        for row, bucket in zip(rows, buckets, strict=True)
    ]
    assert got == want


def test_the_gateway_tokenizes_like_the_training_tokenizer(tmp_path: Path) -> None:
    from ltrec.text_encoder import load_text_model, tokenize

    tokenizer, _ = load_text_model()
    tokenizer.save_pretrained(str(tmp_path))  # what the export writes
    ours = ItemTokenizer(tmp_path / "tokenizer.json", max_tokens=64)
    texts = [
        "Toy Story (1995). Category: Animation > Children's > Comedy.",
        "Ünïcode, PUNCTUATION!! and a very long text " * 20,
        "x",
    ]
    want = tokenize(tokenizer, texts, 64)
    got = ours(texts)
    for name in (contract.TEXT_INPUT_IDS, contract.TEXT_ATTENTION_MASK):
        np.testing.assert_array_equal(got[name], want[name].numpy())
