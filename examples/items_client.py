"""Add, hide and relate catalogue items on the running gateway, without retraining; find their
audience and forecast their demand.

    python examples/items_client.py upsert --file examples/new_items.csv [--batch 64]
    python examples/items_client.py delete "Grave Shadows (2031)" [ID ...]
    python examples/items_client.py similar "Toy Story (1995)" [-k 10] [--long-tail-weight 0.01]
    python examples/items_client.py basket "Toy Story (1995)" "Babe (1995)" [ID ...] [-k 10]
    python examples/items_client.py audience "Grave Shadows (2031)" [-k 10] [--max-users N]
    python examples/items_client.py forecast "Grave Shadows (2031)" "Toy Story (1995)" [ID ...]
    (every command takes --address 127.0.0.1:50051 and --timeout SECONDS; upsert and delete
    take --token TOKEN, default the LTREC_ADMIN_TOKEN environment variable: the bearer token
    a gateway that requires credentials for its admin RPCs accepts)

`upsert` reads a CSV (UTF-8, header row) with the dataset format's item columns: `item_id` and
`title` (required), `description`, `category` (`Books|Fiction`), `brand`, `price_bucket`
(`budget`, `mid-range`, `premium` or empty), `available` (`true`/`false`, `1`/`0`, `yes`/`no`;
empty: available, as every item is unless told otherwise; a filter's `available_only` leaves
out the others), `image` (a local image file, relative to the CSV's folder, that this client
reads and sends as bytes; at most 1 MiB) and `image_path` (a path the gateway reads under its
LTREC_IMAGE_ROOT); any other column is kept as an attribute. It sends
`UpsertItems` in batches (each encoded by the model's image and item encoders in Triton,
acknowledged once on disk) and retries a batch on UNAVAILABLE: upserts are idempotent. An image
the gateway cannot use does not fail the item: it is printed, and the item is served by its text
and attributes. Once it returns, the items are recommendable on every gateway replica within
the poll interval (1 s).

`basket` asks SimilarItems in basket mode (`basket_item_ids`): items that complete a cart of
several items as a whole, none of the cart's, each with the cart item it is closest to.
`audience` prints the users most likely to engage with an item (`Audience`): the users the
gateway's history store knows (those who sent Feedback, or Recommend with remember_history),
each with their expected interactions with the item (their activity x the model's probability
that their next interaction is the item). `forecast` prints each item's expected interactions
summed over the same users (`ForecastDemand`), to compare items for stock planning.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc  # noqa: E402

FIELDS = (
    "item_id",
    "title",
    "description",
    "category",
    "brand",
    "price_bucket",
    "available",
    "image",
    "image_path",
)
MAX_IMAGE_BYTES = 1024 * 1024  # the gateway's bound on Item.image
PRICE_BUCKETS = {
    "": recommender_pb2.PRICE_BUCKET_UNSPECIFIED,
    "budget": recommender_pb2.PRICE_BUCKET_BUDGET,
    "mid-range": recommender_pb2.PRICE_BUCKET_MID_RANGE,
    "premium": recommender_pb2.PRICE_BUCKET_PREMIUM,
}
AVAILABLE = {
    "": None,
    "true": True,
    "1": True,
    "yes": True,
    "false": False,
    "0": False,
    "no": False,
}
RETRIES = 3
T = TypeVar("T")


def read_image(csv_path: Path, line: int, value: str) -> bytes:
    """The `image` column: a local file (relative to the CSV's folder) -> its bytes."""
    if not value.strip():
        return b""
    path = csv_path.parent / value.strip()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"{csv_path}, line {line}: image {str(path)!r}: {exc.strerror}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise SystemExit(
            f"{csv_path}, line {line}: image {str(path)!r} has {len(data)} bytes, at most "
            f"{MAX_IMAGE_BYTES} are sent (resize it, or use image_path on the gateway's side)"
        )
    return data


