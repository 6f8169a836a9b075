"""New items without retraining, through the real stack: UpsertItems -> Triton's item text
encoder (the real MiniLM) -> the shared item store -> Recommend and SimilarItems on two gateway
replicas in front of one real tritonserver.

A slice of real MovieLens-1M trains a small model (20 epochs, 32-d: about 20 s; the one-epoch
model of `test_serving` has not learnt enough from text to tell genres apart). One brand-new film
per genre is upserted ("A Brand New Horror Film (2031)", category "Horror": no one has seen
them), and the users whose recent history leans most on one genre are asked for
recommendations. New items have no interactions, so the long-tail term (`long_tail_weight`, the
per-request knob for it) is what lets them compete with popular films; among the new films,
the text decides which one a user gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from export_scripts.export import export
from ltrec.checkpoint import load_checkpoint
from ltrec.datasets.movielens import ML_1M_GENRES
from ltrec.models import Scorer, UserEncoder
from ltrec.train import TrainConfig, train
from ltrec_core import contract
from ltrec_core.item_attributes import attribute_ids
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.stack import Replica, start_replica
from tests.support.tiny_model import encode_new_items, ml1m_slice
from triton_local.server import TritonServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POLL_SECONDS = 1.0  # the default LTREC_ITEMS_POLL_INTERVAL_SECONDS
WEIGHT = 1.0  # long_tail_weight of the requests below
GENRES = list(ML_1M_GENRES)
CASES = 20  # the most genre-focused users
# 978300760 = 2000-12-31 22:12:40 UTC (as in test_serving)
CONTEXT = recommender_pb2.Context(timestamp=978_300_760, region="zip4")


def new_id(genre: str) -> str:
    return f"new-2031-{genre.lower()}"


def new_title(genre: str) -> str:
    return f"A Brand New {genre} Film (2031)"


NEW_IDS = [new_id(g) for g in GENRES]


@dataclass
class Stack:
    root: Path
    repo: Path
    triton: TritonServer
    a: Replica
    b: Replica
    # (genre, the user's last training events, oldest first): users whose history leans most
    # on one genre, most focused first
    cases: list[tuple[str, list[str]]]
    genres: dict[str, set[str]]  # trained item id -> its genres
    start_replica: Callable[[str], Replica]
    # set by the first test: a case whose new film is in the user's top 10
    showcase: tuple[str, list[str]] | None = None


def _genres(text: str) -> set[str]:
    """`Title (1995). Category: Animation > Children's > Comedy.` -> its genres."""
    _, _, category = text.partition("Category: ")
    return {g.strip(" .") for g in category.split(">")} & set(ML_1M_GENRES)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("new-items")
    prepared, users = ml1m_slice(root)
    config = TrainConfig(
        epochs=20,
        batch_size=64,
        patience=20,
        validate_every=1,  # the best of every epoch, as this fixture's thresholds were set on
        seed=0,
        model={"embedding_dim": 32, "n_layers": 1, "n_heads": 2, "max_history": 20},
    )
    train(prepared, config, root / "artifacts", progress=False)
    repo = root / "model_repository"
    export(root / "artifacts" / "checkpoint.pt", repo, log=lambda _m: None)
    genres = {i: _genres(t) for i, t in zip(prepared.item_ids, prepared.texts, strict=True)}
    base_rate = {g: np.mean([g in gs for gs in genres.values()]) for g in GENRES}

    # Per user, the genre with the largest lift over its catalogue share in their history.
    train_events = prepared.split.train
    focused: list[tuple[float, str, list[str]]] = []
    for user in users:
        history = train_events.loc[train_events["user_id"] == user, "item_id"].tolist()[-20:]
        if len(history) < 10:
            continue
        share = {g: np.mean([g in genres[i] for i in history]) for g in GENRES}
        genre = max(GENRES, key=lambda g: share[g] - base_rate[g])
        focused.append((share[genre] - base_rate[genre], genre, history))
    focused.sort(key=lambda case: -case[0])
    cases = [(genre, history) for _, genre, history in focused[:CASES]]

    triton = TritonServer(repo, build_dir=triton_build_dir, log_path=root / "tritonserver.log")
    triton.start()

    def start_named(name: str) -> Replica:
        env = {
            "LTREC_FEEDBACK_REPLICA": name,
            "LTREC_ITEMS_POLL_INTERVAL_SECONDS": str(POLL_SECONDS),
        }
        replica = start_replica(repo, triton.grpc_url, root / f"gateway-{name}.log", env)
        replicas.append(replica)  # restarted ones too: every process is stopped at teardown
        return replica

    replicas: list[Replica] = []
    try:
        triton.wait_ready(timeout_s=180)
        start_named("a")
        start_named("b")
        yield Stack(root, repo, triton, replicas[0], replicas[1], cases, genres, start_named)
    finally:
        for replica in replicas:
            replica.close()
        triton.stop()


def _recommend(
    stub: recommender_pb2_grpc.RecommenderStub,
    history: list[str],
    k: int = 10,
    weight: float = WEIGHT,
) -> list[recommender_pb2.RecommendedItem]:
    request = recommender_pb2.RecommendRequest(
        user_id="new-items-user",
        history=[
            recommender_pb2.HistoryEvent(
                item_id=i, event_type=recommender_pb2.EVENT_TYPE_RATING, timestamp=1_000 + n
            )
            for n, i in enumerate(history)
        ],
        context=CONTEXT,
        k=k,
        long_tail_weight=weight,
    )
    return list(stub.Recommend(request, timeout=10).items)


def _ids(items: list[recommender_pb2.RecommendedItem]) -> list[str]:
    return [item.item_id for item in items]


def _knows(replica: Replica, item_id: str) -> bool:
    try:
        replica.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(item_id=item_id, k=1), timeout=10
        )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def _rank(items: list[recommender_pb2.RecommendedItem], item_id: str) -> int:
    """1-based rank; len + 1 when absent."""
    ids = _ids(items)
    return ids.index(item_id) + 1 if item_id in ids else len(ids) + 1


def _wait_until(condition: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_brand_new_films_reach_the_users_of_their_genre_at_once_and_replicas_agree(
    stack: Stack,
) -> None:
    """Runs first in this module: it upserts the new films."""
    assert not set(NEW_IDS) & set(_ids(_recommend(stack.a.stub, stack.cases[0][1], k=500)))
    started = time.monotonic()
    reply = stack.a.stub.UpsertItems(
        recommender_pb2.UpsertItemsRequest(
            items=[
                recommender_pb2.Item(item_id=new_id(g), title=new_title(g), category=g)
                for g in GENRES
            ]
        ),
        timeout=60,
    )
    acknowledged = time.monotonic()
    assert (reply.upserted, reply.created, reply.images_not_encoded) == (len(GENRES), 18, 0)
    # The other replica knows them within its poll interval.
    propagated = _wait_until(lambda: _knows(stack.b, NEW_IDS[-1]), 3 * POLL_SECONDS)
    print(
        f"\nUpsertItems of {len(GENRES)} films (MiniLM in Triton, fsync): "
        f"{acknowledged - started:.2f} s; known to replica b {propagated:.2f} s later"
    )

    # On the replica that took the call, at once: each focused user's own-genre film, ranked
    # among all items and among the 18 new films (chance: 1 in 18 is first).
    in_top10 = first_among_new = 0
    lines = []
    for genre, history in stack.cases:
        ranked = _recommend(stack.a.stub, history, k=500)
        new_films = [i for i in ranked if i.item_id in NEW_IDS]
        rank, rank_new = _rank(ranked, new_id(genre)), _rank(new_films, new_id(genre))
        at_zero = _rank(_recommend(stack.a.stub, history, k=500, weight=0.0), new_id(genre))
        in_top10 += rank <= 10
        first_among_new += rank_new == 1
        lines.append(f"{genre}: {rank} ({rank_new} of the new; at w=0: {at_zero})")
        if rank <= 10 and stack.showcase is None:
            stack.showcase = (genre, history)
    print(
        f"\nnew film of the user's genre, rank at w={WEIGHT} (among the new films; at w=0): "
        + ", ".join(lines)
    )
    print(f"in the top 10: {in_top10}/{CASES}; first of the 18 new: {first_among_new}/{CASES}")
    assert in_top10 >= 7
    assert first_among_new >= 6  # chance would give about 1

    # The showcase: recommended, titled, explained, a long-tail item.
    assert stack.showcase is not None
    genre, history = stack.showcase
    top10 = _recommend(stack.a.stub, history)
    (new,) = [item for item in top10 if item.item_id == new_id(genre)]
    assert new.title == new_title(genre) and new.long_tail
    assert new.reason.startswith("Because you rated")

    # The other replica agrees: the same list, the same scores.
    assert _ids(_recommend(stack.b.stub, history)) == _ids(top10)
    np.testing.assert_allclose(
        [i.score for i in _recommend(stack.b.stub, history)], [i.score for i in top10], atol=1e-5
    )


def test_the_served_ranking_is_the_torch_models_with_the_new_items_appended(
    stack: Stack,
) -> None:
    """What Triton serves with the overlay is what torch computes for the catalogue plus the
    new films (MiniLM + the trained fusion of their text and category, no ID vector)."""
    assert stack.showcase is not None
    _, history = stack.showcase
    model, ckpt = load_checkpoint(stack.root / "artifacts" / "checkpoint.pt")
    texts = [f"{new_title(g)}. Category: {g}." for g in GENRES]
    index = {item_id: i + 1 for i, item_id in enumerate(ckpt["item_ids"])}
    index |= {item_id: len(index) + 1 + j for j, item_id in enumerate(NEW_IDS)}
    hist = torch.tensor([[index[i] for i in history]])
    types = torch.full_like(hist, 1 + contract.EVENT_TYPES.index("rating"))
    region = 1 + ckpt["vocabularies"]["region"].index("zip4")
    with torch.no_grad():
        extra = encode_new_items(model, texts, [attribute_ids(g, "", "") for g in GENRES])
        table = model.item_table()
        user = UserEncoder(table, model.user_tower, model.added_item_offset())(hist, types, extra)
        weighted = model.context_weighting(user, torch.tensor([[23, 7, 0, region]]))
        items, scores, _ = Scorer(table, torch.from_numpy(np.asarray(ckpt.long_tail_counts)))(
            weighted,
            hist,
            torch.zeros(1, 1, dtype=torch.long),
            torch.tensor([[WEIGHT]]),
            10,
            extra,
            torch.zeros(len(GENRES)),
        )
    served = _recommend(stack.a.stub, history)
    assert [index[i.item_id] for i in served] == items[0].tolist()
    np.testing.assert_allclose([i.score for i in served], scores[0], atol=1e-4)


def test_similar_items_of_a_new_film_share_its_genre(stack: Stack) -> None:
    """Each new film's 10 nearest trained films (the other new ones excluded): how many share
    its genre, against the genre's share of the catalogue."""
    shares, base_rates = [], []
    for genre in GENRES:
        reply = stack.b.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(
                item_id=new_id(genre), k=10, exclude_item_ids=NEW_IDS
            ),
            timeout=10,
        )
        similar = _ids(list(reply.items))
        assert len(similar) == 10 and not set(similar) & set(NEW_IDS)
        assert {i.reason for i in reply.items} == {f'Similar to "{new_title(genre)}"'}
        shares.append(np.mean([genre in stack.genres[i] for i in similar]))
        base_rates.append(np.mean([genre in g for g in stack.genres.values()]))
    print(
        f"\nSimilarItems of the new films: {np.mean(shares):.0%} share the film's genre "
        f"(catalogue base rate {np.mean(base_rates):.0%})"
    )
    assert np.mean(shares) >= 2 * np.mean(base_rates)
    # A trained film has related items too, never itself; an unknown one is NOT_FOUND.
    trained = stack.cases[0][1][-1]
    related = stack.a.stub.SimilarItems(
        recommender_pb2.SimilarItemsRequest(item_id=trained, k=5), timeout=10
    )
    assert len(related.items) == 5 and trained not in _ids(list(related.items))
    with pytest.raises(grpc.RpcError) as err:
        stack.a.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(item_id="no such film (2099)", k=5), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_added_items_survive_a_gateway_restart(stack: Stack) -> None:
    assert stack.showcase is not None
    genre, history = stack.showcase
    want = _ids(_recommend(stack.a.stub, history))
    assert new_id(genre) in want
    stack.a.close()
    stack.a = stack.start_replica("a")
    assert _ids(_recommend(stack.a.stub, history)) == want


