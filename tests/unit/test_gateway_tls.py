"""TLS and mutual TLS on the gateway, with certificates made by openssl for each test module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from server.app import create_server
from server.config import ConfigError, GatewayConfig
from server.errors import StartupError
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.gateway import FakeTransport, run_async, write_repository
from tests.support.pki import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    made = make_pki(tmp_path_factory.mktemp("pki"))
    made.issue("client", "/CN=ltrec-client")
    return made.directory


@asynccontextmanager
async def tls_gateway(repository: Path, **tls: str) -> AsyncIterator[int]:
    config = GatewayConfig(
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        model_repository=repository,
        feedback_dir=repository.parent / "feedback",
        items_dir=repository.parent / "items",
        history_sqlite_path=repository.parent / "history" / "history.sqlite3",
        **tls,
    )
    server, port = create_server(config, transport=FakeTransport())
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def _recommend(channel: grpc.aio.Channel) -> grpc.StatusCode:
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    try:
        await stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@run_async
async def test_tls_serves_trusted_clients_and_refuses_plaintext(pki: Path, tmp_path: Path) -> None:
    repository = write_repository(tmp_path / "repo")
    cert, key = str(pki / "server.crt"), str(pki / "server.key")
    async with tls_gateway(repository, tls_cert_file=cert, tls_key_file=key) as port:
        trusted = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", trusted) as channel:
            assert await _recommend(channel) == grpc.StatusCode.OK
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await _recommend(channel) == grpc.StatusCode.UNAVAILABLE


@run_async
async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    pki: Path, tmp_path: Path
) -> None:
    repository = write_repository(tmp_path / "repo")
    tls = {
        "tls_cert_file": str(pki / "server.crt"),
        "tls_key_file": str(pki / "server.key"),
        "tls_client_ca_file": str(pki / "ca.crt"),
    }
    root = (pki / "ca.crt").read_bytes()
    async with tls_gateway(repository, **tls) as port:
        anonymous = grpc.ssl_channel_credentials(root_certificates=root)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", anonymous) as channel:
            assert await _recommend(channel) == grpc.StatusCode.UNAVAILABLE
        identified = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.crt").read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", identified) as channel:
            assert await _recommend(channel) == grpc.StatusCode.OK


@run_async
async def test_tls_configuration_errors_name_the_variable(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LTREC_TLS_KEY_FILE must be set together"):
        GatewayConfig.from_env({"LTREC_TLS_CERT_FILE": str(pki / "server.crt")})
    with pytest.raises(ConfigError, match="LTREC_TLS_CLIENT_CA_FILE must be used only with"):
        GatewayConfig.from_env({"LTREC_TLS_CLIENT_CA_FILE": str(pki / "ca.crt")})
    config = GatewayConfig(
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        model_repository=write_repository(tmp_path / "repo"),
        tls_cert_file=str(pki / "server.crt"),
        tls_key_file=str(tmp_path / "missing.key"),
        feedback_dir=tmp_path / "feedback",
        items_dir=tmp_path / "items",
        history_sqlite_path=tmp_path / "history" / "history.sqlite3",
    )
    with pytest.raises(StartupError, match="LTREC_TLS_KEY_FILE: cannot read .*missing.key"):
        create_server(config, transport=FakeTransport())
