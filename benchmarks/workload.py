"""The requests every system under test answers: the same histories, the same tensors.

Histories are real ones (the last `length` events of users with at least that many) when the
dataset directory matches the catalogue, else drawn from the catalogue by popularity (synthetic
catalogues). Tensors come from the gateway's own feature code (`server.features`), so the
in-process floor, direct Triton and the naive peer get exactly what the gateway sends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.catalogue import Catalogue, ModelMetadata, load_model_repository
from server.features import build_features
from server.gen.ltrec.v1 import recommender_pb2

# A fixed context timestamp (2000-12-31 22:12:40 UTC): the same buckets in every run.
CONTEXT_TIMESTAMP = 978_300_760
DEVICES = ("mobile", "desktop")


@dataclass(frozen=True)
class Workload:
    requests: list[recommender_pb2.RecommendRequest]
    tensors: list[dict[str, np.ndarray]]  # ensemble inputs, one dict per request
    history_length: int
    k: int
    catalogue_size: int
    real_histories: bool

    def head(self, n: int) -> Workload:
        return dataclasses.replace(self, requests=self.requests[:n], tensors=self.tensors[:n])


def real_histories(events_path: Path, catalogue: Catalogue, length: int) -> list[list[str]]:
    """The last `length` events of every user with at least that many known items."""
    import pandas as pd

    events = pd.read_parquet(events_path, columns=["user_id", "item_id", "timestamp"])
    events = events[events["item_id"].isin(catalogue.index_of.keys())]
    events = events.sort_values(["user_id", "timestamp"], kind="stable")
    grouped = events.groupby("user_id", sort=False)["item_id"].apply(list)
    return [items[-length:] for items in grouped if len(items) >= length]


def sampled_histories(
    catalogue: Catalogue, n: int, length: int, rng: np.random.Generator
) -> list[list[str]]:
    """Histories drawn by popularity (+1, so items without interactions appear too)."""
    weights = catalogue.popularity[1:].astype(np.float64) + 1.0
    weights /= weights.sum()
    picks = rng.choice(catalogue.size, size=(n, length), p=weights) + 1
    return [[catalogue.item_ids[i] for i in row] for row in picks]


def make_request(
    index: int, history: list[str], k: int, rng: np.random.Generator
) -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(
        user_id=f"bench-user-{index}",
        history=[
            recommender_pb2.HistoryEvent(
                item_id=item,
                event_type=recommender_pb2.EVENT_TYPE_VIEW,
                timestamp=CONTEXT_TIMESTAMP - (len(history) - j) * 60,
            )
            for j, item in enumerate(history)
        ],
        context=recommender_pb2.Context(
            timestamp=CONTEXT_TIMESTAMP,
            device=DEVICES[index % len(DEVICES)],
            region=f"zip{rng.integers(0, 10)}",
        ),
        k=k,
        request_id=f"bench-{index}",
    )


def build_workload(
    model_repository: Path,
    n: int,
    *,
    history_length: int = 50,
    k: int = 10,
    events_path: Path | None = None,
    seed: int = 0,
    loaded: tuple[ModelMetadata, Catalogue] | None = None,
) -> Workload:
    metadata, catalogue = loaded or load_model_repository(model_repository)
    rng = np.random.default_rng(seed)
    pool: list[list[str]] = []
    if events_path is not None and events_path.is_file():
        pool = real_histories(events_path, catalogue, history_length)
    if pool:
        histories = [pool[i] for i in rng.integers(0, len(pool), size=n)]
    else:
        histories = sampled_histories(catalogue, n, history_length, rng)
    requests = [make_request(i, h, k, rng) for i, h in enumerate(histories)]
    tensors = [
        build_features(r, metadata, catalogue, float(CONTEXT_TIMESTAMP)).as_inputs()
        for r in requests
    ]
    return Workload(
        requests=requests,
        tensors=tensors,
        history_length=history_length,
        k=k,
        catalogue_size=catalogue.size,
        real_histories=bool(pool),
    )
