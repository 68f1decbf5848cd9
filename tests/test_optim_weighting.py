"""Multi-task loss weightings (optim/weighting.py) against hand derivations on L_i = (a x_i − y_i)² of a shared a."""
import math

import pytest
import torch
from safetensors.torch import load, save

from minbert.optim.gradnorm import GradNorm
from minbert.optim.weighting import WEIGHTINGS, LossWeighting, loss_weighting

X, Y = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 1.0, -1.5])
K = 3


def task_losses(a: torch.Tensor) -> torch.Tensor:
    return (a * X - Y) ** 2  # (k,)


def dlosses(a: float) -> torch.Tensor:
    """dL_i/da = 2 x_i (a x_i − y_i), by hand."""
    return 2 * X * (a * X - Y)


def per_task_grad(w: LossWeighting, a: torch.Tensor) -> None:
    """The loop's path: backward c_i L_i one task at a time, then r, then scale every gradient by n(L)."""
    detached = []
    for i in range(K):
        loss = task_losses(a)[i]  # a fresh graph per task
        (w.coefficient(i, loss.detach()) * loss).backward()
        detached.append(loss.detach())
    r = w.regularizer()
    if r is not None:
        r.backward()
    n = w.normalizer(torch.stack(detached))
    if n is not None:
        for p in [a, *w.parameters()]:
            p.grad.mul_(n)


def both_grads(w: LossWeighting, a0: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂a of backpropagating __call__, ∂/∂a of the per-task path), with the parameters' grads of the latter left."""
    a = torch.tensor(a0, requires_grad=True)
    w(task_losses(a)).backward()
    whole = a.grad.clone()
    for p in w.parameters():
        p.grad = None
    a = torch.tensor(a0, requires_grad=True)
    per_task_grad(w, a)
    return whole, a.grad


def drive(w: LossWeighting, a: torch.Tensor, steps: int, lr: float = 0.05) -> list[torch.Tensor]:
    """The loop's order for `steps` taken steps on a (and parameters()) by SGD; the weights after each step."""
    opt, out = torch.optim.SGD([a, *w.parameters()], lr=lr), []
    for _ in range(steps):
        opt.zero_grad()
        per_task_grad(w, a)
        losses = task_losses(a).detach()
        if w.name == "gradnorm":  # its own weight update, as the loop keeps calling it
            w.update(*w.measure(list(task_losses(a)), [a]))
        w.observe(losses)
        opt.step()
        if w.needs_new_losses:
            with torch.no_grad():
                w.update(task_losses(a))
        out.append(w.weights)
    return out


def test_registry():
    assert WEIGHTINGS == ("uw", "dwa", "rlw", "famo", "imtl_l", "gradnorm")
    for name in WEIGHTINGS:
        w = loss_weighting(name, K)
        assert w.name == name and w.num_tasks == K and w.weights.shape == (K,)
        assert w.needs_new_losses == (name == "famo")


def test_unknown_name_and_hyper_parameter():
    with pytest.raises(ValueError, match="uw, dwa, rlw, famo, imtl_l, gradnorm"):
        loss_weighting("nash", K)
    with pytest.raises(ValueError, match="lr, weight_decay, min_losses"):
        loss_weighting("famo", K, gamma=0.01)
    with pytest.raises(ValueError, match="none"):
        loss_weighting("imtl_l", K, init=1.0)
    with pytest.raises(ValueError):
        loss_weighting("dwa", K, every=-1)
    with pytest.raises(ValueError):
        loss_weighting("uw", K)(torch.ones(2))


def test_scales_at_init_against_summed_losses():
    """n · c_i at init: UW e^0.5 / 2 (LibMTL's s = −0.5), FAMO 1/k (the mean), the others 1 (RLW 1 on average)."""
    torch.testing.assert_close(loss_weighting("uw", K).weights, torch.full((K,), math.exp(0.5) / 2))
    torch.testing.assert_close(loss_weighting("uw", K, init=0.0).weights, torch.full((K,), 0.5))
    torch.testing.assert_close(loss_weighting("famo", K).weights, torch.full((K,), 1 / K))
    for name in ("dwa", "imtl_l", "gradnorm"):
        torch.testing.assert_close(loss_weighting(name, K).weights, torch.ones(K))
    assert loss_weighting("rlw", K).weights.sum().item() == pytest.approx(K)


