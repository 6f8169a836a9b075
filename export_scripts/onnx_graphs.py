"""ONNX graphs of the trained towers, and their parity check against torch.

The torch towers go through `torch.onnx.export`. The scorer is written with `onnx.helper`: its
`k` is a runtime input (TopK's second input), which traced exports would freeze; the torch
`ltrec.models.Scorer` is the reference it is checked against.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from ltrec.image_encoder import ImageEncoder
from ltrec.models import (
    AudienceScorer,
    ContextWeighting,
    ItemEncoder,
    ItemLookup,
    Scorer,
    UserEncoder,
)
from ltrec_core import contract

OPSET = 18
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise


# A catalogue past this many bytes goes to a file beside the graph (`model.onnx.data`). A protobuf
# message cannot exceed 2 GB (8M items at 64-d fp32), but memory comes first: onnxruntime copies an
# embedded initializer out of the parsed protobuf, so each model that embeds the table holds it
# twice while it loads (and the stand-in loads each model in a process of its own), while external
# data is mapped from its file. A model that only gathers rows (the user encoder, the item lookup)
# then loads without the table and holds, file-backed, only the pages it reads; the scorer and the
# audience scorer pack the table for their Gemm either way. Measured at 1M items, 64-d (README,
# "Memory of a batch"): the item lookup's process loads at 55 MiB instead of 298 (peak 543).
EXTERNAL_DATA_BYTES = 64 << 20
EXTERNAL_DATA_FILE = "model.onnx.data"


def needs_external_data(*arrays: np.ndarray | torch.Tensor) -> bool:
    return sum(int(a.nbytes) for a in arrays) > EXTERNAL_DATA_BYTES


# Offsets of tables written straight to external data are aligned for memory mapping.
EXTERNAL_DATA_ALIGNMENT = 1 << 16


def table_initializer(
    table: np.ndarray, name: str, external_dir: Path | None = None
) -> onnx.TensorProto:
    """The catalogue `table` as a float32 initializer named `name`.

    With `external_dir` and a table past `EXTERNAL_DATA_BYTES`, its bytes go straight to
    `external_dir / EXTERNAL_DATA_FILE` (appended at an aligned offset) and the initializer only
    points at them: no in-memory copy as protobuf bytes, which past 2 GiB (about 8M items at
    64-d) no protobuf message can hold at all. `save` then appends the graph's other large
    tensors to the same file."""
    array = np.ascontiguousarray(table, dtype=np.float32)
    if external_dir is None or array.nbytes <= EXTERNAL_DATA_BYTES:
        return numpy_helper.from_array(array, name)
    external_dir.mkdir(parents=True, exist_ok=True)
    with (external_dir / EXTERNAL_DATA_FILE).open("ab") as handle:
        end = handle.tell()
        offset = -(-end // EXTERNAL_DATA_ALIGNMENT) * EXTERNAL_DATA_ALIGNMENT
        handle.write(b"\0" * (offset - end))
        array.tofile(handle)
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (
        ("location", EXTERNAL_DATA_FILE),
        ("offset", str(offset)),
        ("length", str(array.nbytes)),
    ):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def save(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    """Writes `model`; with `external`, its large tensors go to `EXTERNAL_DATA_FILE` beside it,
    which onnxruntime (and Triton's native backend) read from the graph's own folder. A graph
    whose tables `table_initializer` already wrote there is checked here, from its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    points_at_data = _points_at_external_data(model)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=min(1 << 20, EXTERNAL_DATA_BYTES),
        )
    else:
        onnx.save(model, str(path))
    if points_at_data:
        onnx.checker.check_model(str(path))


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    *,
    external: bool = False,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            external_data=external,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=external)


def export_user_encoder(encoder: UserEncoder, path: Path, *, overlay: bool = False) -> None:
    """`overlay` adds the `extra_item_vectors` [B, M, D] input (items added after training, per
    row)."""
    items = torch.tensor([[0, 0, 3, 1, 2], [4, 5, 6, 7, 1]], dtype=torch.long)
    events = torch.tensor([[0, 0, 1, 2, 4], [1, 1, 3, 4, 4]], dtype=torch.long)
    args: tuple[torch.Tensor, ...] = (items, events)
    names = [contract.HISTORY_ITEMS, contract.HISTORY_EVENT_TYPES]
    axes = {
        contract.HISTORY_ITEMS: {0: "batch", 1: "history"},
        contract.HISTORY_EVENT_TYPES: {0: "batch", 1: "history"},
        contract.USER_EMBEDDING: {0: "batch"},
    }
    if overlay:
        n_rows, dim = encoder.item_table.shape
        items[1, 0] = n_rows + 1  # an overlay row, so the trace keeps both sides of the gather
        args = (items, events, torch.randn(2, 3, dim))
        names.append(contract.EXTRA_ITEM_VECTORS)
        axes[contract.EXTRA_ITEM_VECTORS] = {0: "batch", 1: "extra"}
    external = needs_external_data(encoder.item_table)
    _export(encoder, args, path, names, [contract.USER_EMBEDDING], axes, external=external)


def export_context_weighting(module: ContextWeighting, dim: int, path: Path) -> None:
    user = torch.randn(2, dim)
    context = torch.tensor([[1, 2, 0, 1], [24, 7, 1, 0]], dtype=torch.long)
    _export(
        module,
        (user, context),
        path,
        [contract.USER_EMBEDDING, contract.CONTEXT],
        [contract.WEIGHTED_USER_EMBEDDING],
        {
            contract.USER_EMBEDDING: {0: "batch"},
            contract.CONTEXT: {0: "batch"},
            contract.WEIGHTED_USER_EMBEDDING: {0: "batch"},
        },
    )


