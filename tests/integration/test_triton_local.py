"""The real tritonserver serves ``backend: "onnxruntime"`` models through our Python stand-in."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from triton_local import TritonServer, TritonServerError

pytestmark = pytest.mark.integration

ADD_ONE = "add_one"
DOUBLE = "double"
ENSEMBLE = "add_one_then_double"
LOOKUP = "lookup"
ROOT_FILES = ("ltrec_metadata.json", "ltrec_catalogue.csv")
LOOKUP_TABLE = [10, 20, 30, 40, 50]
LOOKUP_QUEUE_DELAY_US = 100_000


def _save_onnx(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # onnxruntime 1.31 reads up to 11; onnx 1.23 would write 12
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def _write_config(repository: Path, config: mc.ModelConfig) -> None:
    folder = repository / config.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def _scale_model(
    repository: Path, name: str, input_name: str, output_name: str, op: str, value: float
) -> None:
    """An unbatched FP32 model ``output = input <op> value`` with a dynamic length."""
    graph = helper.make_graph(
        [helper.make_node(op, [input_name, "constant"], [output_name])],
        name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["n"])],
        initializer=[helper.make_tensor("constant", TensorProto.FLOAT, [], [value])],
    )
    _save_onnx(graph, repository / name / "1" / "model.onnx")
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=0)
    config.input.add(name=input_name, data_type=mc.TYPE_FP32, dims=[-1])
    config.output.add(name=output_name, data_type=mc.TYPE_FP32, dims=[-1])
    _write_config(repository, config)


def _lookup_model(repository: Path) -> None:
    """A batched INT64 model: ``item_values = table[item_ids]`` (and as FP32). An id out of the
    table's range makes onnxruntime fail, which is how a bad request inside a batch is made."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "item_ids"], ["item_values"], axis=0),
            helper.make_node("Cast", ["item_values"], ["item_values_fp32"], to=TensorProto.FLOAT),
        ],
        LOOKUP,
        [helper.make_tensor_value_info("item_ids", TensorProto.INT64, ["batch", "k"])],
        [
            helper.make_tensor_value_info("item_values", TensorProto.INT64, ["batch", "k"]),
            helper.make_tensor_value_info("item_values_fp32", TensorProto.FLOAT, ["batch", "k"]),
        ],
        initializer=[
            helper.make_tensor("table", TensorProto.INT64, [len(LOOKUP_TABLE)], LOOKUP_TABLE)
        ],
    )
    _save_onnx(graph, repository / LOOKUP / "1" / "model.onnx")
    config = mc.ModelConfig(name=LOOKUP, backend="onnxruntime", max_batch_size=8)
    config.input.add(name="item_ids", data_type=mc.TYPE_INT64, dims=[-1])
    config.output.add(name="item_values", data_type=mc.TYPE_INT64, dims=[-1])
    config.output.add(name="item_values_fp32", data_type=mc.TYPE_FP32, dims=[-1])
    config.dynamic_batching.max_queue_delay_microseconds = LOOKUP_QUEUE_DELAY_US
    config.parameters["intra_op_thread_count"].string_value = "1"
    _write_config(repository, config)


def _ensemble(repository: Path) -> None:
    config = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=0)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[-1])
    config.output.add(name="z", data_type=mc.TYPE_FP32, dims=[-1])
    first = config.ensemble_scheduling.step.add(model_name=ADD_ONE, model_version=-1)
    first.input_map["x"] = "x"
    first.output_map["y"] = "x_plus_one"
    second = config.ensemble_scheduling.step.add(model_name=DOUBLE, model_version=-1)
    second.input_map["y"] = "x_plus_one"
    second.output_map["z"] = "z"
    _write_config(repository, config)


def build_repository(repository: Path) -> Path:
    _scale_model(repository, ADD_ONE, "x", "y", "Add", 1.0)
    _scale_model(repository, DOUBLE, "y", "z", "Mul", 2.0)
    _ensemble(repository)
    _lookup_model(repository)
    (repository / ROOT_FILES[0]).write_text('{"model_version": "test"}\n')
    (repository / ROOT_FILES[1]).write_text("item_id,title\n1,Toy Story (1995)\n")
    return repository


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path
) -> Iterator[TritonServer]:
    repository = build_repository(tmp_path_factory.mktemp("model_repository"))
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(repository, build_dir=triton_build_dir, log_path=log) as started:
        yield started


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.grpc_url) as started:
        yield started


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _infer_fp32(
    client: grpcclient.InferenceServerClient, model: str, name: str, values: list[float]
) -> grpcclient.InferResult:
    return client.infer(model, [_input(name, np.array(values, dtype=np.float32), "FP32")])