def test_uw_gradients_match_hand_derivation():
    uw = loss_weighting("uw", K)
    s = torch.tensor([0.2, -0.5, 1.0])
    uw.load_state_dict({"s": s})
    whole, per_task = both_grads(uw)
    L = task_losses(torch.tensor(0.7))
    torch.testing.assert_close(whole, (torch.exp(-s) / 2 * dlosses(0.7)).sum())  # Σ ∂L_i/∂a / (2 e^{s_i})
    torch.testing.assert_close(per_task, whole)
    torch.testing.assert_close(uw.s.grad, 0.5 - L / (2 * torch.exp(s)))  # ∂/∂s_i: −L_i / (2 e^{s_i}) + 1/2


def test_imtl_l_gradients_match_hand_derivation():
    imtl = loss_weighting("imtl_l", K)
    s = torch.tensor([0.3, -0.2, 0.0])
    imtl.load_state_dict({"s": s})
    whole, per_task = both_grads(imtl)
    L = task_losses(torch.tensor(0.7))
    torch.testing.assert_close(whole, (torch.exp(s) * dlosses(0.7)).sum())
    torch.testing.assert_close(per_task, whole)
    torch.testing.assert_close(imtl.s.grad, torch.exp(s) * L - 1)  # ∂/∂s_i (e^{s_i} L_i − s_i)


def test_dwa_weights_after_two_epochs():
    dwa = loss_weighting("dwa", K)
    for epoch in ([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 3.0, 2.0]]):
        torch.testing.assert_close(dwa.weights, torch.ones(K))  # w = 1 for the first two epochs
        for losses in epoch:
            dwa.observe(torch.tensor(losses))
        dwa.step()
    r = torch.tensor([1.0, 2.0, 1.5]) / torch.tensor([2.0, 2.0, 2.0])  # L̄(t−1) / L̄(t−2)
    expected = K * torch.exp(r / 2) / torch.exp(r / 2).sum()  # eq. 7, T = 2
    torch.testing.assert_close(dwa.weights, expected)
    torch.testing.assert_close(dwa.weights.sum(), torch.tensor(float(K)))
    whole, per_task = both_grads(dwa)
    torch.testing.assert_close(whole, (expected * dlosses(0.7)).sum())
    torch.testing.assert_close(per_task, whole)
    dwa.step()  # an epoch with nothing observed changes nothing
    torch.testing.assert_close(dwa.weights, expected)


def test_dwa_every_n_steps():
    dwa = loss_weighting("dwa", K, temperature=1.0, every=2)
    for i, losses in enumerate([[2.0, 1.0, 1.0], [2.0, 1.0, 3.0], [1.0, 1.0, 2.0]]):
        dwa.observe(torch.tensor(losses))
        dwa.step()  # epoch ends do not close a period when every > 0
    torch.testing.assert_close(dwa.weights, torch.ones(K))  # one period and a half
    dwa.observe(torch.tensor([1.0, 3.0, 2.0]))
    r = torch.tensor([1.0, 2.0, 2.0]) / torch.tensor([2.0, 1.0, 2.0])
    torch.testing.assert_close(dwa.weights, K * torch.softmax(r, 0))


def test_rlw_draws():
    a, b, c = (loss_weighting("rlw", K, seed=s) for s in (0, 0, 1))
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(4):
        w = a.weights
        torch.testing.assert_close(w, K * torch.softmax(torch.randn(K, generator=g), 0))  # LibMTL's Normal, × k
        assert (w > 0).all() and w.sum().item() == pytest.approx(K)
        for _ in range(2):  # every coefficient call of one step reads the same draw
            assert [a.coefficient(i, torch.tensor(1.0)).item() for i in range(K)] == w.tolist()
        torch.testing.assert_close(b.weights, w)  # deterministic for a seed
        assert not torch.equal(c.weights, w)
        whole, per_task = both_grads(a)
        torch.testing.assert_close(whole, (w * dlosses(0.7)).sum())
        torch.testing.assert_close(per_task, whole)
        seen.append(w)
        for x in (a, b, c):
            x.observe(torch.ones(K))
    assert all(not torch.equal(p, q) for p, q in zip(seen, seen[1:]))  # a new draw each step


def official_famo_update(xi, m, v, t, old, new, lr=0.025, weight_decay=0.001, b1=0.9, b2=0.999, eps=1e-8):
    """Cranial-XIX/FAMO `update` by hand: ∇ξ = J_softmaxᵀ δ, δ = log D(old) − log D(new), then Adam with L2 decay."""
    z = torch.softmax(xi, 0)
    delta = (old + 1e-8).log() - (new + 1e-8).log()
    g = (torch.diag(z) - torch.outer(z, z)).T @ delta + weight_decay * xi
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    xi = xi - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return xi, m, v


