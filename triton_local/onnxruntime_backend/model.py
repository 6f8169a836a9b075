"""A Python-based Triton backend named ``onnxruntime`` that runs ``<version>/model.onnx``.

On the NGC ``tritonserver`` image, models whose config says ``backend: "onnxruntime"`` run on the
native onnxruntime backend. The tritonserver carried by the ``nvidia-pytriton`` wheel has only the
python backend, so this file is installed as ``<backend dir>/onnxruntime/model.py``: Triton's
python backend then runs it for every such model, and one model repository serves unchanged in
Kubernetes and on a CPU-only laptop. Only what the repository uses is mimicked: the model file
layout, the ``intra_op_thread_count`` / ``inter_op_thread_count`` parameters of the native backend,
batched and unbatched models, and per-request errors.

Tensors cross the stub boundary through DLPack, never ``Tensor.as_numpy()`` or
``pb_utils.Tensor(name, ndarray)``: the stub of the 2.51 python backend is built with a pybind11
that predates numpy 2, and under numpy 2 it reads the dtype's item size from the wrong place, so
``as_numpy()`` returns every element equal to the first (zero strides) and ``Tensor(...)`` sends an
empty buffer. BYTES (TYPE_STRING) tensors have no DLPack form, and under numpy 2 that stub crashes
on them, so a model with string inputs or outputs is refused at load time with that reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

DEFAULT_MODEL_FILENAME = "model.onnx"
# The python backend already runs one stub process per model instance on a small machine: one
# intra-op thread per session keeps several models from oversubscribing two cores.
DEFAULT_INTRA_OP_THREADS = 1
DEFAULT_INTER_OP_THREADS = 1

_ORT_TO_NUMPY: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


# The stub renames a consumed DLPack capsule with a name numpy's capsule destructor does not
# recognise; the destructor then reports this harmless error once per output tensor.
_CAPSULE_NOISE = "PyCapsule_GetPointer called with incorrect name"


def _quiet_capsule_noise(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, ValueError) and str(exc) == _CAPSULE_NOISE:
            return
        previous(unraisable)

    return hook


def _to_numpy(tensor: Any, dtype: Any) -> np.ndarray:
    array = np.from_dlpack(tensor)
    if np.dtype(dtype) == np.bool_ and array.dtype == np.uint8:
        array = array.view(np.bool_)
    return array


def _to_tensor(name: str, array: np.ndarray, dtype: Any) -> Any:
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array, dtype=dtype))


class _RequestError(Exception):
    """A problem with one request: it becomes that request's error response."""


