"""The fused full-softmax loss equals plain cross-entropy over the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltrec.softmax import full_softmax_loss, matmul_dtype


def _reference(users: torch.Tensor, table: torch.Tensor, targets: torch.Tensor):
    u = users.detach().clone().requires_grad_()
    t = table.detach().clone().requires_grad_()
    loss = F.cross_entropy(u @ t.T, targets)
    loss.backward()
    return loss.detach(), u.grad, t.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_value_and_gradients_match_cross_entropy(chunk: int) -> None:
    torch.manual_seed(0)
    users = (torch.randn(130, 8) * 3).requires_grad_()  # large logits: the max shift matters
    table = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (130,))
    loss = full_softmax_loss(users, table, targets, chunk=chunk)
    (2.0 * loss).backward()  # the upstream gradient scales both
    want, want_users, want_table = _reference(users, table, targets)
    assert torch.isclose(loss, want, atol=1e-5)
    assert torch.allclose(users.grad, 2.0 * want_users, atol=1e-6)
    assert torch.allclose(table.grad, 2.0 * want_table, atol=1e-6)


def test_bfloat16_matmuls_stay_close() -> None:
    torch.manual_seed(1)
    users = torch.randn(300, 16, requires_grad=True)
    table = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    loss = full_softmax_loss(users, table, targets, chunk=64, matmul_dtype=torch.bfloat16)
    loss.backward()
    want, want_users, want_table = _reference(users, table, targets)
    assert abs(loss.item() - want.item()) < 2e-2 * want.item()
    assert torch.allclose(users.grad, want_users, atol=5e-4)
    assert torch.allclose(table.grad, want_table, atol=5e-4)
    # Not the float32 result: the narrower type really is used.
    assert not torch.allclose(users.grad, want_users, atol=1e-9)


def test_targets_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="columns"):
        full_softmax_loss(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="columns"):
        full_softmax_loss(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([-1, 0]))


def test_precision_names() -> None:
    assert matmul_dtype("float32") is torch.float32
    assert matmul_dtype("bfloat16") is torch.bfloat16
    assert matmul_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        matmul_dtype("fp8")


def test_bias_is_the_logit_adjusted_cross_entropy() -> None:
    torch.manual_seed(3)
    users = torch.randn(90, 8, requires_grad=True)
    table = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (90,))
    bias = torch.randn(30) * 2
    loss = full_softmax_loss(users, table, targets, chunk=16, bias=bias)
    loss.backward()
    u = users.detach().clone().requires_grad_()
    t = table.detach().clone().requires_grad_()
    want = F.cross_entropy(u @ t.T + bias, targets)
    want.backward()
    assert torch.isclose(loss, want, atol=1e-5)
    assert torch.allclose(users.grad, u.grad, atol=1e-6)
    assert torch.allclose(table.grad, t.grad, atol=1e-6)
    # and it is not the unadjusted loss
    assert not torch.isclose(loss, F.cross_entropy(u @ t.T, targets), atol=1e-3)
    with pytest.raises(ValueError, match="one value per table row"):
        full_softmax_loss(users, table, targets, bias=torch.zeros(29))


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_excluded_logits_leave_their_rows_softmax(chunk: int) -> None:
    """Excluded (row, column) pairs are the cross-entropy of logits masked with -inf there: the
    same value and gradients, no gradient at all through an excluded logit."""
    torch.manual_seed(4)
    users = torch.randn(23, 8, requires_grad=True)
    table = torch.randn(12, 8, requires_grad=True)
    targets = torch.randint(0, 12, (23,))
    mask = torch.rand(23, 12) < 0.3
    mask[torch.arange(23), targets] = False  # never a row's own target
    rows, columns = torch.nonzero(mask, as_tuple=True)
    loss = full_softmax_loss(users, table, targets, chunk=chunk, excluded=(rows, columns))
    loss.backward()
    u = users.detach().clone().requires_grad_()
    t = table.detach().clone().requires_grad_()
    want = F.cross_entropy((u @ t.T).masked_fill(mask, float("-inf")), targets)
    want.backward()
    assert torch.isclose(loss, want, atol=1e-5)
    assert torch.allclose(users.grad, u.grad, atol=1e-6)
    assert torch.allclose(table.grad, t.grad, atol=1e-6)
    # and it is another loss than the unmasked one
    assert not torch.isclose(loss, F.cross_entropy(u @ t.T, targets), atol=1e-3)


def test_excluded_pairs_that_would_be_wrong_are_refused() -> None:
    users, table, targets = torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="target cannot be excluded"):
        full_softmax_loss(users, table, targets, excluded=(torch.tensor([1]), torch.tensor([1])))
    with pytest.raises(ValueError, match="ascending"):
        full_softmax_loss(
            users, table, targets, excluded=(torch.tensor([2, 0]), torch.tensor([3, 3]))
        )
    with pytest.raises(ValueError, match="rows of users"):
        full_softmax_loss(users, table, targets, excluded=(torch.tensor([3]), torch.tensor([4])))
    with pytest.raises(ValueError, match="table rows"):
        full_softmax_loss(users, table, targets, excluded=(torch.tensor([0]), torch.tensor([5])))