def test_the_items_command_upserts_a_csv_and_shows_related_items(stack: Stack) -> None:
    """examples/items_client.py, as the README runs it, against replica b."""
    client = [sys.executable, str(REPO_ROOT / "examples" / "items_client.py")]
    address = ["--address", stack.b.process.address]
    upserted = subprocess.run(
        [*client, *address, "upsert", "--file", str(REPO_ROOT / "examples" / "new_items.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "3 items from" in upserted.stdout and "are recommendable" in upserted.stdout
    similar = subprocess.run(
        [*client, *address, "similar", "Grave Shadows (2031)", "-k", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert similar.stdout.count("\n") == 4  # a header and three items
    _wait_until(lambda: _knows(stack.a, "Grave Shadows (2031)"), 3 * POLL_SECONDS)


def test_deleting_stops_recommending_at_once_and_on_every_replica(stack: Stack) -> None:
    """Runs last: it deletes the showcase film and a trained one."""
    assert stack.showcase is not None
    genre, history = stack.showcase
    ranked = _ids(_recommend(stack.b.stub, history, k=50))
    trained = next(i for i in ranked if i not in NEW_IDS)  # the best trained film
    gone = {new_id(genre), trained}
    reply = stack.b.stub.DeleteItems(
        recommender_pb2.DeleteItemsRequest(item_ids=sorted(gone)), timeout=10
    )
    assert reply.deleted == 2
    after = _ids(_recommend(stack.b.stub, history, k=500))
    assert not gone & set(after)  # at once on this replica
    waited = _wait_until(
        lambda: not gone & set(_ids(_recommend(stack.a.stub, history, k=500))), 3 * POLL_SECONDS
    )
    print(f"\nreplica a stopped recommending them {waited:.2f} s later")
    with pytest.raises(grpc.RpcError) as err:
        stack.a.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(item_id=new_id(genre), k=5), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The other new films are still in the catalogue on both replicas (a top 500 need not hold
    # all of them), and lists come back in full.
    for item_id in set(NEW_IDS) - gone:
        assert _knows(stack.a, item_id) and _knows(stack.b, item_id)
    assert len(_recommend(stack.a.stub, history)) == 10
