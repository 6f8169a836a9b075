"""SimilarItems' basket mode ("complete the basket"): the pooled item lookup graph, the gateway's
validation of `basket_item_ids`, and baskets served through the export's own graphs.

The gateway runs in-process against `ScorerGraphs` (the exported item lookup and scorer graphs
under onnxruntime, chained as the `similar_items` ensemble config chains them), so rankings and
reasons are checked against numpy on the real graphs; `tests/integration/test_basket_serving.py`
does it through tritonserver.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from prometheus_client import REGISTRY

from export_scripts import onnx_graphs
from ltrec.models import ItemLookup
from ltrec_core import contract
from server.config import ConfigError, GatewayConfig
from server.gen.ltrec.v1 import recommender_pb2
from tests.support.gateway import (
    ITEMS,
    METADATA,
    FakeTransport,
    fake_item_vectors,
    run_async,
    running_gateway,
    write_repository,
)
from tests.support.scorer import ITEM_TABLE, POPULARITY, ScorerGraphs

PB = recommender_pb2
N = len(ITEMS)
TITLES = ["", *(title for _, title, _, _ in ITEMS)]


# --- the item lookup graph ----------------------------------------------------------------------


def lookup(table: np.ndarray, query: np.ndarray, extra: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(onnx_graphs.item_lookup_graph(table).SerializeToString())
    (embedding,) = session.run(
        None,
        {
            contract.QUERY_ITEMS: query,
            contract.EXTRA_ITEM_VECTORS: onnx_graphs.per_row(extra, len(query)),
        },
    )
    return np.asarray(embedding)


def test_the_lookup_pools_a_basket_as_the_mean_of_its_vectors_padding_left_out() -> None:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((9, 5)).astype(np.float32)  # row 0: padding, not zero on purpose
    extra = rng.standard_normal((2, 5)).astype(np.float32)
    rows = np.concatenate([table, extra])  # catalogue index -> vector, overlay after the N+1 rows
    query = np.array(
        [
            [3, 7, 1],  # trained items only
            [4, 0, 0],  # a basket of one, padded
            [9, 2, 0],  # an added item (index N+1 = 9) beside a trained one
            [10, 9, 0],  # added items only
            [0, 0, 0],  # nothing: zeros, not NaN
        ],
        dtype=np.int64,
    )
    want = np.stack(
        [rows[[i for i in row if i != contract.PADDING_INDEX]].mean(axis=0) for row in query[:4]]
        + [np.zeros(5, dtype=np.float32)]
    )
    np.testing.assert_allclose(lookup(table, query, extra), want, rtol=0, atol=1e-6)
    # Without an overlay (M = 0) too.
    got = lookup(table, query[:2], np.zeros((0, 5), dtype=np.float32))
    np.testing.assert_allclose(got, want[:2], rtol=0, atol=1e-6)


def test_a_single_item_query_is_exactly_the_items_vector() -> None:
    """The single-item path (`item_id`, [B, 1]) gives the vector itself, bit for bit: the pooling
    changes nothing SimilarItems answered before."""
    rng = np.random.default_rng(4)
    table = rng.standard_normal((40, 8)).astype(np.float32)
    extra = rng.standard_normal((3, 8)).astype(np.float32)
    query = np.arange(1, 43, dtype=np.int64).reshape(-1, 1)
    got = lookup(table, query, extra)
    assert np.array_equal(got, np.concatenate([table, extra])[1:43])


class FirstItemLookup(torch.nn.Module):
    """The lookup before baskets: the first query item's vector, whatever follows it."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, query: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.table, extra])[query[:, 0]]