def item_encoder_example(dim: int = contract.IMAGE_FEATURE_DIM) -> dict[str, torch.Tensor]:
    """Example inputs of the item encoder: two items, one with an image and one without."""
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2003, 102, 0]], dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    return {
        contract.TEXT_INPUT_IDS: ids,
        contract.TEXT_ATTENTION_MASK: (ids != 0).long(),
        contract.IMAGE_FEATURES: torch.rand(2, dim, generator=generator),
        contract.HAS_IMAGE: torch.tensor([[1.0], [0.0]]),
        contract.ATTRIBUTE_IDS: torch.tensor(
            [[5, 9] + [0] * (contract.ATTRIBUTE_SLOTS - 2), [0] * contract.ATTRIBUTE_SLOTS]
        ),
    }


ITEM_ENCODER_INPUTS = (
    contract.TEXT_INPUT_IDS,
    contract.TEXT_ATTENTION_MASK,
    contract.IMAGE_FEATURES,
    contract.HAS_IMAGE,
    contract.ATTRIBUTE_IDS,
)


def export_item_encoder(module: ItemEncoder, path: Path) -> None:
    example = item_encoder_example(module.fusion.image[0].normalized_shape[0])
    _export(
        module,
        tuple(example[name] for name in ITEM_ENCODER_INPUTS),
        path,
        list(ITEM_ENCODER_INPUTS),
        [contract.ITEM_VECTOR],
        {
            contract.TEXT_INPUT_IDS: {0: "batch", 1: "tokens"},
            contract.TEXT_ATTENTION_MASK: {0: "batch", 1: "tokens"},
            contract.IMAGE_FEATURES: {0: "batch"},
            contract.HAS_IMAGE: {0: "batch"},
            contract.ATTRIBUTE_IDS: {0: "batch"},
            contract.ITEM_VECTOR: {0: "batch"},
        },
    )


def export_image_encoder(module: ImageEncoder, path: Path) -> None:
    size = contract.IMAGE_SIZE
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    _export(
        module,
        (example,),
        path,
        [contract.IMAGE],
        [contract.IMAGE_FEATURES],
        {contract.IMAGE: {0: "batch"}, contract.IMAGE_FEATURES: {0: "batch"}},
    )


CATALOGUE_SCANS = ("fp32", "int8")
# int8 scan: the approximate top (k + RERANK_EXTRA) are re-scored exactly in fp32.
RERANK_EXTRA = 256


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: `table[i] ≈ q[i] * scale[i]`; an all-zero row gets scale 0."""
    peak = np.abs(table).max(axis=1)
    scale = (peak / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _overlay_gather(
    rows: str, extra_rows: str, indices: str, out: str, *, vectors: bool
) -> list[onnx.NodeProto]:
    """`out[b] = concat(rows, extra_rows[b])[indices[b]]` without copying the trained rows per
    request: each index is gathered from the side it falls in.

    Needs `n_trained` (N+1), `n_trained_last` (N) and `n_extra` (M) in the graph, and
    `extra_rows` the row's overlay padded with one zero row ([B, M+1, D], or [B, M+1] when not
    `vectors`), so that M = 0 still gathers (a row nobody keeps).
    """
    n = helper.make_node
    nodes = [
        n("Min", [indices, "n_trained_last"], [f"{out}_trained_idx"]),
        n("Gather", [rows, f"{out}_trained_idx"], [f"{out}_trained"]),
        n("Sub", [indices, "n_trained"], [f"{out}_extra_rel"]),
        n("Clip", [f"{out}_extra_rel", "zero_index", "n_extra"], [f"{out}_extra_idx"]),
    ]
    if vectors:  # [B, L] -> [B, L, D], each row from its own overlay
        nodes += [
            n("Unsqueeze", [f"{out}_extra_idx", "last_axis"], [f"{out}_extra_idx_col"]),
            n(
                "GatherND",
                [extra_rows, f"{out}_extra_idx_col"],
                [f"{out}_extra"],
                batch_dims=1,
            ),
        ]
    else:
        nodes.append(
            n("GatherElements", [extra_rows, f"{out}_extra_idx"], [f"{out}_extra"], axis=1)
        )
    nodes.append(n("GreaterOrEqual", [indices, "n_trained"], [f"{out}_is_extra"]))
    condition = f"{out}_is_extra"
    if vectors:
        nodes.append(n("Unsqueeze", [condition, "last_axis"], [f"{out}_is_extra_col"]))
        condition = f"{out}_is_extra_col"
    nodes.append(n("Where", [condition, f"{out}_extra", f"{out}_trained"], [out]))
    return nodes


def _overlay_inits(n_rows: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array(n_rows, dtype=np.int64), "n_trained"),
        numpy_helper.from_array(np.array(n_rows - 1, dtype=np.int64), "n_trained_last"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero_index"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_axis"),
    ]


def _overlay_rows_nodes(
    dim: int, offset: np.ndarray | None = None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`extra_rows` (each row's overlay plus one zero row, [B, M+1, D]) and `n_extra` (M, a
    scalar); with `offset` [D], the overlay rows minus it (an added item read as a query, without
    the new-item boost's shift: `ltrec.models.ItemLookup`)."""
    n = helper.make_node
    inits = [
        numpy_helper.from_array(np.array([0, 0, 0, 0, 1, 0], dtype=np.int64), "pad_one_row"),
    ]
    source = contract.EXTRA_ITEM_VECTORS
    nodes = []
    if offset is not None:
        inits.append(numpy_helper.from_array(offset.astype(np.float32), "added_item_offset"))
        nodes.append(n("Sub", [source, "added_item_offset"], ["extra_unshifted"]))
        source = "extra_unshifted"
    nodes += [
        n("Pad", [source, "pad_one_row"], ["extra_rows"]),
        n("Shape", [contract.EXTRA_ITEM_VECTORS], ["n_extra_1d"], start=1, end=2),
        n("Squeeze", ["n_extra_1d", "zero_axis"], ["n_extra"]),
    ]
    return nodes, inits


