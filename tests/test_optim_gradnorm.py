"""GradNorm (Chen et al. 2018, Alg. 1) on a toy two-task regression with a shared layer."""
import io

import pytest
import torch
from torch import nn

from minbert.optim import GradNorm


class Toy(nn.Module):
    """Shared tanh layer W and two linear heads; task b's labels are noise, task a's a linear function of x."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.shared, self.head_a, self.head_b = nn.Linear(8, 16), nn.Linear(16, 1), nn.Linear(16, 1)
        self.x = torch.randn(64, 8, generator=g)
        self.y_a = self.x @ torch.randn(8, generator=g)  # learnable: fast
        self.y_b = 3 * torch.randn(64, generator=g)  # noise: slow

    def losses(self, scale_a: float = 1.0) -> list[torch.Tensor]:
        h = torch.tanh(self.shared(self.x))  # (N, 16)
        return [scale_a * ((self.head_a(h).squeeze(-1) - self.y_a) ** 2).mean(),
                ((self.head_b(h).squeeze(-1) - self.y_b) ** 2).mean()]


def train(model: Toy, gn: GradNorm, steps: int, scale_a: float = 1.0, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        total = gn.step(model.losses(scale_a), list(model.shared.parameters()))
        opt.zero_grad()
        total.backward()
        opt.step()
        assert gn.weights.sum().item() == pytest.approx(2.0, abs=1e-6)


def test_faster_learning_task_is_downweighted():
    model, gn = Toy(), GradNorm(["a", "b"], alpha=1.5)
    train(model, gn, steps=30)
    w_a, w_b = gn.weights.tolist()
    assert w_a < 0.5 and w_b > 1.5


def test_larger_gradient_task_is_downweighted():
    model, gn = Toy(), GradNorm(["a", "b"], alpha=1.5)
    train(model, gn, steps=10, scale_a=10.0)
    w_a, w_b = gn.weights.tolist()
    assert w_a < 1.0 < w_b


def test_alpha_zero_equalises_gradient_norms():
    model, gn = Toy(), GradNorm(["a", "b"], alpha=0.0, lr=0.05)
    for _ in range(150):  # model frozen: only w moves, towards w_a ‖∇L_a‖ = w_b ‖∇L_b‖
        gn.step(model.losses(scale_a=10.0), list(model.shared.parameters()))
    G_a, G_b = gn.grad_norms.tolist()
    assert G_a / G_b == pytest.approx(1.0, abs=0.1)


def test_gradient_norms_and_total_match_manual_autograd():
    model, gn = Toy(), GradNorm(["a", "b"])
    gn.w.data = torch.tensor([0.5, 1.5])
    shared = list(model.shared.parameters())
    losses = model.losses()
    total = gn.step(losses, shared)
    for i, loss in enumerate(model.losses()):
        grads = torch.autograd.grad([0.5, 1.5][i] * loss, shared, retain_graph=True)  # ‖∇_W (w_i L_i)‖₂
        manual = torch.sqrt(sum((g ** 2).sum() for g in grads))
        torch.testing.assert_close(gn.grad_norms[i], manual)
    torch.testing.assert_close(total, 0.5 * losses[0] + 1.5 * losses[1])  # weights before the update
    total.backward()  # the graph survived the gradient-norm computation
    assert gn.w.grad is not None and all(p.grad is not None for p in model.parameters())


def test_initial_losses_are_recorded_once():
    model, gn = Toy(), GradNorm(["a", "b"])
    first = [loss.item() for loss in model.losses()]
    train(model, gn, steps=3)
    torch.testing.assert_close(gn.initial_losses, torch.tensor(first))


def test_state_dict_round_trip():
    model, gn = Toy(), GradNorm(["a", "b"])
    train(model, gn, steps=5)
    buffer = io.BytesIO()
    torch.save(gn.state_dict(), buffer)  # as a checkpoint would (state_dict shares the Adam moments' storage)
    buffer.seek(0)
    resumed = GradNorm(["a", "b"])
    resumed.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(resumed.weights, gn.weights)
    torch.testing.assert_close(resumed.initial_losses, gn.initial_losses)
    shared = list(model.shared.parameters())
    gn.step(model.losses(), shared)
    resumed.step(model.losses(), shared)  # same Adam moments -> same update
    torch.testing.assert_close(resumed.weights, gn.weights)
    assert set(gn.log()) == {"gradnorm_w_a", "gradnorm_w_b", "gradnorm_G_a", "gradnorm_G_b", "gradnorm_loss"}


def test_wrong_number_of_losses():
    model = Toy()
    with pytest.raises(ValueError):
        GradNorm(["a", "b", "c"]).step(model.losses(), list(model.shared.parameters()))
