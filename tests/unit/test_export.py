"""The export: a tiny checkpoint in, a Triton repository out that the gateway and Triton accept.

The repository is exported once per module (the torch.onnx exports are the slow part); tests that
need a second export reuse its ONNX files for the torch towers and rebuild the rest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export_scripts import export as export_module
from export_scripts import onnx_graphs, triton_config
from ltrec.checkpoint import Checkpoint, load_checkpoint
from ltrec.models import ItemLookup, Scorer, UserEncoder
from ltrec_core import contract
from ltrec_core.artifacts import CatalogueFields, content_hash, read_repository_metadata
from server.catalogue import load_model_repository
from server.gen.ltrec.v1 import recommender_pb2
from server.item_filter import eligibility
from tests.support.checkpoints import CFG, N_ITEMS, VOCABULARIES, item_fields, write_checkpoint

TRITON_TYPES = {
    mc.TYPE_INT64: "tensor(int64)",
    mc.TYPE_FP32: "tensor(float)",
    mc.TYPE_BOOL: "tensor(bool)",
}
TOWER_MODELS = (
    contract.USER_ENCODER_MODEL,
    contract.CONTEXT_WEIGHTING_MODEL,
    contract.SCORER_MODEL,
    contract.ITEM_LOOKUP_MODEL,
    contract.AUDIENCE_SCORER_MODEL,
)
ENSEMBLES = (contract.ENSEMBLE_MODEL, contract.SIMILAR_ITEMS_MODEL, contract.AUDIENCE_MODEL)
EXPORTED_MODELS = (*ENSEMBLES, *TOWER_MODELS)


class Exported:
    def __init__(self, checkpoint: Path, ckpt: dict, repo: Path, metadata: dict) -> None:
        self.checkpoint = checkpoint
        self.ckpt = ckpt
        self.repo = repo
        self.metadata = metadata


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    root = tmp_path_factory.mktemp("export")
    checkpoint = root / "checkpoint.pt"
    ckpt = write_checkpoint(checkpoint)
    repo = root / "model_repository"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        metadata = export_module.export(
            checkpoint,
            repo,
            text_encoder=False,
            default_long_tail_weight=0.25,
            similar_items_default_long_tail_weight=0.0125,
            log=lambda _: None,
        )
        yield Exported(checkpoint, ckpt, repo, metadata)


def reuse_tower_exports(mp: pytest.MonkeyPatch, source: Path) -> None:
    """Make further exports copy the module's torch.onnx files instead of re-exporting them."""

    def copier(model: str):
        def copy(*args: object, **_options: object) -> None:
            path = args[-1]
            assert isinstance(path, Path)
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / model / export_module.VERSION / "model.onnx", path)

        return copy

    mp.setattr(onnx_graphs, "export_user_encoder", copier(contract.USER_ENCODER_MODEL))
    mp.setattr(onnx_graphs, "export_context_weighting", copier(contract.CONTEXT_WEIGHTING_MODEL))


def read_config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def session(repo: Path, model: str) -> ort.InferenceSession:
    return onnx_graphs.session(repo / model / export_module.VERSION / "model.onnx")


# --- parity ------------------------------------------------------------------------------------


def test_every_parity_figure_is_within_tolerance(exported: Exported) -> None:
    parity = exported.metadata["parity_max_abs_diff"]
    assert set(parity) == set(TOWER_MODELS)
    assert set(parity[contract.SCORER_MODEL]) == {
        contract.TOP_SCORES,
        contract.TOP_ITEMS,
        contract.REASON_POSITIONS,
    }
    assert set(parity[contract.AUDIENCE_SCORER_MODEL]) == {
        contract.AUDIENCE_TOP_USERS,
        contract.AUDIENCE_TOP_SCORES,
        contract.EXPECTED_INTERACTIONS,
    }
    figures = [v for diffs in parity.values() for v in diffs.values()]
    assert figures and all(math.isfinite(v) and v <= 1e-4 for v in figures), parity


