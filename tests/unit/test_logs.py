"""The gateway's log as written: one JSON object per line, tracebacks inside the object, the trace
and span ids of the span a line was logged in, and no user id in clear."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from server.gen.ltrec.v1 import recommender_pb2
from server.logs import (
    DEFAULT_FLUSH_INTERVAL_SECONDS,
    EXCEPTION_FIELD,
    LINE_FIELDS,
    TRACE_FIELDS,
    JsonLog,
    configure_logging,
)
from tests.support.gateway import (
    FakeTransport,
    full_request,
    outputs,
    run_async,
    running_gateway,
    write_repository,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
USER = "carol@example.com"


class Written:
    """The gateway's log handler, writing into memory (root level INFO) until `lines()`."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self._log: JsonLog | None = configure_logging(logging.INFO, self.stream)

    def stop(self) -> None:
        if self._log is not None:
            self._log.stop()  # writes what is queued
            self._log = None

    def lines(self) -> list[dict[str, Any]]:
        self.stop()
        return _parse(self.stream.getvalue())


@pytest.fixture
def written() -> Iterator[Written]:
    root = logging.getLogger()
    level = root.level
    log = Written()
    try:
        yield log
    finally:
        log.stop()
        root.setLevel(level)


def _parse(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]  # each line alone, from its first byte


@run_async
async def test_a_request_flow_logs_only_json_lines_with_trace_ids(
    repository: Path, written: Written, spans: InMemorySpanExporter
) -> None:
    fake = FakeTransport(outputs([3], [1.0], [0]))
    async with running_gateway(repository, fake, user_hash_key="k") as gw:
        request = full_request()
        request.user_id = USER
        await gw.stub.Recommend(request, timeout=5)
        event = recommender_pb2.FeedbackEvent(
            request_id="req-123",
            user_id=USER,
            item_id="i3",
            type=recommender_pb2.FEEDBACK_TYPE_CLICK,
            timestamp=int(time.time()),
        )
        await gw.stub.Feedback(recommender_pb2.FeedbackRequest(event=event), timeout=5)
        fake.always = RuntimeError("secret detail")
        request.request_id = "fails-1"
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.stub.Recommend(request, timeout=5)
        await gw.stub.ForgetUser(recommender_pb2.ForgetUserRequest(user_id=USER), timeout=5)
    lines = written.lines()
    assert all(set(LINE_FIELDS) <= set(line) for line in lines)
    assert "carol" not in written.stream.getvalue()

    access = [line for line in lines if line.get("event") == "rpc"]
    assert [(line["method"], line["code"]) for line in access] == [
        ("Recommend", "OK"),
        ("Feedback", "OK"),
        ("Recommend", "INTERNAL"),
        ("ForgetUser", "OK"),
    ]
    # The access line is written inside its RPC's span: its trace and span ids are that span's.
    rpc_spans = [span for span in spans.get_finished_spans() if span.kind.name == "SERVER"]
    assert [
        (format_trace_id(s.context.trace_id), format_span_id(s.context.span_id))
        for s in rpc_spans
        if s.context is not None
    ] == [(line["trace_id"], line["span_id"]) for line in access]

    (error,) = [line for line in lines if line.get("event") == "rpc_error"]
    assert error["level"] == "ERROR" and error["request_id"] == "fails-1"
    assert error[EXCEPTION_FIELD].startswith("Traceback (most recent call last):")
    assert error[EXCEPTION_FIELD].rstrip().endswith("RuntimeError: secret detail")
    assert (error["trace_id"], error["span_id"]) == (access[2]["trace_id"], access[2]["span_id"])
    (audit,) = [line for line in lines if line.get("event") == "forget_user"]
    assert audit["user"] == access[0]["user"] and len(audit["user"]) == 16


def test_lines_outside_a_span_carry_no_trace_ids(written: Written) -> None:
    logging.getLogger("server.test").warning("a %s with %d args", "line", 2)
    try:
        raise ValueError("why")
    except ValueError:
        logging.getLogger("server.test").exception("failed")
    warning, failure = written.lines()
    assert {key: warning[key] for key in ("level", "logger", "message")} == {
        "level": "WARNING",
        "logger": "server.test",
        "message": "a line with 2 args",
    }
    assert not set(TRACE_FIELDS) & set(warning)
    assert "ValueError: why" in failure[EXCEPTION_FIELD] and failure["message"] == "failed"


def test_lines_wait_for_the_interval_but_a_warning_goes_at_once() -> None:
    """With a long interval an INFO line waits in the queue (no wake of the writer per line), a
    WARNING wakes the writer and takes the lines queued before it along, in order; stop()
    writes the rest."""
    stream = io.StringIO()
    log = configure_logging(logging.INFO, stream, flush_interval=1.0)
    try:
        logger = logging.getLogger("server.test")
        logger.info("first")
        time.sleep(0.2)
        assert stream.getvalue() == ""
        logger.warning("second")
        deadline = time.monotonic() + 0.5
        while stream.getvalue().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [line["message"] for line in _parse(stream.getvalue())] == ["first", "second"]
        logger.info("third")
    finally:
        log.stop()
    assert [line["message"] for line in _parse(stream.getvalue())][-1] == "third"


def test_the_default_interval_writes_within_it_and_zero_writes_each_line() -> None:
    for interval in (DEFAULT_FLUSH_INTERVAL_SECONDS, 0.0):
        stream = io.StringIO()
        log = configure_logging(logging.INFO, stream, flush_interval=interval, pid=True)
        try:
            logging.getLogger("server.test").info("one")
            deadline = time.monotonic() + interval + 0.5
            while not stream.getvalue() and time.monotonic() < deadline:
                time.sleep(0.005)
            (line,) = _parse(stream.getvalue())
            assert line["message"] == "one" and line["pid"] == os.getpid()
        finally:
            log.stop()
    with pytest.raises(ValueError, match="flush_interval must be in"):
        log.flush_interval = -1


def test_python_m_server_logs_json_from_the_first_line(tmp_path: Path) -> None:
    """A start that fails (an unknown trace exporter) still writes only JSON lines, and exits 2
    naming the variable."""
    env = {
        **os.environ,
        "LTREC_GRPC_HOST": "127.0.0.1",
        "LTREC_GRPC_PORT": "0",
        "LTREC_METRICS_PORT": "0",
        "LTREC_MODEL_REPOSITORY": str(write_repository(tmp_path / "model_repository")),
        "LTREC_ALLOW_PLAINTEXT": "1",
        "OTEL_TRACES_EXPORTER": "zipkin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = _parse(result.stderr)
    assert line["level"] == "ERROR"
    assert "OTEL_TRACES_EXPORTER must be one of" in line["message"]
