"""The serving contract shared by export code, generated Triton configs and the gateway.

Defined once here (and imported by `export_scripts` and `ltrec`) so that a renamed tensor cannot
drift between the ONNX graphs, `config.pbtxt` and the gateway. Pure Python: no torch, no numpy.
"""

from __future__ import annotations

# --- Triton model names -------------------------------------------------------------------------
ENSEMBLE_MODEL = "recommend"
USER_ENCODER_MODEL = "user_encoder"
CONTEXT_WEIGHTING_MODEL = "context_weighting"
SCORER_MODEL = "scorer"
# Item tower for items added after training: MiniLM + the trained fusion of text, image
# features and attributes. The image encoder (EfficientNet-Lite0) runs first, only for items
# that have an image.
ITEM_ENCODER_MODEL = "item_encoder"
IMAGE_ENCODER_MODEL = "image_encoder"
# SimilarItems: ensemble item_lookup -> scorer (the item's own vector as the query).
SIMILAR_ITEMS_MODEL = "similar_items"
ITEM_LOOKUP_MODEL = "item_lookup"
# Audience and ForecastDemand: ensemble item_lookup -> context_weighting (of the users) ->
# audience_scorer. The users' vectors come from USER_ENCODER_MODEL, which the gateway calls on
# their stored histories (and caches).
AUDIENCE_MODEL = "audience"
AUDIENCE_SCORER_MODEL = "audience_scorer"

# --- Ensemble inputs (all batch-first; the gateway sends batch 1) ------------------------------
# The Recommend and SimilarItems ensembles and their steps batch (Triton's dynamic batcher): every
# input is per row, and requests of one shape are stacked. The gateway pads the variable-length
# inputs to a few lengths (`padded_length`) so that concurrent requests share a shape.
# Catalogue indices of the user's history, oldest first, 0 = padding (left-padded to a length of
# `HISTORY_BUCKETS`). INT64 [batch, history].
HISTORY_ITEMS = "history_items"
# Event type index per history position (see EVENT_TYPES), 0 = padding. INT64 [batch, history].
HISTORY_EVENT_TYPES = "history_event_types"
# Context buckets (hour, weekday, device, region), each 0 = unknown. INT64 [batch, 4].
CONTEXT = "context"
# Catalogue indices never to return, 0 = padding (padded to a length of `EXCLUDE_BUCKETS`).
# INT64 [batch, n_exclude].
EXCLUDE_ITEMS = "exclude_items"
# Popularity-debiasing strength. FP32 [batch, 1].
LONG_TAIL_WEIGHT = "long_tail_weight"
# Number of items to return, per row. INT64 [batch, 1]. A batch returns its largest k for every
# row (TOP_ITEMS [batch, max k]); a row's own top k are the first k of its row (TopK breaks ties
# by index, so they are exactly what k alone returns), and the gateway keeps those.
TOP_K = "top_k"
# The item overlay: items added after training (UpsertItems), per row. Row j is catalogue index
# N+1+j in history, exclusions and outputs; M may be 0. FP32 [batch, M, D] and FP32 [batch, M]
# (interaction counts, for the long-tail term). A caller whose indices read only some overlay rows
# may send just those, renumbered (`server.features.overlay_subset`).
EXTRA_ITEM_VECTORS = "extra_item_vectors"
EXTRA_POPULARITY = "extra_popularity"
# SimilarItems ensemble input: the catalogue indices of the item (or the basket of items) to find
# neighbours of, PADDING_INDEX = padding (right-padded to a length of `HISTORY_BUCKETS`).
# INT64 [batch, basket].
QUERY_ITEMS = "query_items"
# The business filter (ItemFilter) as a mask the scorer applies before top-k: True where the item
# may be returned. BOOL [batch, N+1+M] (every catalogue index, overlay included), or [batch, 1]
# (True: no filter), which broadcasts, so an unfiltered request sends one element.
ITEM_ELIGIBLE = "item_eligible"

# Audience ensemble inputs (not batched; beside QUERY_ITEMS [Q, 1], one row per item; CONTEXT
# [U, 4], the same row for every user; EXTRA_ITEM_VECTORS [M, D], the audience scorer's; TOP_K
# [1]; EXCLUDE_ITEMS [1, E], the items left out of the catalogue's softmax: the hidden ones,
# 0 = padding):
# The overlay rows the query items read, per query row, for the (batching) item lookup.
# FP32 [Q, M', D].
QUERY_EXTRA_ITEM_VECTORS = "query_extra_item_vectors"
# The user encoder's vectors of the users scored. FP32 [U, D].
AUDIENCE_USERS = "audience_users"
# Each user's events in the history store (> 0), the weight of their expected interactions.
# FP32 [U].
USER_ACTIVITY = "user_activity"

# --- Intermediate tensors -----------------------------------------------------------------------
USER_EMBEDDING = "user_embedding"
WEIGHTED_USER_EMBEDDING = "weighted_user_embedding"
# The query items' mean vector (one item: its vector), scored like a user embedding.
QUERY_EMBEDDING = "query_embedding"

# --- Ensemble outputs ---------------------------------------------------------------------------
TOP_ITEMS = "top_items"  # INT64 [batch, k] catalogue indices
TOP_SCORES = "top_scores"  # FP32 [batch, k]; -inf where fewer than k items were eligible
REASON_POSITIONS = "reason_positions"  # INT64 [batch, k] history position closest to each item
# Audience: per query item, the top k users (positions in AUDIENCE_USERS, best first) by their
# expected interactions with it, activity x p(item | user), and its sum over the users.
AUDIENCE_TOP_USERS = "audience_top_users"  # INT64 [Q, k]
AUDIENCE_TOP_SCORES = "audience_top_scores"  # FP32 [Q, k]
EXPECTED_INTERACTIONS = "expected_interactions"  # FP32 [Q]

