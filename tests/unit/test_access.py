"""Access control: who may call the admin RPCs (UpsertItems, DeleteItems, ForgetUser), and the
per-caller concurrency limit.

The authoriser alone (tokens, certificate names, the constant-time compare), the configuration,
then the gateway in-process over real mutual TLS (certificates made by openssl per module) with
bearer tokens from a directory laid out as Kubernetes mounts a Secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

import server.access
from server.access import (
    ANONYMOUS,
    Authoriser,
    CallerLimiter,
    load_tokens,
)
from server.app import create_server
from server.config import ConfigError, GatewayConfig
from server.errors import StartupError
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.gateway import FakeTransport, run_async, running_gateway, write_repository
from tests.support.pki import Pki, make_pki

SYNC_TOKEN = "sync-token-0123456789abcdef"
ERASE_TOKEN = "erase-token-fedcba9876543210"
ADMIN_SUBJECT = "O=Shop\\, Inc.,CN=ltrec-admin"  # RFC 2253: the last RDN first, commas escaped
SPIFFE_ID = "spiffe://cluster.local/ns/shop/sa/catalogue-sync"
PB = recommender_pb2


def context(subject: str = "", *sans: str) -> dict[str, list[bytes]]:
    """What `ServicerContext.auth_context()` holds for a verified client certificate."""
    found: dict[str, list[bytes]] = {"transport_security_type": [b"ssl"]}
    if subject:
        found["x509_subject"] = [subject.encode()]
    if sans:
        found["x509_subject_alternative_name"] = [san.encode() for san in sans]
    return found


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


AUTHORISER = Authoriser(
    {"catalogue-sync": SYNC_TOKEN, "erasure": ERASE_TOKEN}, {ADMIN_SUBJECT, SPIFFE_ID}
)


# --- The authoriser ----------------------------------------------------------------------------


def test_a_configured_bearer_token_is_allowed_and_names_its_caller() -> None:
    caller = AUTHORISER.identify(bearer(ERASE_TOKEN), {})
    assert (caller.allowed, caller.key) == (True, "token:erasure")
    # The scheme is case-insensitive; the token is not.
    assert AUTHORISER.identify([("authorization", f"bearer {SYNC_TOKEN}")], {}).allowed
    assert not AUTHORISER.identify(bearer(SYNC_TOKEN.upper()), {}).allowed


@pytest.mark.parametrize(
    "metadata",
    [
        bearer("sync-token-0123456789abcdeX"),  # one character off
        bearer(SYNC_TOKEN[:-1]),  # a prefix
        bearer(SYNC_TOKEN + "0"),
        [("authorization", SYNC_TOKEN)],  # no scheme
        [("authorization", f"Basic {SYNC_TOKEN}")],
        [("authorization", "Bearer ")],
        bearer(SYNC_TOKEN) + bearer(ERASE_TOKEN),  # two headers: ambiguous
    ],
    ids=["one-off", "prefix", "longer", "no-scheme", "basic", "empty", "two-headers"],
)
def test_a_wrong_or_malformed_token_is_invalid(metadata: list[tuple[str, str]]) -> None:
    caller = AUTHORISER.identify(metadata, {})
    assert (caller.allowed, caller.denial, caller.key) == (False, "invalid_token", ANONYMOUS)


def test_no_credentials_at_all_is_missing_credentials() -> None:
    caller = AUTHORISER.identify([("x-request-id", "r1")], {})
    assert (caller.allowed, caller.denial, caller.key) == (False, "missing_credentials", ANONYMOUS)


def test_tokens_are_compared_as_digests_in_constant_time_against_every_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`hmac.compare_digest` on equal-length SHA-256 digests, and no early exit at a match:
    the time of an answer does not depend on which token matched, nor on the length sent."""
    compared: list[tuple[bytes, bytes]] = []
    real = server.access.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server.access.hmac, "compare_digest", spy)
    for sent in (SYNC_TOKEN, ERASE_TOKEN, "x", "y" * 500):
        compared.clear()
        AUTHORISER.identify(bearer(sent), {})
        assert len(compared) == 2, sent  # both tokens, whichever matched
        assert all(len(a) == len(b) == 32 for a, b in compared)
        assert all(a == hashlib.sha256(sent.encode()).digest() for a, _ in compared)