def test_server_and_models_ready(
    server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    assert server.is_running()
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in (ADD_ONE, DOUBLE, ENSEMBLE, LOOKUP):
        assert client.is_model_ready(model), model


def test_files_at_repository_root_are_ignored(
    server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    for name in ROOT_FILES:
        assert (server.model_repository / name).is_file()
    index = client.get_model_repository_index(as_json=True)
    assert sorted(model["name"] for model in index["models"]) == sorted(
        [ADD_ONE, DOUBLE, ENSEMBLE, LOOKUP]
    )


def test_add_one(client: grpcclient.InferenceServerClient) -> None:
    result = _infer_fp32(client, ADD_ONE, "x", [1.0, 2.0, -3.5, 0.25])
    y = result.as_numpy("y")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.array([2.0, 3.0, -2.5, 1.25], dtype=np.float32))


def test_double(client: grpcclient.InferenceServerClient) -> None:
    result = _infer_fp32(client, DOUBLE, "y", [1.5, -4.0, 8.0])
    np.testing.assert_array_equal(result.as_numpy("z"), np.array([3.0, -8.0, 16.0], np.float32))


def test_ensemble_chains_both_models(client: grpcclient.InferenceServerClient) -> None:
    result = _infer_fp32(client, ENSEMBLE, "x", [1.0, 2.0, 3.5])
    np.testing.assert_array_equal(result.as_numpy("z"), np.array([4.0, 6.0, 9.0], np.float32))


def test_int64_batched_model(client: grpcclient.InferenceServerClient) -> None:
    ids = np.array([[0, 4, 2], [1, 1, 3]], dtype=np.int64)
    result = client.infer(LOOKUP, [_input("item_ids", ids, "INT64")])
    values = result.as_numpy("item_values")
    assert values.dtype == np.int64
    np.testing.assert_array_equal(values, np.array([[10, 50, 30], [20, 20, 40]], np.int64))
    np.testing.assert_array_equal(result.as_numpy("item_values_fp32"), values.astype(np.float32))


def test_only_requested_outputs_are_returned(client: grpcclient.InferenceServerClient) -> None:
    ids = np.array([[3]], dtype=np.int64)
    result = client.infer(
        LOOKUP,
        [_input("item_ids", ids, "INT64")],
        outputs=[grpcclient.InferRequestedOutput("item_values_fp32")],
    )
    assert [output.name for output in result.get_response().outputs] == ["item_values_fp32"]
    np.testing.assert_array_equal(result.as_numpy("item_values_fp32"), [[40.0]])


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.array([1, 2, 3], dtype=np.int32), "INT32"),  # wrong dtype
        (np.ones((2, 3), dtype=np.float32), "FP32"),  # wrong rank
    ],
    ids=["dtype", "shape"],
)
def test_malformed_request_is_rejected_and_server_still_answers(
    client: grpcclient.InferenceServerClient, array: np.ndarray, datatype: str
) -> None:
    with pytest.raises(InferenceServerException):
        client.infer(ADD_ONE, [_input("x", array, datatype)])
    result = _infer_fp32(client, ADD_ONE, "x", [41.0])
    np.testing.assert_array_equal(result.as_numpy("y"), [42.0])


def _executions(client: grpcclient.InferenceServerClient, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("execution_count", 0))


def test_bad_request_in_a_batch_fails_alone(client: grpcclient.InferenceServerClient) -> None:
    """Sent together, the requests share one dynamic batch; the one with an out-of-range id gets
    an error and the others their values."""
    id_rows = [[0, 1], [2, 3], [len(LOOKUP_TABLE), 0], [4, 4]]
    bad = 2
    executions_before = _executions(client, LOOKUP)
    results: dict[int, tuple[grpcclient.InferResult | None, InferenceServerException | None]] = {}

    def callback_for(i: int) -> Callable[[Any, Any], None]:
        return lambda result, error: results.__setitem__(i, (result, error))

    for i, row in enumerate(id_rows):
        client.async_infer(
            LOOKUP, [_input("item_ids", np.array([row], np.int64), "INT64")], callback_for(i)
        )
    deadline = time.monotonic() + 30
    while len(results) < len(id_rows) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(results) == len(id_rows)

    for i, row in enumerate(id_rows):
        result, error = results[i]
        if i == bad:
            assert result is None
            assert error is not None
            assert "onnxruntime failed" in error.message()
        else:
            assert error is None, error
            expected = [[LOOKUP_TABLE[j] for j in row]]
            np.testing.assert_array_equal(result.as_numpy("item_values"), expected)
    # Triton 2.51 does not count an error response from the python backend as a failed request in
    # its statistics or metrics, so only the batching itself is asserted here.
    assert _executions(client, LOOKUP) - executions_before < len(id_rows), "not batched"


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_leaves_no_process(tmp_path: Path, triton_server: Callable[..., TritonServer]) -> None:
    repository = tmp_path / "repository"
    _scale_model(repository, ADD_ONE, "x", "y", "Add", 1.0)
    server = triton_server(repository)
    pid = server.pid
    assert pid is not None
    stubs = _children(pid)
    assert stubs, "expected a python backend stub process under tritonserver"

    assert server.stop() == 0
    assert not server.is_running()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in [pid, *stubs]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in [pid, *stubs] if _alive(p)]


def test_broken_model_fails_fast_with_the_log(tmp_path: Path, triton_build_dir: Path) -> None:
    repository = tmp_path / "repository"
    _scale_model(repository, ADD_ONE, "x", "y", "Add", 1.0)
    config = mc.ModelConfig()
    text_format.Parse((repository / ADD_ONE / "config.pbtxt").read_text(), config)
    config.input[0].name = "not_in_the_graph"
    _write_config(repository, config)

    server = TritonServer(repository, build_dir=triton_build_dir, log_path=tmp_path / "triton.log")
    server.start()
    try:
        with pytest.raises(TritonServerError, match="not_in_the_graph"):
            server.wait_ready(timeout_s=60)
        assert not server.is_running()  # raised because it exited, not on the timeout
    finally:
        server.stop()
    assert os.path.getsize(tmp_path / "triton.log") > 0
