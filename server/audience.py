"""Audience and ForecastDemand: the known users scored against items in Triton, in blocks.

The users (`server.user_vectors`: the history store's most recently active users, as user
vectors) go to Triton's `audience` ensemble with the items: the items' vectors (trained, or
added by UpsertItems: the overlay goes with the request), the users' vectors under the
request's context (the context weighting of Recommend), and the audience scorer, which gives per
item its top k users by expected interactions, activity x p(item | user), and their sum
(`ltrec.models.AudienceScorer` defines it; the export checks the graph against it).

p(item | user) is a softmax over the whole catalogue (hidden items left out), so one Triton call
costs users x catalogue scores: the users go in blocks of at most `block_users(catalogue)`
(about `BLOCK_SCORES` scores a call), each block's top k are merged here (the scores of all
blocks are on one scale) and the sums added.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ltrec_core import contract
from server import metrics
from server.catalogue import Catalogue
from server.features import exclusions, overlay_subset
from server.tracing import Stage
from server.triton_client import TritonClient
from server.user_vectors import UserMatrix, UserVectors

# Scores (users x catalogue items) one audience scorer call computes at most: its logits are
# about 4 bytes each, a few times over.
BLOCK_SCORES = 8_000_000
MAX_BLOCK_USERS = contract.MAX_DIRECT_ROWS  # the context weighting's largest batch
OUTPUT_NAMES = (
    contract.AUDIENCE_TOP_USERS,
    contract.AUDIENCE_TOP_SCORES,
    contract.EXPECTED_INTERACTIONS,
)
_USERS, _TRITON = (Stage(stage) for stage in ("users", "triton"))


@dataclass(frozen=True)
class AudienceMember:
    user_id: str
    expected_interactions: float  # activity x p(item | user)
    probability: float  # p(item | user)
    history_events: int  # the user's activity


@dataclass(frozen=True)
class Scored:
    """Per query item: its top users, best first, and its expected interactions."""

    audiences: list[list[AudienceMember]]
    expected_interactions: list[float]
    users_scanned: int


def block_users(catalogue: Catalogue) -> int:
    """Users per audience scorer call: about BLOCK_SCORES scores, at least one user."""
    return max(1, min(MAX_BLOCK_USERS, BLOCK_SCORES // (catalogue.size + 1)))


class Audiences:
    """Scores items against the known users (one `UserVectors` per gateway)."""

    def __init__(self, users: UserVectors, triton: TritonClient) -> None:
        self.users = users
        self._triton = triton

    async def score(
        self,
        item_indices: Sequence[int],
        k: int,
        max_users: int,
        context: Sequence[int],
        catalogue: Catalogue,
        *,
        deadline: float | None,
        request_id: str,
        method: str,
    ) -> Scored:
        """Expects known, served catalogue indices and a validated k; raises
        BackendUnavailable, BackendTimeout or BackendError."""
        with _USERS.time():
            matrix = await self.users.matrix(
                max_users, catalogue, time.time(), deadline=deadline, request_id=request_id
            )
        metrics.AUDIENCE_SCANNED_USERS.labels(method=method).observe(len(matrix))
        n_items = len(item_indices)
        if not len(matrix):
            return Scored([[] for _ in item_indices], [0.0] * n_items, 0)
        # the item lookup batches: the overlay per query row, only the rows the queries read
        queries, query_extra = overlay_subset(
            np.asarray(item_indices, dtype=np.int64).reshape(-1, 1), catalogue
        )
        step = block_users(catalogue)
        excluded = exclusions((), catalogue)
        tops: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]] = []
        totals = np.zeros(n_items, dtype=np.float64)
        with _TRITON.time():
            for start in range(0, len(matrix), step):
                stop = min(start + step, len(matrix))
                outputs = await self._triton.infer(
                    {
                        contract.QUERY_ITEMS: queries,
                        contract.AUDIENCE_USERS: matrix.vectors[start:stop],
                        contract.CONTEXT: np.tile(
                            np.asarray([context], dtype=np.int64), (stop - start, 1)
                        ),
                        contract.USER_ACTIVITY: matrix.activity[start:stop],
                        contract.EXCLUDE_ITEMS: excluded,
                        contract.TOP_K: np.asarray([min(k, stop - start)], dtype=np.int64),
                        contract.EXTRA_ITEM_VECTORS: catalogue.extra_vectors,
                        contract.QUERY_EXTRA_ITEM_VECTORS: query_extra,
                    },
                    deadline=deadline,
                    request_id=request_id,
                    model_name=contract.AUDIENCE_MODEL,
                    output_names=OUTPUT_NAMES,
                )
                tops.append(
                    (
                        np.asarray(outputs[contract.AUDIENCE_TOP_USERS], np.int64) + start,
                        np.asarray(outputs[contract.AUDIENCE_TOP_SCORES], np.float32),
                    )
                )
                totals += np.asarray(outputs[contract.EXPECTED_INTERACTIONS], np.float64)
        return Scored(
            audiences=[_merged(tops, q, k, matrix) for q in range(n_items)],
            expected_interactions=totals.tolist(),
            users_scanned=len(matrix),
        )


def _merged(
    tops: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]],
    query: int,
    k: int,
    matrix: UserMatrix,
) -> list[AudienceMember]:
    """The best k of every block's top k of one query item: by score, then by user position
    (the listing's order: the more recently active first)."""
    positions = np.concatenate([users[query] for users, _ in tops])
    scores = np.concatenate([values[query] for _, values in tops])
    order = np.lexsort((positions, -scores.astype(np.float64)))[:k]
    members = []
    for i in order:
        position = int(positions[i])
        expected = float(scores[i])
        activity = float(matrix.activity[position])
        members.append(
            AudienceMember(
                user_id=matrix.user_ids[position],
                expected_interactions=expected,
                probability=expected / activity,
                history_events=int(activity),
            )
        )
    return members
