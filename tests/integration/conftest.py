"""Fixtures that start the real tritonserver; every server started here is stopped at teardown."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from triton_local import TritonServer

# The backend directory is shared by all tests (prepare_backend_dir is idempotent); logs are not.
BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "triton"


@pytest.fixture(scope="session")
def triton_build_dir() -> Path:
    """Where ``TritonServer`` keeps its backend directory; for module-scoped servers."""
    return BUILD_DIR


@pytest.fixture
def triton_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., TritonServer]]:
    """A factory: ``triton_server(repository, **TritonServer kwargs)`` returns a ready server on
    free ports, with its log under the test's temporary directory."""
    with contextlib.ExitStack() as stack:

        def start(model_repository: Path, **kwargs: Any) -> TritonServer:
            kwargs.setdefault("build_dir", BUILD_DIR)
            kwargs.setdefault("log_path", tmp_path_factory.mktemp("triton") / "tritonserver.log")
            return stack.enter_context(TritonServer(model_repository, **kwargs))

        yield start
