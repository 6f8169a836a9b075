"""Call the running gateway with a real MovieLens-1M viewing history and print the titles.

    python examples/recommend_client.py [--address 127.0.0.1:50051] [-k 10] [--long-tail-weight 0.5]
                                        [--click N] [--user-only | --remember] [--user ID]
                                        [--category PATH ...] [--brand B ...] [--price P ...]
                                        [--available-only] [--allow ID ...] [--deny ID ...]
    python examples/recommend_client.py --forget [--user ID]
    python examples/recommend_client.py --batch N [--user ID] [-k 10]

The history below is user 1m_1's first twelve ratings in MovieLens-1M, in time order (item ids
there are titles). Any internal service calls `ltrec.v1.Recommender/Recommend` the same way.
With `--click N` it then reports feedback for the list: an impression for every item shown and a
click on the N-th (`FeedbackBatch`, acknowledged once it is on disk in the gateway's store; the
click also joins the user's stored history).

`--remember` sends the history with `remember_history`, so the gateway keeps it for the user;
`--user-only` sends only the user id, and the gateway uses the user's stored history (the
remembered events and the clicks, carts and purchases reported by Feedback). The reply says
which history was used: "history: stored (13 events)".

`--category`, `--brand`, `--price`, `--available-only`, `--allow` and `--deny` send a business
filter (`ItemFilter`): only items that pass are recommended, still k of them whenever k pass, in
the order the unfiltered list has them. Each repeatable flag is a list of which any value will
do; different flags must all hold. `--category Comedy` keeps the items whose category path
starts with Comedy (MovieLens: the genre list, "Comedy|Romance"). A value no item has is
INVALID_ARGUMENT naming it: "filter.brands[0] 'Acme' is not the brand of any item ...".

`--forget` erases the user instead (`ForgetUser`): the stored history is deleted, and the next
retraining skips the user's feedback; it prints what was erased. ForgetUser is an admin RPC:
`--token` (default: the LTREC_ADMIN_TOKEN environment variable) sends `authorization: Bearer
<token>` with it, for a gateway that requires credentials (the local stack allows every caller).

`--batch N` asks for N users at once over one `RecommendBatch` stream (as a newsletter job
would): users ID-1 ... ID-N, each with a different part of the history. Answers come back as they
are ready, each with the index of its request and either the list or that request's own error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc  # noqa: E402

PRICE_BUCKETS = {
    "budget": recommender_pb2.PRICE_BUCKET_BUDGET,
    "mid-range": recommender_pb2.PRICE_BUCKET_MID_RANGE,
    "premium": recommender_pb2.PRICE_BUCKET_PREMIUM,
}

HISTORY = [
    "Girl, Interrupted (1999)",
    "Back to the Future (1985)",
    "Titanic (1997)",
    "Cinderella (1950)",
    "Meet Joe Black (1998)",
    "Last Days of Disco, The (1998)",
    "Erin Brockovich (2000)",
    "Christmas Story, A (1983)",
    "To Kill a Mockingbird (1962)",
    "Star Wars: Episode IV - A New Hope (1977)",
    "One Flew Over the Cuckoo's Nest (1975)",
    "Wallace & Gromit: The Best of Aardman Animation (1996)",
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--long-tail-weight", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--click", type=int, metavar="N", help="report a click on the N-th item")
    parser.add_argument("--user", default="example-user", help="the user id (default %(default)s)")
    stored = parser.add_mutually_exclusive_group()
    stored.add_argument(
        "--user-only", action="store_true", help="no history: use the user's stored one"
    )
    stored.add_argument(
        "--remember", action="store_true", help="have the gateway keep this history for the user"
    )
    stored.add_argument(
        "--forget", action="store_true", help="erase the user (ForgetUser) instead of recommending"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("LTREC_ADMIN_TOKEN") or None,
        help="bearer token for ForgetUser (default: $LTREC_ADMIN_TOKEN)",
    )
    business = parser.add_argument_group("business filter (ItemFilter)")
    business.add_argument(
        "--category", action="append", default=[], metavar="PATH", help="category path prefix"
    )
    business.add_argument("--brand", action="append", default=[])
    business.add_argument("--price", action="append", default=[], choices=sorted(PRICE_BUCKETS))
    business.add_argument("--available-only", action="store_true", help="only items in stock")
    business.add_argument("--allow", action="append", default=[], metavar="ID")
    business.add_argument("--deny", action="append", default=[], metavar="ID")
    parser.add_argument(
        "--batch",
        type=int,
        metavar="N",
        help="recommend for N users over one RecommendBatch stream",
    )
    args = parser.parse_args()
    if args.forget:
        return forget(args.address, args.user, args.timeout, args.token)
    if args.batch is not None:
        return batch(args.address, args.user, args.batch, args.k, args.timeout)
    now = int(time.time())
    request = recommender_pb2.RecommendRequest(
        user_id=args.user,
        context=recommender_pb2.Context(timestamp=now, device="desktop", region="zip4"),
        k=args.k,
        remember_history=args.remember,
        filter=recommender_pb2.ItemFilter(
            categories=args.category,
            brands=args.brand,
            price_buckets=[PRICE_BUCKETS[p] for p in args.price],
            available_only=args.available_only,
            allow_item_ids=args.allow,
            deny_item_ids=args.deny,
        ),
    )
    if not args.user_only:
        # An hour apart, the last at the start of this hour: the same history sent again within
        # the hour has the same times, and a remembered one is kept once.
        last = now // 3600 * 3600
        request.history.extend(
            recommender_pb2.HistoryEvent(
                item_id=title,
                event_type=recommender_pb2.EVENT_TYPE_RATING,
                timestamp=last - 3600 * (len(HISTORY) - 1 - i),
            )
            for i, title in enumerate(HISTORY)
        )
    if args.long_tail_weight is not None:
        request.long_tail_weight = args.long_tail_weight
    with grpc.insecure_channel(args.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        try:
            reply = stub.Recommend(request, timeout=args.timeout)
            accepted = 0
            if args.click is not None:
                accepted = stub.FeedbackBatch(
                    feedback(reply, request.user_id, args.click), timeout=args.timeout
                ).accepted
        except grpc.RpcError as exc:
            print(f"call failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    source = recommender_pb2.HistorySource.Name(reply.history_source)
    source = source.removeprefix("HISTORY_SOURCE_").lower()
    skipped = reply.skipped_history_items
    unknown = f", {skipped} not in the catalogue" if skipped else ""
    print(f"history: {source} ({reply.history_events} events{unknown})", end="")
    print(f": {', '.join(HISTORY[-5:])} ..." if request.history else "")
    if request.filter.ListFields():
        shown = str(request.filter).replace("\n", "; ").strip("; ")
        print(f"filter: {shown} ({len(reply.items)} items for k={args.k})")
    print(f"model {reply.model_version}, request {reply.request_id}:")
    for rank, item in enumerate(reply.items, 1):
        tail = " [long tail]" if item.long_tail else ""
        print(f"{rank:>3}. {item.title}  (score {item.score:.3f}){tail} - {item.reason}")
    if accepted:
        print(f"feedback: {accepted} events stored (impressions, click on #{args.click})")
    return 0


def admin_metadata(token: str | None) -> list[tuple[str, str]] | None:
    """The credentials an admin RPC carries: `authorization: Bearer <token>`, or none."""
    return [("authorization", f"Bearer {token}")] if token else None


def forget(address: str, user_id: str, timeout: float, token: str | None = None) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        try:
            request = recommender_pb2.ForgetUserRequest(user_id=user_id)
            reply = stub.ForgetUser(request, timeout=timeout, metadata=admin_metadata(token))
        except grpc.RpcError as exc:
            print(f"call failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(
        f"forgot the user (request {reply.request_id}): {reply.history_events_removed} stored "
        f"history events removed; {reply.feedback_records_erased} feedback records and "
        f"{reply.served_lists_erased} served lists left out of retraining"
    )
    return 0


def batch(address: str, user_prefix: str, users: int, k: int, timeout: float) -> int:
    """One stream, one request per user; each answer printed as it comes."""
    now = int(time.time()) // 3600 * 3600

    def requests() -> Iterator[recommender_pb2.RecommendBatchRequest]:
        for n in range(users):
            # User n read the history's titles n, n+1, ... (a different taste each), in order.
            titles = HISTORY[n % len(HISTORY) :] or HISTORY
            history = [
                recommender_pb2.HistoryEvent(
                    item_id=title,
                    event_type=recommender_pb2.EVENT_TYPE_RATING,
                    timestamp=now - 3600 * (len(titles) - i),
                )
                for i, title in enumerate(titles)
            ]
            request = recommender_pb2.RecommendRequest(
                user_id=f"{user_prefix}-{n + 1}", history=history, k=k
            )
            yield recommender_pb2.RecommendBatchRequest(request=request)

    failed = 0
    with grpc.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        try:
            for answer in stub.RecommendBatch(requests(), timeout=timeout):
                user = f"{user_prefix}-{answer.index + 1}"
                if answer.WhichOneof("result") == "error":
                    failed += 1
                    code = _CODE_NAMES.get(answer.error.code, str(answer.error.code))
                    print(f"#{answer.index} {user}: {code}: {answer.error.message}")
                    continue
                titles = ", ".join(item.title for item in answer.response.items[:3])
                print(f"#{answer.index} {user} (request {answer.request_id}): {titles} ...")
        except grpc.RpcError as exc:
            print(f"stream failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{users} users: {users - failed} lists, {failed} errors")
    return 0


# google.rpc.Code number -> its name: 3 -> INVALID_ARGUMENT
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def feedback(
    reply: recommender_pb2.RecommendResponse, user_id: str, click: int
) -> recommender_pb2.FeedbackBatchRequest:
    """Impressions for the whole list and a click on its `click`-th item (1-based)."""
    events = [
        recommender_pb2.FeedbackEvent(
            request_id=reply.request_id,
            user_id=user_id,
            item_id=item.item_id,
            type=recommender_pb2.FEEDBACK_TYPE_IMPRESSION,
            position=position,
        )
        for position, item in enumerate(reply.items)
    ]
    if 1 <= click <= len(reply.items):
        events.append(
            recommender_pb2.FeedbackEvent(
                request_id=reply.request_id,
                user_id=user_id,
                item_id=reply.items[click - 1].item_id,
                type=recommender_pb2.FEEDBACK_TYPE_CLICK,
                position=click - 1,
            )
        )
    return recommender_pb2.FeedbackBatchRequest(events=events)


if __name__ == "__main__":
    sys.exit(main())