def scorer_graph(
    item_table: np.ndarray,
    popularity: np.ndarray,
    *,
    scan: str = "fp32",
    overlay: bool = False,
    item_filter: bool = False,
    external_dir: Path | None = None,
) -> onnx.ModelProto:
    """ONNX version of `ltrec.models.Scorer` with the catalogue inside the graph (in
    `external_dir`'s external data when it is large: `table_initializer`).

    `scan="int8"` reads the catalogue as per-row int8 (a quarter of the bytes: the scan is
    memory-bound on large catalogues), keeps the best `k + RERANK_EXTRA` and re-scores those
    exactly in fp32: the same top-k as fp32 whenever it lies within those candidates, with exact
    scores. The fp32 table stays for that and for the reasons.

    `overlay=True` (what the export writes) adds the inputs `extra_item_vectors` [B, M, D] and
    `extra_popularity` [B, M]: items added after training, catalogue indices N+1..N+M, per row
    (rows batched together share M, not necessarily the vectors). They are scored in fp32 beside
    the trained catalogue (whose table is never copied per request) and the two score rows are
    concatenated before masking and top-k.

    `top_k` is per row ([B, 1]); the outputs have the batch's largest k for every row, whose
    first k are the row's own top k (TopK's ties go to the lower index, so a prefix of a longer
    ranking is the shorter one). The int8 scan quantizes each row on its own and keeps each
    row's own k + RERANK_EXTRA candidates: a row's answer does not depend on its batch.

    `item_filter=True` (what the export writes) adds the input `item_eligible`, BOOL [B, N+1+M]
    or [B, 1] (broadcast): the business filter, applied with the history and exclusions before
    top-k (and before the int8 candidates are chosen), so k items come back whenever k pass.
    The scores of the items that pass are untouched, hence so is their order.
    """
    if scan not in CATALOGUE_SCANS:
        raise ValueError(f"scan must be one of {CATALOGUE_SCANS}, got {scan!r}")
    n_rows, dim = item_table.shape
    log_popularity = np.log1p(popularity.astype(np.float32)).reshape(1, -1)
    inits = [
        table_initializer(item_table, "item_table", external_dir),
        numpy_helper.from_array(log_popularity, "log_popularity"),
        numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), "neg_inf"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(contract.PADDING_INDEX, dtype=np.int64), "pad_index"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "norm_eps"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one_axis"),
    ]
    n = helper.make_node
    # Every pass over the catalogue counts at a million items: the padding row is masked with the
    # history (one scatter) rather than by adding a mask row, and the int8 scan leaves its
    # per-request scale on the popularity weight (a ranking is unchanged by a positive factor).
    weight = contract.LONG_TAIL_WEIGHT
    if scan == "fp32":
        score_nodes = [
            n("Gemm", [contract.WEIGHTED_USER_EMBEDDING, "item_table"], ["raw"], transB=1)
        ]
    else:
        q, scale = quantize_rows(np.asarray(item_table, dtype=np.float32))
        inits += [
            numpy_helper.from_array(np.ascontiguousarray(q.T), "item_table_q_t"),  # [D, N+1]
            numpy_helper.from_array(scale.reshape(1, -1), "item_scale"),
        ]
        inits += [
            # sum over d of q[d, i]: (u_q - zero) . q = u_q . q - zero * sum(q), exactly
            numpy_helper.from_array(
                q.astype(np.int32).sum(axis=1, dtype=np.int32).reshape(1, -1), "item_table_q_sum"
            ),
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "uint8_max"),
        ]
        user = contract.WEIGHTED_USER_EMBEDDING
        score_nodes = [
            # DynamicQuantizeLinear's uint8 quantization, but per row: a row's candidates must
            # not depend on the rows it is batched with.
            n("ReduceMax", [user, "last_axis"], ["user_max_raw"], keepdims=1),
            n("Max", ["user_max_raw", "zero"], ["user_max"]),
            n("ReduceMin", [user, "last_axis"], ["user_min_raw"], keepdims=1),
            n("Min", ["user_min_raw", "zero"], ["user_min"]),
            n("Sub", ["user_max", "user_min"], ["user_range"]),
            n("Div", ["user_range", "uint8_max"], ["user_scale"]),  # [B, 1]
            n("Div", ["user_min", "user_scale"], ["user_min_units"]),
            n("Neg", ["user_min_units"], ["user_zero_raw"]),
            n("Clip", ["user_zero_raw", "zero", "uint8_max"], ["user_zero_clipped"]),
            n("Round", ["user_zero_clipped"], ["user_zero_f"]),
            n("Div", [user, "user_scale"], ["user_units"]),
            n("Round", ["user_units"], ["user_units_rounded"]),
            n("Add", ["user_units_rounded", "user_zero_f"], ["user_shifted"]),
            n("Clip", ["user_shifted", "zero", "uint8_max"], ["user_q_f"]),
            n("Cast", ["user_q_f"], ["user_q"], to=TensorProto.UINT8),
            n("Cast", ["user_zero_f"], ["user_zero_i"], to=TensorProto.INT32),
            n("MatMulInteger", ["user_q", "item_table_q_t"], ["raw_int_unshifted"]),
            n("Mul", ["user_zero_i", "item_table_q_sum"], ["raw_int_shift"]),
            n("Sub", ["raw_int_unshifted", "raw_int_shift"], ["raw_int"]),
            n("Cast", ["raw_int"], ["raw_units"], to=TensorProto.FLOAT),
            n("Mul", ["raw_units", "item_scale"], ["raw"]),  # exact score / user_scale
            n("Div", [contract.LONG_TAIL_WEIGHT, "user_scale"], ["scaled_weight"]),
        ]
        weight = "scaled_weight"
    nodes = [
        *score_nodes,
        # scores, adjusted for popularity
        n("Mul", [weight, "log_popularity"], ["penalty"]),
        n("Sub", ["raw", "penalty"], ["adjusted_trained" if overlay else "adjusted"]),
    ]

    # Where the reasons (and the int8 re-scoring) read item vectors and popularity from.
    def gather_vectors(indices: str, out: str) -> list[onnx.NodeProto]:
        if overlay:
            return _overlay_gather("item_table", "extra_rows", indices, out, vectors=True)
        return [n("Gather", ["item_table", indices], [out])]

    if overlay:
        rows_nodes, rows_inits = _overlay_rows_nodes(dim)
        inits += [
            *_overlay_inits(n_rows),
            *rows_inits,
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ]
        user = contract.WEIGHTED_USER_EMBEDDING
        nodes += [
            *rows_nodes,
            # each row against its own overlay: [B, 1, D] x [B, D, M]
            n("Unsqueeze", [user, "one_axis"], ["user_row3"]),
            n("Transpose", [contract.EXTRA_ITEM_VECTORS], ["extra_t"], perm=[0, 2, 1]),
            n("MatMul", ["user_row3", "extra_t"], ["extra_raw3"]),
            n("Squeeze", ["extra_raw3", "one_axis"], ["extra_raw_exact"]),  # [B, M]
            n("Add", [contract.EXTRA_POPULARITY, "one"], ["extra_pop_plus_one"]),
            n("Log", ["extra_pop_plus_one"], ["extra_log_pop"]),  # [B, M]
        ]
        if scan == "fp32":
            nodes.append(n("Identity", ["extra_raw_exact"], ["extra_raw"]))
        else:  # the trained scores are in units of user_scale here
            nodes.append(n("Div", ["extra_raw_exact", "user_scale"], ["extra_raw"]))
        nodes += [
            n("Mul", [weight, "extra_log_pop"], ["extra_penalty"]),
            n("Sub", ["extra_raw", "extra_penalty"], ["adjusted_extra"]),
            n("Concat", ["adjusted_trained", "adjusted_extra"], ["adjusted"], axis=1),
        ]
    nodes += [
        # padding, history and excluded items can never be returned
        n("Shape", [contract.WEIGHTED_USER_EMBEDDING], ["batch_size"], start=0, end=1),
        n("Concat", ["batch_size", "one_axis"], ["pad_shape"], axis=0),
        n(
            "ConstantOfShape",
            ["pad_shape"],
            ["pad_column"],  # [batch, 1] of PADDING_INDEX
            value=helper.make_tensor("pad", TensorProto.INT64, [1], [contract.PADDING_INDEX]),
        ),
        n(
            "Concat",
            [contract.HISTORY_ITEMS, contract.EXCLUDE_ITEMS, "pad_column"],
            ["masked_idx"],
            axis=1,
        ),
        n("Shape", ["masked_idx"], ["masked_shape"]),
        n("Expand", ["neg_inf", "masked_shape"], ["masked_val"]),
        n(
            "ScatterElements",
            ["adjusted", "masked_idx", "masked_val"],
            ["scores_unfiltered" if item_filter else "scores"],
            axis=1,
        ),
    ]
    if item_filter:
        nodes.append(
            n("Where", [contract.ITEM_ELIGIBLE, "scores_unfiltered", "neg_inf"], ["scores"])
        )
    # One TopK for the batch: its largest k (a row's own k are the first k of its row).
    nodes += [
        n("ReduceMax", [contract.TOP_K], ["k_max_scalar"], keepdims=0),
        n("Reshape", ["k_max_scalar", "last_axis"], ["k_max"]),
    ]
    if scan == "fp32":
        nodes.append(
            n("TopK", ["scores", "k_max"], [contract.TOP_SCORES, contract.TOP_ITEMS], axis=1)
        )
    else:
        inits += [
            numpy_helper.from_array(np.array([RERANK_EXTRA], dtype=np.int64), "rerank_extra"),
            numpy_helper.from_array(np.array([n_rows], dtype=np.int64), "n_rows"),
            numpy_helper.from_array(log_popularity.reshape(-1), "log_popularity_flat"),
        ]
        if overlay:
            inits.append(
                numpy_helper.from_array(np.array([0, 0, 0, 1], dtype=np.int64), "pad_one_col")
            )
            nodes += [
                n("Add", ["n_rows", "n_extra_1d"], ["n_all_rows"]),
                n("Pad", ["extra_log_pop", "pad_one_col"], ["extra_log_pop_padded"]),
            ]
            cand_log_pop = _overlay_gather(
                "log_popularity_flat",
                "extra_log_pop_padded",
                "cand_items",
                "cand_log_pop",
                vectors=False,
            )
        else:
            nodes.append(n("Identity", ["n_rows"], ["n_all_rows"]))
            cand_log_pop = [n("Gather", ["log_popularity_flat", "cand_items"], ["cand_log_pop"])]
        inits += [
            numpy_helper.from_array(np.array(0, dtype=np.int64), "range_start"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "range_step"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "first_axis"),
        ]
        nodes += [
            n("Add", ["k_max", "rerank_extra"], ["wanted"]),
            n("Min", ["wanted", "n_all_rows"], ["n_candidates"]),
            n("TopK", ["scores", "n_candidates"], ["cand_scores", "cand_items"], axis=1),
            # a row keeps its own k + RERANK_EXTRA candidates, as when scored alone
            n("Add", [contract.TOP_K, "rerank_extra"], ["row_wanted"]),  # [B, 1]
            n("Squeeze", ["n_candidates", "first_axis"], ["n_candidates_scalar"]),
            n("Range", ["range_start", "n_candidates_scalar", "range_step"], ["cand_positions"]),
            n("GreaterOrEqual", ["cand_positions", "row_wanted"], ["cand_beyond"]),
            # exact fp32 scores of the candidates; masked ones stay -inf
            *gather_vectors("cand_items", "cand_vec"),
            n("Unsqueeze", [contract.WEIGHTED_USER_EMBEDDING, "last_axis"], ["user_col"]),
            n("MatMul", ["cand_vec", "user_col"], ["cand_raw3"]),
            n("Squeeze", ["cand_raw3", "last_axis"], ["cand_raw"]),
            *cand_log_pop,
            n("Mul", [contract.LONG_TAIL_WEIGHT, "cand_log_pop"], ["cand_penalty"]),
            n("Sub", ["cand_raw", "cand_penalty"], ["cand_exact"]),
            n("IsInf", ["cand_scores"], ["cand_masked_score"], detect_positive=0),
            n("Or", ["cand_masked_score", "cand_beyond"], ["cand_masked"]),
            n("Where", ["cand_masked", "neg_inf", "cand_exact"], ["cand_final"]),
            n("TopK", ["cand_final", "k_max"], [contract.TOP_SCORES, "top_pos"], axis=1),
            n("GatherElements", ["cand_items", "top_pos"], [contract.TOP_ITEMS], axis=1),
        ]
    nodes += [
        # reason: the history position whose item is most similar (cosine) to each result
        *gather_vectors(contract.TOP_ITEMS, "rec_vec"),
        n("ReduceL2", ["rec_vec", "last_axis"], ["rec_norm"], keepdims=1),
        n("Max", ["rec_norm", "norm_eps"], ["rec_norm_safe"]),
        n("Div", ["rec_vec", "rec_norm_safe"], ["rec_unit"]),
        *gather_vectors(contract.HISTORY_ITEMS, "hist_vec"),
        n("ReduceL2", ["hist_vec", "last_axis"], ["hist_norm"], keepdims=1),
        n("Max", ["hist_norm", "norm_eps"], ["hist_norm_safe"]),
        n("Div", ["hist_vec", "hist_norm_safe"], ["hist_unit"]),
        n("Transpose", ["hist_unit"], ["hist_unit_t"], perm=[0, 2, 1]),
        n("MatMul", ["rec_unit", "hist_unit_t"], ["sims"]),
        n("Equal", [contract.HISTORY_ITEMS, "pad_index"], ["is_pad"]),
        n("Where", ["is_pad", "neg_inf", "zero"], ["pad_penalty"]),
        n("Unsqueeze", ["pad_penalty", "one_axis"], ["pad_penalty3"]),
        n("Add", ["sims", "pad_penalty3"], ["reason_sims"]),
        n("ArgMax", ["reason_sims"], [contract.REASON_POSITIONS], axis=2, keepdims=0),
    ]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info(contract.WEIGHTED_USER_EMBEDDING, f32, ["batch", dim]),
        helper.make_tensor_value_info(contract.HISTORY_ITEMS, i64, ["batch", "history"]),
        helper.make_tensor_value_info(contract.EXCLUDE_ITEMS, i64, ["batch", "exclude"]),
        helper.make_tensor_value_info(contract.LONG_TAIL_WEIGHT, f32, ["batch", 1]),
        helper.make_tensor_value_info(contract.TOP_K, i64, ["batch", 1]),
    ]
    if overlay:
        inputs += [
            helper.make_tensor_value_info(
                contract.EXTRA_ITEM_VECTORS, f32, ["batch", "extra", dim]
            ),
            helper.make_tensor_value_info(contract.EXTRA_POPULARITY, f32, ["batch", "extra"]),
        ]
    if item_filter:
        inputs.append(
            helper.make_tensor_value_info(
                contract.ITEM_ELIGIBLE, TensorProto.BOOL, ["batch", "eligible"]
            )
        )
    graph = helper.make_graph(
        nodes,
        "scorer",
        inputs,
        [
            helper.make_tensor_value_info(contract.TOP_ITEMS, i64, ["batch", "k"]),
            helper.make_tensor_value_info(contract.TOP_SCORES, f32, ["batch", "k"]),
            helper.make_tensor_value_info(contract.REASON_POSITIONS, i64, ["batch", "k"]),
        ],
        inits,
    )
    return _model(graph)


