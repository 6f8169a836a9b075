"""Training in several processes (`torchrun`): which process this is, and the few collectives
that keep the processes in step.

torchrun gives every process it starts RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. Without
them (or with a world of one) training is one process exactly as before: no process group, every
collective here a no-op. Gradients are averaged by DistributedDataParallel (`ltrec.train`); what
this module adds is what DDP does not: one clock, one stop decision and one random stream per
step for all ranks, so that every rank takes the same decisions and the replicas never drift.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

ENV_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: the defaults)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this machine, which share its cores

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0 validates, decides when to stop, prints and writes files."""
        return self.rank == 0

    def broadcast_float(self, value: float) -> float:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def broadcast_flag(self, value: bool) -> bool:
        """Rank 0's `value` on every rank: its stop decisions, which only it can take."""
        return bool(self.broadcast_float(float(value)))

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of every rank's `values` (equal lengths), on every rank."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def seed_step(self, seed: int, step: int) -> None:
        """The same torch random stream on every rank for this step, so the item table's ID and
        image dropout and the sampled negatives are one draw for the global batch, as in one
        process. (One process keeps its single stream: its results stay as they were.)"""
        if self.distributed:
            torch.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))

    def check_replicas(self, model: torch.nn.Module) -> None:
        """Raise if the ranks' parameters differ: averaged gradients and one learning rate must
        keep the replicas bit-identical, so any difference is a bug, not noise."""
        if not self.distributed:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        low, high = flat.clone(), flat.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            worst = float((high - low).abs().max())
            raise RuntimeError(
                f"rank {self.rank}: the model replicas diverged (by up to {worst:g})"
            )

    def default_threads(self, cores: int | None = None) -> int:
        """Torch threads per process when none are asked for: this machine's cores shared
        between its processes (oversubscribed ranks slow each other down more than they gain)."""
        cores = cores if cores is not None else len(os.sched_getaffinity(0))
        return max(1, cores // self.local_size)


SINGLE = World()


def world_from_env(environ: Mapping[str, str] | None = None) -> World:
    """The World torchrun describes in the environment; `SINGLE` outside torchrun."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return SINGLE
    values: dict[str, int] = {}
    for name in ENV_VARIABLES:
        raw = environ.get(name)
        if raw is None and name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            raw = environ.get("RANK") if name == "LOCAL_RANK" else environ.get("WORLD_SIZE")
        try:
            values[name] = int(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} must be an integer (as torchrun sets it), got {raw!r}"
            ) from None
    size, rank = values["WORLD_SIZE"], values["RANK"]
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be at least 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"RANK must be in [0, {size - 1}], got {rank}")
    local_size = values["LOCAL_WORLD_SIZE"]
    if not 1 <= local_size <= size:
        raise ValueError(f"LOCAL_WORLD_SIZE must be in [1, {size}], got {local_size}")
    if not 0 <= values["LOCAL_RANK"] < local_size:
        raise ValueError(f"LOCAL_RANK must be in [0, {local_size - 1}], got {values['LOCAL_RANK']}")
    return World(rank=rank, size=size, local_rank=values["LOCAL_RANK"], local_size=local_size)


def backend(device: torch.device) -> str:
    """The collective backend for tensors on `device`: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def join(world: World, device: torch.device | None = None) -> None:
    """Join the process group torchrun set up (MASTER_ADDR/MASTER_PORT); nothing for one
    process."""
    if world.distributed and not dist.is_initialized():
        dist.init_process_group(
            backend(device or torch.device("cpu")), rank=world.rank, world_size=world.size
        )


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
