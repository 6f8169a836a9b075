"""Triton `config.pbtxt` files, built as `ModelConfig` protobufs (never string templates).

Every model has `max_batch_size: 0` and an explicit leading batch dimension: history length, the
exclusion list and k vary per request, so Triton could not stack requests anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from server import contract

ONNX_BACKEND = "onnxruntime"
INT64 = mc.TYPE_INT64
FP32 = mc.TYPE_FP32


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: int
    dims: tuple[int, ...]


def _io(tensors: list[Tensor], kind: type) -> list:
    return [kind(name=t.name, data_type=t.dtype, dims=list(t.dims)) for t in tensors]


def user_encoder_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.HISTORY_ITEMS, INT64, (-1, -1)),
            Tensor(contract.HISTORY_EVENT_TYPES, INT64, (-1, -1)),
        ],
        [Tensor(contract.USER_EMBEDDING, FP32, (-1, dim))],
    )


def context_weighting_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.USER_EMBEDDING, FP32, (-1, dim)),
            Tensor(contract.CONTEXT, INT64, (-1, len(contract.CONTEXT_FIELDS))),
        ],
        [Tensor(contract.WEIGHTED_USER_EMBEDDING, FP32, (-1, dim))],
    )


def scorer_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.WEIGHTED_USER_EMBEDDING, FP32, (-1, dim)),
            Tensor(contract.HISTORY_ITEMS, INT64, (-1, -1)),
            Tensor(contract.EXCLUDE_ITEMS, INT64, (-1, -1)),
            Tensor(contract.LONG_TAIL_WEIGHT, FP32, (-1, 1)),
            Tensor(contract.TOP_K, INT64, (1,)),
        ],
        [
            Tensor(contract.TOP_ITEMS, INT64, (-1, -1)),
            Tensor(contract.TOP_SCORES, FP32, (-1, -1)),
            Tensor(contract.REASON_POSITIONS, INT64, (-1, -1)),
        ],
    )


def item_text_encoder_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.TEXT_INPUT_IDS, INT64, (-1, -1)),
            Tensor(contract.TEXT_ATTENTION_MASK, INT64, (-1, -1)),
        ],
        [Tensor(contract.ITEM_VECTOR, FP32, (-1, dim))],
    )


def ensemble_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    user_in, _ = user_encoder_io(dim)
    ctx_in, _ = context_weighting_io(dim)
    score_in, score_out = scorer_io(dim)
    request_inputs = [*user_in, ctx_in[1], *score_in[2:]]
    return request_inputs, score_out


def onnx_model_config(
    name: str, io: tuple[list[Tensor], list[Tensor]], *, tensorrt: bool = False, threads: int = 1
) -> mc.ModelConfig:
    """Config for the native onnxruntime backend (NGC image) and our local stand-in alike."""
    inputs, outputs = io
    cfg = mc.ModelConfig(
        name=name,
        backend=ONNX_BACKEND,
        max_batch_size=0,
        input=_io(inputs, mc.ModelInput),
        output=_io(outputs, mc.ModelOutput),
    )
    cfg.version_policy.latest.num_versions = 1
    group = cfg.instance_group.add()
    group.count = 1
    if tensorrt:
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add()
        accel.name = "tensorrt"
        accel.parameters["precision_mode"] = "FP16"
        accel.parameters["max_workspace_size_bytes"] = str(1 << 30)
        accel.parameters["trt_engine_cache_enable"] = "1"
        accel.parameters["trt_engine_cache_path"] = "/tmp/trt_cache"
    else:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        cfg.parameters["intra_op_thread_count"].string_value = str(threads)
        cfg.parameters["inter_op_thread_count"].string_value = "1"
    return cfg


def ensemble_config(dim: int) -> mc.ModelConfig:
    """encode -> context-weight -> score, one Triton request from the gateway."""
    inputs, outputs = ensemble_io(dim)
    cfg = mc.ModelConfig(
        name=contract.ENSEMBLE_MODEL,
        platform="ensemble",
        max_batch_size=0,
        input=_io(inputs, mc.ModelInput),
        output=_io(outputs, mc.ModelOutput),
    )
    steps = cfg.ensemble_scheduling.step

    def step(model: str, io: tuple[list[Tensor], list[Tensor]]) -> None:
        s = steps.add(model_name=model, model_version=-1)
        for t in io[0]:
            s.input_map[t.name] = t.name
        for t in io[1]:
            s.output_map[t.name] = t.name

    step(contract.USER_ENCODER_MODEL, user_encoder_io(dim))
    step(contract.CONTEXT_WEIGHTING_MODEL, context_weighting_io(dim))
    step(contract.SCORER_MODEL, scorer_io(dim))
    return cfg


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())
