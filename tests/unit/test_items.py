"""Items added or hidden after training: UpsertItems, DeleteItems, SimilarItems and the item store.

The gateway runs in-process against the fake Triton of `test_gateway` (whose fake item text
encoder answers a vector derived from the tokens); the real encoder and graphs are exercised by
`tests/integration/test_new_items.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from prometheus_client import REGISTRY

from server import contract
from server.catalogue import load_model_repository
from server.gen.ltrec.v1 import recommender_pb2
from server.interceptors import INTERNAL_MESSAGE
from server.item_text import ItemFields, ItemTokenizer, item_text
from server.items import DELETE, UPSERT, ItemStore, encode_vector
from tests.unit.test_gateway import (
    DIM,
    ITEMS,
    METADATA,
    FakeTransport,
    fake_item_vectors,
    outputs,
    run_async,
    running_gateway,
    write_repository,
)

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
    fake = FakeTransport(outputs([N + 2, 4], [2.0, 1.0], [0, 0]))
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.UpsertItems(
            upsert(
                item("new-1", "Toy Story 5 (2031)", category="Animation|Children's"),
                item("new-2", description="A new space film.", brand="Acme", image=b"\x89PNG"),
            ),
            timeout=5,
        )
        assert (reply.upserted, reply.created, reply.images_not_encoded) == (2, 2, 1)
        assert reply.model_version == METADATA["model_version"] and reply.request_id == "up-1"
        (encode,) = fake.calls
        assert encode.model_name == contract.ITEM_TEXT_ENCODER_MODEL
        ids = encode.inputs[contract.TEXT_INPUT_IDS]
        assert ids.dtype == np.int64 and ids.shape[0] == 2
        assert encode.inputs[contract.TEXT_ATTENTION_MASK].shape == ids.shape
        assert encode.client_timeout == pytest.approx(5, abs=0.5)  # the caller's deadline

        response = await gw.stub.Recommend(recommend("i1", "new-1"), timeout=5)
    tensors = sent(fake)
    # The new items are indices N+1, N+2; their vectors and popularity go with the request.
    np.testing.assert_array_equal(tensors[contract.HISTORY_ITEMS], [[1, N + 1]])
    np.testing.assert_allclose(tensors[contract.EXTRA_ITEM_VECTORS], fake_item_vectors(ids))
    np.testing.assert_array_equal(tensors[contract.EXTRA_POPULARITY], [0.0, 0.0])
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
    np.testing.assert_array_equal(tensors[contract.HISTORY_ITEMS], [[N + 1]])  # the new version
    np.testing.assert_array_equal(tensors[contract.EXCLUDE_ITEMS], [[3]])  # the old one, hidden
    np.testing.assert_array_equal(tensors[contract.EXTRA_POPULARITY], [300.0])
    assert response.items == []  # index 3 hidden, N+1 in the history: both dropped


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
        np.testing.assert_array_equal(tensors[contract.EXCLUDE_ITEMS], [[2]])
        assert tensors[contract.EXTRA_ITEM_VECTORS].shape == (0, DIM)
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
        np.testing.assert_array_equal(sent(fake)[contract.EXCLUDE_ITEMS], [[2]])
        # An upsert brings a deleted item back.
        await gw.stub.UpsertItems(upsert(item("i2", "Heat (1995)")))
        await gw.stub.Recommend(recommend(), timeout=5)
        np.testing.assert_array_equal(sent(fake)[contract.EXCLUDE_ITEMS], [[2]])
        assert sent(fake)[contract.EXTRA_ITEM_VECTORS].shape == (1, DIM)


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
            np.testing.assert_array_equal(sent(fake)[contract.HISTORY_ITEMS], [[N + 1]])
            np.testing.assert_array_equal(sent(fake)[contract.EXCLUDE_ITEMS], [[6]])
        np.testing.assert_array_equal(
            sent(fake_a)[contract.EXTRA_ITEM_VECTORS], sent(fake_b)[contract.EXTRA_ITEM_VECTORS]
        )
    names = sorted(p.name for p in (repository.parent / "items").iterdir())
    assert names == ["items-a-000001.jsonl", "items-b-000001.jsonl"]
    restarted = FakeTransport()
    async with running_gateway(repository, restarted, feedback_replica="a") as gw:
        await gw.stub.Recommend(recommend("new-1"), timeout=5)
        await gw.stub.UpsertItems(upsert(item("new-2")))
    np.testing.assert_array_equal(sent(restarted)[contract.HISTORY_ITEMS], [[N + 1]])
    np.testing.assert_array_equal(sent(restarted)[contract.EXCLUDE_ITEMS], [[6]])
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
    assert encode.model_name == contract.ITEM_TEXT_ENCODER_MODEL
    np.testing.assert_allclose(
        gw.server.items.catalogue.extra_vectors,
        fake_item_vectors(encode.inputs[contract.TEXT_INPUT_IDS]),
    )


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
        }
        np.testing.assert_array_equal(tensors[contract.QUERY_ITEMS], [[1]])
        np.testing.assert_array_equal(tensors[contract.EXCLUDE_ITEMS], [[2, 6]])
        np.testing.assert_array_equal(tensors[contract.LONG_TAIL_WEIGHT], [[0.5]])
        np.testing.assert_array_equal(tensors[contract.TOP_K], [4])
        assert tensors[contract.EXTRA_ITEM_VECTORS].shape == (1, DIM)
        assert [(i.item_id, i.reason) for i in reply.items] == [
            ("i4", 'Similar to "Toy Story (1995)"'),
            ("new-1", 'Similar to "Toy Story (1995)"'),
        ]
        assert reply.request_id == "s1" and reply.model_version == METADATA["model_version"]

        # A new item has neighbours too; an unknown or hidden one is NOT_FOUND.
        await gw.stub.SimilarItems(recommender_pb2.SimilarItemsRequest(item_id="new-1", k=4))
        np.testing.assert_array_equal(
            sent(fake, contract.SIMILAR_ITEMS_MODEL)[contract.QUERY_ITEMS], [[N + 1]]
        )
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
        assert "no item text encoder" in (caught.value.details() or "")

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
