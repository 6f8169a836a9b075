"""The full-softmax cross-entropy over the catalogue, fused with its item-scoring matmul.

`full_softmax_loss(users, table, targets)` equals
`F.cross_entropy(users @ table.T, targets)`, value and gradients, but never materialises the
[events, items] logits: it walks the events in chunks, and for each chunk computes the logits,
their log-sum-exp, the loss and, at once, the chunk's gradients (softmax minus one-hot, times the
other factor). On a 2-core CPU the unfused version spends most of a training step writing,
reading and zeroing the ~200 MB logit, log-softmax and gradient tensors; the chunked one keeps a
chunk's logits in cache and does the same arithmetic. Gradients are computed in the forward pass
(the loss is always the last node of the graph), so `backward` only scales them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

# Events per chunk: a [CHUNK, items] block of logits (15 MB for 3,700 items) stays in cache.
CHUNK = 1024


class _FusedFullSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        users: torch.Tensor,
        table: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        matmul_dtype: torch.dtype,
        bias: torch.Tensor | None,
        excluded: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        n = users.shape[0]
        if excluded is not None:  # (rows, columns), rows ascending: where each chunk's pairs are
            bounds = torch.searchsorted(excluded[0], torch.arange(0, n + chunk, chunk)).tolist()
        grad_users = torch.empty_like(users)
        grad_table = torch.zeros_like(table)
        total = torch.zeros((), dtype=torch.float64)
        # The three matmuls may run in a narrower type (their sums accumulate in float32); the
        # log-sum-exp, the softmax and the accumulated gradients stay in float32.
        low_users = users.to(matmul_dtype)
        low_table = table.to(matmul_dtype)
        for start in range(0, n, chunk):
            u = low_users[start : start + chunk]
            t = targets[start : start + chunk]
            rows = torch.arange(len(t))
            logits = (u @ low_table.T).float()
            if bias is not None:
                logits += bias
            if excluded is not None:
                first, last = bounds[start // chunk], bounds[start // chunk + 1]
                if last > first:
                    logits[excluded[0][first:last] - start, excluded[1][first:last]] = float("-inf")
            # log-sum-exp and softmax from one pass of exp, in place: loss = lse - target logit.
            top = logits.amax(dim=1, keepdim=True)
            target_logit = logits[rows, t] - top.squeeze(1)
            probs = logits.sub_(top).exp_()
            sums = probs.sum(dim=1, keepdim=True)
            total += (sums.squeeze(1).log() - target_logit).sum(dtype=torch.float64)
            probs.div_(sums)
            probs[rows, t] -= 1.0  # d(loss)/d(logits), unscaled
            low_probs = probs.to(matmul_dtype)
            grad_users[start : start + chunk] = low_probs @ low_table
            grad_table += (low_probs.T @ u).float()
        scale = 1.0 / max(n, 1)
        ctx.save_for_backward(grad_users.mul_(scale), grad_table.mul_(scale))
        return (total * scale).to(users.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_users, grad_table = ctx.saved_tensors
        return grad_users * grad, grad_table * grad, None, None, None, None, None


def full_softmax_loss(
    users: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = CHUNK,
    matmul_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `targets` (column indices of `table`) under softmax(users @ table.T).

    `bias` [C], a constant (no gradient), is added to every row of logits: the logit-adjusted
    loss, `F.cross_entropy(users @ table.T + bias, targets)`.

    `excluded` (rows, columns), two INT64 [m] tensors with rows ascending: logits left out of
    their row's softmax (set to -inf), e.g. items a user is known to want that are not the row's
    target. A row's target must not be among its excluded columns.

    users [n, D], table [C, D], targets INT64 [n] in [0, C). Same value and gradients as
    `F.cross_entropy(users @ table.T, targets)`, without the [n, C] tensors. With
    `matmul_dtype=torch.bfloat16` the matmuls take bfloat16 inputs (about 3x faster on CPUs with
    AVX-512 BF16; logits then carry ~3 significant digits), everything else stays float32.
    """
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= table.shape[0]):
        raise ValueError(f"targets must index the {table.shape[0]} columns of the table")
    if bias is not None and bias.shape != (table.shape[0],):
        raise ValueError(
            f"bias must have one value per table row ({table.shape[0]}), got {tuple(bias.shape)}"
        )
    if excluded is not None:
        rows, columns = excluded
        if rows.shape != columns.shape or rows.dim() != 1:
            raise ValueError("excluded must be two 1-D tensors of the same length")
        if rows.numel():
            if int(rows.min()) < 0 or int(rows.max()) >= users.shape[0]:
                raise ValueError(f"excluded rows must index the {users.shape[0]} rows of users")
            if int(columns.min()) < 0 or int(columns.max()) >= table.shape[0]:
                raise ValueError(f"excluded columns must index the {table.shape[0]} table rows")
            if bool((rows[1:] < rows[:-1]).any()):
                raise ValueError("excluded rows must be in ascending order")
            if bool((columns == targets[rows]).any()):
                raise ValueError("a row's target cannot be excluded from its softmax")
    return _FusedFullSoftmax.apply(
        users,
        table,
        targets,
        chunk,
        matmul_dtype,
        None if bias is None else bias.detach().float(),
        excluded,
    )


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def matmul_dtype(precision: str) -> torch.dtype:
    """The softmax matmuls' input type for a training precision: "float32", "bfloat16", or
    "auto" (bfloat16 where the CPU has it natively, float32 elsewhere)."""
    if precision == "auto":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if precision in ("float32", "bfloat16"):
        return getattr(torch, precision)
    raise ValueError(f"softmax precision must be auto, float32 or bfloat16, got {precision!r}")
