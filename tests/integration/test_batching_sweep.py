"""`benchmarks/batching_sweep.py --quick` end to end: a tiny checkpoint trained and exported per
setting, the real tritonserver and gateway, the closed-loop load; its table has a row per
setting, and Triton's statistics show batches forming only where a batcher is configured.
No timing is asserted (speed is the report's business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import batching_sweep

# training the tiny model and two exports and stacks: minutes on a loaded 2-core machine
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]


def test_quick_sweep_writes_a_row_per_setting_and_batches_form(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.batching_sweep",
            "--quick",
            f"--checkpoint={tmp_path / 'none.pt'}",  # none: the quick mode trains a tiny one
            f"--workdir={tmp_path / 'work'}",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    result = json.loads((out / "batching_sweep.json").read_text())
    settings = batching_sweep.QUICK.settings
    assert any(s.dynamic for s in settings) and any(not s.dynamic for s in settings)
    rows = result["rows"]
    assert [batching_sweep.setting_of(r) for r in rows] == list(settings)
    concurrency = list(batching_sweep.QUICK.concurrency)
    for row in rows:
        assert [run["concurrency"] for run in row["runs"]] == concurrency
        for run in row["runs"]:
            assert run["throughput_rps"] > 0 and run["p50_ms"] > 0, (row["batcher"], run)
            assert run["errors"] == 0, run["first_error"]
            # Triton answered every measured request, one scorer row each; the gateway may have
            # coalesced several into one Triton request (LTREC_TRITON_COALESCE, on by default)
            assert run["scorer_rows"] == batching_sweep.QUICK.requests, run
            assert 0 < run["requests"] <= run["scorer_rows"], run
            if run["concurrency"] >= 8:  # batches formed, at the gateway or in Triton
                assert run["scorer_executions"] < run["scorer_rows"], (row["batcher"], run)
            if not row["setting"]["dynamic"]:  # no batcher: each Triton request executes alone
                assert run["scorer_executions"] == run["requests"], run
            else:  # the batcher may merge Triton's requests, never split one
                assert run["scorer_executions"] <= run["requests"], run

    table = [
        line
        for line in (out / "batching_sweep.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| batcher")
    ]
    assert len(table) == len(settings)
    assert table[0].startswith("| preferred 8/16/32 (default) | 0 | 1 |")
    assert table[1].startswith("| off | – | 1 |")