def read_items(path: Path) -> list[recommender_pb2.Item]:
    """CSV rows -> Items; a bad price bucket, availability or image names its line."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        items = []
        for row in reader:
            bucket = (row.get("price_bucket") or "").strip().lower()
            if bucket not in PRICE_BUCKETS:
                raise SystemExit(
                    f"{path}, line {reader.line_num}: price_bucket must be one of "
                    f"{sorted(k for k in PRICE_BUCKETS if k)} or empty, got {bucket!r}"
                )
            available = (row.get("available") or "").strip().lower()
            if available not in AVAILABLE:
                raise SystemExit(
                    f"{path}, line {reader.line_num}: available must be true, false or empty, "
                    f"got {available!r}"
                )
            items.append(
                recommender_pb2.Item(
                    item_id=(row.get("item_id") or "").strip(),
                    title=(row.get("title") or "").strip(),
                    description=row.get("description") or "",
                    category=row.get("category") or "",
                    brand=row.get("brand") or "",
                    price_bucket=PRICE_BUCKETS[bucket],
                    image=read_image(path, reader.line_num, row.get("image") or ""),
                    image_path=row.get("image_path") or "",
                    available=AVAILABLE[available],
                    attributes={k: v for k, v in row.items() if k and k not in FIELDS and v},
                )
            )
    return items


def batches(items: list[recommender_pb2.Item], size: int) -> Iterator[list[recommender_pb2.Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def with_retries(call: Callable[[], T]) -> T:
    """Retries UNAVAILABLE (Triton or the store briefly away) with backoff."""
    for attempt in range(RETRIES):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == RETRIES - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def print_audience(
    stub: recommender_pb2_grpc.RecommenderStub,
    item_id: str,
    k: int,
    max_users: int | None,
    timeout: float,
) -> None:
    request = recommender_pb2.AudienceRequest(item_id=item_id, k=k)
    if max_users is not None:
        request.max_users = max_users
    reply = with_retries(lambda: stub.Audience(request, timeout=timeout))
    print(
        f"audience of {item_id} (model {reply.model_version}): {len(reply.users)} of "
        f"{reply.users_scanned} users scanned; {reply.expected_interactions:.4f} expected "
        "interactions in all"
    )
    for rank, user in enumerate(reply.users, 1):
        print(
            f"{rank:>3}. {user.user_id}  {user.expected_interactions:.4f} expected "
            f"(p {user.probability:.2e} x {user.history_events} events)"
        )


def print_forecast(
    stub: recommender_pb2_grpc.RecommenderStub,
    item_ids: list[str],
    max_users: int | None,
    timeout: float,
) -> None:
    request = recommender_pb2.ForecastDemandRequest(item_ids=item_ids)
    if max_users is not None:
        request.max_users = max_users
    reply = with_retries(lambda: stub.ForecastDemand(request, timeout=timeout))
    print(f"demand over {reply.users_scanned} users (model {reply.model_version}):")
    for item in reply.items:
        print(f"  {item.expected_interactions:>12.4f}  {item.item_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument(
        "--token",
        default=os.environ.get("LTREC_ADMIN_TOKEN") or None,
        help="bearer token for UpsertItems and DeleteItems (default: $LTREC_ADMIN_TOKEN)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    upsert = commands.add_parser("upsert", help="add or replace items from a CSV file")
    upsert.add_argument("--file", type=Path, required=True)
    upsert.add_argument("--batch", type=int, default=64, help="items per call (gateway max 64)")
    delete = commands.add_parser("delete", help="hide items: never recommended again")
    delete.add_argument("item_ids", nargs="+")
    similar = commands.add_parser("similar", help="items related to one item")
    similar.add_argument("item_id")
    similar.add_argument("-k", type=int, default=10)
    similar.add_argument("--long-tail-weight", type=float, default=None)
    basket = commands.add_parser("basket", help="items that complete a basket of items")
    basket.add_argument("item_ids", nargs="+", help="the basket (distinct ids)")
    basket.add_argument("-k", type=int, default=10)
    basket.add_argument("--long-tail-weight", type=float, default=None)
    audience = commands.add_parser("audience", help="the users most likely to engage with an item")
    audience.add_argument("item_id")
    audience.add_argument("-k", type=int, default=10)
    audience.add_argument("--max-users", type=int, default=None, help="users scanned at most")
    forecast = commands.add_parser("forecast", help="expected interactions per item")
    forecast.add_argument("item_ids", nargs="+")
    forecast.add_argument("--max-users", type=int, default=None, help="users scanned at most")
    args = parser.parse_args(argv)
    # Only the admin RPCs carry the token (the others never need it).
    credentials = [("authorization", f"Bearer {args.token}")] if args.token else None

    with grpc.insecure_channel(args.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        try:
            if args.command == "upsert":
                items = read_items(args.file)
                done = 0
                for batch in batches(items, args.batch):
                    reply = with_retries(
                        lambda b=batch: stub.UpsertItems(  # type: ignore[misc]
                            recommender_pb2.UpsertItemsRequest(items=b),
                            timeout=args.timeout,
                            metadata=credentials,
                        )
                    )
                    done += reply.upserted
                    print(
                        f"upserted {reply.upserted} ({reply.created} new; images: "
                        f"{reply.images_encoded} encoded, {reply.images_not_encoded} not used) "
                        f"with model {reply.model_version}"
                    )
                    for problem in reply.image_problems:
                        print(f"  {batch[problem.index].item_id}: {problem.reason}")
                print(f"{done} items from {args.file} are recommendable")
            elif args.command == "delete":
                reply = with_retries(
                    lambda: stub.DeleteItems(
                        recommender_pb2.DeleteItemsRequest(item_ids=args.item_ids),
                        timeout=args.timeout,
                        metadata=credentials,
                    )
                )
                print(f"hidden: {reply.deleted} items")
            elif args.command == "audience":
                print_audience(stub, args.item_id, args.k, args.max_users, args.timeout)
            elif args.command == "forecast":
                print_forecast(stub, args.item_ids, args.max_users, args.timeout)
            else:
                if args.command == "basket":
                    request = recommender_pb2.SimilarItemsRequest(
                        basket_item_ids=args.item_ids, k=args.k
                    )
                    heading = f"to complete a basket of {len(args.item_ids)}"
                else:
                    request = recommender_pb2.SimilarItemsRequest(item_id=args.item_id, k=args.k)
                    heading = f"related to {args.item_id}"
                if args.long_tail_weight is not None:
                    request.long_tail_weight = args.long_tail_weight
                reply = stub.SimilarItems(request, timeout=args.timeout)
                print(f"{heading} (model {reply.model_version}):")
                for rank, item in enumerate(reply.items, 1):
                    tail = " [long tail]" if item.long_tail else ""
                    # in a basket: which of its items this one goes with
                    why = f"  {item.reason}" if args.command == "basket" else ""
                    print(f"{rank:>3}. {item.title}  (score {item.score:.3f}){tail}{why}")
        except grpc.RpcError as exc:
            print(f"call failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