def test_the_exports_parity_check_covers_baskets(tmp_path: Path) -> None:
    """`item_lookup_parity` (run by every export) passes the pooled graph against torch's
    `ItemLookup`, and fails a reference that ignores all but the first item of a basket."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((30, 6)).astype(np.float32)
    path = tmp_path / "model.onnx"
    onnx.save(onnx_graphs.item_lookup_graph(table), path)
    pooled = ItemLookup(torch.from_numpy(table))
    assert onnx_graphs.item_lookup_parity(path, pooled, 6, 29, rng) < 1e-5
    first = FirstItemLookup(torch.from_numpy(table))
    assert onnx_graphs.item_lookup_parity(path, first, 6, 29, rng) > 1e-2


def test_an_added_item_is_looked_up_and_encoded_without_the_new_item_shift(tmp_path: Path) -> None:
    """The item encoder adds the new-item boost's shift to every added item (a lift as a
    candidate); read as a query (the item lookup of SimilarItems and Audience) or as a history
    event (the user encoder), an added item's vector is the overlay row less that shift, in torch
    and in the exported graph; trained rows are untouched."""
    from ltrec.models import ModelConfig, Recommender, UserEncoder

    rng = np.random.default_rng(7)
    table = rng.standard_normal((30, 6)).astype(np.float32)
    offset = rng.standard_normal(6).astype(np.float32)
    extra = rng.standard_normal((2, 3, 6)).astype(np.float32)
    query = np.array([[30, 5, 0], [32, 31, 2]], dtype=np.int64)  # added items beside trained
    path = tmp_path / "model.onnx"
    onnx.save(onnx_graphs.item_lookup_graph(table, added_item_offset=offset), path)
    shifted = ItemLookup(torch.from_numpy(table), torch.from_numpy(offset))
    plain = ItemLookup(torch.from_numpy(table))
    want = plain(torch.from_numpy(query), torch.from_numpy(extra - offset)).numpy()
    got = shifted(torch.from_numpy(query), torch.from_numpy(extra)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, plain(torch.from_numpy(query), torch.from_numpy(extra)).numpy())
    (graph,) = ort.InferenceSession(str(path)).run(
        None, {contract.QUERY_ITEMS: query, contract.EXTRA_ITEM_VECTORS: extra}
    )
    np.testing.assert_allclose(graph, want, atol=1e-5)
    assert onnx_graphs.item_lookup_parity(path, shifted, 6, 29, rng) < 1e-5
    assert onnx_graphs.item_lookup_parity(path, plain, 6, 29, rng) > 1e-2  # the check would see
    trained_only = np.array([[3, 4, 0]], dtype=np.int64)
    np.testing.assert_allclose(
        shifted(torch.from_numpy(trained_only), torch.from_numpy(extra[:1])).numpy(),
        table[[3, 4]].mean(axis=0, keepdims=True),
        atol=1e-6,
    )
    # The user encoder reads a history's added items the same way.
    cfg = ModelConfig(
        n_items=29, n_devices=2, n_regions=2, embedding_dim=6, n_layers=1, n_heads=2, max_history=4
    )
    model = Recommender(cfg, torch.zeros(30, 384)).eval()
    history = torch.tensor([[0, 7, 30, 31]])
    types = torch.ones_like(history)
    with torch.no_grad():
        encoded = UserEncoder(torch.from_numpy(table), model.user_tower, torch.from_numpy(offset))(
            history, types, torch.from_numpy(extra[0])
        )
        reference = UserEncoder(torch.from_numpy(table), model.user_tower)(
            history, types, torch.from_numpy(extra[0] - offset)
        )
    torch.testing.assert_close(encoded, reference)


# --- the gateway --------------------------------------------------------------------------------


def similar(**fields: Any) -> PB.SimilarItemsRequest:
    return PB.SimilarItemsRequest(**{"k": 3, **fields})


def served(reply: PB.SimilarItemsResponse) -> list[tuple[str, float, str]]:
    return [(item.item_id, item.score, item.reason) for item in reply.items]


def expected(
    basket: list[int], k: int, weight: float, table: np.ndarray = ITEM_TABLE
) -> list[tuple[str, str]]:
    """Numpy's answer: the mean vector's dot products minus the long-tail term, the basket and
    padding masked, best first; each item's reason the basket item of highest cosine."""
    query = table[basket].mean(axis=0)
    scores = table @ query - weight * np.log1p(POPULARITY.astype(np.float64))
    scores[[contract.PADDING_INDEX, *basket]] = -np.inf
    top = np.argsort(-scores, kind="stable")[:k]
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    closest = [basket[int(np.argmax(unit[basket] @ unit[i]))] for i in top]
    return [
        (ITEMS[i - 1][0], f'Similar to "{TITLES[c]}"') for i, c in zip(top, closest, strict=True)
    ]


