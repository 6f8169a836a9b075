"""The files passed between stages, one typed schema each: written and read only here.

- `CheckpointMetadata`: what training stores in ``checkpoint.pt`` beside the tensors (the catalogue,
  vocabularies, model settings and training summary); `ltrec.checkpoint` writes and reads the
  file around it.
- `RepositoryMetadata`: ``ltrec_metadata.json`` at the root of the model repository; the export
  writes it (`write_repository_metadata`), the gateway reads it (`read_repository_metadata`).

Versions: the files as first written are version 1 and carry no version field, so repositories
and checkpoints written before the schemas were declared read as they are. A later version writes
``"schema_version": N``; a reader refuses a version it does not know (`ArtifactError`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltrec_core import contract

SCHEMA_VERSION = 1


class ArtifactError(ValueError):
    """A file passed between stages that is missing, unreadable or not of its schema; the message
    names the file."""


def _check_version(raw: dict[str, Any], fail: Any) -> None:
    version = raw.get("schema_version", 1)
    if version != SCHEMA_VERSION:
        raise fail(f"schema_version {version!r} is not one this code reads ({SCHEMA_VERSION})")


# --- checkpoint ---------------------------------------------------------------------------------


@dataclass
class Vocabularies:
    """Context labels in bucket order (bucket = 1 + position; 0 is unknown)."""

    event_types: list[str]
    device: list[str]
    region: list[str]

    def to_json(self) -> dict[str, list[str]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> Vocabularies:
        if not isinstance(raw, dict):
            raise ArtifactError(
                "vocabularies must be an object with event_types, device and region"
            )
        return cls(
            event_types=list(raw["event_types"]),
            device=list(raw["device"]),
            region=list(raw["region"]),
        )


# The checkpoint's keys that are not metadata: tensors and arrays (`ltrec.checkpoint.Checkpoint`).
CHECKPOINT_ARRAYS: tuple[str, ...] = (
    "state_dict",
    "text_features",
    "image_rows",
    "image_features",
    "attribute_ids",
    "popularity",
    "long_tail",
    "exposure",
)


@dataclass
class CatalogueFields:
    """Each item's category, brand and price bucket as training read them, in catalogue order
    (item i, 0-based, is catalogue index i + 1); "" where the data had none. The export writes
    them to the catalogue file, where the gateway's business filters read them."""

    categories: list[str]
    brands: list[str]
    price_buckets: list[str]  # `ltrec_core.item_text.PRICE_BUCKETS` names, or ""

    @classmethod
    def empty(cls, n_items: int) -> CatalogueFields:
        return cls([""] * n_items, [""] * n_items, [""] * n_items)

    def to_json(self) -> dict[str, list[str]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any, n_items: int) -> CatalogueFields:
        if not isinstance(raw, dict):
            raise ArtifactError(
                "item_fields must be an object with categories, brands and price_buckets"
            )
        lists: dict[str, list[str]] = {}
        for name in ("categories", "brands", "price_buckets"):
            values = raw.get(name)
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ArtifactError(f"item_fields.{name} must be a list of strings")
            if len(values) != n_items:
                raise ArtifactError(
                    f"item_fields.{name} must have one entry per item ({n_items}), "
                    f"got {len(values)}"
                )
            lists[name] = values
        return cls(**lists)


@dataclass
class CheckpointMetadata:
    """The non-tensor part of a checkpoint. Item i (0-based here) is catalogue index i + 1."""

    model_config: dict[str, Any]  # `ltrec.models.ModelConfig.to_dict()`
    item_ids: list[str]
    titles: list[str]
    texts: list[str]  # the item encoder's input text (`ltrec_core.item_text`)
    image_paths: list[str | None]  # as given (resolved), readable or not
    vocabularies: Vocabularies
    # Training's figures and choices: train/model config, best epoch, stop reason, the serving
    # defaults of the long-tail weights ("long_tail_weight", "similar_items_long_tail_weight"),
    # the data and its cleaning report.
    summary: dict[str, Any] = field(default_factory=dict)
    # None in checkpoints written before training stored them (the export then reads them from
    # the dataset, `export_scripts.export.catalogue_fields`).
    item_fields: CatalogueFields | None = None

    def to_json(self) -> dict[str, Any]:
        """The checkpoint's metadata keys, in the order training has always written them (the
        item fields, added later, last; absent when unknown)."""
        raw = {
            "model_config": self.model_config,
            "item_ids": self.item_ids,
            "titles": self.titles,
            "texts": self.texts,
            "image_paths": self.image_paths,
            "vocabularies": self.vocabularies.to_json(),
            "summary": self.summary,
        }
        if self.item_fields is not None:
            raw["item_fields"] = self.item_fields.to_json()
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str = "checkpoint") -> CheckpointMetadata:
        def fail(message: str) -> ArtifactError:
            return ArtifactError(f"{where}: {message}")

        _check_version(raw, fail)
        try:
            return cls(
                model_config=dict(raw["model_config"]),
                item_ids=list(raw["item_ids"]),
                titles=list(raw["titles"]),
                texts=list(raw["texts"]),
                image_paths=list(raw.get("image_paths") or [None] * len(raw["item_ids"])),
                vocabularies=Vocabularies.from_json(raw["vocabularies"]),
                summary=dict(raw.get("summary") or {}),
                item_fields=None
                if raw.get("item_fields") is None
                else CatalogueFields.from_json(raw["item_fields"], len(raw["item_ids"])),
            )
        except KeyError as exc:
            raise fail(f"{exc.args[0]} is missing") from None
        except (TypeError, ValueError) as exc:
            raise fail(str(exc)) from None

    def tuned_long_tail_weight(self, key: str) -> float | None:
        """The serving default training chose on validation under `key` of the summary
        ("long_tail_weight" for Recommend, "similar_items_long_tail_weight" for SimilarItems)."""
        tuned = self.summary.get(key)
        return float(tuned["chosen"]) if tuned else None


