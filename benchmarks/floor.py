"""The floor: the exported ONNX graphs (user encoder -> context weighting -> scorer) chained
in-process with onnxruntime on the gateway's own tensors. No network, no serialisation, no
scheduler: the latency and throughput limit of this machine for this model.

Sessions use the settings the Triton stand-in backend uses (one intra-op and one inter-op thread,
all graph optimisations), so the floor differs from Triton only by what Triton adds. Run as its
own process by `benchmarks.bench`, so that its CPU time and peak memory are its own:

    python -m benchmarks.floor --model-repository R --tensors T.pkl --out F.json -c 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import procstat
from benchmarks.load import run_threads
from ltrec_core import contract

VERSION = "1"


def make_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class InProcessRecommender:
    """The ensemble's three steps as three onnxruntime sessions, outputs fed forward (without
    `scorer`, the first two only: `weighted_user` for a repository whose scorer is the ANN one)."""

    def __init__(self, model_repository: Path, threads: int = 1, scorer: bool = True) -> None:
        def load(model: str) -> ort.InferenceSession:
            return make_session(model_repository / model / VERSION / "model.onnx", threads)

        self.encoder = load(contract.USER_ENCODER_MODEL)
        self.context = load(contract.CONTEXT_WEIGHTING_MODEL)
        self.scorer = load(contract.SCORER_MODEL) if scorer else None
        self._outputs = [contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS]

    def weighted_user(self, t: dict[str, np.ndarray]) -> np.ndarray:
        """The context-weighted user embedding of a request's tensors (encode, then weight)."""
        (user,) = self.encoder.run(
            [contract.USER_EMBEDDING],
            {
                contract.HISTORY_ITEMS: t[contract.HISTORY_ITEMS],
                contract.HISTORY_EVENT_TYPES: t[contract.HISTORY_EVENT_TYPES],
                contract.EXTRA_ITEM_VECTORS: t[contract.EXTRA_ITEM_VECTORS],
            },
        )
        (weighted,) = self.context.run(
            [contract.WEIGHTED_USER_EMBEDDING],
            {contract.USER_EMBEDDING: user, contract.CONTEXT: t[contract.CONTEXT]},
        )
        return weighted

    def __call__(self, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.scorer is None:
            raise RuntimeError("loaded without the scorer")
        weighted = self.weighted_user(t)
        results = self.scorer.run(
            self._outputs,
            {
                contract.WEIGHTED_USER_EMBEDDING: weighted,
                contract.HISTORY_ITEMS: t[contract.HISTORY_ITEMS],
                contract.EXCLUDE_ITEMS: t[contract.EXCLUDE_ITEMS],
                contract.LONG_TAIL_WEIGHT: t[contract.LONG_TAIL_WEIGHT],
                contract.TOP_K: t[contract.TOP_K],
                contract.EXTRA_ITEM_VECTORS: t[contract.EXTRA_ITEM_VECTORS],
                contract.EXTRA_POPULARITY: t[contract.EXTRA_POPULARITY],
                contract.ITEM_ELIGIBLE: t[contract.ITEM_ELIGIBLE],
            },
        )
        return dict(zip(self._outputs, results, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--tensors", type=Path, required=True, help="pickled list of input dicts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--keep", type=int, default=0, help="answers to keep for comparison")
    args = parser.parse_args(argv)
    tensors: list[dict[str, np.ndarray]] = pickle.loads(args.tensors.read_bytes())
    model = InProcessRecommender(args.model_repository)
    me = os.getpid()
    for i in range(args.warmup):
        model(tensors[i % len(tensors)])
    runs = []
    for concurrency in args.concurrency:
        meter = procstat.CpuMeter(me)
        meter.start()
        run = run_threads(
            lambda i: model(tensors[i]),
            len(tensors),
            concurrency,
            keep=args.keep,
        )
        reading = meter.stop()
        runs.append(
            {
                **run.summary.to_dict(),
                "cpu_seconds": meter.cpu_seconds,
                "peak_rss_mib": reading.peak_rss_mib,
                "top_items": {
                    str(i): np.asarray(r[contract.TOP_ITEMS]).reshape(-1).tolist()  # type: ignore[index]
                    for i, r in run.results.items()
                },
            }
        )
    args.out.write_text(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
