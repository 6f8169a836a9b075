"""The exported audience scorer (ONNX, as Triton runs it) against numpy computed from its
definition: p(item | user) is the softmax over the catalogue (trained rows and overlay, without
padding and the hidden items), a user's expected interactions are activity x p, and each item
gets its top k users and their sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export_scripts import onnx_graphs
from ltrec_core import contract

DIM = 6
N_ITEMS = 30
OUTPUTS = [
    contract.AUDIENCE_TOP_USERS,
    contract.AUDIENCE_TOP_SCORES,
    contract.EXPECTED_INTERACTIONS,
]


def numpy_audience(
    table: np.ndarray,
    extra: np.ndarray,
    query: np.ndarray,
    users: np.ndarray,
    activity: np.ndarray,
    hidden: list[int],
) -> np.ndarray:
    """activity_u * p(q | u), [Q, U], in float64 straight from the definition."""
    catalogue = np.concatenate([table, extra]).astype(np.float64)
    logits = users.astype(np.float64) @ catalogue.T
    keep = np.ones(len(catalogue), dtype=bool)
    keep[[contract.PADDING_INDEX, *hidden]] = False
    denominators = np.exp(logits[:, keep]).sum(axis=1)  # small logits: no overflow here
    probability = np.exp(query.astype(np.float64) @ users.T.astype(np.float64)) / denominators
    return probability * activity[None, :]


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((N_ITEMS + 1, DIM)).astype(np.float32)
    table[contract.PADDING_INDEX] = 0.0
    path = tmp_path_factory.mktemp("audience") / "model.onnx"
    onnx.save(onnx_graphs.audience_scorer_graph(table), path)
    return path, table


def run(path: Path, **feeds: np.ndarray) -> list[np.ndarray]:
    return onnx_graphs.session(path).run(OUTPUTS, feeds)  # type: ignore[no-any-return]


def feeds_for(
    query: np.ndarray,
    users: np.ndarray,
    activity: np.ndarray,
    hidden: list[int],
    k: int,
    extra: np.ndarray,
) -> dict[str, np.ndarray]:
    return {
        contract.QUERY_EMBEDDING: query,
        contract.WEIGHTED_USER_EMBEDDING: users,
        contract.USER_ACTIVITY: activity,
        contract.EXCLUDE_ITEMS: np.asarray([hidden or [0]], dtype=np.int64),
        contract.TOP_K: np.asarray([k], dtype=np.int64),
        contract.EXTRA_ITEM_VECTORS: extra,
    }


@pytest.mark.parametrize("n_extra", [0, 4])
def test_the_graph_is_activity_times_the_catalogue_softmax(
    graph: tuple[Path, np.ndarray], n_extra: int
) -> None:
    path, table = graph
    rng = np.random.default_rng(n_extra)
    extra = rng.standard_normal((n_extra, DIM)).astype(np.float32)
    users = rng.standard_normal((9, DIM)).astype(np.float32)
    activity = rng.integers(1, 200, size=9).astype(np.float32)
    hidden = [3, 17] + ([N_ITEMS + 2] if n_extra else [])
    # queries: a trained item, a hidden one's vector, an overlay item (when there is one)
    rows = [5, 3] + ([N_ITEMS + 1] if n_extra else [])
    query = np.concatenate([table, extra])[rows]
    top_users, top_scores, expected = run(
        path, **feeds_for(query, users, activity, hidden, 4, extra)
    )
    want = numpy_audience(table, extra, query, users, activity, hidden)
    np.testing.assert_allclose(expected, want.sum(axis=1), rtol=1e-5)
    assert top_users.tolist() == np.argsort(-want, axis=1, kind="stable")[:, :4].tolist()
    np.testing.assert_allclose(top_scores, np.sort(want, axis=1)[:, ::-1][:, :4], rtol=1e-5)
    assert top_users.dtype == np.int64 and top_scores.dtype == np.float32


def test_large_scores_do_not_overflow_and_activity_only_scales(
    graph: tuple[Path, np.ndarray],
) -> None:
    """Logits of several hundred (exp overflows float32 at 89) give finite probabilities: the
    normaliser is max + log-sum-exp of the shifted row. A user's activity multiplies their
    expected interactions and nothing else."""
    path, table = graph
    rng = np.random.default_rng(7)
    users = (rng.standard_normal((5, DIM)) * 200).astype(np.float32)
    query = table[[1, 2, 3]]
    extra = np.zeros((0, DIM), dtype=np.float32)
    ones = np.ones(5, dtype=np.float32)
    _, top_scores, expected = run(path, **feeds_for(query, users, ones, [], 5, extra))
    assert np.isfinite(top_scores).all() and np.isfinite(expected).all()
    assert (top_scores <= 1.0 + 1e-6).all() and (expected <= 5.0 + 1e-5).all()
    # Every user's probabilities over the catalogue sum to 1: score the whole catalogue.
    every = table[1:]
    _, _, mass = run(path, **feeds_for(every, users, ones, [], 1, extra))
    np.testing.assert_allclose(mass.sum(), 5.0, rtol=1e-4)  # 5 users, each a distribution
    # Doubling one user's activity doubles their expected interactions, not the others'.
    activity = ones.copy()
    activity[2] = 2.0
    _, single, _ = run(path, **feeds_for(query, users[2:3], ones[:1], [], 1, extra))
    _, doubled, _ = run(path, **feeds_for(query, users[2:3], activity[2:3], [], 1, extra))
    np.testing.assert_allclose(doubled, 2.0 * single, rtol=1e-6)


def test_hidden_items_leave_the_softmax_and_raise_every_probability(
    graph: tuple[Path, np.ndarray],
) -> None:
    path, table = graph
    rng = np.random.default_rng(3)
    users = rng.standard_normal((4, DIM)).astype(np.float32)
    query = table[[7]]
    extra = np.zeros((0, DIM), dtype=np.float32)
    ones = np.ones(4, dtype=np.float32)
    _, _, before = run(path, **feeds_for(query, users, ones, [], 1, extra))
    _, _, after = run(path, **feeds_for(query, users, ones, [1, 2, 9], 1, extra))
    assert after[0] > before[0]
    want = numpy_audience(table, extra, query, users, ones, [1, 2, 9]).sum()
    np.testing.assert_allclose(after[0], want, rtol=1e-5)


def test_item_lookup_then_the_scorer_serve_a_new_item_by_its_overlay_row(
    graph: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """As the audience ensemble chains them (the context weighting, a torch export, aside):
    the query item's index gathers its vector from the trained table or the overlay."""
    path, table = graph
    lookup = tmp_path / "lookup.onnx"
    onnx.save(onnx_graphs.item_lookup_graph(table), lookup)
    rng = np.random.default_rng(11)
    extra = rng.standard_normal((2, DIM)).astype(np.float32)
    users = rng.standard_normal((6, DIM)).astype(np.float32)
    activity = np.arange(1, 7, dtype=np.float32)
    indices = np.array([[4], [N_ITEMS + 2]], dtype=np.int64)
    (query,) = onnx_graphs.session(lookup).run(
        [contract.QUERY_EMBEDDING],
        {
            contract.QUERY_ITEMS: indices,
            contract.EXTRA_ITEM_VECTORS: onnx_graphs.per_row(extra, len(indices)),
        },
    )
    top_users, _, expected = run(path, **feeds_for(query, users, activity, [], 6, extra))
    want = numpy_audience(table, extra, np.concatenate([table, extra])[[4, N_ITEMS + 2]], users,
                          activity, [])  # fmt: skip
    np.testing.assert_allclose(expected, want.sum(axis=1), rtol=1e-5)
    assert top_users.tolist() == np.argsort(-want, axis=1, kind="stable").tolist()
