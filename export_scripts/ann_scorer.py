"""The ANN scorer: approximate retrieval over the catalogue, then an exact re-rank.

The export copies this file as `scorer/1/model.py` (a Triton Python-backend model, which the NGC
image has too) when the catalogue is too large for the exact ONNX scorer, beside a Faiss index of
the trained items. It takes the exact scorer's inputs and gives its outputs (`scorer_io`), so the
ensembles and the gateway are the same on both paths. Self-contained (numpy and faiss only): the
Triton side has neither the project nor its packages; the tensor names and search settings come
from `SETTINGS_FILE`, which the export writes from `ltrec_core.contract`.

The long-tail term is folded into the search: each indexed row is the item's vector plus one
dimension holding -log(1 + popularity), the query is the user's vector plus the request's weight,
so the inner product is exactly the scorer's `u·v - w·log(1 + popularity)` at every weight (0
included) and the index ranks what the re-rank ranks. Filters, history and exclusions are applied
to an over-fetched candidate list (fetched again, larger, until k pass; an exact scan of the
eligible items when a filter leaves few). Items added after training (`extra_item_vectors`, at
most the overlay's bound) are scored exactly beside the index: searchable without a rebuild.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS_FILE = "ann.json"
INDEX_FILE = "catalogue.faiss"
VECTORS_FILE = "item_vectors.npy"  # [N+1, D] float32, row 0 padding; the exact re-rank's
LOG_POPULARITY_FILE = "log_popularity.npy"  # [N+1] float32, log(1 + interactions)

# Roles of the scorer's tensors; the settings map each to its name in the contract.
ROLES = (
    "user",
    "history",
    "exclude",
    "weight",
    "top_k",
    "extra_vectors",
    "extra_popularity",
    "eligible",
    "top_items",
    "top_scores",
    "reasons",
)


@dataclass(frozen=True)
class SearchSettings:
    """How the index is searched; written by the export, read at load."""

    tensors: dict[str, str]  # role -> tensor name
    ef_search: int = 512  # HNSW
    nprobe: int = 32  # IVF
    # Candidates fetched per result slot beyond what history and exclusions take.
    overfetch: float = 1.5
    # A filter that leaves at most this many trained items: exact scan of those.
    exact_below: int = 20_000
    # Candidate lists grow ×4 up to this, then the eligible items are scanned exactly.
    max_fetch: int = 8192
    # Search threads; 0: faiss' default, every core of the serving machine. Each row is searched
    # alone (its own fetch), so an IVF index splits one query's probed lists among them.
    threads: int = 0
    popularity_scale: float = 1.0  # the folding's (`popularity_scale`)
    index: dict[str, Any] = field(default_factory=dict)  # how it was built (for the record)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SearchSettings:
        data = json.loads(text)
        missing = [r for r in ROLES if r not in data.get("tensors", {})]
        if missing:
            raise ValueError(f"{SETTINGS_FILE}: tensors has no name for {missing}")
        return cls(**data)


def popularity_scale(vectors: np.ndarray, log_popularity: np.ndarray) -> float:
    """The factor on the popularity column: its largest value the size of a typical item vector.

    Any factor leaves the inner product exact (the query carries weight / factor), but the graph
    is built from item-item inner products: unscaled, log-popularity (up to ~11) outweighs the
    vectors (norm ~1), every item's neighbours are the popular items, and a search at weight 0
    finds almost nothing (2% recall on the unit-test fixture, 100% scaled)."""
    sample = np.asarray(vectors[1 : 1 + 100_000], dtype=np.float32)
    norm = float(np.median(np.linalg.norm(sample, axis=1))) if len(sample) else 1.0
    peak = float(np.max(log_popularity)) if len(log_popularity) else 0.0
    return norm / peak if peak > 0 and norm > 0 else 1.0


def fold_items(vectors: np.ndarray, log_popularity: np.ndarray, scale: float) -> np.ndarray:
    """[N, D] + [N] -> [N, D+1]: the item's vector and -log(1 + popularity) · scale.

    Searched by inner product. (The usual reduction to L2, one more column equalising the rows'
    norms, measured worse here.)"""
    folded = np.empty((len(vectors), vectors.shape[1] + 1), dtype=np.float32)
    folded[:, :-1] = vectors
    folded[:, -1] = -log_popularity * scale
    return folded


def fold_queries(users: np.ndarray, weights: np.ndarray, scale: float) -> np.ndarray:
    """[B, D] + [B, 1] -> [B, D+1]: the user's vector and weight / scale, so the inner product
    with a folded item is the adjusted score `u·v - w·log(1 + popularity)`."""
    folded = np.empty((len(users), users.shape[1] + 1), dtype=np.float32)
    folded[:, :-1] = users
    folded[:, -1] = weights.reshape(-1) / scale
    return folded


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score desc, id asc on ties, as TopK), padded with (0, -inf)."""
    if len(scores) > k:
        keep = np.argpartition(-scores, k - 1)[:k]
        scores, ids = scores[keep], ids[keep]
    order = np.lexsort((ids, -scores))
    top_ids = np.zeros(k, dtype=np.int64)
    top_scores = np.full(k, -np.inf, dtype=np.float32)
    top_ids[: len(order)] = ids[order]
    top_scores[: len(order)] = scores[order]
    return top_ids, top_scores