def test_a_certificate_subject_or_san_on_the_allow_list_is_allowed() -> None:
    by_subject = AUTHORISER.identify([], context(ADMIN_SUBJECT, "DNS:admin.example"))
    assert (by_subject.allowed, by_subject.key) == (True, f"certificate:{ADMIN_SUBJECT}")
    by_san = AUTHORISER.identify([], context("CN=sync", "sync.shop.svc", SPIFFE_ID))
    assert (by_san.allowed, by_san.key) == (True, "certificate:CN=sync")
    # Exact matches only: a CN alone, another order, a prefix of a SAN are not the identity.
    for subject, sans in (
        ("CN=ltrec-admin", ()),
        ("CN=ltrec-admin,O=Shop\\, Inc.", ()),
        ("CN=other", (SPIFFE_ID + "-2", "spiffe://cluster.local/ns/shop")),
    ):
        caller = AUTHORISER.identify([], context(subject, *sans))
        assert (caller.allowed, caller.denial) == (False, "not_allowed"), subject
        assert caller.key == f"certificate:{subject}"


def test_a_token_names_the_caller_before_its_certificate_and_either_allows() -> None:
    caller = AUTHORISER.identify(bearer(SYNC_TOKEN), context("CN=reader"))
    assert (caller.allowed, caller.key) == (True, "token:catalogue-sync")
    # A wrong token with an allowed certificate: the certificate allows.
    caller = AUTHORISER.identify(bearer("wrong-token-0123456789"), context(ADMIN_SUBJECT))
    assert (caller.allowed, caller.key) == (True, f"certificate:{ADMIN_SUBJECT}")
    # A wrong token with a certificate that is not allowed: the token is what failed.
    caller = AUTHORISER.identify(bearer("wrong-token-0123456789"), context("CN=reader"))
    assert (caller.allowed, caller.denial) == (False, "invalid_token")


def test_allow_all_allows_anonymous_callers_and_still_names_the_others() -> None:
    everyone = Authoriser({"sync": SYNC_TOKEN}, allow_all=True)
    assert everyone.identify([], {}) == server.access.Caller(ANONYMOUS, allowed=True)
    assert everyone.identify(bearer(SYNC_TOKEN), {}).key == "token:sync"
    nobody = Authoriser()
    assert nobody.allows_nobody and not everyone.allows_nobody
    assert nobody.identify([], context(ADMIN_SUBJECT)).denial == "not_allowed"


def test_the_caller_limiter_counts_per_key_and_forgets_idle_callers() -> None:
    limiter = CallerLimiter(2)
    assert limiter.acquire("a") and limiter.acquire("a")
    assert not limiter.acquire("a")
    assert limiter.acquire("b")
    limiter.release("a")
    assert limiter.in_flight("a") == 1 and limiter.acquire("a")
    for key in ("a", "a", "b"):
        limiter.release(key)
    assert limiter._in_flight == {}
    unlimited = CallerLimiter(0)
    assert all(unlimited.acquire("a") for _ in range(10_000))


# --- The tokens directory and the configuration ------------------------------------------------


def secret_volume(directory: Path, tokens: dict[str, str]) -> Path:
    """Files as the kubelet mounts a Secret: `..data` -> a timestamped directory, and one
    symlink per key into `..data`."""
    directory.mkdir()
    data = directory / "..2026_01_01_00_00_00.000000001"
    data.mkdir()
    for name, token in tokens.items():
        (data / name).write_text(token + "\n")
    os.symlink(data.name, directory / "..data")
    for name in tokens:
        os.symlink(f"..data/{name}", directory / name)
    return directory