@run_async
async def test_a_basket_returns_k_items_beside_it_each_naming_its_closest_basket_item(
    repository: Path,
) -> None:
    async with running_gateway(repository, ScorerGraphs()) as gw:
        for basket, weight in ((["i1", "i3"], 0.0), (["i2", "i5", "i6"], 0.0), (["i1", "i4"], 0.3)):
            reply = await gw.stub.SimilarItems(
                similar(basket_item_ids=basket, k=3, long_tail_weight=weight), timeout=5
            )
            indices = [int(i[1:]) for i in basket]
            assert [(i.item_id, i.reason) for i in reply.items] == expected(indices, 3, weight)
            assert not {i.item_id for i in reply.items} & set(basket)
        # The whole catalogue but the basket, when k asks for more.
        reply = await gw.stub.SimilarItems(similar(basket_item_ids=["i6", "i2"], k=50), timeout=5)
        assert sorted(i.item_id for i in reply.items) == ["i1", "i3", "i4", "i5"]
        sent = gw.fake.ranking_calls(contract.SIMILAR_ITEMS_MODEL)[-1].inputs
        # right-padded to the smallest length (max_history=3 here)
        np.testing.assert_array_equal(sent[contract.QUERY_ITEMS], [[6, 2, 0]])
        np.testing.assert_array_equal(sent[contract.TOP_K], [[N]])


@run_async
async def test_a_basket_of_one_answers_exactly_as_its_item_id(repository: Path) -> None:
    async with running_gateway(repository, ScorerGraphs()) as gw:
        await gw.stub.UpsertItems(
            PB.UpsertItemsRequest(items=[PB.Item(item_id="new-1", title="Toy Space (2031)")])
        )
        for query in ("i2", "i5", "new-1"):
            for fields in ({}, {"long_tail_weight": 0.2}, {"exclude_item_ids": ["i3"]}):
                one = await gw.stub.SimilarItems(similar(item_id=query, k=5, **fields))
                basket = await gw.stub.SimilarItems(similar(basket_item_ids=[query], k=5, **fields))
                assert served(basket) == served(one) and len(one.items) == 5
        single, pooled = gw.fake.ranking_calls(contract.SIMILAR_ITEMS_MODEL)[-2:]
        assert single.inputs.keys() == pooled.inputs.keys()
        for name, value in single.inputs.items():
            np.testing.assert_array_equal(pooled.inputs[name], value)


@run_async
async def test_a_basket_with_an_added_item_pools_its_overlay_vector(repository: Path) -> None:
    fake = ScorerGraphs()
    async with running_gateway(repository, fake) as gw:
        await gw.stub.UpsertItems(
            PB.UpsertItemsRequest(items=[PB.Item(item_id="new-1", title="Toy Space (2031)")])
        )
        reply = await gw.stub.SimilarItems(
            similar(basket_item_ids=["new-1", "i3"], k=N, long_tail_weight=0.0), timeout=5
        )
        (encoded,) = [c for c in fake.calls if c.model_name == contract.ITEM_ENCODER_MODEL]
        added = fake_item_vectors(encoded.inputs[contract.TEXT_INPUT_IDS])
        table = np.concatenate([ITEM_TABLE, added])
        query = table[[N + 1, 3]].mean(axis=0)
        scores = {ITEMS[i - 1][0]: float(table[i] @ query) for i in range(1, N + 1) if i != 3}
        assert [i.item_id for i in reply.items] == sorted(scores, key=lambda i: -scores[i])
        np.testing.assert_allclose(
            [i.score for i in reply.items], sorted(scores.values(), reverse=True), atol=1e-5
        )


def query_items_observed() -> float:
    value = REGISTRY.get_sample_value("ltrec_gateway_similar_items_query_items_sum")
    return value or 0.0


@run_async
async def test_the_query_size_is_measured(repository: Path) -> None:
    async with running_gateway(repository, ScorerGraphs()) as gw:
        before = query_items_observed()
        await gw.stub.SimilarItems(similar(basket_item_ids=["i1", "i2", "i3"]))
        await gw.stub.SimilarItems(similar(item_id="i1"))
        assert query_items_observed() - before == 4