class AnnScorer:
    """The search, re-rank and reasons, without Triton (the unit tests call it directly)."""

    def __init__(
        self,
        index: Any,
        vectors: np.ndarray,
        log_popularity: np.ndarray,
        settings: SearchSettings,
    ) -> None:
        import faiss

        self.index = index
        self.vectors = vectors
        self.log_popularity = log_popularity
        self.settings = settings
        self.n_rows = vectors.shape[0]  # N+1, the padding row included
        if settings.threads:
            faiss.omp_set_num_threads(settings.threads)
        base = faiss.extract_index_ivf(index) if "IVF" in type(index).__name__ else index
        if hasattr(base, "nprobe"):
            base.nprobe = settings.nprobe
            base.parallel_mode = 1  # one query at a time: its lists, not the queries, in parallel
        self._hnsw = hasattr(index, "hnsw")

    @classmethod
    def load(cls, directory: Path) -> AnnScorer:
        import faiss

        settings = SearchSettings.from_json((directory / SETTINGS_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE), faiss.IO_FLAG_MMAP)
        vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
        log_popularity = np.load(directory / LOG_POPULARITY_FILE)
        return cls(index, vectors, log_popularity, settings)

    def _search(self, query: np.ndarray, fetch: int) -> np.ndarray:
        import faiss

        fetch = min(fetch, self.n_rows)
        if self._hnsw:
            params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                efSearch=max(self.settings.ef_search, fetch)
            )
            _, ids = self.index.search(query, fetch, params=params)
        else:
            _, ids = self.index.search(query, fetch)
        return ids

    def _exact(self, user: np.ndarray, weight: float, ids: np.ndarray) -> np.ndarray:
        """The exact adjusted scores of trained rows `ids` (the re-rank)."""
        return (np.asarray(self.vectors[ids]) @ user - weight * self.log_popularity[ids]).astype(
            np.float32
        )

    def _trained_candidates(
        self,
        user: np.ndarray,
        weight: float,
        blocked: np.ndarray,
        eligible: np.ndarray | None,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Trained rows that may be returned, re-ranked exactly: at least k whenever k pass."""
        allowed = np.ones(self.n_rows, dtype=bool) if eligible is None else eligible.copy()
        allowed[blocked[blocked < self.n_rows]] = False
        allowed[0] = False
        n_allowed = self.n_rows if eligible is None else int(np.count_nonzero(allowed))
        if eligible is not None and n_allowed <= self.settings.exact_below:
            ids = np.flatnonzero(allowed)
            return ids, self._exact(user, weight, ids)
        share = n_allowed / self.n_rows
        fetch = int((k + len(blocked) + 1) * self.settings.overfetch / max(share, 1e-9)) + 16
        query = fold_queries(
            user.reshape(1, -1), np.array([[weight]]), self.settings.popularity_scale
        )
        while True:
            ids = self._search(query, fetch)[0]
            ids = ids[ids >= 0]
            ids = ids[allowed[ids]]
            if len(ids) >= k or fetch >= self.n_rows:
                return ids, self._exact(user, weight, ids)
            if fetch >= self.settings.max_fetch:
                ids = np.flatnonzero(allowed)
                return ids, self._exact(user, weight, ids)
            fetch *= 4

    def score(
        self,
        users: np.ndarray,  # [B, D]
        history: np.ndarray,  # [B, H]
        exclude: np.ndarray,  # [B, E]
        weights: np.ndarray,  # [B, 1]
        k: int,
        extra_vectors: np.ndarray,  # [M, D]
        extra_popularity: np.ndarray,  # [M]
        eligible: np.ndarray,  # [B, N+1+M] or [B, 1]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch = users.shape[0]
        n_extra = extra_vectors.shape[0]
        n_all = self.n_rows + n_extra
        if k < 1 or k > n_all:
            raise ValueError(f"top_k must be in [1, {n_all}], got {k}")
        if eligible.shape[1] not in (1, n_all):
            raise ValueError(
                f"item_eligible must have 1 or {n_all} columns, got {eligible.shape[1]}"
            )
        extra_log_pop = np.log1p(extra_popularity.astype(np.float32))
        top_items = np.zeros((batch, k), dtype=np.int64)
        top_scores = np.full((batch, k), -np.inf, dtype=np.float32)
        for b in range(batch):
            user = users[b].astype(np.float32)
            weight = float(weights[b, 0])
            blocked = np.unique(np.concatenate([history[b], exclude[b], [0]]).astype(np.int64))
            full_mask = eligible.shape[1] == n_all
            if not full_mask and not bool(eligible[b, 0]):
                continue  # nothing passes
            trained_mask = eligible[b, : self.n_rows] if full_mask else None
            ids, scores = self._trained_candidates(user, weight, blocked, trained_mask, k)
            if n_extra:
                extra_ok = np.ones(n_extra, dtype=bool)
                if full_mask:
                    extra_ok &= eligible[b, self.n_rows :]
                extra_blocked = blocked[blocked >= self.n_rows] - self.n_rows
                extra_ok[extra_blocked[extra_blocked < n_extra]] = False
                extra_ids = np.flatnonzero(extra_ok)
                extra_scores = (
                    extra_vectors[extra_ids] @ user - weight * extra_log_pop[extra_ids]
                ).astype(np.float32)
                ids = np.concatenate([ids, extra_ids + self.n_rows])
                scores = np.concatenate([scores, extra_scores])
            top_items[b], top_scores[b] = _top(scores, ids, k)
        return top_items, top_scores, self.reasons(top_items, history, extra_vectors)

    def score_rows(
        self,
        users: np.ndarray,  # [B, D]
        history: np.ndarray,  # [B, H]
        exclude: np.ndarray,  # [B, E]
        weights: np.ndarray,  # [B, 1]
        top_k: np.ndarray,  # [B, 1]
        extra_vectors: np.ndarray,  # [B, M, D]
        extra_popularity: np.ndarray,  # [B, M]
        eligible: np.ndarray,  # [B, N+1+M] or [B, 1]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batching scorer's form (`scorer_io`): k and the overlay per row; every row gets
        the largest k, its own top k first and (0, -inf) after, as the ONNX scorer's TopK."""
        ks = top_k.reshape(-1).astype(np.int64)
        k_max = int(ks.max()) if len(ks) else 1
        batch = users.shape[0]
        items = np.zeros((batch, k_max), dtype=np.int64)
        scores = np.full((batch, k_max), -np.inf, dtype=np.float32)
        reasons = np.zeros((batch, k_max), dtype=np.int64)
        for b in range(batch):
            row = slice(b, b + 1)
            k = int(ks[b])
            items[row, :k], scores[row, :k], reasons[row, :k] = self.score(
                users[row],
                history[row],
                exclude[row],
                weights[row],
                k,
                extra_vectors[b],
                extra_popularity[b],
                eligible[row],
            )
        return items, scores, reasons

    def _rows(self, indices: np.ndarray, extra_vectors: np.ndarray) -> np.ndarray:
        flat = indices.reshape(-1)
        out = np.zeros((len(flat), self.vectors.shape[1]), dtype=np.float32)
        trained = flat < self.n_rows
        out[trained] = self.vectors[flat[trained]]
        extra = ~trained & (flat - self.n_rows < len(extra_vectors))
        out[extra] = extra_vectors[flat[extra] - self.n_rows]
        return out.reshape(*indices.shape, -1)

    def reasons(
        self, top_items: np.ndarray, history: np.ndarray, extra_vectors: np.ndarray
    ) -> np.ndarray:
        """Per result, the history position whose item is most similar (cosine); padding never."""

        def unit(v: np.ndarray) -> np.ndarray:
            return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

        rec = unit(self._rows(top_items, extra_vectors))
        hist = unit(self._rows(history, extra_vectors))
        sims = rec @ hist.transpose(0, 2, 1)
        sims = np.where((history == 0)[:, None, :], -np.inf, sims)
        return sims.argmax(axis=2).astype(np.int64)


class TritonPythonModel:
    """The Triton side: one response per request; a bad request gets an error response."""

    def initialize(self, args: dict[str, str]) -> None:
        directory = Path(args["model_repository"]) / args["model_version"]
        self.scorer = AnnScorer.load(directory)
        self.names = self.scorer.settings.tensors

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        def tensor(request: Any, role: str) -> np.ndarray:
            value = pb_utils.get_input_tensor_by_name(request, self.names[role])
            if value is None:
                raise ValueError(f"input {self.names[role]} is missing")
            # DLPack, not as_numpy(): stubs built before numpy 2 misread its dtypes.
            array = np.from_dlpack(value)
            return array.view(np.bool_) if array.dtype == np.uint8 else array

        def out(role: str, array: np.ndarray) -> Any:
            return pb_utils.Tensor.from_dlpack(self.names[role], np.ascontiguousarray(array))

        responses = []
        for request in requests:
            try:
                items, scores, reasons = self.scorer.score_rows(
                    tensor(request, "user"),
                    tensor(request, "history"),
                    tensor(request, "exclude"),
                    tensor(request, "weight"),
                    tensor(request, "top_k"),
                    tensor(request, "extra_vectors"),
                    tensor(request, "extra_popularity"),
                    tensor(request, "eligible"),
                )
            except (ValueError, IndexError) as exc:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"scorer: {exc}")
                    )
                )
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        out("top_items", items),
                        out("top_scores", scores),
                        out("reasons", reasons),
                    ]
                )
            )
        return responses
