"""The ANN scorer (export_scripts.ann_scorer, ann_index) against the exact ONNX scorer, and the
export's choice between them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import faiss
import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export_scripts import ann_index, ann_scorer, onnx_graphs
from export_scripts import export as export_module
from ltrec_core import contract
from tests.support.checkpoints import N_ITEMS, write_checkpoint

N = 3000  # trained items of the fixture
DIM = 16
M = 4  # overlay items
DEFAULT_WEIGHT = 0.15  # the trained checkpoint's default long-tail weight
WEIGHTS = (0.0, DEFAULT_WEIGHT, 0.7)
K = 10


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    """Item vectors of the trained model's scale and heavy-tailed popularity; row 0 padding."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((N + 1, DIM)).astype(np.float32) * 0.3
    table[0] = 0
    popularity = np.floor(50_000 / (rng.permutation(N + 1) + 1) ** 1.1).astype(np.int64)
    popularity[0] = 0
    return table, popularity


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, catalogue: tuple) -> Path:
    directory = tmp_path_factory.mktemp("ann") / "scorer" / "1"
    ann_index.write_ann_scorer(directory, *catalogue, log=lambda _m: None)
    return directory


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory, catalogue: tuple) -> Path:
    path = tmp_path_factory.mktemp("exact") / "model.onnx"
    graph = onnx_graphs.scorer_graph(*catalogue, overlay=True, item_filter=True)
    onnx.save(graph, path)
    return path


