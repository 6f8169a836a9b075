"""Turn a trained checkpoint into a Triton model repository.

Writes ONNX models (item text encoder, user encoder, context weighting, scorer with the catalogue
inside, item lookup), their configs as `ModelConfig` protobufs, the `recommend` and
`similar_items` ensembles, and beside them the metadata (versions, data, training figures,
hashes, parity) and the catalogue file the gateway reads. Every ONNX graph is run against its
torch module during export; a mismatch fails the export. The user encoder, scorer and item
lookup take the item overlay (`extra_item_vectors`, and `extra_popularity` for the scorer: items
added after training, see `server/stores/items.py`); their parity is checked without (M = 0) and
with overlay items.

    python -m export_scripts.export --checkpoint artifacts/ml-1m/checkpoint.pt \
        --output model_repository
    python -m export_scripts.export ... --tensorrt   # configs for a GPU deployment (TensorRT EP)
    python -m export_scripts.export ... --catalogue-scan int8   # large catalogues (see onnx_graphs)
    python -m export_scripts.export ... --retrieval ann   # force the Faiss scorer (ann_scorer)

The scorer scans the catalogue exactly (ONNX) up to `ANN_MIN_ITEMS` items and is an ANN index in
front of an exact re-rank above (`--retrieval` overrides). A graph whose catalogue would pass the
protobuf limit keeps it in external data beside it (`onnx_graphs.save`). The batching models'
dynamic batcher and instance counts are `triton_config.Batching` (the `batching` option; its
defaults, which `benchmarks/batching_sweep.py` measures against other settings).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export_scripts import ann_index, onnx_graphs, triton_config
from ltrec.checkpoint import Checkpoint, load_checkpoint, read_checkpoint
from ltrec.data import sha256_file
from ltrec.models import AudienceScorer, ItemEncoder, ItemLookup, Scorer, UserEncoder
from ltrec.prepared import dataset_item_fields
from ltrec_core import contract
from ltrec_core.artifacts import (
    CatalogueFields,
    RepositoryMetadata,
    content_hash,
    write_repository_metadata,
)

PARITY_TOLERANCE = 1e-4


def parity_tolerance(model_name: str, n_items: int) -> float:
    """The largest ONNX-vs-torch difference accepted for `model_name`'s outputs.

    The audience scorer's figures are relative and rest on a softmax normaliser summed over the
    whole catalogue in float32, whose rounding grows as the square root of the terms summed
    (torch and onnxruntime sum in different orders): 1.4e-4 at ten million items. Its tolerance
    grows the same way past a million items; a wrong graph is off by far more."""
    if model_name == contract.AUDIENCE_SCORER_MODEL:
        return PARITY_TOLERANCE * max(1.0, math.sqrt((n_items + 1) / 1_000_000))
    return PARITY_TOLERANCE


VERSION = "1"  # Triton version folder; the model version string lives in the metadata
OWNED_MODELS = (
    contract.ENSEMBLE_MODEL,
    contract.USER_ENCODER_MODEL,
    contract.CONTEXT_WEIGHTING_MODEL,
    contract.SCORER_MODEL,
    contract.ITEM_ENCODER_MODEL,
    contract.IMAGE_ENCODER_MODEL,
    contract.ITEM_LOOKUP_MODEL,
    contract.SIMILAR_ITEMS_MODEL,
    contract.AUDIENCE_SCORER_MODEL,
    contract.AUDIENCE_MODEL,
)


def _write_config(repo: Path, cfg: object) -> None:
    model_dir = repo / cfg.name  # type: ignore[attr-defined]
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    text = triton_config.to_pbtxt(cfg)  # type: ignore[arg-type]
    triton_config.parse_pbtxt(text)  # round-trip: a config Triton cannot parse never lands
    (model_dir / "config.pbtxt").write_text(text)


def file_hashes(repo: Path) -> dict[str, dict[str, Any]]:
    """Every file of the repository but the metadata file: relative path -> sha256, bytes."""
    files = sorted(p for p in repo.rglob("*") if p.is_file() and p.name != contract.METADATA_FILE)
    return {
        str(p.relative_to(repo)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in files
    }


def write_catalogue(path: Path, ckpt: Checkpoint, fields: CatalogueFields) -> None:
    """`contract.CATALOGUE_COLUMNS`, one row per item in catalogue order."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(contract.CATALOGUE_COLUMNS)
        rows = zip(
            ckpt.item_ids,
            ckpt.titles,
            fields.categories,
            fields.brands,
            fields.price_buckets,
            strict=True,
        )
        for i, (item_id, title, category, brand, price) in enumerate(rows):
            idx = i + 1
            writer.writerow(
                [
                    idx,
                    item_id,
                    title,
                    int(ckpt.long_tail_counts[idx]),
                    int(ckpt.long_tail[idx]),
                    category,
                    brand,
                    price,
                ]
            )