# --- model repository ---------------------------------------------------------------------------


@dataclass
class RepositoryMetadata:
    """``ltrec_metadata.json``: versions, vocabularies, data, training figures, parity, hashes.

    The gateway needs the first block (it refuses a file without them, naming the field); the
    rest describes the export for people and tools, and is optional when read.
    """

    model_version: str
    embedding_dim: int
    max_history: int
    default_long_tail_weight: float
    long_tail_weight_max: float
    vocabularies: Vocabularies
    similar_items_default_long_tail_weight: float = 0.0
    # The user encoder, scorer and item lookup take extra_item_vectors/extra_popularity.
    item_overlay: bool = True
    # The scorer takes item_eligible (the business filter) and the catalogue file holds each
    # item's category, brand and price bucket.
    item_filter: bool = True
    # The item lookup takes a basket (query_items [B, L]) and pools their vectors: SimilarItems'
    # basket mode. False for a repository exported before it: the gateway serves it, and refuses
    # basket requests naming the re-export.
    basket_lookup: bool = False
    # The repository has the audience ensemble (Audience, ForecastDemand); exported before it:
    # False, and those two methods answer UNAVAILABLE until the export is re-run.
    audience: bool = False
    # The most rows one Recommend or SimilarItems ensemble call takes (their max_batch_size,
    # lowered on a large catalogue): the gateway never coalesces more requests into one call.
    max_batch_rows: int = contract.MAX_BATCH_SIZE
    model_config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    n_items: int = 0
    tensorrt: bool = False
    catalogue_scan: str = "fp32"
    # "exact": the ONNX scorer scans the catalogue; "ann": a Faiss index (a Python-backend
    # scorer) in front of an exact re-rank, described by `ann` (kind, build time, recall).
    retrieval: str = "exact"
    ann: dict[str, Any] = field(default_factory=dict)
    text_model: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    parity_max_abs_diff: dict[str, dict[str, float]] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    export_seconds: float = 0.0
    # `content_hash(files)`; "" in repositories exported before it (the gateway then cannot
    # compare what Triton serves with what it loaded, and says so at start).
    content_hash: str = ""

    @property
    def text_max_tokens(self) -> int:
        """Tokens of item text the item text encoder reads (the training setting)."""
        return int(self.model_config.get("text_max_tokens", 64))

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in the order the export has always written them."""
        return {
            "model_version": self.model_version,
            "created_at": self.created_at,
            "embedding_dim": self.embedding_dim,
            "max_history": self.max_history,
            "n_items": self.n_items,
            "default_long_tail_weight": self.default_long_tail_weight,
            contract.SIMILAR_ITEMS_DEFAULT_WEIGHT_KEY: self.similar_items_default_long_tail_weight,
            "long_tail_weight_max": self.long_tail_weight_max,
            "tensorrt": self.tensorrt,
            "catalogue_scan": self.catalogue_scan,
            "retrieval": self.retrieval,
            "ann": self.ann,
            "item_overlay": self.item_overlay,
            "item_filter": self.item_filter,
            "basket_lookup": self.basket_lookup,
            "audience": self.audience,
            "max_batch_rows": self.max_batch_rows,
            "vocabularies": self.vocabularies.to_json(),
            "text_model": self.text_model,
            "model_config": self.model_config,
            "data": self.data,
            "training": self.training,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "checkpoint": self.checkpoint,
            "files": self.files,
            "export_seconds": self.export_seconds,
            "content_hash": self.content_hash,
        }


def write_repository_metadata(path: Path, metadata: RepositoryMetadata) -> dict[str, Any]:
    """Writes the file; returns its JSON object."""
    raw = metadata.to_json()
    path.write_text(json.dumps(raw, indent=2))
    return raw


def read_repository_metadata(path: Path) -> RepositoryMetadata:
    """Reads and checks the file; `ArtifactError` naming the file and the field otherwise."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found (run the export first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object")

    def fail(message: str) -> ArtifactError:
        return ArtifactError(f"{path}: {message}")

    _check_version(raw, fail)

    def number(key: str) -> float:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise fail(f"{key} must be finite, got {value!r}")
        return float(value)

    model_version = raw.get("model_version")
    if not isinstance(model_version, str) or not model_version:
        raise fail(f"model_version must be a non-empty string, got {model_version!r}")
    max_history = raw.get("max_history")
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise fail(f"max_history must be an integer >= 1, got {max_history!r}")
    default_weight = number("default_long_tail_weight")
    weight_max = number("long_tail_weight_max")
    if not 0 <= default_weight <= weight_max:
        raise fail(
            f"default_long_tail_weight must be in [0, long_tail_weight_max={weight_max:g}], "
            f"got {default_weight:g}"
        )
    # Exported before SimilarItems had a default of its own: 0 (pure similarity), never
    # Recommend's, whose scale would bury the neighbours under the popularity term.
    similar_key = contract.SIMILAR_ITEMS_DEFAULT_WEIGHT_KEY
    similar_weight = number(similar_key) if similar_key in raw else 0.0
    if not 0 <= similar_weight <= weight_max:
        raise fail(
            f"{similar_key} must be in [0, long_tail_weight_max={weight_max:g}], "
            f"got {similar_weight:g}"
        )
    vocabularies = raw.get("vocabularies")
    if not isinstance(vocabularies, dict):
        raise fail("vocabularies must be an object with event_types, device and region")

    def vocabulary(name: str) -> list[str]:
        values = vocabularies.get(name)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise fail(f"vocabularies.{name} must be a list of strings, got {values!r}")
        return values

    event_types = tuple(vocabulary("event_types"))
    if event_types != contract.EVENT_TYPES:
        raise fail(
            f"vocabularies.event_types must be {list(contract.EVENT_TYPES)} "
            f"(ltrec_core/contract.py), got {list(event_types)}"
        )
    dim = raw.get("embedding_dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise fail(f"embedding_dim must be an integer >= 1, got {dim!r}")
    if raw.get("item_overlay") is not True:
        raise fail(
            "item_overlay must be true: this repository was exported before the models took "
            "the item overlay (extra_item_vectors); re-run the export"
        )
    if raw.get("item_filter") is not True:
        raise fail(
            "item_filter must be true: this repository was exported before the scorer took the "
            "business filter (item_eligible) and the catalogue file the item fields; re-run the "
            "export"
        )
    model_config = raw.get("model_config", {})
    max_tokens = model_config.get("text_max_tokens", 64) if isinstance(model_config, dict) else 64
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise fail(f"model_config.text_max_tokens must be an integer >= 1, got {max_tokens!r}")

    def optional(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = raw.get(key, default)
        return value if isinstance(value, kind) else default

    max_batch_rows = raw.get("max_batch_rows", contract.MAX_BATCH_SIZE)
    if (
        isinstance(max_batch_rows, bool)
        or not isinstance(max_batch_rows, int)
        or not 1 <= max_batch_rows <= contract.MAX_BATCH_SIZE
    ):
        raise fail(
            f"max_batch_rows must be an integer in [1, {contract.MAX_BATCH_SIZE}], "
            f"got {max_batch_rows!r}"
        )

    return RepositoryMetadata(
        model_version=model_version,
        embedding_dim=dim,
        max_history=max_history,
        default_long_tail_weight=default_weight,
        long_tail_weight_max=weight_max,
        vocabularies=Vocabularies(
            event_types=list(event_types), device=vocabulary("device"), region=vocabulary("region")
        ),
        similar_items_default_long_tail_weight=similar_weight,
        item_overlay=True,
        item_filter=True,
        basket_lookup=raw.get("basket_lookup") is True,
        audience=raw.get("audience") is True,
        max_batch_rows=max_batch_rows,
        model_config=model_config if isinstance(model_config, dict) else {},
        created_at=optional("created_at", str, ""),
        n_items=optional("n_items", int, 0),
        tensorrt=optional("tensorrt", bool, False),
        catalogue_scan=optional("catalogue_scan", str, "fp32"),
        retrieval=optional("retrieval", str, "exact"),
        ann=optional("ann", dict, {}),
        text_model=optional("text_model", str, ""),
        data=optional("data", dict, {}),
        training=optional("training", dict, {}),
        parity_max_abs_diff=optional("parity_max_abs_diff", dict, {}),
        checkpoint=optional("checkpoint", dict, {}),
        files=optional("files", dict, {}),
        export_seconds=float(optional("export_seconds", (int, float), 0.0)),
        content_hash=optional("content_hash", str, ""),
    )


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 over the repository's files (relative path -> {"sha256": ...}), the metadata
    file and the ensemble config that carries the hash left out: two repositories with the same
    models, configs and catalogue have the same hash, whatever their version label says."""
    digest = hashlib.sha256()
    for path in sorted(files):
        if path in (contract.METADATA_FILE, contract.IDENTITY_CARRIER):
            continue
        digest.update(f"{path}\0{files[path]['sha256']}\n".encode())
    return digest.hexdigest()
