"""A fake Triton whose ranking ensembles run the export's own scorer and item lookup graphs.

`similar_items` runs as its exported ensemble config chains the steps (item lookup -> scorer);
`recommend` runs the scorer on a fixed user embedding (the towers before it are not what these
tests are about). Everything the gateway sends the scorer (history, exclusions, the overlay, the
filter mask) goes through the real graph with onnxruntime, under the names and dtypes the
exported configs declare. By default the catalogue of `tests.support.gateway` gets fixed item
vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from export_scripts import onnx_graphs, triton_config
from ltrec_core import contract
from tests.support.gateway import DIM, ITEMS, FakeTransport

# Row 0 is padding; rows 1..N the catalogue of `tests.support.gateway.ITEMS`.
ITEM_TABLE = np.random.default_rng(14).standard_normal((len(ITEMS) + 1, DIM)).astype(np.float32)
ITEM_TABLE[contract.PADDING_INDEX] = 0.0
POPULARITY = np.array([0] + [popularity for _, _, popularity, _ in ITEMS], dtype=np.int64)
USER = np.array([[1.0, 0.5, -0.25, 0.1]], dtype=np.float32)


class ScorerGraphs(FakeTransport):
    """The encoders answer as in `FakeTransport`; `recommend` and `similar_items` run the graphs
    of `table` [N+1, DIM] and `popularity` [N+1]."""

    def __init__(
        self,
        table: np.ndarray = ITEM_TABLE,
        popularity: np.ndarray = POPULARITY,
        user: np.ndarray = USER,
    ) -> None:
        super().__init__()
        self.user = user
        self.sessions = {
            model: ort.InferenceSession(graph.SerializeToString())
            for model, graph in (
                (
                    contract.SCORER_MODEL,
                    onnx_graphs.scorer_graph(table, popularity, overlay=True, item_filter=True),
                ),
                (contract.ITEM_LOOKUP_MODEL, onnx_graphs.item_lookup_graph(table)),
            )
        }

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        *,
        client_timeout: float,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        answer = await super().infer(
            model_name, inputs, output_names, client_timeout=client_timeout, request_id=request_id
        )
        if model_name == contract.ENSEMBLE_MODEL:
            steps = [(contract.SCORER_MODEL, triton_config.scorer_io(DIM), {})]
            tensors = {**inputs, contract.WEIGHTED_USER_EMBEDDING: self.user}
        elif model_name == contract.SIMILAR_ITEMS_MODEL:
            steps = triton_config.similar_items_steps(DIM)
            tensors = dict(inputs)
        else:
            return answer
        for step, (step_in, step_out), renames in steps:
            feeds = {t.name: tensors[renames.get(t.name, t.name)] for t in step_in}
            values = self.sessions[step].run([t.name for t in step_out], feeds)
            tensors |= {
                renames.get(t.name, t.name): v for t, v in zip(step_out, values, strict=True)
            }
        return {name: tensors[name] for name in output_names}