# --- Item encoders (for encoding new items; not on the Recommend path) -----------------------
TEXT_INPUT_IDS = "input_ids"  # INT64 [batch, tokens]
TEXT_ATTENTION_MASK = "attention_mask"  # INT64 [batch, tokens]
# Image encoder input: RGB in [0, 1], channels first, as `ltrec_core.images.to_model_input` makes it
# (resize the shorter side, centre crop); the ImageNet normalisation is inside the graph.
# FP32 [batch, 3, IMAGE_SIZE, IMAGE_SIZE].
IMAGE = "image"
IMAGE_SIZE = 224
# Pooled EfficientNet-Lite0 features. FP32 [batch, IMAGE_FEATURE_DIM]; zeros for no image.
IMAGE_FEATURES = "image_features"
IMAGE_FEATURE_DIM = 1280
# 1.0 where the row has a real image, 0.0 where not (the fusion then ignores IMAGE_FEATURES).
# FP32 [batch, 1].
HAS_IMAGE = "has_image"
# Hashed attribute tokens (category path parts, brand, price bucket; see
# `ltrec_core.item_attributes`), 0 = padding. INT64 [batch, ATTRIBUTE_SLOTS].
ATTRIBUTE_IDS = "attribute_ids"
ATTRIBUTE_SLOTS = 8
ATTRIBUTE_BUCKETS = 1024  # ids 1..ATTRIBUTE_BUCKETS-1
ITEM_VECTOR = "item_vector"  # FP32 [batch, EMBEDDING_DIM] (not "embedding": clashes in torch.onnx)
# The tokenizer files (tokenizer.json) the gateway tokenizes new items' text with, no torch.
TOKENIZER_DIR = "tokenizer"  # under <repository>/item_encoder/

# --- Batching ------------------------------------------------------------------------------------
# Padded lengths of the history (and basket): the smallest that holds it, at most max_history.
HISTORY_BUCKETS: tuple[int, ...] = (16, 32, 64, 128)
# Padded lengths of the exclusions: powers of two from the first.
EXCLUDE_BUCKET_MIN = 16
# The largest batch of the Recommend and SimilarItems ensembles and the scorer.
MAX_BATCH_SIZE = 64
# The largest batch of the steps the gateway also calls directly with many rows (the user encoder
# for cached user vectors, the context weighting and item lookup for Audience's user blocks and
# query items): at least their largest direct call.
MAX_DIRECT_ROWS = 4096


def padded_length(length: int, buckets: tuple[int, ...], limit: int) -> int:
    """The smallest of `buckets` (then `limit`) that holds `length`; beyond `limit`, `length`."""
    for bucket in buckets:
        if length <= bucket and bucket < limit:
            return bucket
    return max(length, limit)


def exclude_length(length: int) -> int:
    """A power of two from EXCLUDE_BUCKET_MIN that holds `length`."""
    size = EXCLUDE_BUCKET_MIN
    while size < length:
        size *= 2
    return size


# --- Vocabularies and bounds --------------------------------------------------------------------
PADDING_INDEX = 0
# Index i+1 in HISTORY_EVENT_TYPES; request EVENT_TYPE_UNSPECIFIED maps to "view".
EVENT_TYPES: tuple[str, ...] = ("view", "cart", "purchase", "rating")
CONTEXT_FIELDS: tuple[str, ...] = ("hour", "weekday", "device", "region")
HOUR_BUCKETS = 25  # 0 unknown, 1 + UTC hour
WEEKDAY_BUCKETS = 8  # 0 unknown, 1 + weekday (Monday = 0)
UNKNOWN_BUCKET = 0  # device/region: 0 unknown, 1 + position in the exported vocabulary

# --- Files the export writes at the root of the model repository -------------------------------
METADATA_FILE = "ltrec_metadata.json"  # versions, data, training figures, hashes, vocabularies
# The repository's identity as Triton serves it: the export writes the model version and the
# content hash (`ltrec_core.artifacts.content_hash`) into the ensemble's config.pbtxt as model
# parameters; Triton's model configuration endpoint returns them, and the gateway compares them
# with the metadata file it loaded (not SERVING while they differ).
MODEL_VERSION_PARAMETER = "ltrec_model_version"
CONTENT_HASH_PARAMETER = "ltrec_content_hash"
# Files the content hash leaves out: the metadata file, and the ensemble config that carries it.
IDENTITY_CARRIER = f"{ENSEMBLE_MODEL}/config.pbtxt"
CATALOGUE_FILE = "ltrec_catalogue.csv"  # CATALOGUE_COLUMNS, one row per item (index 1..N)
# The catalogue file's header: the export writes it, the gateway refuses any other. category,
# brand and price_bucket (one of `ltrec_core.item_text.PRICE_BUCKETS`, or empty) are the item's
# fields as training read them; the gateway filters on them (ItemFilter). popularity is the count
# the long-tail term penalises, `w * log(1 + popularity)`: the model's exposure of the item (1 +
# how many training users' top-50 lists hold it; training interactions for a checkpoint from
# before exposure);
# an item replaced by UpsertItems keeps it, a new one gets 0. long_tail is the training head/tail
# flag (the top 20% of items by interactions are the head).
CATALOGUE_COLUMNS: tuple[str, ...] = (
    "index",
    "item_id",
    "title",
    "popularity",
    "long_tail",
    "category",
    "brand",
    "price_bucket",
)
# The metadata's default long-tail weight of SimilarItems (Recommend's is
# `default_long_tail_weight`): item-item scores have a scale of their own.
SIMILAR_ITEMS_DEFAULT_WEIGHT_KEY = "similar_items_default_long_tail_weight"
