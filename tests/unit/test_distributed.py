"""Multi-process training's pieces that need no processes: reading torchrun's environment and
sharding each batch's users across the ranks. (tests/integration/test_ddp_training.py runs the
processes.)"""

from __future__ import annotations

import numpy as np
import pytest

from ltrec.distributed import SINGLE, World, world_from_env
from ltrec.train import _batches, _shard_batches
from tests.support.datasets import sequences

LENGTHS = [3, 40, 7, 120, 15, 2, 60, 33, 9, 80, 5, 250, 18]

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_without_torchrun_variables_training_is_one_process() -> None:
    assert world_from_env({}) is SINGLE
    assert not SINGLE.distributed and SINGLE.main
    # A world of one (torchrun --nproc_per_node 1) is one process too: no collectives.
    one = world_from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert not one.distributed and one.broadcast_float(2.5) == 2.5 and one.sum([1.0]) == [1.0]


def test_torchrun_variables_are_read_and_checked() -> None:
    assert world_from_env(TORCHRUN) == World(rank=1, size=2, local_rank=1, local_size=2)
    world = world_from_env({**TORCHRUN, "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert world.distributed and not world.main and world.local_size == 1
    for change, message in [
        ({"RANK": "two"}, "RANK must be an integer"),
        ({"RANK": "2"}, r"RANK must be in \[0, 1\], got 2"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be at least 1, got 0"),
        ({"LOCAL_WORLD_SIZE": "3"}, r"LOCAL_WORLD_SIZE must be in \[1, 2\], got 3"),
        ({"LOCAL_RANK": "-1"}, r"LOCAL_RANK must be in \[0, 1\], got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            world_from_env({**TORCHRUN, **change})


def test_threads_share_the_machine_between_its_processes() -> None:
    assert World(size=4, local_size=2).default_threads(cores=16) == 8
    assert World(size=3, local_size=3).default_threads(cores=2) == 1


def test_the_ranks_shards_make_up_each_single_process_batch() -> None:
    """Same seed, same epoch: every global batch is one process's batch, split by users between
    the ranks, with shares (of the batch's events) that sum to one."""
    seqs = sequences(LENGTHS)

    def epoch(rank: int, processes: int) -> list:
        rng = np.random.default_rng(3)
        return list(_shard_batches(seqs, 64, 4, rng, 0.5, rank, processes))

    single = list(_batches(seqs, 64, 4, np.random.default_rng(3), 0.5))
    ranks = [epoch(rank, 2) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, (a, share_a), (b, share_b) in zip(single, *ranks, strict=True):
        assert share_a + share_b == pytest.approx(1.0)
        events = [int((part[2] != 0).sum()) for part in (whole, a, b)]
        assert share_a == pytest.approx(events[1] / events[0])
        assert events[1] + events[2] == events[0]
        # The same rows (target windows, in order augmentation's order too), only split.
        rows = {tuple(r[r != 0].tolist()) for r in whole[2]}
        assert {tuple(r[r != 0].tolist()) for part in (a, b) for r in part[2]} == rows
        assert len(a[2]) + len(b[2]) == len(whole[2])


def test_a_rank_without_users_in_a_batch_takes_the_step_at_share_zero() -> None:
    seqs = sequences([5, 9])
    shards = [
        list(_shard_batches(seqs, 16, 1, np.random.default_rng(0), 0.0, rank, 3))
        for rank in range(3)
    ]
    for batches in zip(*shards, strict=True):  # one user a batch, three ranks
        shares = [share for _, share in batches]
        assert sorted(shares) == [0.0, 0.0, 1.0]
        for batch, _ in batches:
            assert int((batch[2] != 0).sum()) > 0  # still a real user, weighted zero