def item_lookup_graph(
    item_table: np.ndarray,
    external_dir: Path | None = None,
    added_item_offset: np.ndarray | None = None,
) -> onnx.ModelProto:
    """ONNX version of `ltrec.models.ItemLookup`: `query_items` [B, L] (a basket, padded with
    `PADDING_INDEX`) -> `query_embedding` [B, D], the mean of the items' vectors, each from the
    trained table or the overlay (SimilarItems' and Audience's first step), an overlay row less
    `added_item_offset` when there is one. L = 1 is the single-item query, whose embedding is
    exactly the item's vector."""
    n_rows, dim = item_table.shape
    rows_nodes, rows_inits = _overlay_rows_nodes(dim, added_item_offset)
    n = helper.make_node
    nodes = [
        *rows_nodes,
        *_overlay_gather(
            "item_table", "extra_rows", contract.QUERY_ITEMS, "query_vectors", vectors=True
        ),  # [B, L, D]
        # the mean over the basket's items, padding left out
        n("Equal", [contract.QUERY_ITEMS, "pad_index"], ["query_is_pad"]),
        n("Not", ["query_is_pad"], ["query_is_item"]),
        n("Cast", ["query_is_item"], ["query_weight"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["query_weight", "last_axis"], ["query_weight_col"]),  # [B, L, 1]
        n("Mul", ["query_vectors", "query_weight_col"], ["query_kept"]),
        n("ReduceSum", ["query_kept", "one_axis"], ["query_sum"], keepdims=0),  # [B, D]
        n("ReduceSum", ["query_weight_col", "one_axis"], ["query_count"], keepdims=0),  # [B, 1]
        n("Max", ["query_count", "one"], ["query_count_safe"]),
        n("Div", ["query_sum", "query_count_safe"], [contract.QUERY_EMBEDDING]),
    ]
    inits = [
        table_initializer(item_table, "item_table", external_dir),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one_axis"),
        numpy_helper.from_array(np.array(contract.PADDING_INDEX, dtype=np.int64), "pad_index"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        *_overlay_inits(n_rows),
        *rows_inits,
    ]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes,
        "item_lookup",
        [
            helper.make_tensor_value_info(contract.QUERY_ITEMS, i64, ["batch", "basket"]),
            helper.make_tensor_value_info(
                contract.EXTRA_ITEM_VECTORS, f32, ["batch", "extra", dim]
            ),
        ],
        [helper.make_tensor_value_info(contract.QUERY_EMBEDDING, f32, ["batch", dim])],
        inits,
    )
    return _model(graph)


def audience_scorer_graph(
    item_table: np.ndarray, external_dir: Path | None = None
) -> onnx.ModelProto:
    """ONNX version of `ltrec.models.AudienceScorer` with the catalogue inside the graph.

    Inputs: `query_embedding` [Q, D] (from item_lookup), `weighted_user_embedding` [U, D] (the
    users' vectors under the request's context), `user_activity` [U], `exclude_items` [1, E]
    (left out of the softmax with the padding row), `top_k` [1], `extra_item_vectors` [M, D].
    Each user's log-normaliser over the whole catalogue (trained rows and overlay, computed as
    max + log-sum-exp of the shifted row) turns the query scores into log p(item | user); plus
    log activity, the log of the user's expected interactions, which top-k ranks and whose
    exponentials sum to the item's. The [U, N+1+M] logits are the cost: the gateway sends the
    users in blocks.
    """
    dim = item_table.shape[1]
    n = helper.make_node
    users = contract.WEIGHTED_USER_EMBEDDING
    nodes = [
        n("Gemm", [users, "item_table"], ["trained_logits"], transB=1),
        n("Gemm", [users, contract.EXTRA_ITEM_VECTORS], ["extra_logits"], transB=1),
        n("Concat", ["trained_logits", "extra_logits"], ["logits"], axis=1),
        # padding and the excluded items leave the softmax: the same columns for every user
        n("Concat", [contract.EXCLUDE_ITEMS, "pad_cell"], ["masked_row"], axis=1),
        n("Shape", [users], ["n_users"], start=0, end=1),
        n("Shape", ["masked_row"], ["n_masked"], start=1, end=2),
        n("Concat", ["n_users", "n_masked"], ["masked_shape"], axis=0),
        n("Expand", ["masked_row", "masked_shape"], ["masked_idx"]),
        n("Expand", ["neg_inf", "masked_shape"], ["masked_val"]),
        n("ScatterElements", ["logits", "masked_idx", "masked_val"], ["catalogue"], axis=1),
        n("ReduceMax", ["catalogue", "one_axis"], ["row_max"], keepdims=1),
        n("Sub", ["catalogue", "row_max"], ["shifted"]),
        n("Exp", ["shifted"], ["shifted_exp"]),
        n("ReduceSum", ["shifted_exp", "one_axis"], ["row_sum"], keepdims=1),
        n("Log", ["row_sum"], ["row_log_sum"]),
        n("Add", ["row_max", "row_log_sum"], ["log_norm_col"]),  # [U, 1]
        n("Transpose", ["log_norm_col"], ["log_norm"], perm=[1, 0]),  # [1, U]
        n("Gemm", [contract.QUERY_EMBEDDING, users], ["query_logits"], transB=1),  # [Q, U]
        n("Sub", ["query_logits", "log_norm"], ["log_p"]),
        n("Log", [contract.USER_ACTIVITY], ["log_activity"]),
        n("Unsqueeze", ["log_activity", "zero_axis"], ["log_activity_row"]),
        n("Add", ["log_p", "log_activity_row"], ["log_expected"]),
        n(
            "TopK",
            ["log_expected", contract.TOP_K],
            ["top_log_expected", contract.AUDIENCE_TOP_USERS],
            axis=1,
        ),
        n("Exp", ["top_log_expected"], [contract.AUDIENCE_TOP_SCORES]),
        n("Exp", ["log_expected"], ["expected"]),
        n(
            "ReduceSum",
            ["expected", "one_axis"],
            [contract.EXPECTED_INTERACTIONS],
            keepdims=0,
        ),
    ]
    inits = [
        table_initializer(item_table, "item_table", external_dir),
        numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), "neg_inf"),
        numpy_helper.from_array(np.array([[contract.PADDING_INDEX]], dtype=np.int64), "pad_cell"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one_axis"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_axis"),
    ]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes,
        "audience_scorer",
        [
            helper.make_tensor_value_info(contract.QUERY_EMBEDDING, f32, ["query", dim]),
            helper.make_tensor_value_info(users, f32, ["users", dim]),
            helper.make_tensor_value_info(contract.USER_ACTIVITY, f32, ["users"]),
            helper.make_tensor_value_info(contract.EXCLUDE_ITEMS, i64, [1, "exclude"]),
            helper.make_tensor_value_info(contract.TOP_K, i64, [1]),
            helper.make_tensor_value_info(contract.EXTRA_ITEM_VECTORS, f32, ["extra", dim]),
        ],
        [
            helper.make_tensor_value_info(contract.AUDIENCE_TOP_USERS, i64, ["query", "k"]),
            helper.make_tensor_value_info(contract.AUDIENCE_TOP_SCORES, f32, ["query", "k"]),
            helper.make_tensor_value_info(contract.EXPECTED_INTERACTIONS, f32, ["query"]),
        ],
        inits,
    )
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ltrec-export",
        ir_version=10,  # onnxruntime 1.31 and the NGC image read IR <= 10
    )
    if not _points_at_external_data(model):  # those are checked where they lie, by `save`
        onnx.checker.check_model(model)
    return model


