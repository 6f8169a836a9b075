"""The real `prometheus` binary as a child process, and the PromQL pieces the metrics tests need.

Debian's `prometheus` package (installed by `make install`) is ready in well under a second; the
first scrape lands a scrape interval later, so callers poll the HTTP API rather than sleep.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from triton_local.server import free_ports

LOG_TAIL_LINES = 40


class PrometheusError(RuntimeError):
    """Prometheus did not start, exited early, or answered the API with something unexpected."""


class PrometheusServer:
    """One Prometheus on 127.0.0.1 with its own config, TSDB directory and log file."""

    def __init__(
        self,
        workdir: Path,
        scrape_configs: list[dict[str, Any]],
        *,
        rule_groups: dict[str, Any] | None = None,
        interval: str = "1s",
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError("prometheus is not installed: run `make install`")
        self.binary = binary
        self.workdir = workdir
        self.log_path = workdir / "prometheus.log"
        self.port = free_ports(1)[0]
        config: dict[str, Any] = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": scrape_configs,
        }
        if rule_groups is not None:
            (workdir / "rules.yaml").write_text(yaml.safe_dump(rule_groups))
            config["rule_files"] = [str(workdir / "rules.yaml")]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self.poll_until(lambda: self._get("/-/ready", raw=True) is not None, timeout_s, "ready")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM to our own child, by its pid
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise PrometheusError(f"prometheus exited with code {code}; log tail:\n{self.tail()}")

    def tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def poll_until(self, condition: Any, timeout_s: float, what: str) -> None:
        """Calls `condition()` every 0.2 s until it is truthy; fails fast if Prometheus died."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            if condition():
                return
            if time.monotonic() > deadline:
                raise PrometheusError(f"not {what} within {timeout_s} s; log tail:\n{self.tail()}")
            time.sleep(0.2)

    def query(self, expr: str) -> dict[str, Any]:
        """The `/api/v1/query` answer: `status` is "error" (with `error`) for a bad query."""
        answer = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert answer is not None
        return answer

    def targets(self) -> list[dict[str, Any]]:
        answer = self._get("/api/v1/targets?state=active")
        return [] if answer is None else answer["data"]["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        answer = self._get("/api/v1/rules")
        return [] if answer is None else [r for g in answer["data"]["groups"] for r in g["rules"]]

    def _get(self, path: str, *, raw: bool = False) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as reply:
                body = reply.read()
        except urllib.error.HTTPError as exc:
            if raw or exc.code not in (400, 422, 503):
                return None
            body = exc.read()  # bad queries answer 400/422 with a JSON error
        except OSError:
            return None
        return body if raw else json.loads(body)


# --- PromQL text: enough to take an alert expression apart at its top level --------------------

_OPEN, _CLOSE = "({[", ")}]"
_SET_OPERATOR = re.compile(r"\b(unless|and|or)\b")
_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
_BOOL = re.compile(r"^\s*bool\b")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _top_level_split(expr: str, operator: re.Pattern[str]) -> list[str]:
    """Splits at matches of `operator` outside brackets and string literals."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
        elif depth == 0 and (match := operator.match(expr, i)):
            # `=~`/`!~` only occur inside a selector's braces, so depth 0 is enough here.
            parts.append(expr[start:i])
            start = i = match.end()
            continue
        i += 1
    parts.append(expr[start:])
    return [part.strip() for part in parts]


def comparison_operands(expr: str) -> list[str]:
    """The non-constant operands of an alert expression's top-level set and comparison operators.

    `A > 0.1` gives `[A]`; `A > 0 unless B > 0` gives `[A, B]`; an expression without a top-level
    comparison gives itself. An alert that is not firing legitimately returns nothing, but each of
    these operands must return data for the alert to be able to fire at all.
    """
    operands = []
    for part in _top_level_split(expr, _SET_OPERATOR):
        for side in _top_level_split(part, _COMPARISON):
            side = _BOOL.sub("", side).strip()
            if not _NUMBER.match(side):
                operands.append(side)
    return operands
