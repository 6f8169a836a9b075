"""Batching in Triton: padded request shapes, per-row k and overlay, and the stand-in's batch
split. Every batched answer is compared with the same request run alone."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from export_scripts import onnx_graphs
from ltrec_core import contract
from server.catalogue import Catalogue
from server.features import exclusions, overlay_subset, padded_row

DIM = 8
N_ITEMS = 40


@pytest.mark.parametrize(
    ("length", "limit", "want"),
    [(0, 200, 16), (1, 200, 16), (16, 200, 16), (17, 200, 32), (129, 200, 200), (200, 200, 200)],
)
def test_history_lengths_pad_to_a_few_buckets(length: int, limit: int, want: int) -> None:
    assert contract.padded_length(length, contract.HISTORY_BUCKETS, limit) == want


def test_a_small_max_history_is_its_own_bucket() -> None:
    assert contract.padded_length(3, contract.HISTORY_BUCKETS, 10) == 10
    assert contract.padded_length(12, contract.HISTORY_BUCKETS, 10) == 12  # never cut


@pytest.mark.parametrize(("length", "want"), [(0, 16), (16, 16), (17, 32), (100, 128)])
def test_exclusions_pad_to_powers_of_two(length: int, want: int) -> None:
    assert contract.exclude_length(length) == want


def test_padded_rows_keep_the_values_at_their_end() -> None:
    assert padded_row([4, 5], 4, left=True).tolist() == [[0, 0, 4, 5]]
    assert padded_row([4, 5], 4, left=False).tolist() == [[4, 5, 0, 0]]
    assert padded_row([], 3, left=True).tolist() == [[0, 0, 0]]


def _catalogue(n_extra: int, hidden: list[int] = ()) -> Catalogue:  # type: ignore[assignment]
    rng = np.random.default_rng(3)
    n = N_ITEMS + n_extra
    ids = ["", *[f"i{i}" for i in range(1, n + 1)]]
    return Catalogue(
        item_ids=ids,
        titles=ids,
        popularity=np.zeros(n + 1, dtype=np.int64),
        long_tail=np.zeros(n + 1, dtype=np.bool_),
        index_of={item: i for i, item in enumerate(ids) if i},
        trained_size=N_ITEMS,
        extra_vectors=rng.standard_normal((n_extra, DIM)).astype(np.float32),
        extra_popularity=np.zeros(n_extra, dtype=np.float32),
        hidden=np.asarray(hidden, dtype=np.int64),
    )


def test_exclusions_then_hidden_items_padded() -> None:
    got = exclusions(["i3", "unknown", "i3", "i7"], _catalogue(2, hidden=[41]))
    assert got.shape == (1, contract.EXCLUDE_BUCKET_MIN)
    assert got[0, :3].tolist() == [3, 7, 41] and not got[0, 3:].any()


def test_overlay_subset_sends_only_the_rows_read_and_gathers_the_same_vectors() -> None:
    catalogue = _catalogue(5)
    table = np.random.default_rng(0).standard_normal((N_ITEMS + 1, DIM)).astype(np.float32)
    indices = np.array([[0, 3, N_ITEMS + 4], [N_ITEMS + 2, N_ITEMS + 4, 9]], dtype=np.int64)
    remapped, extra = overlay_subset(indices, catalogue)
    assert extra.shape == (2, 2, DIM)  # two of the five added items, once per row
    whole = np.concatenate([table, catalogue.extra_vectors])
    for row in range(2):
        subset = np.concatenate([table, extra[row]])
        np.testing.assert_array_equal(subset[remapped[row]], whole[indices[row]])


# --- the scorer graph: a batch equals its rows run alone ------------------------------------


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    table = rng.standard_normal((N_ITEMS + 1, DIM)).astype(np.float32)
    table[0] = 0
    popularity = rng.integers(0, 50, N_ITEMS + 1).astype(np.float32)
    path = tmp_path_factory.mktemp("scorer") / "model.onnx"
    graph = onnx_graphs.scorer_graph(table, popularity, overlay=True, item_filter=True)
    onnx_graphs.save(graph, path, external=False)
    return path


def _rows(n_rows: int, seed: int, n_extra: int = 3) -> list[dict[str, np.ndarray]]:
    """Requests of one shape (as the gateway pads them), each with its own k and overlay."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_rows):
        history = padded_row(
            rng.integers(1, N_ITEMS + n_extra + 1, size=2 + r).tolist(), 16, left=True
        )
        rows.append(
            {
                contract.WEIGHTED_USER_EMBEDDING: rng.standard_normal((1, DIM)).astype(np.float32),
                contract.HISTORY_ITEMS: history,
                contract.EXCLUDE_ITEMS: padded_row([int(rng.integers(1, N_ITEMS))], 16, left=False),
                contract.LONG_TAIL_WEIGHT: np.array([[0.3 * r]], dtype=np.float32),
                contract.TOP_K: np.array([[3 + 2 * r]], dtype=np.int64),
                contract.EXTRA_ITEM_VECTORS: rng.standard_normal((1, n_extra, DIM)).astype(
                    np.float32
                ),
                contract.EXTRA_POPULARITY: rng.integers(0, 9, (1, n_extra)).astype(np.float32),
                contract.ITEM_ELIGIBLE: np.ones((1, 1), dtype=np.bool_),
            }
        )
    return rows