def _points_at_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_abs_diff(
    path: Path,
    feeds: dict[str, np.ndarray],
    reference: Callable[[], tuple[torch.Tensor, ...]],
) -> list[float]:
    """Run the ONNX file and the torch module on the same inputs; one figure per output."""
    got = session(path).run(None, feeds)
    with torch.no_grad():
        want = reference()
    diffs = []
    for g, w in zip(got, want, strict=True):
        w_np = w.numpy()
        finite = np.isfinite(w_np)
        if not np.array_equal(finite, np.isfinite(g)):
            diffs.append(float("inf"))
            continue
        diffs.append(float(np.max(np.abs(g[finite] - w_np[finite]), initial=0.0)))
    return diffs


def per_row(shared: np.ndarray, batch: int) -> np.ndarray:
    """A batch-shared tensor (the overlay, [M, D] or [M]) as the batching models take it: one
    copy per row."""
    return np.ascontiguousarray(np.broadcast_to(shared, (batch, *shared.shape)))


def overlay_case(rng: np.random.Generator, n_extra: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlay inputs for a parity check: M random vectors and popularity counts."""
    vectors = rng.standard_normal((n_extra, dim)).astype(np.float32)
    popularity = rng.integers(0, 50, size=n_extra).astype(np.float32)
    return vectors, popularity


def scorer_parity(
    path: Path,
    scorer: Scorer,
    dim: int,
    n_items: int,
    rng: np.random.Generator,
    *,
    overlay: bool = False,
    item_filter: bool = False,
) -> dict[str, float]:
    """Scores and order must match; ties aside, the same items in the same order.

    The two rows ask for different k (the graph returns the larger for both): each row's first
    k must be torch's top k. With `overlay`, the worst figure over no overlay (M = 0) and an
    overlay of 3 items that appear in the history and the exclusions; with `item_filter`, each
    of those unfiltered (`item_eligible` [B, 1] of True, broadcast) and under a random filter
    over every item.
    """
    figures: dict[str, float] = {}
    for n_extra in (0, 3) if overlay else (0,):
        extra, extra_pop = overlay_case(rng, n_extra, dim)
        user = rng.standard_normal((2, dim)).astype(np.float32)
        hist = rng.integers(0, n_items + n_extra + 1, size=(2, 6)).astype(np.int64)
        hist[0, :2] = 0
        excl = rng.integers(0, n_items + n_extra + 1, size=(2, 3)).astype(np.int64)
        if n_extra:
            hist[1, -1] = n_items + 1  # an overlay item in the history (reasons read it)
            excl[0, 0] = n_items + n_extra
        weight = np.array([[0.0], [0.7]], dtype=np.float32)
        k = min(10, max(1, n_items + n_extra - 9))
        row_k = [k, max(1, k - 3)]
        feeds = {
            contract.WEIGHTED_USER_EMBEDDING: user,
            contract.HISTORY_ITEMS: hist,
            contract.EXCLUDE_ITEMS: excl,
            contract.LONG_TAIL_WEIGHT: weight,
            contract.TOP_K: np.array(row_k, dtype=np.int64).reshape(-1, 1),
        }
        if overlay:
            feeds[contract.EXTRA_ITEM_VECTORS] = per_row(extra, len(user))
            feeds[contract.EXTRA_POPULARITY] = per_row(extra_pop, len(user))
        masks: list[np.ndarray | None] = [None]
        if item_filter:
            masks = [
                np.ones((2, 1), dtype=np.bool_),
                rng.random((2, n_items + n_extra + 1)) < 0.5,
            ]
        for mask in masks:
            if mask is not None:
                feeds[contract.ITEM_ELIGIBLE] = mask
            items, scores, reasons = session(path).run(
                [contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS], feeds
            )
            for row, row_k_value in enumerate(row_k):
                with torch.no_grad():
                    t_items, t_scores, t_reasons = scorer(
                        torch.from_numpy(user),
                        torch.from_numpy(hist),
                        torch.from_numpy(excl),
                        torch.from_numpy(weight),
                        row_k_value,
                        torch.from_numpy(extra) if overlay else None,
                        torch.from_numpy(extra_pop) if overlay else None,
                        None if mask is None else torch.from_numpy(mask),
                    )
                want_scores = t_scores.numpy()[row]
                got_scores = scores[row, :row_k_value]
                finite = np.isfinite(want_scores)
                case = {
                    # -inf where fewer than k items are eligible: the same slots in both
                    contract.TOP_SCORES: float(
                        np.max(np.abs(got_scores[finite] - want_scores[finite]), initial=0.0)
                        if np.array_equal(finite, np.isfinite(got_scores))
                        else np.inf
                    ),
                    contract.TOP_ITEMS: _share_differing(
                        items[row, :row_k_value][finite], t_items.numpy()[row][finite]
                    ),
                    contract.REASON_POSITIONS: _share_differing(
                        reasons[row, :row_k_value][finite], t_reasons.numpy()[row][finite]
                    ),
                }
                for name, value in case.items():
                    figures[name] = max(figures.get(name, 0.0), value)
    return figures


def _share_differing(got: np.ndarray, want: np.ndarray) -> float:
    """The share of positions that differ (0 for none to compare)."""
    return float(np.mean(got != want)) if got.size else 0.0


def item_lookup_parity(
    path: Path, lookup: ItemLookup, dim: int, n_items: int, rng: np.random.Generator
) -> float:
    """Max abs difference over single-item queries ([B, 1]) and baskets ([B, 4], padded and
    mixing trained and overlay items), each without (M = 0) and with (M = 3) an overlay."""
    worst = 0.0
    for n_extra in (0, 3):
        extra, _ = overlay_case(rng, n_extra, dim)
        single = rng.integers(1, n_items + n_extra + 1, size=(4, 1)).astype(np.int64)
        basket = rng.integers(1, n_items + n_extra + 1, size=(4, 4)).astype(np.int64)
        basket[1, 2:] = contract.PADDING_INDEX  # a basket of two in a batch of four
        basket[2, 1:] = contract.PADDING_INDEX  # a basket of one
        if n_extra:
            single[0, 0] = n_items + n_extra
            basket[0, 1] = n_items + 1  # an added item beside trained ones
            basket[3, :] = n_items + np.arange(1, 5) % n_extra + 1  # added items only
        for query in (single, basket):
            (diff,) = max_abs_diff(
                path,
                {contract.QUERY_ITEMS: query, contract.EXTRA_ITEM_VECTORS: per_row(extra, 4)},
                lambda q=query, e=extra: (lookup(torch.from_numpy(q), torch.from_numpy(e)),),
            )
            worst = max(worst, diff)
    return worst


def audience_parity(
    path: Path, scorer: AudienceScorer, dim: int, n_items: int, rng: np.random.Generator
) -> dict[str, float]:
    """The worst figure over no overlay (M = 0) and 3 overlay items (one queried, one
    excluded): expected interactions and top scores as relative differences (they span
    orders of magnitude), top users as the share of positions that differ."""
    figures: dict[str, float] = {}
    for n_extra in (0, 3):
        extra, _ = overlay_case(rng, n_extra, dim)
        query = rng.standard_normal((3, dim)).astype(np.float32)
        users = rng.standard_normal((7, dim)).astype(np.float32)
        activity = rng.integers(1, 50, size=7).astype(np.float32)
        exclude = rng.integers(1, n_items + 1, size=(1, 2)).astype(np.int64)
        if n_extra:
            exclude[0, 1] = n_items + n_extra
        k = 4
        feeds = {
            contract.QUERY_EMBEDDING: query,
            contract.WEIGHTED_USER_EMBEDDING: users,
            contract.USER_ACTIVITY: activity,
            contract.EXCLUDE_ITEMS: exclude,
            contract.TOP_K: np.array([k], dtype=np.int64),
            contract.EXTRA_ITEM_VECTORS: extra,
        }
        top_users, top_scores, expected = session(path).run(
            [
                contract.AUDIENCE_TOP_USERS,
                contract.AUDIENCE_TOP_SCORES,
                contract.EXPECTED_INTERACTIONS,
            ],
            feeds,
        )
        with torch.no_grad():
            t_users, t_scores, t_expected = scorer(
                torch.from_numpy(query),
                torch.from_numpy(users),
                torch.from_numpy(activity),
                torch.from_numpy(exclude),
                k,
                torch.from_numpy(extra),
            )
        case = {
            contract.EXPECTED_INTERACTIONS: _relative(expected, t_expected.numpy()),
            contract.AUDIENCE_TOP_SCORES: _relative(top_scores, t_scores.numpy()),
            contract.AUDIENCE_TOP_USERS: _share_differing(top_users, t_users.numpy()),
        }
        for name, value in case.items():
            figures[name] = max(figures.get(name, 0.0), value)
    return figures


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30), initial=0.0))