def catalogue_fields(ckpt: Checkpoint, log: Callable[[str], object] = print) -> CatalogueFields:
    """The items' category, brand and price bucket, which the gateway filters on.

    A checkpoint written before training stored them is read back from the dataset it was
    trained on (the directory in its summary), as training read them, if that dataset is still
    there with the same items; otherwise every item's fields are empty (filters on them then
    find no trained item) and the log says so.
    """
    if ckpt.metadata.item_fields is not None:
        return ckpt.metadata.item_fields
    directory = (ckpt.summary.get("data") or {}).get("dir")
    problem = "its summary names no dataset"
    if directory:
        try:
            fields = dataset_item_fields(Path(directory), ckpt.item_ids)
        except (OSError, ValueError) as exc:
            problem = f"{directory}: {exc}"
        else:
            log(f"catalogue fields: read from {directory} (the checkpoint predates storing them)")
            return fields
    log(
        "warning: catalogue fields (category, brand, price bucket) unknown: the checkpoint "
        f"predates storing them and {problem}; filters on them will find no trained item "
        "(retrain to store them)"
    )
    return CatalogueFields.empty(len(ckpt.item_ids))


def _export_item_encoders(
    output: Path, model: Any, ckpt: Checkpoint, dim: int, parity: dict, *, tensorrt: bool
) -> list[object]:
    """The encoders for items added after training: image encoder (EfficientNet-Lite0) and
    item encoder (MiniLM + the trained fusion), each checked against torch on real inputs."""
    from ltrec.image_encoder import load_image_encoder
    from ltrec.text_encoder import load_text_model, tokenize
    from ltrec_core.images import image_batch, load_image_file

    cfg = model.cfg
    tokenizer, minilm = load_text_model()
    module = ItemEncoder(minilm, model.fusion).eval()
    path = output / contract.ITEM_ENCODER_MODEL / VERSION / "model.onnx"
    onnx_graphs.export_item_encoder(module, path)
    batch = tokenize(tokenizer, list(ckpt.texts[:4]), cfg.text_max_tokens)
    n = batch["input_ids"].shape[0]
    rng = np.random.default_rng(0)
    inputs = {
        contract.TEXT_INPUT_IDS: batch["input_ids"].numpy().astype(np.int64),
        contract.TEXT_ATTENTION_MASK: batch["attention_mask"].numpy().astype(np.int64),
        contract.IMAGE_FEATURES: rng.random((n, cfg.image_dim), dtype=np.float32) * 3,
        contract.HAS_IMAGE: (np.arange(n) % 2 == 0).astype(np.float32).reshape(n, 1),
        contract.ATTRIBUTE_IDS: np.asarray(ckpt.attribute_ids[1 : n + 1], dtype=np.int64),  # type: ignore[index]
    }
    (diff,) = onnx_graphs.max_abs_diff(
        path,
        inputs,
        lambda: (module(*(torch.from_numpy(inputs[k]) for k in onnx_graphs.ITEM_ENCODER_INPUTS)),),
    )
    parity[contract.ITEM_ENCODER_MODEL] = {contract.ITEM_VECTOR: diff}
    # load_text_model is annotated AutoTokenizer; the instance is a PreTrainedTokenizer.
    tokenizer.save_pretrained(str(output / contract.ITEM_ENCODER_MODEL / contract.TOKENIZER_DIR))  # type: ignore[attr-defined]

    image_module = load_image_encoder()
    path = output / contract.IMAGE_ENCODER_MODEL / VERSION / "model.onnx"
    onnx_graphs.export_image_encoder(image_module, path)
    # Parity on the catalogue's own photos where it has some, random pixels otherwise.
    photos = []
    for p in [p for p in ckpt.image_paths if p][:2]:
        try:
            photos.append(load_image_file(p))
        except ValueError:
            continue
    size = contract.IMAGE_SIZE
    pixels = image_batch(photos) if photos else rng.random((2, 3, size, size), dtype=np.float32)
    (diff,) = onnx_graphs.max_abs_diff(
        path, {contract.IMAGE: pixels}, lambda: (image_module(torch.from_numpy(pixels)),)
    )
    parity[contract.IMAGE_ENCODER_MODEL] = {contract.IMAGE_FEATURES: diff}
    return [
        triton_config.onnx_model_config(
            contract.ITEM_ENCODER_MODEL,
            triton_config.item_encoder_io(dim),
            tensorrt=tensorrt,
            threads=2,
        ),
        triton_config.onnx_model_config(
            contract.IMAGE_ENCODER_MODEL,
            triton_config.image_encoder_io(),
            tensorrt=tensorrt,
            threads=2,
        ),
    ]