OUTPUTS = [contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS]


def test_a_batch_of_the_scorer_answers_each_row_as_alone(scorer: Path) -> None:
    session = ort.InferenceSession(str(scorer), providers=["CPUExecutionProvider"])
    rows = _rows(4, seed=1)
    batch = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
    items, scores, reasons = session.run(OUTPUTS, batch)
    k_max = max(int(row[contract.TOP_K][0, 0]) for row in rows)
    assert items.shape == (4, k_max)  # the batch's largest k for every row
    for r, row in enumerate(rows):
        k = int(row[contract.TOP_K][0, 0])
        alone_items, alone_scores, alone_reasons = session.run(OUTPUTS, row)
        assert alone_items.shape == (1, k)
        assert items[r, :k].tolist() == alone_items[0].tolist()
        assert reasons[r, :k].tolist() == alone_reasons[0].tolist()
        np.testing.assert_allclose(scores[r, :k], alone_scores[0], rtol=0, atol=1e-5)


# --- the onnxruntime stand-in: one session run per batch, split back per request -------------


class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self.array.__dlpack_device__()

    @classmethod
    def from_dlpack(cls, name: str, array: np.ndarray) -> _FakeTensor:
        return cls(name, np.array(array))


class _FakeResponse:
    def __init__(self, output_tensors: list[_FakeTensor], error: Any = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


class _FakeRequest:
    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        self.inputs = inputs

    def requested_output_names(self) -> list[str]:
        return OUTPUTS


def _fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    dtypes = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_}
    module.Tensor = _FakeTensor  # type: ignore[attr-defined]
    module.InferenceResponse = _FakeResponse  # type: ignore[attr-defined]
    module.TritonError = str  # type: ignore[attr-defined]
    module.TritonModelException = RuntimeError  # type: ignore[attr-defined]
    module.triton_string_to_numpy = dtypes.__getitem__  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = (  # type: ignore[attr-defined]
        lambda request, name: (
            _FakeTensor(name, request.inputs[name]) if name in request.inputs else None
        )
    )
    return module


@pytest.fixture
def stand_in(scorer: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    source = Path(__file__).parents[2] / "triton_local" / "onnxruntime_backend" / "model.py"
    spec = importlib.util.spec_from_file_location("stand_in_model", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # initialize replaces it
    types_ = {np.float32: "TYPE_FP32", np.int64: "TYPE_INT64", np.bool_: "TYPE_BOOL"}
    row = _rows(1, seed=0)[0]
    config = {
        "name": contract.SCORER_MODEL,
        "max_batch_size": contract.MAX_BATCH_SIZE,
        "input": [{"name": n, "data_type": types_[a.dtype.type]} for n, a in row.items()],
        "output": [
            {"name": contract.TOP_ITEMS, "data_type": "TYPE_INT64"},
            {"name": contract.TOP_SCORES, "data_type": "TYPE_FP32"},
            {"name": contract.REASON_POSITIONS, "data_type": "TYPE_INT64"},
        ],
    }
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(scorer.parent.parent),
            "model_version": scorer.parent.name,
        }
    )
    runs: list[int] = []
    real_run = model.session.run

    class _Counting:
        def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            runs.append(len(next(iter(feed.values()))))
            return real_run(names, feed)

    model.session = _Counting()
    model.runs = runs
    return model


def test_the_stand_in_runs_a_batch_once_and_splits_it_as_alone(stand_in: Any) -> None:
    rows = _rows(5, seed=2)
    batched = stand_in.execute([_FakeRequest(row) for row in rows])
    assert stand_in.runs == [5]  # one onnxruntime call for the five requests
    for row, response in zip(rows, batched, strict=True):
        (alone,) = stand_in.execute([_FakeRequest(row)])
        k = int(row[contract.TOP_K][0, 0])
        assert response.error is None
        for name in OUTPUTS:
            assert response.outputs[name].shape[0] == 1  # this request's row only
            np.testing.assert_allclose(response.outputs[name][:, :k], alone.outputs[name])


def test_a_request_of_another_shape_runs_apart(stand_in: Any) -> None:
    rows = _rows(2, seed=4)
    other = _rows(1, seed=5, n_extra=1)[0]  # another overlay size: another shape
    responses = stand_in.execute(
        [_FakeRequest(rows[0]), _FakeRequest(other), _FakeRequest(rows[1])]
    )
    assert sorted(stand_in.runs) == [1, 2]
    assert all(response.error is None for response in responses)
