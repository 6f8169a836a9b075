"""Access control through the real stack: the gateway process (`python -m server`) serving mutual
TLS in front of the real Triton, with bearer tokens from a directory and a certificate allow-list.

Certificates are made by openssl per module (`tests.support.pki`): `admin` is on the allow-list by
its subject, `reader` is signed by the same CA but not on it, so it may Recommend but not change
the catalogue unless it sends the `catalogue-sync` token. The per-caller limit is 1, so a
RecommendBatch stream held open takes its caller's only slot.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.pki import Pki, make_pki
from tests.support.stack import Stack, _request, metric_value, started_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PB = recommender_pb2
TOKEN = "catalogue-sync-" + "5f2c9a1e7b3d4c60"
NEW_ID = "access-new-film"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    made = make_pki(tmp_path_factory.mktemp("pki"))
    made.issue("admin", "/CN=ltrec-admin/O=Shop")
    made.issue("reader", "/CN=ltrec-reader/O=Shop", "DNS:reader.shop.svc")
    return made


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path, pki: Pki
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("access")
    tokens = root / "tokens"
    tokens.mkdir()
    (tokens / "catalogue-sync").write_text(TOKEN + "\n")
    env = {
        "LTREC_ALLOW_PLAINTEXT": "false",
        "LTREC_TLS_CERT_FILE": str(pki.cert("server")),
        "LTREC_TLS_KEY_FILE": str(pki.key("server")),
        "LTREC_TLS_CLIENT_CA_FILE": str(pki.ca),
        "LTREC_ADMIN_AUTH": "require",
        "LTREC_ADMIN_TOKENS_DIR": str(tokens),
        "LTREC_ADMIN_ALLOWED_IDENTITIES": "O=Shop,CN=ltrec-admin",
        "LTREC_MAX_CONCURRENT_PER_CALLER": "1",
    }
    with started_stack(
        root, triton_build_dir, env, credentials=pki.client_credentials("reader")
    ) as started:
        yield started


@pytest.fixture(scope="module")
def admin(stack: Stack, pki: Pki) -> Iterator[recommender_pb2_grpc.RecommenderStub]:
    with grpc.secure_channel(stack.gateway.address, pki.client_credentials("admin")) as channel:
        yield recommender_pb2_grpc.RecommenderStub(channel)


def denied(stack: Stack, method: str, reason: str) -> float:
    return metric_value(
        stack.gateway.metrics_port,
        "ltrec_gateway_auth_denied_total",
        {"method": method, "reason": reason},
    )


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()  # type: ignore[attr-defined]
    return code


def known(stub: recommender_pb2_grpc.RecommenderStub, item_id: str) -> bool:
    try:
        stub.SimilarItems(PB.SimilarItemsRequest(item_id=item_id, k=3), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return False
    return True


def test_only_allowed_callers_change_the_catalogue(
    stack: Stack, admin: recommender_pb2_grpc.RecommenderStub
) -> None:
    reader = stack.stub  # signed by the CA, not on the allow-list
    trained = stack.history[-1]
    upsert = PB.UpsertItemsRequest(
        items=[PB.Item(item_id=NEW_ID, title="Access Story (2031)", category="Comedy")]
    )
    wrong = (("authorization", "Bearer catalogue-sync-0000000000000000"),)
    assert code_of(lambda: reader.UpsertItems(upsert, timeout=60)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert code_of(lambda: reader.UpsertItems(upsert, metadata=wrong, timeout=60)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    delete = PB.DeleteItemsRequest(item_ids=[trained])
    assert code_of(lambda: reader.DeleteItems(delete, timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Nothing changed: the new film is unknown, the trained one still served.
    assert not known(reader, NEW_ID) and known(reader, trained)
    assert denied(stack, "UpsertItems", "not_allowed") == 1
    assert denied(stack, "UpsertItems", "invalid_token") == 1
    assert denied(stack, "DeleteItems", "not_allowed") == 1
    assert denied(stack, "ForgetUser", "missing_credentials") == 0

    # The token allows the same certificate (the real MiniLM in Triton encodes the film) ...
    token = (("authorization", f"Bearer {TOKEN}"),)
    assert reader.UpsertItems(upsert, metadata=token, timeout=120).upserted == 1
    assert known(reader, NEW_ID)
    # ... and the allow-listed certificate needs none.
    assert admin.DeleteItems(PB.DeleteItemsRequest(item_ids=[NEW_ID]), timeout=10).deleted == 1
    assert not known(reader, NEW_ID)
    assert denied(stack, "UpsertItems", "not_allowed") == 1


def test_the_per_caller_limit_refuses_one_caller_while_another_gets_through(
    stack: Stack, admin: recommender_pb2_grpc.RecommenderStub
) -> None:
    reader = stack.stub
    requests: queue.Queue[PB.RecommendBatchRequest | None] = queue.Queue()

    def feed() -> Iterator[PB.RecommendBatchRequest]:
        while (request := requests.get(timeout=60)) is not None:
            yield request

    stream = reader.RecommendBatch(feed(), timeout=60)
    requests.put(PB.RecommendBatchRequest(request=_request(stack.history, k=5)))
    assert next(stream).WhichOneof("result") == "response"  # the stream holds reader's slot
    try:
        with pytest.raises(grpc.RpcError) as caught:
            reader.Recommend(_request(stack.history, k=5), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details() == (
            "caller concurrency limit LTREC_MAX_CONCURRENT_PER_CALLER=1 reached; retry later"
        )
        assert len(admin.Recommend(_request(stack.history, k=5), timeout=10).items) == 5
    finally:
        requests.put(None)
    assert list(stream) == []
    assert len(reader.Recommend(_request(stack.history, k=5), timeout=10).items) == 5
    rejected = metric_value(
        stack.gateway.metrics_port,
        "ltrec_gateway_caller_limit_rejected_total",
        {"method": "Recommend"},
    )
    assert rejected == 1