def test_tokens_are_read_from_a_mounted_secret(tmp_path: Path) -> None:
    tokens = {"catalogue-sync": SYNC_TOKEN, "erasure": ERASE_TOKEN}
    assert load_tokens(secret_volume(tmp_path / "tokens", tokens)) == tokens


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"short": "0123456789abcde"}, "token short must be at least 16 printable ASCII"),
        ({"spaced": "0123456789 abcdef"}, "token spaced must be at least 16 printable ASCII"),
        ({"bad name": SYNC_TOKEN}, "token file name 'bad name' must match"),
        ({"a": SYNC_TOKEN, "b": SYNC_TOKEN}, "token b is the same as another token"),
        ({}, "holds no token files"),
    ],
    ids=["short", "space", "name", "duplicate", "empty"],
)
def test_unusable_tokens_stop_the_start_naming_the_file_not_the_token(
    tmp_path: Path, files: dict[str, str], error: str
) -> None:
    directory = tmp_path / "tokens"
    directory.mkdir()
    for name, token in files.items():
        (directory / name).write_text(token)
    with pytest.raises(StartupError, match="LTREC_ADMIN_TOKENS_DIR") as caught:
        load_tokens(directory)
    assert error in str(caught.value)
    assert all(token not in str(caught.value) for token in files.values())
    with pytest.raises(StartupError, match="LTREC_ADMIN_TOKENS_DIR: cannot list"):
        load_tokens(tmp_path / "missing")


def test_access_settings_are_read_from_the_environment_and_checked() -> None:
    plain = {"LTREC_ALLOW_PLAINTEXT": "true"}
    default = GatewayConfig.from_env(plain)
    assert (default.admin_auth, default.admin_tokens_dir) == ("require", None)
    assert default.max_concurrent_per_caller == 0 and default.allowed_identities == frozenset()
    mtls = {
        "LTREC_TLS_CERT_FILE": "server.crt",
        "LTREC_TLS_KEY_FILE": "server.key",
        "LTREC_TLS_CLIENT_CA_FILE": "ca.crt",
    }
    config = GatewayConfig.from_env(
        mtls
        | {
            "LTREC_ADMIN_AUTH": " Allow-All ",
            "LTREC_ADMIN_TOKENS_DIR": "/etc/ltrec/admin-tokens",
            "LTREC_ADMIN_ALLOWED_IDENTITIES": f"{ADMIN_SUBJECT}; {SPIFFE_ID}\nCN=b;;",
            "LTREC_MAX_CONCURRENT_PER_CALLER": "8",
        }
    )
    assert config.admin_auth == "allow-all"
    assert config.admin_tokens_dir == Path("/etc/ltrec/admin-tokens")
    assert config.allowed_identities == {ADMIN_SUBJECT, SPIFFE_ID, "CN=b"}
    assert config.max_concurrent_per_caller == 8
    assert GatewayConfig.from_env(plain | {"LTREC_ADMIN_TOKENS_DIR": ""}).admin_tokens_dir is None
    for env, message in (
        (
            {"LTREC_ADMIN_AUTH": "open"},
            r"LTREC_ADMIN_AUTH must be one of \('require', 'allow-all'\), got 'open'",
        ),
        (
            {"LTREC_ADMIN_ALLOWED_IDENTITIES": "CN=a"},
            "LTREC_ADMIN_ALLOWED_IDENTITIES must be empty unless LTREC_TLS_CLIENT_CA_FILE",
        ),
        (
            {"LTREC_MAX_CONCURRENT_PER_CALLER": "-1"},
            r"LTREC_MAX_CONCURRENT_PER_CALLER must be in \[0, LTREC_MAX_CONCURRENT_RPCS=1000\]",
        ),
        (
            {"LTREC_MAX_CONCURRENT_PER_CALLER": "1001"},
            r"LTREC_MAX_CONCURRENT_PER_CALLER must be in \[0, LTREC_MAX_CONCURRENT_RPCS=1000\]",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            GatewayConfig.from_env(plain | env)


# --- The gateway over mutual TLS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Client certificates: `admin` (allowed by its subject), `sync` (allowed by a SPIFFE SAN),
    `reader` (not allowed), all signed by the gateway's client CA."""
    made = make_pki(tmp_path_factory.mktemp("pki"))
    made.issue("admin", "/CN=ltrec-admin/O=Shop, Inc.")
    made.issue("sync", "/CN=catalogue-sync", f"URI:{SPIFFE_ID},DNS:sync.shop.svc")
    made.issue("reader", "/CN=ltrec-reader", "DNS:reader.shop.svc")
    return made


@asynccontextmanager
async def mtls_gateway(
    pki: Pki, root: Path, fake: FakeTransport, **settings: Any
) -> AsyncIterator[tuple[Any, int]]:
    repository = write_repository(root / "model_repository")
    config = GatewayConfig(
        **{
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "model_repository": repository,
            "health_poll_interval_seconds": 0.02,
            "feedback_dir": root / "feedback",
            "items_dir": root / "items",
            "history_sqlite_path": root / "history" / "history.sqlite3",
            "tls_cert_file": str(pki.cert("server")),
            "tls_key_file": str(pki.key("server")),
            "tls_client_ca_file": str(pki.ca),
            "admin_tokens_dir": secret_volume(root / "tokens", {"catalogue-sync": SYNC_TOKEN}),
            "admin_allowed_identities": f"{ADMIN_SUBJECT};{SPIFFE_ID}",
            **settings,
        }
    )
    server, port = create_server(config, transport=fake)
    await server.start()
    try:
        yield server, port
    finally:
        await server.stop(None)


@asynccontextmanager
async def client(
    pki: Pki, port: int, cert: str
) -> AsyncIterator[recommender_pb2_grpc.RecommenderStub]:
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", pki.client_credentials(cert)
    ) as channel:
        yield recommender_pb2_grpc.RecommenderStub(channel)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"ltrec_gateway_{name}", labels) or 0.0