def test_famo_updates_match_the_official_algorithm():
    famo = loss_weighting("famo", K)
    xi, m, v = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    steps = [([1.0, 2.0, 0.5], [0.9, 1.5, 0.5]), ([0.9, 1.5, 0.5], [0.7, 1.6, 0.2]), ([0.7, 1.6, 0.2], [0.7, 1.0, 0.1])]
    for t, (old, new) in enumerate(steps, 1):
        famo.observe(torch.tensor(old))
        famo.update(torch.tensor(new))
        xi, m, v = official_famo_update(xi, m, v, t, torch.tensor(old), torch.tensor(new))
        torch.testing.assert_close(famo.xi.detach(), xi)
    assert len(famo.weights) == K and famo.weights.sum().item() == pytest.approx(1.0)


def test_famo_gradient_is_the_official_objective():
    famo = loss_weighting("famo", K, min_losses=[0.0, 0.01, 0.0])
    famo.observe(torch.tensor([1.0, 2.0, 0.5]))
    famo.update(torch.tensor([0.8, 2.1, 0.3]))  # ξ ≠ 0
    z, mins = torch.softmax(famo.xi.detach(), 0), famo.min_losses
    a = torch.tensor(0.7, requires_grad=True)
    D = task_losses(a) - mins + 1e-8
    c = (z / D).sum().detach()
    (D.log() * z / c).sum().backward()  # the official get_weighted_loss
    whole, per_task = both_grads(famo)
    torch.testing.assert_close(whole, a.grad)
    torch.testing.assert_close(per_task, a.grad)
    torch.testing.assert_close(whole, (z / (c * D.detach()) * dlosses(0.7)).sum())  # Σ z_i / (c D_i) ∂L_i/∂a


def test_gradnorm_under_the_interface():
    gn = loss_weighting("gradnorm", K)
    assert isinstance(gn, GradNorm) and gn.parameters() == [] and gn.regularizer() is None
    gn.w.data = torch.tensor([0.5, 1.5, 1.0])
    a = torch.tensor(0.7, requires_grad=True)
    losses = task_losses(a)
    assert torch.equal(gn(losses), gn.weighted_sum(list(losses)))  # bit-identical to the loop's weighted sum
    whole, per_task = both_grads(gn)
    torch.testing.assert_close(whole, (torch.tensor([0.5, 1.5, 1.0]) * dlosses(0.7)).sum())
    torch.testing.assert_close(per_task, whole)
    gn.step()  # an epoch's end: nothing
    torch.testing.assert_close(gn.weights, torch.tensor([0.5, 1.5, 1.0]))
    total = gn.step(list(task_losses(a)), [a])  # GradNorm's own step is still there
    torch.testing.assert_close(total, 0.5 * losses[0] + 1.5 * losses[1] + losses[2])
    assert gn.weights.sum().item() == pytest.approx(K) and {"w_0", "G_2", "grad_loss"} <= set(gn.log())


@pytest.mark.parametrize("name, hparams", [("uw", {}), ("dwa", {"every": 2}), ("rlw", {"seed": 3}), ("famo", {}),
                                           ("imtl_l", {}), ("gradnorm", {})])
def test_state_dict_round_trip(name, hparams):
    """Through safetensors (tensors only), mid-period for DWA: the resumed run's weights are the same, bit for bit."""
    w, a = loss_weighting(name, K, **hparams), torch.tensor(0.7, requires_grad=True)
    drive(w, a, 3)
    state, a_then = load(save(w.state_dict())), a.detach().clone()
    expected = drive(w, a, 3)
    resumed = loss_weighting(name, K, **hparams)
    resumed.load_state_dict(state)
    got = drive(resumed, a_then.requires_grad_(), 3)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    if name in ("uw", "imtl_l"):
        assert resumed.parameters()[0] is resumed.s  # loaded in place: the caller's optimizer keeps its tensor


@pytest.mark.parametrize("name", WEIGHTINGS)
@pytest.mark.parametrize("values", [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
def test_degenerate_losses_stay_finite(name, values):
    w = loss_weighting(name, K, **({"every": 1} if name == "dwa" else {}))
    losses = torch.tensor(values)
    for _ in range(3):  # DWA: three periods, the ratio of two zero losses included
        w.observe(losses)
        if w.needs_new_losses:
            w.update(losses)
    w.observe(losses + 1)  # DWA: a ratio over a zero loss
    if w.needs_new_losses:
        w.update(losses)
    assert torch.isfinite(w.weights).all()
    a = torch.tensor(1.0, requires_grad=True)
    total = w(a * losses)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(a.grad)
