"""Closed-loop load with bounded concurrency: `concurrency` callers, each sends its next request
as soon as its previous one is answered, until every request has been sent once.

Asyncio callers for gRPC clients (one process, one event loop, like a real async client), threads
for in-process work (onnxruntime and torch release the GIL while they compute).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from benchmarks.stats import Summary, summarize


@dataclass
class Run:
    summary: Summary
    results: dict[int, object] = field(default_factory=dict)  # request index -> answer (kept ones)
    first_error: str = ""


async def run_async(
    call: Callable[[int], Awaitable[object]],
    n: int,
    concurrency: int,
    *,
    warmup: int = 0,
    keep: int = 0,
) -> Run:
    """Requests 0..n-1 (index modulo n for the warm-up); answers of the first `keep` are kept."""
    for i in range(warmup):
        await call(i % n)
    latencies: list[float] = []
    results: dict[int, object] = {}
    errors: list[str] = []
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                answer = await call(i)
            except Exception as exc:  # counted and reported, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - t0)
            if i < keep:
                results[i] = answer

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    if not latencies:
        raise RuntimeError(f"every request failed; the first: {errors[0]}")
    return Run(
        summarize(latencies, wall, concurrency, errors=len(errors)),
        results,
        errors[0] if errors else "",
    )


def run_threads(
    call: Callable[[int], object],
    n: int,
    concurrency: int,
    *,
    warmup: int = 0,
    keep: int = 0,
) -> Run:
    for i in range(warmup):
        call(i % n)
    lock = threading.Lock()
    latencies: list[float] = []
    results: dict[int, object] = {}
    errors: list[str] = []
    counter = iter(range(n))

    def caller() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                answer = call(i)
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.append(elapsed)
                if i < keep:
                    results[i] = answer

    threads = [threading.Thread(target=caller) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if not latencies:
        raise RuntimeError(f"every request failed; the first: {errors[0]}")
    return Run(
        summarize(latencies, wall, concurrency, errors=len(errors)),
        results,
        errors[0] if errors else "",
    )
