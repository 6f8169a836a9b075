"""A fake Triton whose ranking ensembles run the export's own scorer and item lookup graphs.

The catalogue of `tests.support.gateway` gets fixed item vectors; Recommend's user embedding is a
fixed vector (the towers before the scorer are not what these tests are about), SimilarItems'
is the query item's vector, looked up by the real item lookup graph. Everything the gateway
sends the scorer (history, exclusions, the overlay, the filter mask) goes through the real graph
with onnxruntime, fed by the names and dtypes the exported config declares.
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


def _session(graph: object) -> ort.InferenceSession:
    return ort.InferenceSession(graph.SerializeToString())  # type: ignore[attr-defined]


class ScorerGraphs(FakeTransport):
    """The encoders answer as in `FakeTransport`; `recommend` and `similar_items` run the graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.scorer = _session(
            onnx_graphs.scorer_graph(ITEM_TABLE, POPULARITY, overlay=True, item_filter=True)
        )
        self.item_lookup = _session(onnx_graphs.item_lookup_graph(ITEM_TABLE))

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
        if model_name not in (contract.ENSEMBLE_MODEL, contract.SIMILAR_ITEMS_MODEL):
            return answer
        tensors = dict(inputs)
        if model_name == contract.ENSEMBLE_MODEL:
            tensors[contract.WEIGHTED_USER_EMBEDDING] = USER
        else:
            (query,) = self.item_lookup.run(
                None,
                {
                    contract.QUERY_ITEMS: tensors[contract.QUERY_ITEMS],
                    contract.EXTRA_ITEM_VECTORS: tensors[contract.EXTRA_ITEM_VECTORS],
                },
            )
            tensors[contract.WEIGHTED_USER_EMBEDDING] = query
            tensors[contract.HISTORY_ITEMS] = tensors[contract.QUERY_ITEMS]
        scorer_inputs, scorer_outputs = triton_config.scorer_io(DIM)
        feeds = {t.name: tensors[t.name] for t in scorer_inputs}
        names = [t.name for t in scorer_outputs]
        return dict(zip(names, self.scorer.run(names, feeds), strict=True))