def upsert(item_id: str) -> recommender_pb2.UpsertItemsRequest:
    return PB.UpsertItemsRequest(items=[PB.Item(item_id=item_id, title="Space Film (2031)")])


@run_async
async def test_only_allowed_callers_change_the_catalogue_and_refusals_are_counted(
    pki: Pki, tmp_path: Path
) -> None:
    fake = FakeTransport()
    async with mtls_gateway(pki, tmp_path, fake) as (server, port):
        async with client(pki, port, "reader") as reader:
            before = {
                (method, reason): sample("auth_denied_total", method=method, reason=reason)
                for method in ("UpsertItems", "DeleteItems", "ForgetUser")
                for reason in ("missing_credentials", "invalid_token", "not_allowed")
            }
            denied_before = sample("requests_total", method="UpsertItems", code="PERMISSION_DENIED")
            # A certificate the CA signed but not on the allow-list, without a token.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await reader.UpsertItems(upsert("new-1"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "LTREC_ADMIN_ALLOWED_IDENTITIES" in (caught.value.details() or "")
            # With a wrong token; and with a valid token of a Basic scheme.
            for metadata in (bearer("wrong-token-0123456789"), [("authorization", "Basic x")]):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await reader.UpsertItems(upsert("new-1"), metadata=metadata, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert caught.value.details() == "UpsertItems: the bearer token is not valid"
            for call in (
                reader.DeleteItems(PB.DeleteItemsRequest(item_ids=["i1"]), timeout=10),
                reader.ForgetUser(PB.ForgetUserRequest(user_id="u1"), timeout=10),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # Nothing reached the pipeline: no encoder call, no store write, nothing hidden.
            assert fake.calls == []
            assert list((tmp_path / "items").iterdir()) == []
            # The other RPCs stay open to every caller the TLS handshake lets in.
            await reader.Recommend(PB.RecommendRequest(k=1), timeout=10)

            after = {
                key: sample("auth_denied_total", method=key[0], reason=key[1]) for key in before
            }
            grown = {key: after[key] - before[key] for key in before if after[key] != before[key]}
            assert grown == {
                ("UpsertItems", "not_allowed"): 1,
                ("UpsertItems", "invalid_token"): 2,
                ("DeleteItems", "not_allowed"): 1,
                ("ForgetUser", "not_allowed"): 1,
            }
            # Refusals are ordinary statuses of the per-RPC counters too.
            assert (
                sample("requests_total", method="UpsertItems", code="PERMISSION_DENIED")
                == denied_before + 1
            )

            # The token allows the same certificate.
            reply = await reader.UpsertItems(upsert("new-1"), metadata=bearer(SYNC_TOKEN))
            assert reply.upserted == 1
        # A certificate allowed by its subject, one by its SPIFFE id.
        async with client(pki, port, "admin") as admin:
            assert (await admin.UpsertItems(upsert("new-2"), timeout=10)).upserted == 1
            assert (await admin.DeleteItems(PB.DeleteItemsRequest(item_ids=["new-1"]))).deleted
        async with client(pki, port, "sync") as sync:
            assert (await sync.UpsertItems(upsert("new-3"), timeout=10)).upserted == 1
            reply = await sync.ForgetUser(PB.ForgetUserRequest(user_id="u1"), timeout=10)
            assert reply.feedback_records_erased == 0
        encoded = [c for c in fake.calls if c.model_name != "recommend"]
        assert len(encoded) == 3  # new-1, new-2, new-3: each allowed upsert, none refused


@run_async
async def test_the_per_caller_limit_refuses_one_caller_while_another_gets_through(
    pki: Pki, tmp_path: Path
) -> None:
    """A RecommendBatch stream holds its caller's one slot while open: that caller's Recommend is
    RESOURCE_EXHAUSTED naming the limit, another caller's is answered; once the stream ends the
    first caller gets through again."""
    async with (
        mtls_gateway(pki, tmp_path, FakeTransport(), max_concurrent_per_caller=1) as (
            _,
            port,
        ),
        client(pki, port, "reader") as reader,
        client(pki, port, "admin") as admin,
    ):
        requests: asyncio.Queue[recommender_pb2.RecommendBatchRequest | None] = asyncio.Queue()

        async def feed() -> AsyncIterator[recommender_pb2.RecommendBatchRequest]:
            while (request := await requests.get()) is not None:
                yield request

        stream = reader.RecommendBatch(feed(), timeout=20)
        await requests.put(PB.RecommendBatchRequest(request=PB.RecommendRequest(k=1)))
        first = await stream.read()
        assert first.WhichOneof("result") == "response"  # the stream is in flight

        rejected = sample("caller_limit_rejected_total", method="Recommend")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reader.Recommend(PB.RecommendRequest(k=1), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details() == (
            "caller concurrency limit LTREC_MAX_CONCURRENT_PER_CALLER=1 reached; retry later"
        )
        assert sample("caller_limit_rejected_total", method="Recommend") == rejected + 1
        # Another certificate is another caller; the same certificate with a token is the
        # token's caller.
        assert (await admin.Recommend(PB.RecommendRequest(k=1), timeout=10)).items
        by_token = await reader.Recommend(
            PB.RecommendRequest(k=1), metadata=bearer(SYNC_TOKEN), timeout=10
        )
        assert by_token.items

        await requests.put(None)
        assert await stream.code() == grpc.StatusCode.OK
        assert (await reader.Recommend(PB.RecommendRequest(k=1), timeout=10)).items
        assert sample("caller_limit_rejected_total", method="Recommend") == rejected + 1


async def _example(script: str, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """Runs an example client as the README does; `token` in LTREC_ADMIN_TOKEN."""
    env = {k: v for k, v in os.environ.items() if k != "LTREC_ADMIN_TOKEN"}
    if token is not None:
        env["LTREC_ADMIN_TOKEN"] = token
    root = Path(__file__).resolve().parents[2]
    process = await asyncio.create_subprocess_exec(
        sys.executable, f"examples/{script}", *args,
        cwd=root, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@run_async
async def test_the_example_clients_send_an_admin_token_where_the_gateway_requires_one(
    tmp_path: Path,
) -> None:
    repository = write_repository(tmp_path / "model_repository")
    tokens = secret_volume(tmp_path / "tokens", {"catalogue-sync": SYNC_TOKEN})
    async with running_gateway(
        repository, FakeTransport(), admin_auth="require", admin_tokens_dir=tokens
    ) as gw:
        address = ["--address", gw.address]
        delete = [*address, "delete", "i1"]
        code, _, err = await _example("items_client.py", *delete)  # no token: refused
        assert code == 1 and "UNAUTHENTICATED: DeleteItems needs credentials" in err
        code, _, err = await _example("items_client.py", *delete, token="wrong-token-0123")
        assert code == 1 and "the bearer token is not valid" in err
        code, out, err = await _example("items_client.py", *delete, token=SYNC_TOKEN)
        assert code == 0, err
        assert out.strip() == "hidden: 1 items"
        forget = [*address, "--user", "u1", "--forget"]
        code, _, err = await _example("recommend_client.py", *forget)
        assert code == 1 and "UNAUTHENTICATED: ForgetUser needs credentials" in err
        code, out, err = await _example("recommend_client.py", *forget, "--token", SYNC_TOKEN)
        assert code == 0, err
        assert out.startswith("forgot the user")
