"""Training in several CPU processes inside a test: `run_ranks` starts them (gloo, a free port)
and `one_step` is what each runs; `torchrun` runs the whole CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, size: int, port: int, out: Path, fn_args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(size),
    )
    from ltrec.distributed import join, leave, world_from_env

    world = world_from_env()
    join(world)
    try:
        torch.save(one_step(*fn_args, world=world), out / f"rank{rank}.pt")
    finally:
        leave(world)


def run_ranks(size: int, out: Path, *fn_args: Any) -> list[dict[str, dict[str, torch.Tensor]]]:
    """`one_step(*fn_args)` in `size` processes joined by gloo; each rank's result."""
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(size, free_port(), out, fn_args), nprocs=size, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(size)]


def one_step(data: Path, cache: Path, cfg_kwargs: dict[str, Any], world: Any = None) -> dict:
    """`ltrec.train.fit` on the dataset with these TrainConfig settings (one epoch of one batch:
    one optimiser step): the gradients of its first step (the averaged ones, under DDP), the
    parameters at the end and the number of steps taken."""
    import ltrec.train as train_module
    from ltrec.distributed import SINGLE
    from ltrec.models import Recommender
    from ltrec.prepared import item_side, prepare

    world = world or SINGLE
    prepared = prepare(data, cache)
    cfg = train_module.TrainConfig(**cfg_kwargs)
    torch.manual_seed(cfg.seed)
    model = Recommender(
        train_module.model_config(prepared, cfg),
        torch.from_numpy(prepared.text_features),
        item_side(prepared),
    )
    grads: dict[str, torch.Tensor] = {}
    steps = 0
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters: Any, max_norm: float) -> torch.Tensor:
        nonlocal steps
        if not steps:
            for name, p in model.named_parameters():
                if p.grad is not None:
                    grads[name] = p.grad.detach().clone()
        steps += 1
        return clip(parameters, max_norm)

    torch.nn.utils.clip_grad_norm_ = recording_clip  # type: ignore[assignment]
    try:
        train_module.fit(prepared, cfg, model, progress=False, world=world)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    if dist.is_initialized():
        dist.barrier()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"grads": grads, "params": params, "steps": steps}


def torchrun(args: list[str], processes: int, env: dict[str, str] | None = None) -> str:
    """`python -m torch.distributed.run --nproc_per_node N -m ltrec.train ARGS` (or plain
    `python -m ltrec.train` for one process); its stdout. Raises with stderr on failure."""
    launcher = (
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
        ]
        if processes > 1
        else []
    )
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "ltrec.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})},
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"training failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout
