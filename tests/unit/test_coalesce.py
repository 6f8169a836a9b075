"""The coalescer of ranking calls (`server.coalesce`) against a gated fake Triton: no wait when
idle, each request's own row back (own k), error isolation per batch, each request's own
deadline, shapes kept apart, the batch bound; and a gateway whose concurrent Recommends, coalesced,
answer as each alone."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from ltrec_core import contract
from server.coalesce import Coalescer
from server.errors import BackendError, BackendTimeout, BackendUnavailable
from server.gen.ltrec.v1 import recommender_pb2
from server.triton_client import OUTPUT_NAMES, TritonClient
from tests.support.gateway import (
    FakeTransport,
    full_request,
    run_async,
    running_gateway,
    write_repository,
)


def row_answer(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each row's answer depends on that row alone: its last history item x 100 + 0..k-1 for
    the batch's largest k, scores falling (a batch returns its largest k for every row)."""
    k = int(inputs[contract.TOP_K].max())
    base = inputs[contract.HISTORY_ITEMS][:, -1:] * 100
    items = base + np.arange(k)
    scores = np.broadcast_to(-np.arange(k, dtype=np.float32), items.shape)
    return {
        contract.TOP_ITEMS: items.astype(np.int64),
        contract.TOP_SCORES: np.ascontiguousarray(scores),
        contract.REASON_POSITIONS: np.zeros_like(items),
    }


class GatedTransport:
    """Records each call; while `gate` is set, every call waits for it, and a call under a
    request id of `held` for that event too; fails calls whose first row's last history item is
    in `failing`."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, np.ndarray], float, str]] = []
        self.gate: asyncio.Event | None = None
        self.held: dict[str, asyncio.Event] = {}
        self.failing: dict[int, BaseException] = {}

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        *,
        client_timeout: float,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        assert tuple(output_names) == OUTPUT_NAMES
        self.calls.append((dict(inputs), client_timeout, request_id))
        if self.gate is not None:
            await self.gate.wait()
        if request_id in self.held:
            await self.held[request_id].wait()
        first = int(inputs[contract.HISTORY_ITEMS][0, -1])
        if first in self.failing:
            raise self.failing[first]
        return row_answer(inputs)

    def rows(self) -> list[int]:
        return [len(inputs[contract.TOP_K]) for inputs, _, _ in self.calls]

    async def is_model_ready(self, model_name: str, *, client_timeout: float) -> bool:
        return True

    async def model_parameters(self, model_name: str, *, client_timeout: float) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        pass


def one_row(last_item: int, k: int = 3, width: int = 4) -> dict[str, np.ndarray]:
    history = np.zeros((1, width), np.int64)
    history[0, -1] = last_item
    return {
        contract.HISTORY_ITEMS: history,
        contract.LONG_TAIL_WEIGHT: np.asarray([[0.5]], np.float32),
        contract.TOP_K: np.asarray([[k]], np.int64),
    }


def coalescer(transport: GatedTransport, **options: int) -> Coalescer:
    return Coalescer(TritonClient(transport, timeout_seconds=2.0), **options)


async def settle() -> None:
    """Lets every ready task run until it waits (a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def blocked_first_call(
    transport: GatedTransport, client: Coalescer, width: int = 4
) -> asyncio.Task[dict[str, np.ndarray]]:
    """A call in flight that holds its shape's slot until the gate opens."""
    transport.gate = asyncio.Event()
    first = asyncio.create_task(
        client.infer(one_row(1, width=width), deadline=None, request_id="first")
    )
    await settle()
    assert len(transport.calls) == 1
    return first


@run_async
async def test_an_idle_call_goes_at_once_alone_and_unchanged() -> None:
    transport = GatedTransport()
    client = coalescer(transport)
    inputs = one_row(7, k=2)
    transport.gate = asyncio.Event()
    task = asyncio.create_task(client.infer(inputs, deadline=None, request_id="alone"))
    await settle()
    # Sent before anything else happened: no wait for company.
    assert len(transport.calls) == 1
    sent, _, request_id = transport.calls[0]
    assert request_id == "alone"
    assert all(sent[name] is array for name, array in inputs.items())
    transport.gate.set()
    outputs = await task
    assert outputs[contract.TOP_ITEMS].tolist() == [[700, 701]]


@run_async
async def test_requests_waiting_behind_a_call_go_as_one_batch_each_getting_its_row() -> None:
    transport = GatedTransport()
    client = coalescer(transport)
    first = await blocked_first_call(transport, client)
    ks = [1, 5, 2, 3]
    waiting = [
        asyncio.create_task(client.infer(one_row(10 + n, k=k), deadline=None, request_id=f"r{n}"))
        for n, k in enumerate(ks)
    ]
    await settle()
    assert len(transport.calls) == 1  # they wait for the slot
    transport.gate.set()  # type: ignore[union-attr]
    await first
    answers = await asyncio.gather(*waiting)
    assert transport.rows() == [1, len(ks)]
    batch, _, request_id = transport.calls[1]
    assert request_id == "r0"
    assert batch[contract.TOP_K].ravel().tolist() == ks
    for n, outputs in enumerate(answers):
        # Its own row, of the batch's largest k (5): the request keeps its first k later.
        assert outputs[contract.TOP_ITEMS].tolist() == [[(10 + n) * 100 + j for j in range(5)]]
        assert {a.shape for a in outputs.values()} == {(1, 5)}


@run_async
async def test_shapes_do_not_mix_and_the_batch_is_bounded() -> None:
    transport = GatedTransport()
    client = coalescer(transport, max_rows=4)
    first = await blocked_first_call(transport, client)
    narrow = [client.infer(one_row(20 + n), deadline=None, request_id=f"n{n}") for n in range(6)]
    wide = [
        client.infer(one_row(40 + n, width=8), deadline=None, request_id=f"w{n}") for n in range(2)
    ]
    tasks = [asyncio.create_task(c) for c in [*narrow, *wide]]
    await settle()
    # The wide shape had no call in flight: its first request went at once, alone.
    assert transport.rows() == [1, 1]
    transport.gate.set()  # type: ignore[union-attr]
    await first
    answers = await asyncio.gather(*tasks)
    assert sorted(transport.rows()) == [1, 1, 1, 2, 4]
    widths = {
        len(inputs[contract.TOP_K]): inputs[contract.HISTORY_ITEMS].shape[1]
        for inputs, _, _ in transport.calls[2:]
    }
    assert widths[4] == 4 and widths[2] == 4 and widths[1] == 8
    for n, outputs in enumerate(answers[:6]):
        assert outputs[contract.TOP_ITEMS][0, 0] == (20 + n) * 100
    for n, outputs in enumerate(answers[6:]):
        assert outputs[contract.TOP_ITEMS][0, 0] == (40 + n) * 100


@run_async
async def test_a_failed_batch_fails_only_its_requests_each_with_the_mapped_error() -> None:
    transport = GatedTransport()
    client = coalescer(transport, max_rows=3)
    transport.failing[30] = InferenceServerException("bad", status="StatusCode.INTERNAL")
    transport.failing[60] = InferenceServerException("down", status="StatusCode.UNAVAILABLE")
    first = await blocked_first_call(transport, client)
    rows = [30, 31, 32, 33, 34, 35, 60, 61]  # batches [30, 31, 32] [33, 34, 35] [60, 61]
    tasks = [
        asyncio.create_task(client.infer(one_row(r), deadline=None, request_id=f"r{r}"))
        for r in rows
    ]
    await settle()
    transport.gate.set()  # type: ignore[union-attr]
    await first
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert transport.rows() == [1, 3, 3, 2]
    failed = {row: result for row, result in zip(rows, results, strict=True)}
    for row in (30, 31, 32):
        assert isinstance(failed[row], BackendError), failed[row]
        assert "INTERNAL" in str(failed[row])
    for row in (60, 61):
        assert isinstance(failed[row], BackendUnavailable), failed[row]
    # One exception object per request, not one shared.
    assert len({id(failed[row]) for row in (30, 31, 32)}) == 3
    for row in (33, 34, 35):
        outputs = failed[row]
        assert isinstance(outputs, dict)
        assert outputs[contract.TOP_ITEMS][0, 0] == row * 100


@run_async
async def test_a_short_deadline_times_out_alone_and_the_batch_runs_under_the_latest() -> None:
    transport = GatedTransport()
    client = coalescer(transport)
    first = await blocked_first_call(transport, client)
    now = time.monotonic()
    short = asyncio.create_task(client.infer(one_row(50), deadline=now + 0.05, request_id="short"))
    long = asyncio.create_task(client.infer(one_row(51), deadline=now + 1.5, request_id="long"))
    late = asyncio.create_task(client.infer(one_row(52), deadline=now + 1.0, request_id="late"))
    with pytest.raises(BackendTimeout):
        await short
    assert not long.done() and not late.done()  # they still wait for the slot
    transport.gate.set()  # type: ignore[union-attr]
    await first
    assert (await long)[contract.TOP_ITEMS][0, 0] == 5100
    assert (await late)[contract.TOP_ITEMS][0, 0] == 5200
    # The timed-out request left the batch; the call had the latest deadline's time left.
    assert transport.rows() == [1, 2]
    _, client_timeout, _ = transport.calls[1]
    assert 1.0 < client_timeout <= 1.5


@run_async
async def test_a_batch_past_one_deadline_answers_the_others() -> None:
    """The call outlives one request's deadline: that one ends DEADLINE_EXCEEDED at its own
    time, the others get their rows when the call returns."""
    transport = GatedTransport()
    client = coalescer(transport)
    first = await blocked_first_call(transport, client)
    now = time.monotonic()
    tasks = [
        asyncio.create_task(client.infer(one_row(70), deadline=now + 0.3, request_id="a")),
        asyncio.create_task(client.infer(one_row(71), deadline=None, request_id="b")),
    ]
    await settle()
    transport.held["a"] = asyncio.Event()  # the batch's call (its first row's id) hangs
    transport.gate.set()  # type: ignore[union-attr]
    await first
    await settle()
    assert transport.rows() == [1, 2]
    with pytest.raises(BackendTimeout):
        await tasks[0]
    assert not tasks[1].done()
    transport.held["a"].set()
    assert (await tasks[1])[contract.TOP_ITEMS][0, 0] == 7100


@run_async
async def test_a_deadline_already_past_is_not_sent() -> None:
    transport = GatedTransport()
    client = coalescer(transport)
    first = await blocked_first_call(transport, client)
    with pytest.raises(BackendTimeout):
        await client.infer(one_row(80), deadline=time.monotonic() - 0.01, request_id="past")
    transport.gate.set()  # type: ignore[union-attr]
    await first
    assert transport.rows() == [1]


@run_async
async def test_a_cancelled_waiting_request_is_left_out() -> None:
    transport = GatedTransport()
    client = coalescer(transport)
    first = await blocked_first_call(transport, client)
    gone = asyncio.create_task(client.infer(one_row(90), deadline=None, request_id="gone"))
    kept = asyncio.create_task(client.infer(one_row(91), deadline=None, request_id="kept"))
    await settle()
    gone.cancel()
    await settle()
    transport.gate.set()  # type: ignore[union-attr]
    await first
    assert (await kept)[contract.TOP_ITEMS][0, 0] == 9100
    assert transport.rows() == [1, 1]
    assert transport.calls[1][2] == "kept"


def test_max_rows_is_bounded_by_the_ensembles_batch() -> None:
    transport = GatedTransport()
    with pytest.raises(ValueError, match=r"max_rows must be in \[1, 64\], got 65"):
        coalescer(transport, max_rows=65)


class RowFake(FakeTransport):
    """The fake Triton of the gateway tests, answering each row from that row's own inputs:
    the items its history does not hold, in an order set by its history, exclusions and weight,
    for the batch's largest k; each call waits a little so that concurrent calls overlap."""

    async def infer(self, model_name, inputs, output_names, *, client_timeout, request_id):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.02)
        if model_name != contract.ENSEMBLE_MODEL:
            return await super().infer(
                model_name,
                inputs,
                output_names,
                client_timeout=client_timeout,
                request_id=request_id,
            )
        await super().infer(
            model_name, inputs, output_names, client_timeout=client_timeout, request_id=request_id
        )
        k = int(inputs[contract.TOP_K].max())
        rows = []
        for history, exclude, weight in zip(
            inputs[contract.HISTORY_ITEMS],
            inputs[contract.EXCLUDE_ITEMS],
            inputs[contract.LONG_TAIL_WEIGHT],
            strict=True,
        ):
            never = set(history.tolist()) | set(exclude.tolist())
            seed = int(history.sum()) + int(10 * weight[0])
            order = [1 + (seed + j) % 6 for j in range(6)]
            ranked = [i for i in dict.fromkeys(order) if i not in never][:k]
            rows.append(ranked + [0] * (k - len(ranked)))
        items = np.asarray(rows, np.int64)
        scores = np.where(items > 0, -np.arange(k, dtype=np.float32), -np.inf).astype(np.float32)
        return {
            contract.TOP_ITEMS: items,
            contract.TOP_SCORES: scores,
            contract.REASON_POSITIONS: np.zeros_like(items),
        }


@run_async
async def test_concurrent_recommends_coalesced_answer_as_each_alone(tmp_path: Path) -> None:
    repository = write_repository(tmp_path / "repo")
    fake = RowFake()
    ids = ["i1", "i2", "i3", "i4", "i5", "i6"]
    requests = []
    for n in range(12):
        request = full_request()
        request.ClearField("request_id")
        del request.history[n % 3 :]
        request.k = 1 + n % 5
        request.long_tail_weight = 0.1 * (n % 4)
        request.exclude_item_ids[:] = ids[n % 6 : n % 6 + n % 2]
        requests.append(request)
    async with running_gateway(repository, fake) as gw:
        alone = [await gw.stub.Recommend(r, timeout=5) for r in requests]
        calls_alone = len(fake.ranking_calls())
        together = await asyncio.gather(*(gw.stub.Recommend(r, timeout=5) for r in requests))
    assert calls_alone == len(requests)
    coalesced = fake.ranking_calls()[calls_alone:]
    assert len(coalesced) < len(requests)  # some went together
    assert max(len(call.inputs[contract.TOP_K]) for call in coalesced) > 1
    for one, other, request in zip(alone, together, requests, strict=True):
        assert [i.item_id for i in one.items] == [i.item_id for i in other.items]
        assert [(i.score, i.reason) for i in one.items] == [
            (i.score, i.reason) for i in other.items
        ]
        assert len(one.items) <= request.k
    assert any(len(r.items) > 1 for r in alone)
    assert isinstance(together[0], recommender_pb2.RecommendResponse)


@run_async
async def test_the_gateway_coalesces_no_more_rows_than_the_repository_s_ensembles_take(
    tmp_path: Path,
) -> None:
    """A large catalogue's export lowers the ensembles' max_batch_size (`max_batch_rows` in its
    metadata): Triton would refuse a larger call, so the gateway never sends one."""
    repository = write_repository(tmp_path / "repo")
    metadata_file = repository / contract.METADATA_FILE
    metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    metadata_file.write_text(json.dumps({**metadata, "max_batch_rows": 2}), encoding="utf-8")
    fake = RowFake()
    requests = []
    for n in range(12):
        request = full_request()
        request.ClearField("request_id")
        request.k = 1 + n % 5
        requests.append(request)
    async with running_gateway(repository, fake) as gw:
        answers = await asyncio.gather(*(gw.stub.Recommend(r, timeout=5) for r in requests))
    calls = fake.ranking_calls()
    rows = [len(call.inputs[contract.TOP_K]) for call in calls]
    assert sum(rows) == len(requests)
    assert max(rows) == 2  # coalesced, within the bound
    assert all(len(a.items) >= 1 for a in answers)