def export(checkpoint: Path, output: Path, **options: Any) -> dict:
    """Export and verify into a staging folder, then swap the result into `output`.

    A failed export (a parity mismatch, say) leaves the previous repository as it was; the
    metadata goes in last, so a reader never sees metadata that describes other files.
    """
    staging = output.parent / f".{output.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        metadata = _export_into(checkpoint, staging, **options)
        output.mkdir(parents=True, exist_ok=True)
        (output / contract.METADATA_FILE).unlink(missing_ok=True)
        for name in (*OWNED_MODELS, contract.CATALOGUE_FILE):
            target = output / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            if (staging / name).exists():
                os.replace(staging / name, target)
        os.replace(staging / contract.METADATA_FILE, output / contract.METADATA_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


LONG_TAIL_WEIGHT_MAX = 2.0  # the largest long-tail weight a request may ask for

# Above this many items the scorer is the ANN index: the exact scan's p99 at a million items is
# 32 ms on 2 cores (reports/bench), near the 50 ms target, and grows with the catalogue.
ANN_MIN_ITEMS = 1_000_000
RETRIEVALS = ("auto", "exact", "ann")


def choose_retrieval(n_items: int, requested: str = "auto") -> str:
    """ "exact" or "ann": the request, or by catalogue size for "auto"."""
    if requested not in RETRIEVALS:
        raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {requested!r}")
    if requested != "auto":
        return requested
    return "ann" if n_items > ANN_MIN_ITEMS else "exact"


# Where training stores each method's default in the checkpoint's summary.
RECOMMEND_WEIGHT = "long_tail_weight"
SIMILAR_ITEMS_WEIGHT = "similar_items_long_tail_weight"


def checkpoint_long_tail_weight(checkpoint: Path, key: str = RECOMMEND_WEIGHT) -> float | None:
    """The serving default of the long-tail weight that training chose on validation, if any:
    Recommend's (`RECOMMEND_WEIGHT`) or SimilarItems' (`SIMILAR_ITEMS_WEIGHT`)."""
    return read_checkpoint(checkpoint).metadata.tuned_long_tail_weight(key)


def _export_into(
    checkpoint: Path,
    output: Path,
    *,
    tensorrt: bool = False,
    text_encoder: bool = True,
    default_long_tail_weight: float = 0.0,
    similar_items_default_long_tail_weight: float = 0.0,
    catalogue_scan: str = "fp32",
    retrieval: str = "auto",
    ann_spec: ann_index.IndexSpec = ann_index.DEFAULT_SPEC,
    batching: triton_config.Batching = triton_config.DEFAULT_BATCHING,
    log: Callable[[str], object] = print,
) -> dict:
    started = time.monotonic()
    model, ckpt = load_checkpoint(checkpoint)
    cfg = model.cfg
    dim = cfg.embedding_dim
    with torch.no_grad():
        table = model.item_table()
    output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    parity: dict[str, dict[str, float]] = {}

    # user encoder: history -> user embedding (item table inside, overlay rows appended)
    encoder = UserEncoder(table, model.user_tower, model.added_item_offset()).eval()
    path = output / contract.USER_ENCODER_MODEL / VERSION / "model.onnx"
    onnx_graphs.export_user_encoder(encoder, path, overlay=True)
    worst = 0.0
    for n_extra in (0, 3):
        extra, _ = onnx_graphs.overlay_case(rng, n_extra, dim)
        hist = rng.integers(1, cfg.n_items + n_extra + 1, size=(3, 7)).astype(np.int64)
        hist[0, :3] = 0
        if n_extra:
            hist[1, -2:] = [cfg.n_items + 1, cfg.n_items + n_extra]
        types = rng.integers(1, len(contract.EVENT_TYPES) + 1, size=hist.shape).astype(np.int64)
        types[hist == 0] = 0
        (diff,) = onnx_graphs.max_abs_diff(
            path,
            {
                contract.HISTORY_ITEMS: hist,
                contract.HISTORY_EVENT_TYPES: types,
                contract.EXTRA_ITEM_VECTORS: onnx_graphs.per_row(extra, len(hist)),
            },
            lambda h=hist, t=types, e=extra: (  # type: ignore[misc]
                encoder(torch.from_numpy(h), torch.from_numpy(t), torch.from_numpy(e)),
            ),
        )
        worst = max(worst, diff)
    parity[contract.USER_ENCODER_MODEL] = {contract.USER_EMBEDDING: worst}

    # context weighting
    path = output / contract.CONTEXT_WEIGHTING_MODEL / VERSION / "model.onnx"
    onnx_graphs.export_context_weighting(model.context_weighting, dim, path)
    user = rng.standard_normal((3, dim)).astype(np.float32)
    ctx = np.stack(
        [
            rng.integers(0, contract.HOUR_BUCKETS, 3),
            rng.integers(0, contract.WEEKDAY_BUCKETS, 3),
            rng.integers(0, cfg.n_devices, 3),
            rng.integers(0, cfg.n_regions, 3),
        ],
        axis=1,
    ).astype(np.int64)
    (diff,) = onnx_graphs.max_abs_diff(
        path,
        {contract.USER_EMBEDDING: user, contract.CONTEXT: ctx},
        lambda: (model.context_weighting(torch.from_numpy(user), torch.from_numpy(ctx)),),
    )
    parity[contract.CONTEXT_WEIGHTING_MODEL] = {contract.WEIGHTED_USER_EMBEDDING: diff}

    # scorer: the catalogue and its long-tail counts (the model's exposure of each item; training
    # popularity for a checkpoint from before) inside the graph, overlay rows appended; or, for
    # a large catalogue, the ANN index with an exact re-rank (a Python-backend model)
    counts = np.asarray(ckpt.long_tail_counts)
    external = onnx_graphs.needs_external_data(table)
    chosen = choose_retrieval(cfg.n_items, retrieval)
    # An exact scan holds [rows, N] score matrices: fewer rows per execution on a large catalogue.
    # The ANN scorer re-ranks a few candidates per row and takes the usual batch.
    scorer_rows = (
        contract.MAX_BATCH_SIZE
        if chosen == "ann"
        else triton_config.scorer_max_batch_size(cfg.n_items)
    )
    ann: dict[str, Any] = {}
    if chosen == "ann":
        folder = output / contract.SCORER_MODEL / VERSION
        ann = ann_index.write_ann_scorer(folder, table.numpy(), counts, ann_spec, log)
        ann["check"] = ann_index.check_recall(
            folder, (0.0, default_long_tail_weight), np.random.default_rng(0)
        )
        worst = min(ann["check"].values())
        log(f"ANN check against the exact scan: {ann['check']}")
        if worst < ann_index.MIN_CHECK_RECALL:
            raise RuntimeError(
                f"the ANN index finds {worst:.2f} of the exact top 10 "
                f"(at least {ann_index.MIN_CHECK_RECALL} expected): {ann['check']}"
            )
        scorer_config = triton_config.python_model_config(
            contract.SCORER_MODEL, triton_config.scorer_io(dim), batching=batching
        )
    else:
        scorer = Scorer(table, torch.from_numpy(counts)).eval()
        path = output / contract.SCORER_MODEL / VERSION / "model.onnx"
        graph = onnx_graphs.scorer_graph(
            table.numpy(),
            counts,
            scan=catalogue_scan,
            overlay=True,
            item_filter=True,
            external_dir=path.parent,
        )
        onnx_graphs.save(graph, path, external=external)
        parity[contract.SCORER_MODEL] = onnx_graphs.scorer_parity(
            path, scorer, dim, cfg.n_items, rng, overlay=True, item_filter=True
        )
        scorer_config = triton_config.onnx_model_config(
            contract.SCORER_MODEL,
            triton_config.scorer_io(dim),
            tensorrt=tensorrt,
            batching=batching,
            max_batch_size=scorer_rows,
        )

    # item lookup (SimilarItems): catalogue indices (one item, or a basket) -> their mean vector
    path = output / contract.ITEM_LOOKUP_MODEL / VERSION / "model.onnx"
    # (an added item as a query: without the new-item boost's shift, `ItemLookup`)
    offset = model.added_item_offset()
    graph = onnx_graphs.item_lookup_graph(
        table.numpy(), path.parent, None if offset is None else offset.numpy()
    )
    onnx_graphs.save(graph, path, external=external)
    parity[contract.ITEM_LOOKUP_MODEL] = {
        contract.QUERY_EMBEDDING: onnx_graphs.item_lookup_parity(
            path, ItemLookup(table, offset).eval(), dim, cfg.n_items, rng
        )
    }

    # audience scorer (Audience, ForecastDemand): users x the catalogue's softmax
    path = output / contract.AUDIENCE_SCORER_MODEL / VERSION / "model.onnx"
    graph = onnx_graphs.audience_scorer_graph(table.numpy(), path.parent)
    onnx_graphs.save(graph, path, external=external)
    parity[contract.AUDIENCE_SCORER_MODEL] = onnx_graphs.audience_parity(
        path, AudienceScorer(table).eval(), dim, cfg.n_items, rng
    )

    configs = [
        triton_config.onnx_model_config(
            contract.USER_ENCODER_MODEL,
            triton_config.user_encoder_io(dim),
            tensorrt=tensorrt,
            batching=batching,
        ),
        triton_config.onnx_model_config(
            contract.CONTEXT_WEIGHTING_MODEL,
            triton_config.context_weighting_io(dim),
            tensorrt=tensorrt,
            batching=batching,
        ),
        scorer_config,
        triton_config.onnx_model_config(
            contract.ITEM_LOOKUP_MODEL,
            triton_config.item_lookup_io(dim),
            tensorrt=tensorrt,
            batching=batching,
        ),
        triton_config.onnx_model_config(
            contract.AUDIENCE_SCORER_MODEL, triton_config.audience_scorer_io(dim), tensorrt=tensorrt
        ),
        # The recommend ensemble is written last, with the repository's identity (below).
        triton_config.similar_items_config(dim, scorer_rows),
        triton_config.audience_config(dim),
    ]

    if text_encoder:
        configs += _export_item_encoders(output, model, ckpt, dim, parity, tensorrt=tensorrt)

    for model_cfg in configs:
        _write_config(output, model_cfg)

    for model_name, diffs in parity.items():
        for tensor, value in diffs.items():
            log(f"parity {model_name}.{tensor}: max abs diff {value:.2e}")
    failed = [
        f"{m}.{t}={v}"
        for m, d in parity.items()
        for t, v in d.items()
        if v > parity_tolerance(m, cfg.n_items)
    ]
    if failed:
        raise RuntimeError(f"ONNX graphs disagree with torch: {', '.join(failed)}")

    write_catalogue(output / contract.CATALOGUE_FILE, ckpt, catalogue_fields(ckpt, log))
    summary = ckpt.summary
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    ckpt_hash = sha256_file(checkpoint)
    model_version = f"{stamp}-{ckpt_hash[:8]}"
    # The identity Triton will serve: the hash of every other file, written into the ensemble.
    identity = content_hash(file_hashes(output))
    _write_config(
        output,
        triton_config.with_identity(
            triton_config.ensemble_config(dim, scorer_rows), model_version, identity
        ),
    )
    metadata = RepositoryMetadata(
        model_version=model_version,
        created_at=datetime.now(UTC).isoformat(),
        embedding_dim=dim,
        max_history=cfg.max_history,
        n_items=cfg.n_items,
        default_long_tail_weight=default_long_tail_weight,
        similar_items_default_long_tail_weight=similar_items_default_long_tail_weight,
        long_tail_weight_max=LONG_TAIL_WEIGHT_MAX,
        tensorrt=tensorrt,
        catalogue_scan=catalogue_scan,
        retrieval=chosen,
        ann=ann,
        # The user encoder, scorer and item lookup take extra_item_vectors/extra_popularity.
        item_overlay=True,
        # The scorer takes item_eligible; the catalogue file has the fields it is built from.
        item_filter=True,
        # The item lookup takes a basket ([B, L] query items) and pools their vectors.
        basket_lookup=True,
        # The audience ensemble and scorer (Audience, ForecastDemand) are in the repository.
        audience=True,
        # The Recommend and SimilarItems ensembles take at most the scorer's rows.
        max_batch_rows=scorer_rows,
        vocabularies=ckpt.vocabularies,
        text_model=summary["text_model"],
        model_config=ckpt.model_config,
        data=summary["data"],
        training={
            "best": summary["best"],
            "most_popular_valid": summary["most_popular_valid"],
            "stop_reason": summary["stop_reason"],
            "train_seconds": summary["train_seconds"],
            "train_config": summary["train_config"],
        },
        parity_max_abs_diff=parity,
        checkpoint={"path": str(checkpoint), "sha256": ckpt_hash},
        files=file_hashes(output),
        export_seconds=round(time.monotonic() - started, 2),
        content_hash=identity,
    )
    return write_repository_metadata(output / contract.METADATA_FILE, metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path("model_repository"))
    parser.add_argument("--tensorrt", action="store_true", help="GPU configs (TensorRT EP, FP16)")
    parser.add_argument(
        "--no-text-encoder", action="store_true", help="skip the MiniLM item text encoder model"
    )
    parser.add_argument(
        "--default-long-tail-weight",
        type=float,
        default=None,
        help="the weight a request without one gets (default: the checkpoint's, chosen on "
        "validation by training; 0 for a checkpoint without one)",
    )
    parser.add_argument(
        "--default-similar-long-tail-weight",
        type=float,
        default=None,
        help="the same for SimilarItems, whose item-item scores have a scale of their own "
        "(default: the checkpoint's, chosen on validation item to item; 0 without one)",
    )
    parser.add_argument(
        "--catalogue-scan",
        choices=onnx_graphs.CATALOGUE_SCANS,
        default="fp32",
        help="int8: the scorer scans a per-row int8 copy of the catalogue and re-scores the best "
        "candidates in fp32 (about twice as fast at a million items; fp32 is faster when small)",
    )
    parser.add_argument(
        "--retrieval",
        choices=RETRIEVALS,
        default="auto",
        help=f"the scorer: exact ONNX scan, or a Faiss index in front of an exact re-rank (auto: "
        f"ann above {ANN_MIN_ITEMS:,} items)",
    )
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(
            f"error: checkpoint {args.checkpoint} not found (run `make train` first)",
            file=sys.stderr,
        )
        return 2
    # method -> (its flag, the weight given there, where training stored its choice)
    defaults = {
        "Recommend": (
            "--default-long-tail-weight",
            args.default_long_tail_weight,
            RECOMMEND_WEIGHT,
        ),
        "SimilarItems": (
            "--default-similar-long-tail-weight",
            args.default_similar_long_tail_weight,
            SIMILAR_ITEMS_WEIGHT,
        ),
    }
    for flag, given, _ in defaults.values():  # before the checkpoint is read
        if given is not None and not 0.0 <= given <= LONG_TAIL_WEIGHT_MAX:
            parser.error(f"{flag} must be in [0, {LONG_TAIL_WEIGHT_MAX:g}], got {given:g}")
    weights: dict[str, float] = {}
    for method, (flag, given, key) in defaults.items():
        tuned = None if given is not None else checkpoint_long_tail_weight(args.checkpoint, key)
        weight = given if given is not None else 0.0 if tuned is None else tuned
        if not 0.0 <= weight <= LONG_TAIL_WEIGHT_MAX:
            parser.error(
                f"the checkpoint's {method} long-tail weight must be in "
                f"[0, {LONG_TAIL_WEIGHT_MAX:g}], got {weight:g}; give one with {flag}"
            )
        source = (
            "given"
            if given is not None
            else "none tuned"
            if tuned is None
            else "chosen on validation by training"
        )
        print(f"{method} default long-tail weight {weight:g} ({source})", file=sys.stderr)
        weights[method] = weight
    meta = export(
        args.checkpoint,
        args.output,
        tensorrt=args.tensorrt,
        text_encoder=not args.no_text_encoder,
        default_long_tail_weight=weights["Recommend"],
        similar_items_default_long_tail_weight=weights["SimilarItems"],
        catalogue_scan=args.catalogue_scan,
        retrieval=args.retrieval,
        log=lambda m: print(m, file=sys.stderr),
    )
    total = sum(f["bytes"] for f in meta["files"].values())
    print(
        f"exported model version {meta['model_version']} to {args.output} "
        f"({len(meta['files'])} files, {total / 1e6:.1f} MB) in {meta['export_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
