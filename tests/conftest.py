"""Fixtures shared by the unit and integration tests (their building blocks: `tests.support`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.datasets import tiny_data  # noqa: F401  (a fixture)
from tests.support.gateway import write_repository
from tests.support.redis import redis_server  # noqa: F401  (a fixture)
from tests.support.tracing import spans  # noqa: F401  (a fixture)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A small model repository the gateway starts on (`tests.support.gateway.METADATA`)."""
    return write_repository(tmp_path / "model_repository")