def requests(weight: float, eligible: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Two users (one a scaled user of the trained model, one small), histories with padding and
    an overlay item, exclusions, the overlay."""
    rng = np.random.default_rng(int(weight * 100) + 7)
    users = rng.standard_normal((2, DIM)).astype(np.float32) * np.array([[4.0], [1.0]], np.float32)
    history = rng.integers(1, N + 1, size=(2, 8)).astype(np.int64)
    history[0, :3] = 0
    history[1, -1] = N + 2  # an overlay item (reasons read it)
    exclude = rng.integers(1, N + 1, size=(2, 3)).astype(np.int64)
    extra = rng.standard_normal((M, DIM)).astype(np.float32)
    # the batching scorer's form: k and the overlay per row
    return {
        contract.WEIGHTED_USER_EMBEDDING: users,
        contract.HISTORY_ITEMS: history,
        contract.EXCLUDE_ITEMS: exclude,
        contract.LONG_TAIL_WEIGHT: np.full((2, 1), weight, dtype=np.float32),
        contract.TOP_K: np.full((2, 1), K, dtype=np.int64),
        contract.EXTRA_ITEM_VECTORS: onnx_graphs.per_row(extra, 2),
        contract.EXTRA_POPULARITY: onnx_graphs.per_row(np.array([0, 3, 40, 0], np.float32), 2),
        contract.ITEM_ELIGIBLE: np.ones((2, 1), dtype=bool) if eligible is None else eligible,
    }


def run_ann(scorer: ann_scorer.AnnScorer, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(
        scorer.score_rows(
            feeds[contract.WEIGHTED_USER_EMBEDDING],
            feeds[contract.HISTORY_ITEMS],
            feeds[contract.EXCLUDE_ITEMS],
            feeds[contract.LONG_TAIL_WEIGHT],
            feeds[contract.TOP_K],
            feeds[contract.EXTRA_ITEM_VECTORS],
            feeds[contract.EXTRA_POPULARITY],
            feeds[contract.ITEM_ELIGIBLE],
        )
    )


def run_exact(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return onnx_graphs.session(path).run(
        [contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS], feeds
    )


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got[2], want[2])


def test_folding_makes_the_inner_product_the_adjusted_score(catalogue: tuple) -> None:
    table, popularity = catalogue
    log_pop = np.log1p(popularity.astype(np.float32))
    users = np.random.default_rng(3).standard_normal((5, DIM)).astype(np.float32)
    scale = ann_scorer.popularity_scale(table, log_pop)
    assert 0 < scale < 1  # the column shrunk to the vectors' size
    for weight in WEIGHTS:
        folded = ann_scorer.fold_queries(users, np.full((5, 1), weight), scale) @ (
            ann_scorer.fold_items(table, log_pop, scale).T
        )
        np.testing.assert_allclose(folded, users @ table.T - weight * log_pop, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_ann_top_k_is_the_exact_top_k(written: Path, exact: Path, weight: float) -> None:
    """History, exclusions and the overlay (one overlay item in the history) as the exact scorer
    applies them, at weight 0, the default and a strong one: the same items, scores, reasons."""
    scorer = ann_scorer.AnnScorer.load(written)
    feeds = requests(weight)
    got = run_ann(scorer, feeds)
    assert_same(got, run_exact(exact, feeds))
    for row in range(2):
        blocked = [feeds[contract.HISTORY_ITEMS][row], feeds[contract.EXCLUDE_ITEMS][row]]
        assert not np.isin(got[0][row], np.concatenate(blocked)).any()


def test_an_overlay_item_is_found_without_a_rebuild(written: Path, exact: Path) -> None:
    """An item added after the index was built, aligned with the user, comes first."""
    scorer = ann_scorer.AnnScorer.load(written)
    feeds = requests(DEFAULT_WEIGHT)
    feeds[contract.EXTRA_ITEM_VECTORS][:, 2] = feeds[contract.WEIGHTED_USER_EMBEDDING][0] * 2
    got = run_ann(scorer, feeds)
    assert got[0][0, 0] == N + 1 + 2
    assert_same(got, run_exact(exact, feeds))


@pytest.mark.parametrize("exact_below", [0, 1_000_000])
@pytest.mark.parametrize("share", [0.5, 0.02])
def test_filters_are_honoured_by_over_fetching(
    written: Path, exact: Path, exact_below: int, share: float
) -> None:
    """k items that pass, in the exact order: by over-fetching (and fetching again) the index,
    `exact_below` 0, or by scanning the eligible items exactly when the filter leaves few."""
    scorer = ann_scorer.AnnScorer.load(written)
    scorer.settings = dataclasses.replace(scorer.settings, exact_below=exact_below)
    eligible = np.random.default_rng(5).random((2, N + 1 + M)) < share
    feeds = requests(DEFAULT_WEIGHT, eligible)
    got = run_ann(scorer, feeds)
    assert_same(got, run_exact(exact, feeds))
    assert eligible[0, got[0][0]].all() and eligible[1, got[0][1]].all()


def test_fewer_eligible_than_k_pads_with_minus_infinity(written: Path, exact: Path) -> None:
    scorer = ann_scorer.AnnScorer.load(written)
    eligible = np.zeros((2, N + 1 + M), dtype=bool)
    eligible[:, [5, 17, N + 1]] = True
    feeds = requests(0.0, eligible)
    feeds[contract.HISTORY_ITEMS][:] = 0
    feeds[contract.EXCLUDE_ITEMS][:] = 0
    items, scores, _ = run_ann(scorer, feeds)
    assert np.isfinite(scores).sum(axis=1).tolist() == [3, 3]
    assert sorted(items[0, :3].tolist()) == [5, 17, N + 1]
    nothing = requests(0.0, np.zeros((2, 1), dtype=bool))
    assert np.isinf(run_ann(scorer, nothing)[1]).all()


def test_bad_k_and_mask_width_are_refused_naming_the_tensor(written: Path) -> None:
    scorer = ann_scorer.AnnScorer.load(written)
    feeds = requests(0.0)
    feeds[contract.TOP_K] = np.full((2, 1), N + M + 5, dtype=np.int64)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, "):
        run_ann(scorer, feeds)
    feeds = requests(0.0, np.ones((2, 7), dtype=bool))
    with pytest.raises(ValueError, match="item_eligible must have 1 or"):
        run_ann(scorer, feeds)


@pytest.mark.parametrize("kind", ann_index.INDEX_KINDS)
def test_index_builder_indexes_every_row_under_its_id(catalogue: tuple, kind: str) -> None:
    table, popularity = catalogue
    log_pop = np.log1p(popularity.astype(np.float32))
    folded = ann_scorer.fold_items(table, log_pop, ann_scorer.popularity_scale(table, log_pop))
    index = ann_index.build_index(folded, ann_index.IndexSpec(kind=kind, ivf_lists=16, nprobe=16))
    assert index.ntotal == N + 1
    _, ids = index.search(folded[[7, 2500]] * np.float32(5), 1)  # a row is its own best match…
    exact_ids = ann_index.exact_top_k(
        table, np.log1p(popularity.astype(np.float32)), table[[7, 2500]] * 5, 0.0, 1
    )
    np.testing.assert_array_equal(ids[:, 0], exact_ids[:, 0])  # …as the exact scan says


def test_auto_picks_hnsw_for_small_catalogues_and_ivf_above() -> None:
    spec = ann_index.IndexSpec()
    assert spec.kind == "auto"
    bound = ann_index.IVF_MIN_ITEMS
    assert spec.resolve(bound - 1).kind == "hnsw"
    large = spec.resolve(bound)
    assert (large.kind, large.ivf_lists) == ("ivf", ann_index.ivf_lists_for(bound))
    assert large.nprobe == ann_index.nprobe_for(bound, large.ivf_lists)
    assert large.ivf_encoding == "flat"
    assert ann_index.IndexSpec(nprobe=24).resolve(bound).nprobe == 24  # a value given stays
    assert ann_index.IndexSpec(kind="hnsw").resolve(10**8).kind == "hnsw"  # a kind given stays
    assert ann_index.IndexSpec(kind="ivf", ivf_lists=7).resolve(10**8).ivf_lists == 7


def test_ivf_lists_grow_with_the_catalogue_within_bounds() -> None:
    sizes = [100, 10_000, 1_000_000, 10_000_000, 100_000_000]
    lists = [ann_index.ivf_lists_for(n) for n in sizes]
    assert lists == sorted(lists)
    assert all(n // lists_ >= 39 for n, lists_ in zip(sizes, lists, strict=True))
    assert lists[-1] == lists[-2] == 4096 and lists[2] == 4000


def test_default_nprobe_is_a_scan_budget_that_shrinks_past_ten_million_items() -> None:
    """Every list up to the cap on small catalogues, 512 at a million and at ten million items
    (the served recall needed it: 262 lists gave 0.912 at 10M), then about 1.3M rows' worth."""

    def default(n: int) -> int:
        return ann_index.IndexSpec(kind="ivf").resolve(n).nprobe

    assert default(100_000) == min(512, ann_index.ivf_lists_for(100_000))
    assert default(1_000_000) == 512
    assert default(10_000_000) == 512
    assert default(100_000_000) == 53
    assert default(100_000_000) < default(10_000_000)
    assert all(default(n) >= 1 for n in (40, 10**9))
    assert ann_index.IndexSpec(kind="hnsw").resolve(10**7).nprobe == 0  # unused by HNSW
    with pytest.raises(ValueError, match="n_rows and lists must be at least 1"):
        ann_index.nprobe_for(0, 16)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "pq", "kind must be one of"),
        ("ivf_encoding", "pq8", "ivf_encoding must be one of"),
        ("nprobe", -1, "nprobe must be at least 0"),
        ("ef_search", -1, "ef_search must be at least 1, got -1"),
    ],
)
def test_bad_index_specs_are_refused_naming_the_field(field: str, value: object, message: str):
    with pytest.raises(ValueError, match=message):
        ann_index.IndexSpec(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("encoding", ann_index.IVF_ENCODINGS)
def test_ivf_scorer_searches_with_the_specs_nprobe_and_finds_the_exact_top_k(
    tmp_path: Path, catalogue: tuple, encoding: str
) -> None:
    """The written settings and the loaded index carry the spec's nprobe; with it the IVF
    scorer finds most of the exact top 10 at weight 0 and the default, and all of it when every
    list is probed (the exact re-rank repairs the 8-bit lists' scores)."""
    directory = tmp_path / "scorer" / "1"
    spec = ann_index.IndexSpec(kind="ivf", ivf_encoding=encoding, nprobe=24)
    table, popularity = catalogue
    built = ann_index.write_ann_scorer(directory, table, popularity, spec, log=lambda _m: None)
    lists = ann_index.ivf_lists_for(N + 1)
    assert built["index"]["ivf_lists"] == lists and built["index"]["ivf_encoding"] == encoding
    scorer = ann_scorer.AnnScorer.load(directory)
    assert scorer.settings.nprobe == 24
    assert faiss.extract_index_ivf(scorer.index).nprobe == 24
    # Rows are searched one at a time: a query's lists are split among the cores.
    assert faiss.extract_index_ivf(scorer.index).parallel_mode == 1
    assert scorer.settings.threads == 0  # faiss' default: every core
    recall = ann_index.check_recall(directory, (0.0, DEFAULT_WEIGHT), np.random.default_rng(0))
    assert min(recall.values()) >= 0.9, recall
    everything = ann_scorer.AnnScorer(
        scorer.index,
        scorer.vectors,
        scorer.log_popularity,
        dataclasses.replace(scorer.settings, nprobe=lists),
    )
    assert faiss.extract_index_ivf(everything.index).nprobe == lists
    users = table[1:33] * 4
    truth = ann_index.exact_top_k(table, np.log1p(popularity.astype(np.float32)), users, 0.0, K)
    got, _, _ = everything.score(
        users,
        np.zeros((32, 1), dtype=np.int64),
        np.zeros((32, 1), dtype=np.int64),
        np.zeros((32, 1), dtype=np.float32),
        K,
        np.zeros((0, DIM), dtype=np.float32),
        np.zeros(0, dtype=np.float32),
        np.ones((32, 1), dtype=bool),
    )
    np.testing.assert_array_equal(got, truth)


def test_settings_name_the_contract_tensors(written: Path) -> None:
    settings = ann_scorer.SearchSettings.from_json((written / ann_scorer.SETTINGS_FILE).read_text())
    assert set(settings.tensors) == set(ann_scorer.ROLES)
    assert settings.tensors["eligible"] == contract.ITEM_ELIGIBLE
    assert settings.index == dataclasses.asdict(ann_index.DEFAULT_SPEC.resolve(N + 1))
    assert settings.index["kind"] == "hnsw"  # "auto" at 3,000 items
    broken = json.loads((written / ann_scorer.SETTINGS_FILE).read_text())
    del broken["tensors"]["user"]
    with pytest.raises(ValueError, match=r"no name for \['user'\]"):
        ann_scorer.SearchSettings.from_json(json.dumps(broken))


# --- the export's choice ----------------------------------------------------------------------


def test_retrieval_is_chosen_by_catalogue_size_unless_forced() -> None:
    threshold = export_module.ANN_MIN_ITEMS
    assert export_module.choose_retrieval(threshold) == "exact"
    assert export_module.choose_retrieval(threshold + 1) == "ann"
    assert export_module.choose_retrieval(threshold + 1, "exact") == "exact"
    assert export_module.choose_retrieval(10, "ann") == "ann"
    with pytest.raises(ValueError, match="retrieval must be one of"):
        export_module.choose_retrieval(10, "hnsw")


def test_forced_ann_export_writes_a_python_scorer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scorer becomes the Python-backend model with its index (same io, so the ensembles are
    unchanged); and a catalogue past the external-data bound leaves every graph's table outside
    the protobuf (here the bound is lowered to the tiny catalogue's size)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_BYTES", 1024)
    checkpoint = tmp_path / "checkpoint.pt"
    write_checkpoint(checkpoint)
    repo = tmp_path / "repo"
    metadata = export_module.export(
        checkpoint,
        repo,
        text_encoder=False,
        retrieval="ann",
        default_long_tail_weight=DEFAULT_WEIGHT,
        log=lambda _m: None,
    )
    assert metadata["retrieval"] == "ann"
    assert min(metadata["ann"]["check"].values()) == 1.0  # 40 items: HNSW is exact
    scorer_dir = repo / contract.SCORER_MODEL
    cfg = text_format.Parse((scorer_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.backend == "python"
    assert [i.name for i in cfg.input][0] == contract.WEIGHTED_USER_EMBEDDING
    assert (scorer_dir / "1" / "model.py").read_text() == Path(ann_scorer.__file__).read_text()
    assert not (scorer_dir / "1" / "model.onnx").exists()
    scorer = ann_scorer.AnnScorer.load(scorer_dir / "1")
    assert scorer.n_rows == N_ITEMS + 1
    for model in (contract.ITEM_LOOKUP_MODEL, contract.AUDIENCE_SCORER_MODEL):
        graph = onnx.load(repo / model / "1" / "model.onnx", load_external_data=False)
        table = next(t for t in graph.graph.initializer if t.name == "item_table")
        assert table.data_location == onnx.TensorProto.EXTERNAL
        assert f"{model}/1/{onnx_graphs.EXTERNAL_DATA_FILE}" in metadata["files"]
