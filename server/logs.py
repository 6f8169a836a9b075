"""The gateway's log: one JSON object per line on stderr, written off the event loop.

Every line has `timestamp`, `level`, `logger` and `message`; a traceback is the `exc_info` field
of its line; `trace_id` and `span_id` are there when a span is active (`server.tracing`); the
fields a call passes in `extra` (the access log's `event`, `request_id`, `method`, `code`, ...)
are fields of the object. User ids appear only as keyed hashes (`server.hashing`).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import logging.handlers
import queue
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from server import tracing

# The fields of every line, those of a line logged inside a span, and of one with a traceback.
LINE_FIELDS = ("timestamp", "level", "logger", "message")
TRACE_FIELDS = ("trace_id", "span_id")
EXCEPTION_FIELD = "exc_info"
PID_FIELD = "pid"
_TRACEBACKS = logging.Formatter()


# A LogRecord's own attributes: every other attribute is a field a call passed in `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    """A record as one JSON object: `level`, `logger`, `message` (and `pid`), the `extra` fields,
    `exc_info` (a traceback), `timestamp` (ISO 8601, UTC). Written for the access log's line per
    request, which a general JSON formatter made a tenth of the gateway's Python time."""

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self._pid = pid

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._pid:
            line[PID_FIELD] = record.process
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES:
                line[name] = value
        if record.exc_info:
            line[EXCEPTION_FIELD] = self.formatException(record.exc_info)
        elif record.exc_text:
            line[EXCEPTION_FIELD] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        line["timestamp"] = dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat()
        return _ENCODER.encode(line)


def _jsonable(value: object) -> object:
    """A value json cannot write: dates as ISO 8601, anything else as its str()."""
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)


_ENCODER = json.JSONEncoder(default=_jsonable)


def json_formatter(*, pid: bool = False) -> JsonLineFormatter:
    """With `pid`, every line also names its process (`pid`): the workers of one gateway
    (`server.workers`) write to the same stream."""
    return JsonLineFormatter(pid=pid)


class TraceContextFilter(logging.Filter):
    """Adds the current span's `trace_id` and `span_id` to a record (in the logging thread,
    where the span is current)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = tracing.trace_ids()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread with their message and traceback rendered as text
    (the arguments and frames may change once the call returns), formatting nothing else."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if not record.args and not record.exc_info and isinstance(record.msg, str):
            # Already text (the access log's line): nothing to render, nothing to copy.
            record.message = record.msg
            return record
        record = copy.copy(record)  # other handlers see the original
        record.msg = record.message = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = record.exc_text or _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


@dataclass(frozen=True)
class JsonLog:
    """The root logger's JSON handler and the thread that writes its lines."""

    handler: logging.Handler
    listener: logging.handlers.QueueListener

    def stop(self) -> None:
        """Writes what is queued and removes the handler (at exit; tests)."""
        logging.getLogger().removeHandler(self.handler)
        self.listener.stop()


def configure_logging(
    level: str | int, stream: TextIO | None = None, *, pid: bool = False
) -> JsonLog:
    """Sends the root logger's records, as JSON lines, to `stream` (default stderr) from a
    writer thread, so that a slow stderr never blocks the event loop; Python warnings too.
    `pid`: each line names its process (several workers)."""
    writer = logging.StreamHandler(sys.stderr if stream is None else stream)
    writer.setFormatter(json_formatter(pid=pid))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _QueueHandler(records)
    handler.addFilter(TraceContextFilter())
    listener = logging.handlers.QueueListener(records, writer)
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(handler)
    logging.captureWarnings(True)
    listener.start()
    return JsonLog(handler, listener)
