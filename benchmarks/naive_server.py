"""The naive peer: what a team writes first. A synchronous gRPC server from the grpc tutorial
(`grpc.server(ThreadPoolExecutor(max_workers=10))`) that runs the torch towers eagerly per
request under `torch.no_grad()`, with torch's default threads.

It serves `ltrec.v1.Recommender/Recommend` from the same checkpoint (same weights) and reuses the
gateway's request features and response building, so that its answers can be compared item for
item with the gateway's; only the serving path differs. The item table is computed once at start
(even a first version would not recompute MiniLM projections per request).

    python -m benchmarks.naive_server --checkpoint artifacts/ml-1m/checkpoint.pt \
        --model-repository model_repository --port 50061
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
import numpy as np
import torch

from ltrec.checkpoint import load_checkpoint
from ltrec.models import Scorer, UserEncoder
from ltrec_core import contract
from server.catalogue import load_model_repository
from server.features import build_features
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from server.postprocess import build_items


class NaiveRecommender(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, checkpoint: Path, model_repository: Path) -> None:
        self.metadata, self.catalogue = load_model_repository(model_repository)
        model, ckpt = load_checkpoint(checkpoint)
        with torch.no_grad():
            table = model.item_table()
        self.encoder = UserEncoder(table, model.user_tower, model.added_item_offset()).eval()
        self.context_weighting = model.context_weighting.eval()
        self.scorer = Scorer(table, torch.from_numpy(np.asarray(ckpt.long_tail_counts))).eval()
        self.model_version = self.metadata.model_version

    def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.RecommendResponse:
        features = build_features(request, self.metadata, self.catalogue, time.time())
        history = torch.from_numpy(features.history_items)
        with torch.no_grad():
            user = self.encoder(history, torch.from_numpy(features.history_event_types))
            weighted = self.context_weighting(user, torch.from_numpy(features.context))
            items, scores, reasons = self.scorer(
                weighted,
                history,
                torch.from_numpy(features.exclude_items),
                torch.from_numpy(features.long_tail_weight),
                int(features.top_k[0, 0]),
            )
        outputs = {
            contract.TOP_ITEMS: items.numpy(),
            contract.TOP_SCORES: scores.numpy(),
            contract.REASON_POSITIONS: reasons.numpy(),
        }
        return recommender_pb2.RecommendResponse(
            items=build_items(outputs, features, self.catalogue),
            model_version=self.model_version,
            request_id=request.request_id,
            skipped_history_items=features.skipped_history_items,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=10)
    args = parser.parse_args(argv)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    recommender_pb2_grpc.add_RecommenderServicer_to_server(
        NaiveRecommender(args.checkpoint, args.model_repository), server
    )
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"naive peer serving on 127.0.0.1:{args.port}", flush=True)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.stop(grace=2)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
