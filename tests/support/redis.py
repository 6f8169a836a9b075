"""A real `redis-server` for the history store's tests (the `redis_server` fixture).

Not skipped when the binary is missing: `make install` provides it (Debian's redis-server), so
a missing one is a broken install and the test fails saying so.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from triton_local.redis_server import INSTALL_HINT, RedisServer


def start_redis(directory: Path, *, password: str = "") -> RedisServer:
    if shutil.which("redis-server") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    directory.mkdir(parents=True, exist_ok=True)
    return RedisServer(password=password, log_path=directory / "redis.log").start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free port of 127.0.0.1, stopped by its pid afterwards."""
    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()