@run_async
async def test_the_example_client_completes_a_basket(repository: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    async with running_gateway(repository, ScorerGraphs()) as gw:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "examples/items_client.py", "--address", gw.address,
            "basket", "i2", "i5", "i6", "-k", "3", "--long-tail-weight", "0",
            cwd=root, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0, err.decode()
    heading, *lines = out.decode().splitlines()
    assert heading.startswith("to complete a basket of 3 (model ")
    want = expected([2, 5, 6], 3, 0.0)
    assert len(lines) == 3
    for rank, (line, (item_id, reason)) in enumerate(zip(lines, want, strict=True), 1):
        title = TITLES[int(item_id[1:])]
        assert line.startswith(f"{rank:>3}. {title}  (score ") and line.endswith(reason)


# --- validation and errors ----------------------------------------------------------------------

INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "basket too large": (
        {"basket_item_ids": ["i1", "i2", "i3", "i4"]},
        "basket_item_ids must have at most 3 ids, got 4",
    ),
    "neither item nor basket (an empty basket)": (
        {"basket_item_ids": []},
        "item_id must be non-empty, or basket_item_ids set",
    ),
    "an empty id": ({"basket_item_ids": ["i1", ""]}, "basket_item_ids[1] must be non-empty"),
    "an id too long": (
        {"basket_item_ids": ["x" * 257]},
        "basket_item_ids[0] must be at most 256 characters, got 257",
    ),
    "a duplicate": (
        {"basket_item_ids": ["i1", "i2", "i1"]},
        "basket_item_ids[2] repeats basket_item_ids[0] (ids must be distinct)",
    ),
    "both item and basket": (
        {"item_id": "i1", "basket_item_ids": ["i2"]},
        "item_id and basket_item_ids are mutually exclusive",
    ),
    "a basket with k out of bounds": ({"basket_item_ids": ["i1"], "k": 0}, "k must be in [1, "),
}


@pytest.mark.parametrize("case", sorted(INVALID))
@run_async
async def test_invalid_baskets_name_the_field_and_bound(repository: Path, case: str) -> None:
    fields, message = INVALID[case]
    fake = FakeTransport()
    async with running_gateway(repository, fake, max_basket_items=3) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.SimilarItems(similar(**fields), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (caught.value.details() or ""), caught.value.details()
        assert not fake.calls


@run_async
async def test_unknown_or_hidden_basket_items_are_not_found_naming_them(repository: Path) -> None:
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        await gw.stub.DeleteItems(PB.DeleteItemsRequest(item_ids=["i4"]))
        for basket, message in (
            (["i1", "nope"], "basket_item_ids[1] 'nope' is not in the catalogue"),
            (["i4", "i1"], "basket_item_ids[0] 'i4' is not in the catalogue"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.SimilarItems(similar(basket_item_ids=basket), timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert message in (caught.value.details() or "")
        assert not fake.ranking_calls(contract.SIMILAR_ITEMS_MODEL)


@run_async
async def test_a_repository_exported_before_baskets_refuses_them_and_serves_single_items(
    tmp_path: Path,
) -> None:
    repository = write_repository(tmp_path / "model_repository")
    metadata = {k: v for k, v in METADATA.items() if k != "basket_lookup"}
    (repository / contract.METADATA_FILE).write_text(json.dumps(metadata), encoding="utf-8")
    async with running_gateway(repository, FakeTransport()) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.SimilarItems(similar(basket_item_ids=["i1"]), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "basket_item_ids cannot be set" in (caught.value.details() or "")
        assert "re-run the export" in (caught.value.details() or "")
        await gw.stub.SimilarItems(similar(item_id="i1"), timeout=5)


def test_the_basket_bound_is_configured_and_checked() -> None:
    plain = {"LTREC_ALLOW_PLAINTEXT": "true"}
    assert GatewayConfig.from_env(plain).max_basket_items == 50
    assert GatewayConfig.from_env({**plain, "LTREC_MAX_BASKET_ITEMS": "8"}).max_basket_items == 8
    with pytest.raises(ConfigError, match="LTREC_MAX_BASKET_ITEMS must be >= 1, got 0"):
        GatewayConfig.from_env({**plain, "LTREC_MAX_BASKET_ITEMS": "0"})