def test_export_fails_when_a_graph_disagrees_with_torch(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reuse_tower_exports(monkeypatch, exported.repo)
    real_graph = onnx_graphs.scorer_graph

    def perturbed(item_table: np.ndarray, popularity: np.ndarray, **options: object):
        return real_graph(item_table + np.float32(0.01), popularity, **options)

    monkeypatch.setattr(onnx_graphs, "scorer_graph", perturbed)
    repo = tmp_path / "repo"
    with pytest.raises(RuntimeError, match=r"disagree with torch: scorer\.top_scores"):
        export_module.export(exported.checkpoint, repo, text_encoder=False, log=lambda _: None)
    assert not (repo / contract.METADATA_FILE).exists()
    assert not (repo / contract.CATALOGUE_FILE).exists()


# --- configs -----------------------------------------------------------------------------------


def test_repository_layout(exported: Exported) -> None:
    models = sorted(p.name for p in exported.repo.iterdir() if p.is_dir())
    assert models == sorted(EXPORTED_MODELS)
    for model in TOWER_MODELS:
        assert (exported.repo / model / export_module.VERSION / "model.onnx").is_file()
    for ensemble in ENSEMBLES:
        ensemble_version = exported.repo / ensemble / export_module.VERSION
        assert ensemble_version.is_dir() and not any(ensemble_version.iterdir())


@pytest.mark.parametrize("model", EXPORTED_MODELS)
def test_config_round_trips_through_text_format(exported: Exported, model: str) -> None:
    text = (exported.repo / model / "config.pbtxt").read_text()
    parsed = text_format.Parse(text, mc.ModelConfig())
    assert text_format.MessageToString(parsed) == text
    assert parsed.name == model
    batched = model in (contract.ENSEMBLE_MODEL, contract.SIMILAR_ITEMS_MODEL)
    assert parsed.max_batch_size == (
        contract.MAX_BATCH_SIZE if batched else triton_config.BATCHED_MODELS.get(model, 0)
    )
    if parsed.max_batch_size and model not in ENSEMBLES:
        # the dynamic batcher, only with fields the native onnxruntime backend reads
        batching = triton_config.DEFAULT_BATCHING
        assert list(parsed.dynamic_batching.preferred_batch_size) == list(
            batching.preferred_batch_sizes
        )
        assert parsed.instance_group[0].count == batching.instances
    if model in ENSEMBLES:
        assert parsed.platform == "ensemble"
    else:
        assert parsed.backend == "onnxruntime"
        assert [g.kind for g in parsed.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
        assert not parsed.optimization.execution_accelerators.gpu_execution_accelerator


def test_exact_scorer_rows_are_bounded_against_the_catalogue() -> None:
    """A batch of the exact scan holds [rows, N+1] score matrices: at a million items the scorer
    takes fewer rows than the ensembles' usual batch, never none."""
    million = 1_000_000
    rows = triton_config.scorer_max_batch_size(million)
    assert 1 <= rows < contract.MAX_BATCH_SIZE
    assert rows * (million + 1) <= triton_config.SCORER_BATCH_SCORES
    assert triton_config.scorer_max_batch_size(N_ITEMS) == contract.MAX_BATCH_SIZE
    assert triton_config.scorer_max_batch_size(100_000_000) == 1
    with pytest.raises(ValueError, match="n_items must be at least 1, got 0"):
        triton_config.scorer_max_batch_size(0)
    scorer = triton_config.onnx_model_config(
        contract.SCORER_MODEL, triton_config.scorer_io(CFG.embedding_dim), max_batch_size=rows
    )
    assert scorer.max_batch_size == rows
    assert all(size <= rows for size in scorer.dynamic_batching.preferred_batch_size)
    with pytest.raises(ValueError, match=r"scorer: max_batch_size must be in \[1, 64\], got 65"):
        triton_config.onnx_model_config(
            contract.SCORER_MODEL, triton_config.scorer_io(CFG.embedding_dim), max_batch_size=65
        )


def test_a_large_catalogue_exports_a_scorer_and_ensembles_of_fewer_rows(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget lowered to 4 rows of the tiny catalogue stands in for a million items: the
    scorer and the two ensembles that end in it take 4 rows (Triton refuses an ensemble larger
    than a step); the steps the gateway also calls directly keep theirs."""
    reuse_tower_exports(monkeypatch, exported.repo)
    monkeypatch.setattr(triton_config, "SCORER_BATCH_SCORES", 4 * (N_ITEMS + 1) + 3)
    repo = tmp_path / "repo"
    export_module.export(exported.checkpoint, repo, text_encoder=False, log=lambda _: None)
    for model in (contract.SCORER_MODEL, contract.ENSEMBLE_MODEL, contract.SIMILAR_ITEMS_MODEL):
        assert read_config(repo, model).max_batch_size == 4, model
    for model in (contract.USER_ENCODER_MODEL, contract.ITEM_LOOKUP_MODEL):
        assert read_config(repo, model).max_batch_size == contract.MAX_DIRECT_ROWS
    # The gateway reads the ensembles' rows from the metadata: it never coalesces more.
    assert read_repository_metadata(repo / contract.METADATA_FILE).max_batch_rows == 4
    assert exported.metadata["max_batch_rows"] == contract.MAX_BATCH_SIZE
    assert (
        list(read_config(repo, contract.SCORER_MODEL).dynamic_batching.preferred_batch_size) == []
    )


def test_an_ensemble_never_takes_more_rows_than_a_step() -> None:
    with pytest.raises(ValueError, match=r"steps \['scorer'\] take fewer than 65 rows"):
        triton_config.ensemble_config(CFG.embedding_dim, 65)


def test_a_catalogue_past_64_mib_is_mapped_from_external_data() -> None:
    """onnxruntime copies an embedded table out of the protobuf (twice the table while a model
    loads, in each of the models that hold it) but maps external data from its file."""
    dim = 64
    assert not onnx_graphs.needs_external_data(np.empty((100_000, dim), np.float32))
    assert onnx_graphs.needs_external_data(np.empty((1_000_001, dim), np.float32))


def test_a_catalogue_table_goes_straight_to_external_data_and_answers_as_embedded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the threshold a graph's catalogue is written to the data file and only pointed at
    (no protobuf copy: past 2 GiB none can hold it); `save` appends the graph's other large
    tensors (the scorer's popularity row) to the same file; onnxruntime answers as with the
    table embedded, for the item lookup, the scorer and the audience scorer."""
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_BYTES", 1024)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((400, 8)).astype(np.float32)  # 12.5 KiB
    table[0] = 0.0
    popularity = rng.integers(0, 50, 400)
    builders = {
        "item_lookup": lambda d: onnx_graphs.item_lookup_graph(table, d),
        "scorer": lambda d: onnx_graphs.scorer_graph(
            table, popularity, overlay=True, item_filter=True, external_dir=d
        ),
        "audience": lambda d: onnx_graphs.audience_scorer_graph(table, d),
    }
    feeds = {
        "item_lookup": {
            contract.QUERY_ITEMS: np.array([[3, 7, 0]], np.int64),
            contract.EXTRA_ITEM_VECTORS: np.zeros((1, 0, 8), np.float32),
        },
        "scorer": {
            contract.WEIGHTED_USER_EMBEDDING: rng.standard_normal((2, 8)).astype(np.float32),
            contract.HISTORY_ITEMS: np.array([[5, 0], [9, 11]], np.int64),
            contract.EXCLUDE_ITEMS: np.zeros((2, 1), np.int64),
            contract.LONG_TAIL_WEIGHT: np.array([[0.0], [0.3]], np.float32),
            contract.TOP_K: np.array([[5], [5]], np.int64),
            contract.EXTRA_ITEM_VECTORS: np.zeros((2, 0, 8), np.float32),
            contract.EXTRA_POPULARITY: np.zeros((2, 0), np.float32),
            contract.ITEM_ELIGIBLE: np.ones((2, 1), bool),
        },
        "audience": {
            contract.QUERY_EMBEDDING: rng.standard_normal((2, 8)).astype(np.float32),
            contract.WEIGHTED_USER_EMBEDDING: rng.standard_normal((6, 8)).astype(np.float32),
            contract.USER_ACTIVITY: np.ones(6, np.float32),
            contract.EXCLUDE_ITEMS: np.zeros((1, 1), np.int64),
            contract.TOP_K: np.array([3], np.int64),
            contract.EXTRA_ITEM_VECTORS: np.zeros((0, 8), np.float32),
        },
    }
    for name, build in builders.items():
        embedded = ort.InferenceSession(build(None).SerializeToString())
        path = tmp_path / name / "model.onnx"
        graph = build(path.parent)
        stored = [t for t in graph.graph.initializer if t.name == "item_table"]
        assert stored[0].data_location == onnx.TensorProto.EXTERNAL
        assert not stored[0].HasField("raw_data")
        onnx_graphs.save(graph, path, external=True)
        data = path.parent / onnx_graphs.EXTERNAL_DATA_FILE
        assert data.stat().st_size >= table.nbytes
        assert path.stat().st_size < table.nbytes  # the graph only points at it
        mapped = ort.InferenceSession(str(path))
        for want, got in zip(
            embedded.run(None, feeds[name]), mapped.run(None, feeds[name]), strict=True
        ):
            np.testing.assert_array_equal(want, got)


ENSEMBLE_WIRING = {
    contract.ENSEMBLE_MODEL: (
        {
            contract.HISTORY_ITEMS,
            contract.HISTORY_EVENT_TYPES,
            contract.CONTEXT,
            contract.EXCLUDE_ITEMS,
            contract.LONG_TAIL_WEIGHT,
            contract.TOP_K,
            contract.EXTRA_ITEM_VECTORS,
            contract.EXTRA_POPULARITY,
            contract.ITEM_ELIGIBLE,
        },
        [contract.USER_ENCODER_MODEL, contract.CONTEXT_WEIGHTING_MODEL, contract.SCORER_MODEL],
    ),
    contract.SIMILAR_ITEMS_MODEL: (
        {
            contract.QUERY_ITEMS,
            contract.EXCLUDE_ITEMS,
            contract.LONG_TAIL_WEIGHT,
            contract.TOP_K,
            contract.EXTRA_ITEM_VECTORS,
            contract.EXTRA_POPULARITY,
            contract.ITEM_ELIGIBLE,
        },
        [contract.ITEM_LOOKUP_MODEL, contract.SCORER_MODEL],
    ),
    contract.AUDIENCE_MODEL: (
        {
            contract.QUERY_ITEMS,
            contract.AUDIENCE_USERS,
            contract.CONTEXT,
            contract.USER_ACTIVITY,
            contract.EXCLUDE_ITEMS,
            contract.TOP_K,
            contract.EXTRA_ITEM_VECTORS,
            contract.QUERY_EXTRA_ITEM_VECTORS,
        },
        [
            contract.ITEM_LOOKUP_MODEL,
            contract.CONTEXT_WEIGHTING_MODEL,
            contract.AUDIENCE_SCORER_MODEL,
        ],
    ),
}
ENSEMBLE_OUTPUTS = {
    contract.ENSEMBLE_MODEL: {contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS},
    contract.SIMILAR_ITEMS_MODEL: {
        contract.TOP_ITEMS,
        contract.TOP_SCORES,
        contract.REASON_POSITIONS,
    },
    contract.AUDIENCE_MODEL: {
        contract.AUDIENCE_TOP_USERS,
        contract.AUDIENCE_TOP_SCORES,
        contract.EXPECTED_INTERACTIONS,
    },
}


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_steps_are_wired_to_existing_models_in_order(
    exported: Exported, name: str
) -> None:
    ensemble = read_config(exported.repo, name)
    available = {i.name for i in ensemble.input}
    want_inputs, want_steps = ENSEMBLE_WIRING[name]
    assert available == want_inputs
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == want_steps
    for step in steps:
        model = read_config(exported.repo, step.model_name)
        # Keys are the step model's own tensor names, values the ensemble's tensors.
        assert set(step.input_map) == {i.name for i in model.input}
        assert set(step.output_map) == {o.name for o in model.output}
        for ensemble_tensor in step.input_map.values():
            assert ensemble_tensor in available, (step.model_name, ensemble_tensor)
        available |= set(step.output_map.values())
    assert {o.name for o in ensemble.output} <= available
    assert {o.name for o in ensemble.output} == ENSEMBLE_OUTPUTS[name]
    if name == contract.SIMILAR_ITEMS_MODEL:  # the query item is the scorer's "history"
        scorer_step = steps[-1]
        assert scorer_step.input_map[contract.HISTORY_ITEMS] == contract.QUERY_ITEMS
        assert scorer_step.input_map[contract.WEIGHTED_USER_EMBEDDING] == contract.QUERY_EMBEDDING
    if name == contract.AUDIENCE_MODEL:  # the users, not a history, are context-weighted
        weighting = steps[1]
        assert weighting.input_map[contract.USER_EMBEDDING] == contract.AUDIENCE_USERS


@pytest.mark.parametrize("model", TOWER_MODELS)
def test_onnx_signature_matches_config(exported: Exported, model: str) -> None:
    cfg = read_config(exported.repo, model)
    sess = session(exported.repo, model)

    def signature(tensors) -> dict[str, tuple[str, int]]:
        return {t.name: (t.type, len(t.shape)) for t in tensors}

    batch = [-1] if cfg.max_batch_size > 0 else []  # Triton's own batch dimension

    def declared(tensors) -> dict[str, tuple[str, int]]:
        return {t.name: (TRITON_TYPES[t.data_type], len(batch) + len(t.dims)) for t in tensors}

    assert signature(sess.get_inputs()) == declared(cfg.input)
    assert signature(sess.get_outputs()) == declared(cfg.output)
    # Fixed sizes in the config are fixed in the graph; -1 is a symbolic (dynamic) dimension.
    onnx_dims = {t.name: t.shape for t in [*sess.get_inputs(), *sess.get_outputs()]}
    for t in [*cfg.input, *cfg.output]:
        for want, got in zip([*batch, *t.dims], onnx_dims[t.name], strict=True):
            if want == -1:
                assert not isinstance(got, int), (t.name, onnx_dims[t.name])
            else:
                assert got == want, (t.name, onnx_dims[t.name])


def test_tensorrt_configs_run_on_gpu_with_the_tensorrt_accelerator(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reuse_tower_exports(monkeypatch, exported.repo)
    repo = tmp_path / "repo"
    metadata = export_module.export(
        exported.checkpoint, repo, tensorrt=True, text_encoder=False, log=lambda _: None
    )
    assert metadata["tensorrt"] is True and exported.metadata["tensorrt"] is False
    for model in TOWER_MODELS:
        cfg = read_config(repo, model)
        assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accelerators] == ["tensorrt"]
        assert accelerators[0].parameters["precision_mode"] == "FP16"
        assert text_format.MessageToString(cfg) == (repo / model / "config.pbtxt").read_text()
    # The same tensors either way: only placement changes.
    for model in EXPORTED_MODELS:
        gpu, cpu = read_config(repo, model), read_config(exported.repo, model)
        assert gpu.input == cpu.input and gpu.output == cpu.output

    direct = triton_config.onnx_model_config(
        contract.SCORER_MODEL, triton_config.scorer_io(CFG.embedding_dim), tensorrt=True
    )
    assert direct.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert direct.optimization.execution_accelerators.gpu_execution_accelerator[0].name == (
        "tensorrt"
    )


def test_the_batching_option_sets_every_batching_model_and_only_those(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `benchmarks/batching_sweep.py` exports per setting."""
    reuse_tower_exports(monkeypatch, exported.repo)
    wide = triton_config.Batching((4, 8, 16, 32, 64, 128), 500, 2)
    off = triton_config.Batching((), dynamic=False, instances=3)
    for name, batching in (("wide", wide), ("off", off)):
        repo = tmp_path / name
        export_module.export(
            exported.checkpoint, repo, text_encoder=False, batching=batching, log=lambda _: None
        )
        for model in EXPORTED_MODELS:
            cfg = read_config(repo, model)
            if model not in triton_config.BATCHED_MODELS:  # ensembles, the audience scorer
                assert not cfg.HasField("dynamic_batching"), model
                assert [g.count for g in cfg.instance_group] == ([] if model in ENSEMBLES else [1])
                continue
            assert cfg.instance_group[0].count == batching.instances
            if batching is off:
                assert not cfg.HasField("dynamic_batching"), model
                continue
            # sizes above the model's largest batch are left out (the scorer takes 64)
            assert list(cfg.dynamic_batching.preferred_batch_size) == [
                size for size in wide.preferred_batch_sizes if size <= cfg.max_batch_size
            ]
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 500


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preferred_batch_sizes": (16, 8)}, "preferred_batch_sizes must be ascending"),
        ({"preferred_batch_sizes": (0, 8)}, "preferred_batch_sizes must be ascending"),
        ({"max_queue_delay_microseconds": -1}, "max_queue_delay_microseconds must be >= 0"),
        ({"instances": 0}, "instances must be >= 1, got 0"),
    ],
)
def test_bad_batching_settings_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        triton_config.Batching(**kwargs)


# --- the chained graphs against torch ----------------------------------------------------------


def pad_left(rows: list[list[int]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([[0] * (width - len(r)) + r for r in rows], dtype=np.int64)


def run_chain(
    repo: Path,
    hist: np.ndarray,
    types: np.ndarray,
    context: np.ndarray,
    exclude: np.ndarray,
    long_tail: np.ndarray,
    k: int,
    extra: np.ndarray,
    extra_pop: np.ndarray,
    eligible: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """The recommend ensemble's three graphs chained with onnxruntime (no filter: `eligible`
    [B, 1] of True, as the gateway sends it)."""
    batch = hist.shape[0]
    if eligible is None:
        eligible = np.ones((batch, 1), dtype=np.bool_)
    (user,) = session(repo, contract.USER_ENCODER_MODEL).run(
        None,
        {
            contract.HISTORY_ITEMS: hist,
            contract.HISTORY_EVENT_TYPES: types,
            contract.EXTRA_ITEM_VECTORS: onnx_graphs.per_row(extra, batch),
        },
    )
    (weighted,) = session(repo, contract.CONTEXT_WEIGHTING_MODEL).run(
        None, {contract.USER_EMBEDDING: user, contract.CONTEXT: context}
    )
    items, scores, reasons = session(repo, contract.SCORER_MODEL).run(
        [contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS],
        {
            contract.WEIGHTED_USER_EMBEDDING: weighted,
            contract.HISTORY_ITEMS: hist,
            contract.EXCLUDE_ITEMS: exclude,
            contract.LONG_TAIL_WEIGHT: long_tail,
            contract.TOP_K: np.full((batch, 1), k, dtype=np.int64),
            contract.EXTRA_ITEM_VECTORS: onnx_graphs.per_row(extra, batch),
            contract.EXTRA_POPULARITY: onnx_graphs.per_row(extra_pop, batch),
            contract.ITEM_ELIGIBLE: eligible,
        },
    )
    return user, weighted, items, scores, reasons


@pytest.mark.parametrize(
    ("histories", "weight", "n_extra"),
    [
        ([[7]], 0.0, 0),
        ([[3, 9, 27, 1, 40]], 0.8, 0),
        ([list(range(5, 5 + CFG.max_history))], 0.3, 0),
        ([[2, 4, 6], [11, 13, 17, 19, 23, 29, 31]], 0.5, 0),  # batch 2, left-padded
        # items added after training (indices N+1..N+M) in the history and the exclusions
        ([[3, N_ITEMS + 1, 9, N_ITEMS + 3]], 0.8, 3),
        ([[N_ITEMS + 2], [11, 13, N_ITEMS + 1, 19]], 0.5, 2),
    ],
)
def test_chained_onnx_models_recommend_what_torch_does(
    exported: Exported, histories: list[list[int]], weight: float, n_extra: int
) -> None:
    hist = pad_left(histories)
    rng = np.random.default_rng(len(histories[-1]))
    types = np.where(hist == 0, 0, rng.integers(1, len(contract.EVENT_TYPES) + 1, hist.shape))
    types = types.astype(np.int64)
    batch = hist.shape[0]
    context = np.tile(np.array([[14, 3, 2, 1]], dtype=np.int64), (batch, 1))
    excluded = [8, 12] + ([N_ITEMS + n_extra] if n_extra else [])
    exclude = np.tile(np.array([excluded], dtype=np.int64), (batch, 1))
    long_tail = np.full((batch, 1), weight, dtype=np.float32)
    extra = rng.standard_normal((n_extra, CFG.embedding_dim)).astype(np.float32)
    extra_pop = rng.integers(0, 20, n_extra).astype(np.float32)
    k = 10

    user, weighted, items, scores, reasons = run_chain(
        exported.repo, hist, types, context, exclude, long_tail, k, extra, extra_pop
    )

    model, ckpt = load_checkpoint(exported.checkpoint)
    with torch.no_grad():
        table = model.item_table()
        t_extra = torch.from_numpy(extra)
        t_user = UserEncoder(table, model.user_tower).eval()(
            torch.from_numpy(hist), torch.from_numpy(types), t_extra
        )
        t_weighted = model.context_weighting(t_user, torch.from_numpy(context))
        t_items, t_scores, t_reasons = Scorer(table, torch.from_numpy(ckpt["exposure"]))(
            t_weighted,
            torch.from_numpy(hist),
            torch.from_numpy(exclude),
            torch.from_numpy(long_tail),
            k,
            t_extra,
            torch.from_numpy(extra_pop),
        )
    np.testing.assert_allclose(user, t_user.numpy(), atol=1e-4, rtol=0)
    assert items.shape == (batch, k)
    assert items.tolist() == t_items.tolist()
    np.testing.assert_allclose(scores, t_scores.numpy(), atol=1e-4, rtol=0)
    assert reasons.tolist() == t_reasons.tolist()
    for row, history in enumerate(histories):
        assert not set(items[row].tolist()) & {0, *excluded, *history}
        assert all(0 < i <= N_ITEMS + n_extra for i in items[row].tolist())
        # The reason position points at a real (non-padding) history item.
        assert all(hist[row, p] != 0 for p in reasons[row])


def test_a_new_item_is_recommended_and_has_similar_items_through_onnx(exported: Exported) -> None:
    """An item that was never trained on, given only as an overlay vector, is ranked by the
    graphs like any other: first when it is closest to the user, and its neighbours (item
    lookup -> scorer, as the similar_items ensemble) are the torch scorer's for its vector."""
    repo, dim = exported.repo, CFG.embedding_dim
    hist = np.array([[3, 9, 27]], dtype=np.int64)
    types = np.ones_like(hist)
    context = np.array([[14, 3, 2, 1]], dtype=np.int64)
    no_extra = np.zeros((0, dim), dtype=np.float32)
    none = np.zeros((1, 1), dtype=np.int64)
    weight = np.array([[0.5]], dtype=np.float32)
    _, weighted, before, _, _ = run_chain(
        repo, hist, types, context, none, weight, 5, no_extra, np.zeros(0, np.float32)
    )
    assert N_ITEMS + 1 not in before[0]
    # A new item pointing where the user points, far out: it must come first.
    new = 10 * weighted / np.linalg.norm(weighted)
    other = -new  # and one pointing away: never in the top 5
    extra = np.concatenate([other, new]).astype(np.float32)
    _, _, items, scores, reasons = run_chain(
        repo, hist, types, context, none, weight, 5, extra, np.zeros(2, np.float32)
    )
    assert items[0, 0] == N_ITEMS + 2 and N_ITEMS + 1 not in items[0]
    assert items[0, 1:].tolist() == before[0, :4].tolist()  # the rest shift down by one

    (query,) = session(repo, contract.ITEM_LOOKUP_MODEL).run(
        None,
        {
            contract.QUERY_ITEMS: np.array([[N_ITEMS + 2]]),
            contract.EXTRA_ITEM_VECTORS: onnx_graphs.per_row(extra, 1),
        },
    )
    np.testing.assert_allclose(query, new, atol=1e-6)
    feeds = {
        contract.WEIGHTED_USER_EMBEDDING: query,
        contract.HISTORY_ITEMS: np.array([[N_ITEMS + 2]]),
        contract.EXCLUDE_ITEMS: np.array([[5]]),
        contract.LONG_TAIL_WEIGHT: weight,
        contract.TOP_K: np.array([[6]], dtype=np.int64),
        contract.EXTRA_ITEM_VECTORS: onnx_graphs.per_row(extra, 1),
        contract.EXTRA_POPULARITY: np.zeros((1, 2), np.float32),
        contract.ITEM_ELIGIBLE: np.ones((1, 1), dtype=np.bool_),
    }
    similar, similar_scores, _ = session(repo, contract.SCORER_MODEL).run(None, feeds)
    model, ckpt = load_checkpoint(exported.checkpoint)
    with torch.no_grad():
        table = model.item_table()
        t_query = ItemLookup(table)(torch.tensor([[N_ITEMS + 2]]), torch.from_numpy(extra))
        t_items, t_scores, _ = Scorer(table, torch.from_numpy(ckpt["exposure"]))(
            t_query,
            torch.tensor([[N_ITEMS + 2]]),
            torch.tensor([[5]]),
            torch.from_numpy(weight),
            6,
            torch.from_numpy(extra),
            torch.zeros(2),
        )
    assert similar.tolist() == t_items.tolist()
    np.testing.assert_allclose(similar_scores, t_scores.numpy(), atol=1e-4, rtol=0)
    assert not {N_ITEMS + 2, 5, 0} & set(similar[0].tolist())


def scorer_run(
    scorer: ort.InferenceSession, user: np.ndarray, k: int, eligible: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The scorer alone for one user (history: item 7; exclusions: item 8; an overlay of 2)."""
    rng = np.random.default_rng(1)
    items, scores, _ = scorer.run(
        None,
        {
            contract.WEIGHTED_USER_EMBEDDING: user,
            contract.HISTORY_ITEMS: np.array([[7]]),
            contract.EXCLUDE_ITEMS: np.array([[8]]),
            contract.LONG_TAIL_WEIGHT: np.array([[0.3]], dtype=np.float32),
            contract.TOP_K: np.array([[k]], dtype=np.int64),
            contract.EXTRA_ITEM_VECTORS: rng.standard_normal((1, 2, CFG.embedding_dim)).astype(
                np.float32
            ),
            contract.EXTRA_POPULARITY: np.array([[3.0, 0.0]], dtype=np.float32),
            contract.ITEM_ELIGIBLE: eligible,
        },
    )
    return items[0], scores[0]


@pytest.mark.parametrize("scan", ["exported fp32", "int8"])
def test_a_filter_returns_k_items_in_the_unfiltered_order(exported: Exported, scan: str) -> None:
    """The mask is applied before top-k: k items whenever k pass, each with its unfiltered
    score, in the unfiltered order; fewer (the rest -inf) only when fewer pass."""
    if scan == "int8":
        model, ckpt = load_checkpoint(exported.checkpoint)
        with torch.no_grad():
            table = model.item_table().numpy()
        graph = onnx_graphs.scorer_graph(
            table, np.asarray(ckpt["exposure"]), scan="int8", overlay=True, item_filter=True
        )
        scorer = ort.InferenceSession(graph.SerializeToString())
    else:
        scorer = session(exported.repo, contract.SCORER_MODEL)
    rows = N_ITEMS + 2 + 1  # the trained items, the overlay of 2, padding
    every = np.ones((1, 1), dtype=np.bool_)
    rng = np.random.default_rng(0)
    for case in range(5):
        user = rng.standard_normal((1, CFG.embedding_dim)).astype(np.float32)
        ranking, ranking_scores = scorer_run(scorer, user, rows - 3, every)  # all but 0, 7, 8
        assert sorted(ranking.tolist()) == sorted(set(range(1, rows)) - {7, 8})
        eligible = rng.random(rows) < 0.3
        eligible[[N_ITEMS + 2, 7]] = True  # an overlay item; the history stays out anyway
        passing = [i for i in ranking.tolist() if eligible[i]]
        k = 6
        assert len(passing) >= k
        # What a post-filter of the unfiltered top k would have kept: usually fewer than k.
        short = [i for i in ranking[:k].tolist() if eligible[i]]
        items, scores = scorer_run(scorer, user, k, eligible.reshape(1, -1))
        assert items.tolist() == passing[:k], (case, short)
        where = {item: n for n, item in enumerate(ranking.tolist())}
        np.testing.assert_allclose(
            scores, ranking_scores[[where[i] for i in passing[:k]]], rtol=0, atol=1e-6
        )
    # Fewer pass than k: those, then -inf padding (which the gateway drops).
    few = np.zeros((1, rows), dtype=np.bool_)
    few[0, [3, 7, N_ITEMS + 1]] = True  # 7 is the history: never returned
    items, scores = scorer_run(scorer, user, 6, few)
    assert set(items[np.isfinite(scores)].tolist()) == {3, N_ITEMS + 1}
    assert np.isneginf(scores[2:]).all()


def test_catalogue_fields_of_a_checkpoint_that_predates_them(
    exported: Exported, tmp_path: Path
) -> None:
    """Stored: as stored. Not stored: read from the training data if it is still there with the
    same items (prices as training's terciles), else empty, and the log says so."""
    from ltrec.checkpoint import read_checkpoint
    from ltrec.data import write_dataset

    ckpt = read_checkpoint(exported.checkpoint)
    stored = export_module.catalogue_fields(ckpt, log=lambda _: None)
    assert stored.brands == [item_fields(i)[1] for i in range(1, N_ITEMS + 1)]

    ckpt.metadata.item_fields = None
    items = pd.DataFrame(
        {
            "item_id": ckpt.item_ids,
            "title": ckpt.titles,
            "category": ["Books|Crime"] * (N_ITEMS - 1) + [None],
            "brand": ["Acme"] * N_ITEMS,
            "price": [float(i) for i in range(N_ITEMS)],
        }
    )
    events = pd.DataFrame(
        {
            "user_id": ["u"] * 3,
            "item_id": ckpt.item_ids[:3],
            "timestamp": [1, 2, 3],
            "event_type": "view",
        }
    )
    write_dataset(items, events, tmp_path / "data", fmt="csv")
    ckpt.summary["data"] = {"dir": str(tmp_path / "data")}
    lines: list[str] = []
    fields = export_module.catalogue_fields(ckpt, log=lines.append)
    assert fields.categories == ["Books|Crime"] * (N_ITEMS - 1) + [""]
    assert fields.brands == ["Acme"] * N_ITEMS
    assert fields.price_buckets[0] == "budget" and fields.price_buckets[-1] == "premium"
    assert lines == [
        f"catalogue fields: read from {tmp_path / 'data'} (the checkpoint predates storing them)"
    ]

    lines.clear()
    ckpt.summary["data"] = {"dir": str(tmp_path / "gone")}
    fields = export_module.catalogue_fields(ckpt, log=lines.append)
    assert fields == CatalogueFields.empty(N_ITEMS)
    (line,) = lines
    assert line.startswith("warning: catalogue fields (category, brand, price bucket) unknown")
    assert str(tmp_path / "gone") in line


# --- catalogue and metadata --------------------------------------------------------------------


def test_catalogue_csv(exported: Exported) -> None:
    path = exported.repo / contract.CATALOGUE_FILE
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert path.read_text(encoding="utf-8").splitlines()[0] == (
        "index,item_id,title,popularity,long_tail,category,brand,price_bucket"
    )
    body = rows[1:]
    assert len(body) == N_ITEMS
    assert [int(r[0]) for r in body] == list(range(1, N_ITEMS + 1))
    assert [r[2] for r in body] == exported.ckpt["titles"]
    assert body[0][2] == "Heat, The (1995)" and body[3][2] == "Two\nlines"
    # The count the long-tail term penalises: the model's exposure of each item, not popularity.
    assert [int(r[3]) for r in body] == exported.ckpt["exposure"][1:].tolist()
    assert exported.ckpt["exposure"][1:].tolist() != exported.ckpt["popularity"][1:].tolist()
    assert [r[4] == "1" for r in body] == exported.ckpt["long_tail"][1:].tolist()
    # ceil(20% of 40) = 8 head items.
    assert sum(r[4] == "0" for r in body) == 8
    # The fields the checkpoint stored, as the gateway's filters read them.
    assert [tuple(r[5:]) for r in body] == [item_fields(i) for i in range(1, N_ITEMS + 1)]


def test_a_checkpoint_from_before_exposure_penalises_training_popularity(tmp_path: Path) -> None:
    """Without stored exposure the term's count is training popularity, as it was served then:
    in the catalogue file and in the scorer's graph."""
    raw = write_checkpoint(tmp_path / "checkpoint.pt")
    del raw["exposure"]
    ckpt = Checkpoint.from_dict(raw)
    assert ckpt.exposure is None and ckpt.long_tail_counts is ckpt.popularity
    path = tmp_path / contract.CATALOGUE_FILE
    export_module.write_catalogue(path, ckpt, export_module.catalogue_fields(ckpt))
    with path.open(encoding="utf-8", newline="") as f:
        body = list(csv.reader(f))[1:]
    assert [int(r[3]) for r in body] == raw["popularity"][1:].tolist()
    stored = Checkpoint.from_dict(write_checkpoint(tmp_path / "other.pt"))
    assert stored.long_tail_counts is stored.exposure
    assert Checkpoint.from_dict(stored.to_dict()).exposure.tolist() == stored.exposure.tolist()


def test_gateway_loads_the_exported_repository(exported: Exported) -> None:
    metadata, catalogue = load_model_repository(exported.repo)
    ckpt = exported.ckpt
    assert metadata.model_version == exported.metadata["model_version"]
    assert metadata.max_history == CFG.max_history
    assert metadata.event_types == contract.EVENT_TYPES
    assert metadata.device_buckets == {"desktop": 1, "mobile": 2}
    assert metadata.region_buckets == {"eu": 1, "us": 2}
    # Each method's default, as the export wrote it.
    assert exported.metadata[contract.SIMILAR_ITEMS_DEFAULT_WEIGHT_KEY] == 0.0125
    assert metadata.default_long_tail_weight == 0.25
    assert metadata.similar_items_default_long_tail_weight == 0.0125
    assert metadata.basket_lookup  # SimilarItems' basket mode: the item lookup pools baskets
    assert catalogue.size == N_ITEMS
    assert catalogue.item_ids[1:] == ckpt["item_ids"]
    assert catalogue.titles[1:] == ckpt["titles"]
    assert catalogue.index_of["item-3"] == 3
    assert catalogue.titles[2] == 'Say "Hi", Bob'
    assert catalogue.popularity.tolist() == ckpt["exposure"].tolist()
    assert catalogue.long_tail.tolist() == ckpt["long_tail"].tolist()
    # The fields the filters compare, from the catalogue file: "books|fiction" is a prefix of
    # two categories; "acme" a brand.
    passes = eligibility(
        recommender_pb2.ItemFilter(categories=["Books | fiction"], brands=["ACME"]), catalogue
    )
    want = [
        i
        for i in range(1, N_ITEMS + 1)
        if item_fields(i)[0].startswith("Books|Fiction") and item_fields(i)[1] == "Acme"
    ]
    assert want and np.flatnonzero(passes[0]).tolist() == want


def test_metadata_records_version_and_file_hashes(exported: Exported) -> None:
    repo = exported.repo
    on_disk = json.loads((repo / contract.METADATA_FILE).read_text())
    assert on_disk == exported.metadata
    assert isinstance(on_disk["model_version"], str) and on_disk["model_version"]
    ckpt_hash = hashlib.sha256(exported.checkpoint.read_bytes()).hexdigest()
    assert on_disk["checkpoint"]["sha256"] == ckpt_hash
    assert on_disk["model_version"].endswith(ckpt_hash[:8])
    assert on_disk["n_items"] == N_ITEMS and on_disk["embedding_dim"] == CFG.embedding_dim
    assert on_disk["vocabularies"] == VOCABULARIES

    files = on_disk["files"]
    every_file = {
        str(p.relative_to(repo))
        for p in repo.rglob("*")
        if p.is_file() and p.name != contract.METADATA_FILE
    }
    assert set(files) == every_file
    assert contract.CATALOGUE_FILE in files
    for model in TOWER_MODELS:
        assert f"{model}/{export_module.VERSION}/model.onnx" in files
    for name, entry in files.items():
        data = (repo / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert entry["bytes"] == len(data), name


def test_ensemble_config_carries_the_repository_identity(exported: Exported) -> None:
    """What Triton's model configuration endpoint gives the gateway: the version and a hash
    of every file but the metadata and the config carrying it, recomputed here from the disk."""
    repo = exported.repo
    parameters = read_config(repo, contract.ENSEMBLE_MODEL).parameters
    assert (
        parameters[contract.MODEL_VERSION_PARAMETER].string_value
        == (exported.metadata["model_version"])
    )
    digest = hashlib.sha256()
    for path in sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()):
        if path in (contract.METADATA_FILE, f"{contract.ENSEMBLE_MODEL}/config.pbtxt"):
            continue
        digest.update(
            f"{path}\0{hashlib.sha256((repo / path).read_bytes()).hexdigest()}\n".encode()
        )
    assert parameters[contract.CONTENT_HASH_PARAMETER].string_value == digest.hexdigest()
    assert exported.metadata["content_hash"] == digest.hexdigest()
    # Any served file changed changes the hash.
    changed = dict(exported.metadata["files"])
    changed[contract.CATALOGUE_FILE] = {"sha256": "0" * 64, "bytes": 1}
    assert content_hash(changed) != exported.metadata["content_hash"]


@pytest.mark.parametrize(
    "flag", ["--default-long-tail-weight", "--default-similar-long-tail-weight"]
)
@pytest.mark.parametrize("weight", ["-0.1", "2.5"])
def test_default_long_tail_weight_out_of_bounds_is_refused(
    flag: str, weight: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export_scripts.export import main as export_main

    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")  # never read: the bound is checked first
    out = tmp_path / "repo"
    with pytest.raises(SystemExit) as exc:
        export_main(
            [
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(out),
                flag,
                weight,
            ]
        )
    assert exc.value.code == 2
    assert f"{flag} must be in [0, 2], got {float(weight):g}" in capsys.readouterr().err
    assert not out.exists()


RECOMMEND_TUNED = {"long_tail_weight": {"chosen": 0.25}}
BOTH_TUNED = {**RECOMMEND_TUNED, "similar_items_long_tail_weight": {"chosen": 0.0125}}


@pytest.mark.parametrize(
    ("summary", "flags", "expected"),
    [
        (BOTH_TUNED, [], (0.25, 0.0125)),
        # A checkpoint from before SimilarItems had its own: 0, never Recommend's.
        (RECOMMEND_TUNED, [], (0.25, 0.0)),
        (BOTH_TUNED, ["--default-similar-long-tail-weight", "0.5"], (0.25, 0.5)),
        (BOTH_TUNED, ["--default-long-tail-weight", "1"], (1.0, 0.0125)),
    ],
)
def test_export_command_gives_each_method_its_default(
    summary: dict,
    flags: list[str],
    expected: tuple[float, float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    ckpt = write_checkpoint(checkpoint)
    ckpt["summary"].update(summary)
    torch.save(ckpt, checkpoint)
    options: dict = {}

    def export(_: Path, __: Path, **given: object) -> dict:
        options.update(given)
        return {"model_version": "v", "files": {}, "export_seconds": 0.0}

    monkeypatch.setattr(export_module, "export", export)
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "repo"), *flags]
    assert export_module.main(argv) == 0
    got = (options["default_long_tail_weight"], options["similar_items_default_long_tail_weight"])
    assert got == expected


def test_a_tuned_default_out_of_bounds_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    ckpt = write_checkpoint(checkpoint)
    ckpt["summary"].update({**RECOMMEND_TUNED, "similar_items_long_tail_weight": {"chosen": 3.0}})
    torch.save(ckpt, checkpoint)
    with pytest.raises(SystemExit) as exc:
        export_module.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "repo")])
    assert exc.value.code == 2
    assert (
        "the checkpoint's SimilarItems long-tail weight must be in [0, 2], got 3; give one with "
        "--default-similar-long-tail-weight" in capsys.readouterr().err
    )


def test_parity_tolerance_widens_only_for_the_audience_softmax_of_large_catalogues() -> None:
    tol = export_module.parity_tolerance
    base = export_module.PARITY_TOLERANCE
    for model in (contract.USER_ENCODER_MODEL, contract.SCORER_MODEL, contract.ITEM_LOOKUP_MODEL):
        assert tol(model, 10_000_000) == base
    assert tol(contract.AUDIENCE_SCORER_MODEL, 3_883) == base
    assert tol(contract.AUDIENCE_SCORER_MODEL, 999_999) == base
    assert 3.1 * base < tol(contract.AUDIENCE_SCORER_MODEL, 10_000_000) < 3.2 * base
