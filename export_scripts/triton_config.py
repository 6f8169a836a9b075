"""Triton `config.pbtxt` files, built as `ModelConfig` protobufs (never string templates).

The Recommend and SimilarItems ensembles and their steps (user encoder, context weighting, item
lookup, scorer) batch: `max_batch_size > 0`, per-row dims, and Triton's dynamic batcher stacks
concurrent requests of one shape (the gateway pads history, basket and exclusions to a few
lengths; k and the item overlay are per row). The batcher's settings (`Batching`) were kept
after `benchmarks/batching_sweep.py` measured them against the others. The audience ensemble and
scorer and the item encoders keep `max_batch_size: 0` and explicit batch dimensions (an audience
call is already a block of users).

An exact scan holds a few [rows, catalogue] score matrices per execution, and onnxruntime's arena
keeps the largest it has seen: the scorer's largest batch is bounded by the catalogue's size
(`scorer_max_batch_size`), and the two ensembles that end in it take no more rows than it does.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ltrec_core import contract

ONNX_BACKEND = "onnxruntime"
PYTHON_BACKEND = "python"
INT64 = mc.TYPE_INT64
FP32 = mc.TYPE_FP32
BOOL = mc.TYPE_BOOL


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: int
    dims: tuple[int, ...]  # per row for a batching model, whole for the others


@dataclass(frozen=True)
class Batching:
    """The dynamic batcher of the batching models and their instance counts.

    The defaults were kept after `benchmarks/batching_sweep.py` (reports/bench/batching_sweep.md,
    2 cores, behind the coalescing gateway): no queue delay (500 µs cost up to a third of the
    throughput at concurrency 1), one instance per model (a second competes for the same cores:
    0.86-0.99x at concurrency 32), and no other preferred sizes measured better beyond the
    machine's drift.
    `dynamic=False` leaves the batcher out (each request executes alone: the sweep's baseline).
    """

    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_microseconds: int = 0
    instances: int = 1
    dynamic: bool = True

    def __post_init__(self) -> None:
        sizes = self.preferred_batch_sizes
        if any(size < 1 for size in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(
                f"preferred_batch_sizes must be ascending, distinct and >= 1, got {list(sizes)}"
            )
        if self.max_queue_delay_microseconds < 0:
            raise ValueError(
                "max_queue_delay_microseconds must be >= 0, got "
                f"{self.max_queue_delay_microseconds}"
            )
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")


DEFAULT_BATCHING = Batching()
# The models that batch, and the largest batch each takes: the scorer only serves the ensembles;
# the others are also called directly with many rows (cached user vectors, audience blocks). An
# exact-scan scorer takes fewer rows on a large catalogue (`scorer_max_batch_size`).
BATCHED_MODELS: dict[str, int] = {
    contract.USER_ENCODER_MODEL: contract.MAX_DIRECT_ROWS,
    contract.CONTEXT_WEIGHTING_MODEL: contract.MAX_DIRECT_ROWS,
    contract.ITEM_LOOKUP_MODEL: contract.MAX_DIRECT_ROWS,
    contract.SCORER_MODEL: contract.MAX_BATCH_SIZE,
}


# Scores (rows x catalogue items) one execution of the exact scan holds at most: 64 MiB per fp32
# [rows, N] intermediate, of which the scan keeps a few alive at once (scores, popularity-adjusted,
# masked). Measured on the exported scorer at 1M items, 64-d, in one onnxruntime session as the
# stand-in creates it: after one row, a batch of 64 rows took the process from 567 to 1,332 MiB and
# one of 16 (this budget at 1M) to 759 MiB, held by the arena for good.
SCORER_BATCH_SCORES = 1 << 24


def scorer_max_batch_size(n_items: int) -> int:
    """The exact scan's largest batch on a catalogue of `n_items`: `contract.MAX_BATCH_SIZE`, or
    fewer rows where rows x (N + 1) would pass `SCORER_BATCH_SCORES`; at least one. (Items added
    after training widen the rows a little; they are few beside a catalogue this size.)"""
    if n_items < 1:
        raise ValueError(f"n_items must be at least 1, got {n_items}")
    return max(1, min(contract.MAX_BATCH_SIZE, SCORER_BATCH_SCORES // (n_items + 1)))


def _io(tensors: list[Tensor], kind: type) -> list:
    return [kind(name=t.name, data_type=t.dtype, dims=list(t.dims)) for t in tensors]


# Batching models: dims per row (Triton adds the batch dimension).
def user_encoder_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.HISTORY_ITEMS, INT64, (-1,)),
            Tensor(contract.HISTORY_EVENT_TYPES, INT64, (-1,)),
            Tensor(contract.EXTRA_ITEM_VECTORS, FP32, (-1, dim)),
        ],
        [Tensor(contract.USER_EMBEDDING, FP32, (dim,))],
    )


def context_weighting_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.USER_EMBEDDING, FP32, (dim,)),
            Tensor(contract.CONTEXT, INT64, (len(contract.CONTEXT_FIELDS),)),
        ],
        [Tensor(contract.WEIGHTED_USER_EMBEDDING, FP32, (dim,))],
    )


def scorer_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.WEIGHTED_USER_EMBEDDING, FP32, (dim,)),
            Tensor(contract.HISTORY_ITEMS, INT64, (-1,)),
            Tensor(contract.EXCLUDE_ITEMS, INT64, (-1,)),
            Tensor(contract.LONG_TAIL_WEIGHT, FP32, (1,)),
            Tensor(contract.TOP_K, INT64, (1,)),
            Tensor(contract.EXTRA_ITEM_VECTORS, FP32, (-1, dim)),
            Tensor(contract.EXTRA_POPULARITY, FP32, (-1,)),
            # [N+1+M], or [1] without a filter
            Tensor(contract.ITEM_ELIGIBLE, BOOL, (-1,)),
        ],
        [
            # the batch's largest k
            Tensor(contract.TOP_ITEMS, INT64, (-1,)),
            Tensor(contract.TOP_SCORES, FP32, (-1,)),
            Tensor(contract.REASON_POSITIONS, INT64, (-1,)),
        ],
    )


def item_lookup_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.QUERY_ITEMS, INT64, (-1,)),  # [basket]
            Tensor(contract.EXTRA_ITEM_VECTORS, FP32, (-1, dim)),
        ],
        [Tensor(contract.QUERY_EMBEDDING, FP32, (dim,))],
    )


# Models with max_batch_size 0: whole dims.


def audience_scorer_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.QUERY_EMBEDDING, FP32, (-1, dim)),
            Tensor(contract.WEIGHTED_USER_EMBEDDING, FP32, (-1, dim)),
            Tensor(contract.USER_ACTIVITY, FP32, (-1,)),
            Tensor(contract.EXCLUDE_ITEMS, INT64, (1, -1)),
            Tensor(contract.TOP_K, INT64, (1,)),
            Tensor(contract.EXTRA_ITEM_VECTORS, FP32, (-1, dim)),
        ],
        [
            Tensor(contract.AUDIENCE_TOP_USERS, INT64, (-1, -1)),
            Tensor(contract.AUDIENCE_TOP_SCORES, FP32, (-1, -1)),
            Tensor(contract.EXPECTED_INTERACTIONS, FP32, (-1,)),
        ],
    )


def item_encoder_io(dim: int) -> tuple[list[Tensor], list[Tensor]]:
    return (
        [
            Tensor(contract.TEXT_INPUT_IDS, INT64, (-1, -1)),
            Tensor(contract.TEXT_ATTENTION_MASK, INT64, (-1, -1)),
            Tensor(contract.IMAGE_FEATURES, FP32, (-1, contract.IMAGE_FEATURE_DIM)),
            Tensor(contract.HAS_IMAGE, FP32, (-1, 1)),
            Tensor(contract.ATTRIBUTE_IDS, INT64, (-1, contract.ATTRIBUTE_SLOTS)),
        ],
        [Tensor(contract.ITEM_VECTOR, FP32, (-1, dim))],
    )


def image_encoder_io() -> tuple[list[Tensor], list[Tensor]]:
    size = contract.IMAGE_SIZE
    return (
        [Tensor(contract.IMAGE, FP32, (-1, 3, size, size))],
        [Tensor(contract.IMAGE_FEATURES, FP32, (-1, contract.IMAGE_FEATURE_DIM))],
    )


# (model, its io, {model tensor: ensemble tensor} where the names differ)
Step = tuple[str, tuple[list[Tensor], list[Tensor]], dict[str, str]]


def recommend_steps(dim: int) -> list[Step]:
    return [
        (contract.USER_ENCODER_MODEL, user_encoder_io(dim), {}),
        (contract.CONTEXT_WEIGHTING_MODEL, context_weighting_io(dim), {}),
        (contract.SCORER_MODEL, scorer_io(dim), {}),
    ]


def similar_items_steps(dim: int) -> list[Step]:
    """The query's embedding (the mean of the basket's item vectors; one item: its vector) stands
    in for the user embedding, and the query items for the history: they are excluded from their
    own neighbours, and each reason points at the basket item closest to the returned one."""
    return [
        (contract.ITEM_LOOKUP_MODEL, item_lookup_io(dim), {}),
        (
            contract.SCORER_MODEL,
            scorer_io(dim),
            {
                contract.WEIGHTED_USER_EMBEDDING: contract.QUERY_EMBEDDING,
                contract.HISTORY_ITEMS: contract.QUERY_ITEMS,
            },
        ),
    ]


def audience_steps(dim: int) -> list[Step]:
    """The query items' vectors (trained or overlay), the users' vectors under the request's
    context (the context weighting of Recommend, on the gateway's cached user encodings), then
    the audience scorer. The item lookup takes its overlay per query row, the audience scorer
    the whole overlay once: two ensemble inputs."""
    return [
        (
            contract.ITEM_LOOKUP_MODEL,
            item_lookup_io(dim),
            {contract.EXTRA_ITEM_VECTORS: contract.QUERY_EXTRA_ITEM_VECTORS},
        ),
        (
            contract.CONTEXT_WEIGHTING_MODEL,
            context_weighting_io(dim),
            {contract.USER_EMBEDDING: contract.AUDIENCE_USERS},
        ),
        (contract.AUDIENCE_SCORER_MODEL, audience_scorer_io(dim), {}),
    ]


def _ensemble_io(steps: list[Step], *, batched: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Request inputs: every step input no earlier step produces (first declaration wins);
    outputs: the last step's. A batching ensemble's dims are per row (all its steps batch); a
    non-batching one's are whole: a batching step's tensors get the batch dimension in front."""

    def dims(model: str, t: Tensor) -> tuple[int, ...]:
        return t.dims if batched or model not in BATCHED_MODELS else (-1, *t.dims)

    inputs: dict[str, Tensor] = {}
    produced: set[str] = set()
    for model, (step_in, step_out), renames in steps:
        for t in step_in:
            name = renames.get(t.name, t.name)
            if name not in produced and name not in inputs:
                inputs[name] = Tensor(name, t.dtype, dims(model, t))
        produced |= {renames.get(t.name, t.name) for t in step_out}
    last_model, (_, last_out), _ = steps[-1]
    return list(inputs.values()), [Tensor(t.name, t.dtype, dims(last_model, t)) for t in last_out]


def onnx_model_config(
    name: str,
    io: tuple[list[Tensor], list[Tensor]],
    *,
    tensorrt: bool = False,
    threads: int = 1,
    batching: Batching = DEFAULT_BATCHING,
    max_batch_size: int | None = None,
) -> mc.ModelConfig:
    """Config for the native onnxruntime backend (NGC image) and our local stand-in alike: only
    fields the native backend reads. `max_batch_size` lowers a batching model's largest batch
    (the exact scorer's, `scorer_max_batch_size`)."""
    cfg = _model_config(name, ONNX_BACKEND, io, batching, max_batch_size)
    group = cfg.instance_group[0]
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


def python_model_config(
    name: str,
    io: tuple[list[Tensor], list[Tensor]],
    *,
    batching: Batching = DEFAULT_BATCHING,
    max_batch_size: int | None = None,
) -> mc.ModelConfig:
    """A Python-backend model (`<version>/model.py`), as the ANN scorer: CPU instances."""
    cfg = _model_config(name, PYTHON_BACKEND, io, batching, max_batch_size)
    cfg.instance_group[0].kind = mc.ModelInstanceGroup.KIND_CPU
    return cfg


def _model_config(
    name: str,
    backend: str,
    io: tuple[list[Tensor], list[Tensor]],
    batching: Batching,
    max_batch_size: int | None = None,
) -> mc.ModelConfig:
    """A model of `backend` with these inputs and outputs, its latest version served (the
    caller sets its instances' kind). A model of `BATCHED_MODELS` gets its largest batch (or
    `max_batch_size`, at most that), the dynamic batcher and `batching.instances` instances; the
    others one instance, no batching."""
    largest = BATCHED_MODELS.get(name, 0)
    if max_batch_size is not None:
        if not 1 <= max_batch_size <= largest:
            raise ValueError(
                f"{name}: max_batch_size must be in [1, {largest}], got {max_batch_size}"
            )
        largest = max_batch_size
    inputs, outputs = io
    cfg = mc.ModelConfig(
        name=name,
        backend=backend,
        max_batch_size=largest,
        input=_io(inputs, mc.ModelInput),
        output=_io(outputs, mc.ModelOutput),
    )
    cfg.version_policy.latest.num_versions = 1
    group = cfg.instance_group.add()
    group.count = 1
    if name in BATCHED_MODELS:
        apply_batching(cfg, batching)
    return cfg


def apply_batching(cfg: mc.ModelConfig, batching: Batching) -> None:
    """Sets a batching model's dynamic batcher (none with `batching.dynamic` false) and its
    instance count."""
    if cfg.max_batch_size <= 0:
        raise ValueError(f"{cfg.name} does not batch (max_batch_size {cfg.max_batch_size})")
    cfg.ClearField("dynamic_batching")
    cfg.instance_group[0].count = batching.instances
    if not batching.dynamic:
        return
    cfg.dynamic_batching.SetInParent()
    cfg.dynamic_batching.preferred_batch_size.extend(
        [size for size in batching.preferred_batch_sizes if size <= cfg.max_batch_size]
    )
    cfg.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_microseconds


def _ensemble(name: str, steps: list[Step], *, max_batch_size: int) -> mc.ModelConfig:
    """`max_batch_size > 0`: the ensemble takes a batch dimension of its own (every step must
    batch, and take as many rows: Triton refuses an ensemble whose batch a step cannot take);
    Triton's dynamic batchers in the steps stack concurrent requests."""
    batched = max_batch_size > 0
    inputs, outputs = _ensemble_io(steps, batched=batched)
    if batched:
        unbatched = [model for model, _, _ in steps if model not in BATCHED_MODELS]
        if unbatched:
            raise ValueError(f"{name}: steps {unbatched} do not batch")
        smaller = [model for model, _, _ in steps if BATCHED_MODELS[model] < max_batch_size]
        if smaller:
            raise ValueError(f"{name}: steps {smaller} take fewer than {max_batch_size} rows")
    cfg = mc.ModelConfig(
        name=name,
        platform="ensemble",
        max_batch_size=max_batch_size,
        input=_io(inputs, mc.ModelInput),
        output=_io(outputs, mc.ModelOutput),
    )
    for model, (step_in, step_out), renames in steps:
        s = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        for t in step_in:
            s.input_map[t.name] = renames.get(t.name, t.name)
        for t in step_out:
            s.output_map[t.name] = renames.get(t.name, t.name)
    return cfg


def ensemble_config(dim: int, max_batch_size: int = contract.MAX_BATCH_SIZE) -> mc.ModelConfig:
    """encode -> context-weight -> score, one Triton request from the gateway; at most the
    scorer's largest batch."""
    return _ensemble(contract.ENSEMBLE_MODEL, recommend_steps(dim), max_batch_size=max_batch_size)


def similar_items_config(dim: int, max_batch_size: int = contract.MAX_BATCH_SIZE) -> mc.ModelConfig:
    """item lookup -> score (SimilarItems), one Triton request from the gateway; at most the
    scorer's largest batch."""
    return _ensemble(
        contract.SIMILAR_ITEMS_MODEL, similar_items_steps(dim), max_batch_size=max_batch_size
    )


def audience_config(dim: int) -> mc.ModelConfig:
    """item lookup -> context-weight the users -> audience scorer (Audience, ForecastDemand)."""
    return _ensemble(contract.AUDIENCE_MODEL, audience_steps(dim), max_batch_size=0)


def with_identity(cfg: mc.ModelConfig, model_version: str, content_hash: str) -> mc.ModelConfig:
    """`cfg` (the ensemble's) carrying the repository's identity as model parameters, which
    Triton's model configuration endpoint returns to the gateway (`server.health`)."""
    out = mc.ModelConfig()
    out.CopyFrom(cfg)
    out.parameters[contract.MODEL_VERSION_PARAMETER].string_value = model_version
    out.parameters[contract.CONTENT_HASH_PARAMETER].string_value = content_hash
    return out


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())
