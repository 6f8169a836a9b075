"""The whole local serving stack: the real tritonserver, then the gateway in front of it.

`python -m triton_local.stack` is what `make serve` runs: it starts Triton on the exported model
repository, starts the gateway (`python -m server`) pointed at it, waits until the gateway's
`grpc.health.v1` check says SERVING (which needs the ensemble ready in Triton), and stays in the
foreground until SIGTERM/SIGINT, then stops the gateway first and Triton second.

The gateway keeps user histories in a SQLite file (`--history-path`); with `--history-redis` it
uses a local redis-server instead, which the stack starts first and stops last (what several
replicas would share). A Redis of one's own is chosen by the gateway's variables, which the stack
passes on (`LTREC_HISTORY_STORE=redis LTREC_HISTORY_REDIS_ADDRESS=host:port
LTREC_USER_HASH_KEY=... make serve`); the serving line says which store the gateway uses.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from triton_local.redis_server import RedisServer, RedisServerError
from triton_local.server import TritonServer, TritonServerError, free_ports

logger = logging.getLogger("triton_local.stack")


class GatewayProcess:
    """`python -m server` as a child process, configured through `LTREC_*` variables."""

    def __init__(
        self,
        model_repository: Path,
        triton_grpc_url: str,
        *,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        feedback_dir: Path | None = None,
        items_dir: Path | None = None,
        history_path: Path | None = None,
    ) -> None:
        ports = iter(free_ports(2))
        self.grpc_port = grpc_port or next(ports)
        self.metrics_port = metrics_port or next(ports)
        self.model_repository = model_repository
        self.triton_grpc_url = triton_grpc_url
        self.log_path = log_path
        # Served lists and Feedback records (default: beside the model repository).
        self.feedback_dir = feedback_dir or model_repository.parent / "feedback"
        # Items added or hidden after training (UpsertItems/DeleteItems), shared by replicas.
        self.items_dir = items_dir or model_repository.parent / "items"
        # User histories (SQLite), unless env selects Redis (LTREC_HISTORY_STORE).
        self.history_path = history_path or model_repository.parent / "history" / "history.sqlite3"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        env = {
            # Every caller may change the catalogue and erase users: a local stack, said
            # explicitly (the gateway's default and the chart's require credentials); an
            # exported LTREC_ADMIN_AUTH (with tokens) wins.
            "LTREC_ADMIN_AUTH": "allow-all",
            **os.environ,
            "LTREC_GRPC_HOST": "127.0.0.1",
            "LTREC_GRPC_PORT": str(self.grpc_port),
            "LTREC_METRICS_PORT": str(self.metrics_port),
            "LTREC_TRITON_URL": self.triton_grpc_url,
            "LTREC_MODEL_REPOSITORY": str(self.model_repository),
            # A local stack on 127.0.0.1; deployments serve TLS (or sit behind a mesh that does).
            "LTREC_ALLOW_PLAINTEXT": "true",
            "LTREC_FEEDBACK_DIR": str(self.feedback_dir),
            "LTREC_ITEMS_DIR": str(self.items_dir),
            "LTREC_HISTORY_SQLITE_PATH": str(self.history_path),
            **self.extra_env,
        }
        out = self.log_path.open("ab") if self.log_path else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def wait_serving(
        self, timeout_s: float = 120.0, credentials: grpc.ChannelCredentials | None = None
    ) -> float:
        """Polls gRPC health until SERVING (over TLS with `credentials`); fails fast if the
        process exits."""
        assert self.process is not None
        started = time.monotonic()
        channel = (
            grpc.insecure_channel(self.address)
            if credentials is None
            else grpc.secure_channel(self.address, credentials)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self.process.poll()
                if code is not None:
                    raise RuntimeError(f"the gateway exited with code {code} before serving")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                if time.monotonic() - started > timeout_s:
                    raise RuntimeError(f"the gateway did not report SERVING within {timeout_s} s")
                time.sleep(0.2)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class _Stop(BaseException):
    pass


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m triton_local.stack", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--grpc-port", type=int, default=50051, help="the gateway's port")
    parser.add_argument("--metrics-port", type=int, default=9100, help="the gateway's metrics")
    parser.add_argument("--triton-grpc-port", type=int, default=8001)
    parser.add_argument("--triton-http-port", type=int, default=8000)
    parser.add_argument("--triton-metrics-port", type=int, default=8002)
    parser.add_argument("--build-dir", type=Path, default=Path("build/triton"))
    parser.add_argument(
        "--feedback-dir",
        type=Path,
        default=Path("feedback"),
        help="the gateway's feedback store (served lists and Feedback records)",
    )
    parser.add_argument(
        "--items-dir",
        type=Path,
        default=Path("items"),
        help="the gateway's item store (items added or hidden after training)",
    )
    parser.add_argument(
        "--history-path",
        type=Path,
        default=Path("history/history.sqlite3"),
        help="the gateway's history store (SQLite, WAL): users' recent events",
    )
    parser.add_argument(
        "--history-redis",
        type=Path,
        metavar="DIR",
        nargs="?",
        const=Path("history-redis"),
        help="keep user histories in a local redis-server instead (saving to DIR, default "
        "history-redis/), as replicas share one",
    )
    args = parser.parse_args(argv)
    if args.history_redis is not None and os.environ.get("LTREC_HISTORY_REDIS_ADDRESS"):
        logger.error(
            "--history-redis starts a redis-server of its own, but LTREC_HISTORY_REDIS_ADDRESS "
            "points the gateway at another: drop one of them"
        )
        return 2
    if not (args.model_repository / "recommend" / "config.pbtxt").is_file():
        logger.error("no exported models in %s: run `make export` first", args.model_repository)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    triton = TritonServer(
        args.model_repository.resolve(),
        grpc_port=args.triton_grpc_port,
        http_port=args.triton_http_port,
        metrics_port=args.triton_metrics_port,
        build_dir=args.build_dir,
    )
    gateway: GatewayProcess | None = None
    redis: RedisServer | None = None
    try:
        env: dict[str, str] = {}
        if args.history_redis is not None:
            redis = RedisServer(data_dir=args.history_redis.resolve())
            redis.start()
            env = redis_env(redis, args.history_redis.resolve())
            logger.info("history store: redis-server at %s (pid %s)", redis.address, redis.pid)
        triton.start()
        triton.wait_ready()
        gateway = GatewayProcess(
            args.model_repository.resolve(),
            triton.grpc_url,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            feedback_dir=args.feedback_dir.resolve(),
            items_dir=args.items_dir.resolve(),
            history_path=args.history_path.resolve(),
            env=env,
        )
        gateway.start()
        gateway.wait_serving()
        history = describe_history({**os.environ, **env}, args.history_path.resolve())
        print(
            f"serving: gateway 127.0.0.1:{args.grpc_port} (gRPC, ltrec.v1.Recommender), "
            f"metrics http://127.0.0.1:{args.metrics_port}/metrics, Triton {triton.grpc_url}, "
            f"Triton metrics {triton.metrics_url}, {history}; ready in "
            f"{time.monotonic() - started:.1f} s. Try: make client",
            flush=True,
        )
        while triton.is_running() and gateway.process and gateway.process.poll() is None:
            time.sleep(0.5)
        logger.error("a serving process exited; stopping the stack")
        return 1
    except _Stop:
        logger.info("stopping the stack")
        return 0
    except (TritonServerError, RedisServerError, RuntimeError) as exc:
        logger.error("%s", exc)
        return 1
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()
        if redis is not None:
            redis.stop()


def describe_history(env: Mapping[str, str], sqlite_path: Path) -> str:
    """Where the gateway started with `env` keeps user histories (its LTREC_HISTORY_* rules)."""
    store = env.get("LTREC_HISTORY_STORE", "sqlite")
    if store == "redis":
        return f"history store Redis at {env.get('LTREC_HISTORY_REDIS_ADDRESS', '')}"
    if store == "sqlite":
        return f"history store SQLite {sqlite_path}"
    return f"history store {store}"


def redis_env(redis: RedisServer, data_dir: Path) -> dict[str, str]:
    """The gateway's settings for the stack's redis-server. Redis keys are keyed hashes of user
    ids, so the key must outlive the gateway: unless LTREC_USER_HASH_KEY is set, one is made
    once and kept beside Redis's data."""
    key = os.environ.get("LTREC_USER_HASH_KEY", "")
    if not key:
        path = data_dir / "user_hash_key"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32), encoding="utf-8")
        key = path.read_text(encoding="utf-8").strip()
    return {
        "LTREC_HISTORY_STORE": "redis",
        "LTREC_HISTORY_REDIS_ADDRESS": redis.address,
        "LTREC_USER_HASH_KEY": key,
    }


if __name__ == "__main__":
    sys.exit(main())
