"""``python -m triton_local``: serve a model repository in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from triton_local.server import TritonServer, TritonServerError

logger = logging.getLogger("triton_local")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m triton_local", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    parser.add_argument("--build-dir", type=Path, default=Path("build/triton"))
    parser.add_argument("--log-file", type=Path, default=None, help="tritonserver's own log")
    parser.add_argument("--model-control-mode", choices=["none", "poll", "explicit"])
    parser.add_argument("--ready-timeout-seconds", type=float, default=120.0)
    return parser.parse_args(argv)


class _Stop(BaseException):
    """Raised by the signal handler so that a signal also interrupts the wait for readiness."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    args = parse_args(argv)

    def on_signal(signum: int, _frame: object) -> None:
        # Once stopping, further signals are ignored: stop() escalates to SIGKILL on its own.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logger.info("received %s; stopping tritonserver", signal.Signals(signum).name)
        raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = TritonServer(
        args.model_repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        build_dir=args.build_dir,
        log_path=args.log_file,
        model_control_mode=args.model_control_mode,
    )
    try:
        server.start()
        waited = server.wait_ready(args.ready_timeout_seconds)
        logger.info(
            "tritonserver pid %s ready in %.1f s; log %s", server.pid, waited, server.log_path
        )
        print(f"grpc    {server.grpc_url}", flush=True)
        print(f"http    http://{server.http_url}", flush=True)
        print(f"metrics {server.metrics_url}", flush=True)
        while server.is_running():
            time.sleep(0.5)
        logger.error("tritonserver exited unexpectedly; log %s", server.log_path)
        return 1
    except _Stop:
        return 0
    except TritonServerError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        code = server.stop()
        if code is not None:
            logger.info("tritonserver exited with code %s", code)


if __name__ == "__main__":
    sys.exit(main())