def _int_parameter(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise pb_utils.TritonModelException(
            f"parameter {key} must be an integer, got {value!r}"
        ) from exc


class TritonPythonModel:
    """Runs an ONNX model with onnxruntime on CPU, one response per request."""

    def initialize(self, args: dict[str, str]) -> None:
        sys.unraisablehook = _quiet_capsule_noise(sys.unraisablehook)
        config = json.loads(args["model_config"])
        self.model_name: str = config["name"]
        self.max_batch_size: int = int(config.get("max_batch_size", 0))
        self.input_dtypes: dict[str, Any] = {
            spec["name"]: pb_utils.triton_string_to_numpy(spec["data_type"])
            for spec in config.get("input", [])
        }
        self.output_dtypes: dict[str, Any] = {
            spec["name"]: pb_utils.triton_string_to_numpy(spec["data_type"])
            for spec in config.get("output", [])
        }
        strings = [
            name
            for name, dtype in {**self.input_dtypes, **self.output_dtypes}.items()
            if np.dtype(dtype) == np.object_
        ]
        if strings:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: TYPE_STRING tensors {strings} are not supported by the local "
                "python backend stub under numpy 2 (it crashes on BYTES tensors)"
            )

        filename = config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
        model_path = Path(args["model_repository"]) / args["model_version"] / filename
        if not model_path.is_file():
            raise pb_utils.TritonModelException(f"{self.model_name}: no model file {model_path}")

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = _int_parameter(
            config, "intra_op_thread_count", DEFAULT_INTRA_OP_THREADS
        )
        options.inter_op_num_threads = _int_parameter(
            config, "inter_op_thread_count", DEFAULT_INTER_OP_THREADS
        )
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._check_config_against_graph()

    def _check_config_against_graph(self) -> None:
        """Fail at load time, not on the first request, when config and graph disagree."""
        graph_inputs = {arg.name: arg.type for arg in self.session.get_inputs()}
        graph_outputs = {arg.name: arg.type for arg in self.session.get_outputs()}
        for kind, declared, graph in (
            ("input", self.input_dtypes, graph_inputs),
            ("output", self.output_dtypes, graph_outputs),
        ):
            for name, dtype in declared.items():
                if name not in graph:
                    raise pb_utils.TritonModelException(
                        f"{self.model_name}: config {kind} {name} is not a graph {kind}; "
                        f"graph has {sorted(graph)}"
                    )
                graph_dtype = _ORT_TO_NUMPY.get(graph[name])
                if graph_dtype is not None and np.dtype(graph_dtype) != np.dtype(dtype):
                    raise pb_utils.TritonModelException(
                        f"{self.model_name}: config {kind} {name} is {np.dtype(dtype)}, "
                        f"graph says {graph[name]}"
                    )

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds: list[dict[str, np.ndarray] | None] = []
        outputs: list[list[str]] = []
        responses: list[Any] = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                feeds.append(self._read_inputs(request))
            except _RequestError as exc:
                feeds.append(None)
                responses[i] = _error_response(str(exc))
            outputs.append(self._output_names(request))

        pending = [i for i, feed in enumerate(feeds) if feed is not None]
        if self.max_batch_size > 0:
            for group in self._batchable_groups(pending, feeds, outputs):
                if len(group) > 1 and self._run_concatenated(group, feeds, outputs, responses):
                    continue
                for i in group:
                    responses[i] = self._run_one(feeds[i], outputs[i])
        else:
            for i in pending:
                responses[i] = self._run_one(feeds[i], outputs[i])
        return responses

    def _read_inputs(self, request: Any) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for name, dtype in self.input_dtypes.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue  # optional input; onnxruntime reports a missing required one
            array = _to_numpy(tensor, dtype)
            if array.dtype != np.dtype(dtype):
                raise _RequestError(
                    f"{self.model_name}: input {name} must be {np.dtype(dtype)}, got {array.dtype}"
                )
            feed[name] = array
        return feed

    def _output_names(self, request: Any) -> list[str]:
        requested = [n for n in request.requested_output_names() if n in self.output_dtypes]
        return requested or list(self.output_dtypes)

    def _batchable_groups(
        self,
        pending: list[int],
        feeds: list[dict[str, np.ndarray] | None],
        outputs: list[list[str]],
    ) -> list[list[int]]:
        """Requests that can share one session run: same inputs, same non-batch shapes."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i in pending:
            feed = feeds[i]
            assert feed is not None
            if any(array.ndim == 0 for array in feed.values()):
                key: tuple[Any, ...] = ("unbatchable", i)
            else:
                key = (
                    tuple(sorted((name, array.shape[1:]) for name, array in feed.items())),
                    tuple(outputs[i]),
                )
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run_concatenated(
        self,
        group: list[int],
        feeds: list[dict[str, np.ndarray] | None],
        outputs: list[list[str]],
        responses: list[Any],
    ) -> bool:
        """Runs the group as one batch; False when it fails so that each request runs alone and
        only the bad one gets an error."""
        group_feeds = [feeds[i] for i in group]
        sizes = [next(iter(feed.values())).shape[0] for feed in group_feeds if feed]
        if len(sizes) != len(group) or any(
            array.shape[0] != size
            for feed, size in zip(group_feeds, sizes, strict=True)
            for array in feed.values()
        ):
            return False
        names = list(group_feeds[0])
        batched = {name: np.concatenate([feed[name] for feed in group_feeds]) for name in names}
        output_names = outputs[group[0]]
        try:
            results = self.session.run(output_names, batched)
        except Exception:
            return False
        if any(result.shape[:1] != (sum(sizes),) for result in results):
            return False
        offsets = np.cumsum([0, *sizes])
        for k, i in enumerate(group):
            start, stop = offsets[k], offsets[k + 1]
            responses[i] = self._response(output_names, [result[start:stop] for result in results])
        return True

    def _run_one(self, feed: dict[str, np.ndarray] | None, output_names: list[str]) -> Any:
        assert feed is not None
        try:
            results = self.session.run(output_names, feed)
        except Exception as exc:
            return _error_response(f"{self.model_name}: onnxruntime failed: {exc}")
        return self._response(output_names, results)

    def _response(self, output_names: list[str], results: list[np.ndarray]) -> Any:
        tensors = [
            _to_tensor(name, result, self.output_dtypes[name])
            for name, result in zip(output_names, results, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.session = None


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
