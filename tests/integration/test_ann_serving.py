"""The ANN scorer through the real stack: the export forced to `retrieval="ann"` on the small
catalogue of `test_serving`, tritonserver running the Python-backend scorer (Faiss) in both
ensembles, the gateway in front, unchanged.

The served scorer is asked directly (tritonclient) for the same requests as the exact ONNX scorer
built from the same vectors (in-process): the same items at weight 0 and at the default weight.
Through the gateway, a filter is honoured and an item added by UpsertItems (no index rebuild)
is returned.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc

from export_scripts import ann_scorer, onnx_graphs
from ltrec_core import contract
from server.gen.ltrec.v1 import recommender_pb2
from tests.support.stack import Stack, _request, started_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PB = recommender_pb2
K = 10
OUTPUTS = [contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("ann")
    with started_stack(root, triton_build_dir, export_options={"retrieval": "ann"}) as stack:
        yield stack


def scorer_feeds(stack: Stack, weight: float, seed: int) -> dict[str, np.ndarray]:
    """A user like the model's (the scaled mean of a few items: HNSW over inner products is
    built for queries from the items' own distribution, not random directions)."""
    n_rows = stack.metadata["n_items"] + 1
    rng = np.random.default_rng(seed)
    dim = stack.metadata["embedding_dim"]
    vectors = np.load(stack.repo / contract.SCORER_MODEL / "1" / ann_scorer.VECTORS_FILE)
    users = (vectors[rng.integers(1, n_rows, size=8)].mean(axis=0, keepdims=True) * 8**0.5).astype(
        np.float32
    )
    return {
        contract.WEIGHTED_USER_EMBEDDING: users,
        contract.HISTORY_ITEMS: rng.integers(1, n_rows, size=(1, 6)).astype(np.int64),
        contract.EXCLUDE_ITEMS: np.zeros((1, 1), dtype=np.int64),
        contract.LONG_TAIL_WEIGHT: np.full((1, 1), weight, dtype=np.float32),
        contract.TOP_K: np.array([[K]], dtype=np.int64),  # per row, as the scorer batches
        contract.EXTRA_ITEM_VECTORS: rng.standard_normal((1, 2, dim)).astype(np.float32),
        contract.EXTRA_POPULARITY: np.zeros((1, 2), dtype=np.float32),
        contract.ITEM_ELIGIBLE: np.ones((1, 1), dtype=bool),
    }


def test_the_repository_serves_the_python_ann_scorer(stack: Stack) -> None:
    assert stack.metadata["retrieval"] == "ann"
    assert 'backend: "python"' in (stack.repo / contract.SCORER_MODEL / "config.pbtxt").read_text()
    assert not (stack.repo / contract.SCORER_MODEL / "1" / "model.onnx").exists()


@pytest.mark.parametrize("weight_key", ["zero", "default"])
def test_served_ann_scorer_returns_the_exact_top_k(
    stack: Stack, tmp_path: Path, weight_key: str
) -> None:
    weight = 0.0 if weight_key == "zero" else stack.metadata["default_long_tail_weight"]
    folder = stack.repo / contract.SCORER_MODEL / "1"
    exact_path = tmp_path / "exact.onnx"
    popularity = np.expm1(np.load(folder / ann_scorer.LOG_POPULARITY_FILE))
    onnx.save(
        onnx_graphs.scorer_graph(
            np.load(folder / ann_scorer.VECTORS_FILE), popularity, overlay=True, item_filter=True
        ),
        exact_path,
    )
    client = triton_grpc.InferenceServerClient(stack.triton.grpc_url)
    kinds = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(bool): "BOOL"}
    for seed in range(5):
        feeds = scorer_feeds(stack, weight, seed)
        inputs = []
        for name, array in feeds.items():
            tensor = triton_grpc.InferInput(name, list(array.shape), kinds[array.dtype])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        served = client.infer(contract.SCORER_MODEL, inputs)
        want = onnx_graphs.session(exact_path).run(OUTPUTS, feeds)
        np.testing.assert_array_equal(served.as_numpy(contract.TOP_ITEMS), want[0])
        np.testing.assert_allclose(served.as_numpy(contract.TOP_SCORES), want[1], atol=1e-4)
        np.testing.assert_array_equal(served.as_numpy(contract.REASON_POSITIONS), want[2])
    client.close()


def test_recommend_honours_a_filter_and_returns_an_upserted_item(stack: Stack) -> None:
    reply = stack.stub.Recommend(_request(stack.history, k=K), timeout=10)
    scores = [item.score for item in reply.items]
    assert len(scores) == K and scores == sorted(scores, reverse=True)
    assert not {item.item_id for item in reply.items} & set(stack.history)

    comedies = {
        i
        for i, c in zip(stack.catalogue["item_id"], stack.catalogue["category"], strict=True)
        if c.split("|")[0] == "Comedy"
    }
    item_filter = PB.ItemFilter(categories=["comedy"])
    filtered = stack.stub.Recommend(_request(stack.history, k=K, filter=item_filter), timeout=10)
    assert len(filtered.items) == K
    assert {item.item_id for item in filtered.items} <= comedies

    new = PB.Item(item_id="ann-space-1", title="Space Station (2031)", category="Sci-Fi|Space")
    assert stack.stub.UpsertItems(PB.UpsertItemsRequest(items=[new]), timeout=120).upserted == 1
    space = PB.ItemFilter(categories=["sci-fi|space"])
    got = stack.stub.Recommend(_request(stack.history, k=K, filter=space), timeout=10)
    assert [item.item_id for item in got.items] == ["ann-space-1"]
