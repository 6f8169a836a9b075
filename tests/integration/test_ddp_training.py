"""`ltrec.train` in two CPU processes (gloo) against one process at the same global batch: the
same gradients at the first step, the same validation NDCG@10 after a short training, through
the real `torchrun` launcher."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.support.datasets import write_tiny_data
from tests.support.ddp import one_step, run_ranks, torchrun

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"embedding_dim": 16, "n_layers": 1, "n_heads": 2, "max_history": 20}
# One epoch of one batch (all 200 users): one optimiser step. float32 matmuls and no dropout, so
# that one and two processes differ by float summation order alone.
ONE_STEP = {
    "epochs": 1,
    "batch_size": 256,
    "softmax_precision": "float32",
    "threads": 1,
    "model": {**SMALL, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """200 users of the tiny synthetic catalogue, text features cached where `prepare` looks."""
    root = tmp_path_factory.mktemp("ddp")
    return write_tiny_data(root / "data", n_users=200, cache_dir=root / "cache"), root / "cache"


def test_two_processes_take_the_single_process_step(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    one = one_step(*data, ONE_STEP)
    ranks = run_ranks(2, tmp_path, *data, ONE_STEP)
    assert one["steps"] == ranks[0]["steps"] == ranks[1]["steps"] == 1
    # DDP's averaged gradients are the single process's: the shards' losses are weighted by
    # their share of the batch's events. (Adam's first step hides a uniform scale error; the
    # gradients do not.)
    grads = one["grads"]
    assert set(ranks[0]["grads"]) == set(ranks[1]["grads"]) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, atol=1e-5, rtol=0, msg=name)
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
    assert max(float(g.abs().max()) for g in grads.values()) > 0.01  # the check has teeth
    for name, param in one["params"].items():
        step = ranks[0]["params"][name]
        if not name.startswith("fusion.new_item_ids"):  # imputed after training, on rank 0
            assert torch.equal(step, ranks[1]["params"][name]), name
        # AdamW divides by |g| + 1e-8: where a gradient is float noise (|g| < 1e-6) the step's
        # direction is noise too, and bounded by the learning rate.
        grad = grads.get(name)
        real = grad.abs() >= 1e-6 if grad is not None else torch.ones_like(param, dtype=torch.bool)
        torch.testing.assert_close(step[real], param[real], atol=1e-5, rtol=0, msg=name)
        assert float((step - param).abs().max()) <= 2 * 2e-3, name


def test_rank_zeros_time_budget_stops_every_rank(data: tuple[Path, Path], tmp_path: Path) -> None:
    """Only rank 0 reads its clock for the budget: the others stop with it, at the same step."""
    ranks = run_ranks(2, tmp_path, *data, {**ONE_STEP, "epochs": 50, "max_minutes": 1e-4})
    assert ranks[0]["steps"] == ranks[1]["steps"] == 1


def test_torchrun_two_processes_match_one_in_validation(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    """The torchrun command of the README, against `python -m ltrec.train`: a short training at
    the same global batch and seed ends at the same validation NDCG@10 (within 0.01)."""
    data_dir, cache = data
    args = [
        "--data", str(data_dir), "--cache", str(cache), "--epochs", "6", "--batch-size", "32",
        "--patience", "50", "--max-minutes", "30", "--embedding-dim", "16", "--layers", "1",
        "--heads", "2", "--max-history", "20", "--dropout", "0", "--softmax-precision", "float32",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    summaries, seconds = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"{processes}"
        started = time.monotonic()
        stdout = torchrun([*args, "--out", str(out)], processes)
        seconds[processes] = time.monotonic() - started
        assert stdout.count("validation (leave-one-out") == 1  # rank 0 alone reports
        summaries[processes] = json.loads((out / "metrics.json").read_text())
    one, two = summaries[1], summaries[2]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["epochs"]) == len(two["epochs"]) == 6
    assert one["best"]["ndcg@10"] > 2 * one["most_popular_valid"]["ndcg@10"]  # it learned
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3)  # the global batch's loss
    last = one["epochs"][-1]["ndcg@10"], two["epochs"][-1]["ndcg@10"]
    assert abs(last[0] - last[1]) <= 0.01, last
    print(
        f"\nfinal validation NDCG@10: 1 process {last[0]:.4f} ({seconds[1]:.1f} s wall), "
        f"2 processes {last[1]:.4f} ({seconds[2]:.1f} s wall)"
    )
