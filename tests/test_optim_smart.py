"""SMART (Jiang et al. 2020): divergences, the adversarial regulariser and the EMA teacher, on tiny modules."""
import math

import pytest
import torch
from torch import nn

from minbert.optim import EMATeacher, bregman_divergence, divergence, smart_loss


class Tiny(nn.Module):
    """Embedding + a one-layer tanh "encoder" + mean pooling + a linear head with ``outputs`` outputs."""

    def __init__(self, outputs: int = 5, pair: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings, self.encoder = nn.Embedding(20, 8), nn.Linear(8, 8)
        self.head = nn.Linear(16 if pair else 8, outputs)
        self.outputs = outputs

    def sentence(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder(emb)).mean(1)  # (B, T, H) -> (B, H)

    def from_embeddings(self, emb):
        x = torch.cat([self.sentence(e) for e in emb], -1) if isinstance(emb, tuple) else self.sentence(emb)
        out = self.head(x)  # (B, outputs)
        return out if self.outputs > 1 else out.squeeze(-1)


IDS = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


def recording(forward):
    """Wrap ``forward`` to keep the inputs of its calls."""
    calls = []

    def wrapped(emb):
        calls.append(emb)
        return forward(emb)
    return wrapped, calls


@pytest.mark.parametrize("kind, a, b, expected", [
    ("classification", [[0.0, math.log(3)]], [[0.0, 0.0]], math.log(3) / 4),  # p=(1/4,3/4), q=(1/2,1/2)
    ("binary", [math.log(3)], [0.0], math.log(3) / 4),  # logit z -> 2-class logits [0, z]: same as above
    ("regression", [1.0, 3.0], [2.0, 0.0], (1 + 9) / 2),
])
def test_divergence_hand_computed(kind, a, b, expected):
    # sym KL = Σ (p−q)(log p − log q) = (−1/4)(−log 2) + (1/4) log(3/2) = log(3) / 4
    a, b = torch.tensor(a), torch.tensor(b)
    assert divergence(a, b, kind).item() == pytest.approx(expected, rel=1e-6)
    assert divergence(b, a, kind).item() == pytest.approx(expected, rel=1e-6)


def test_divergence_rejects_unknown_kind():
    with pytest.raises(ValueError):
        divergence(torch.zeros(2), torch.zeros(2), "ranking")


@pytest.mark.parametrize("kind, outputs", [("classification", 5), ("binary", 1), ("regression", 1)])
def test_zero_without_perturbation_positive_with(kind, outputs):
    model = Tiny(outputs)
    emb = model.embeddings(IDS)
    clean = model.from_embeddings(emb)
    assert smart_loss(model.from_embeddings, emb, clean, kind, sigma=0.0, steps=0).item() == 0.0
    assert smart_loss(model.from_embeddings, emb, clean, kind, sigma=1e-2, steps=0).item() > 0.0
    assert smart_loss(model.from_embeddings, emb, clean, kind, sigma=1e-2, epsilon=1e-2, steps=1).item() > 0.0


def test_gradients_reach_encoder_and_embeddings():
    model = Tiny()
    emb = model.embeddings(IDS)
    loss = smart_loss(model.from_embeddings, emb, model.from_embeddings(emb), "classification",
                      sigma=1e-2, epsilon=1e-2, step_size=1e-2)
    loss.backward()
    for p in (model.encoder.weight, model.head.weight, model.embeddings.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_pair_of_embeddings(kind):
    model = Tiny(outputs=1, pair=True)
    emb = (model.embeddings(IDS), model.embeddings(IDS.flip(0)[:, :4]))  # two sides, different lengths
    forward, calls = recording(model.from_embeddings)
    loss = smart_loss(forward, emb, model.from_embeddings(emb), kind, sigma=1e-3, epsilon=1e-2, step_size=1e-2)
    assert loss.item() > 0
    loss.backward()
    assert model.encoder.weight.grad.abs().sum() > 0
    assert len(calls) == 2 and all(isinstance(c, tuple) and len(c) == 2 for c in calls)
    for x, perturbed in zip(emb, calls[-1]):  # each side perturbed within its own ε-ball
        delta = perturbed - x
        assert 0 < delta.abs().max() <= 1e-2 + 1e-6


def test_projection_keeps_perturbation_in_ball():
    model, eps = Tiny(), 1e-3
    emb = model.embeddings(IDS)
    forward, calls = recording(model.from_embeddings)
    smart_loss(forward, emb, model.from_embeddings(emb), "classification", sigma=1e-1, epsilon=eps,
               step_size=1e-1, steps=2)  # noise and steps far outside the ball
    delta = (calls[-1] - emb).detach().flatten(1)  # (B, T·H)
    size = delta.abs().amax(1)
    assert torch.all(size <= eps + 1e-6) and torch.all(size >= eps - 1e-6)  # on the boundary; 1e-6: float32 (x+δ)−x


def test_ascent_beats_random_corners_of_the_ball():
    model, eps = Tiny(), 1e-2
    emb = model.embeddings(IDS).detach()
    clean = model.from_embeddings(emb).detach()
    g = torch.Generator().manual_seed(0)
    adversarial = smart_loss(model.from_embeddings, emb, clean, "classification", sigma=1e-4, epsilon=eps,
                             step_size=eps, steps=3, generator=g)
    random = max(divergence(model.from_embeddings(emb + eps * torch.randn(emb.shape, generator=g).sign()), clean,
                            "classification") for _ in range(20))  # same ‖δ‖∞ = ε, random directions
    assert adversarial > 2 * random


def test_generator_makes_it_reproducible():
    model = Tiny()
    emb = model.embeddings(IDS)
    clean = model.from_embeddings(emb)
    a, b = (smart_loss(model.from_embeddings, emb, clean, "classification", sigma=1e-2, epsilon=1e-2,
                       generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.item() == b.item()


def test_ema_teacher_and_bregman_divergence():
    student = Tiny()
    teacher = EMATeacher(student, beta=0.9)
    emb = student.embeddings(IDS)
    assert bregman_divergence(student.from_embeddings(emb), teacher.model.from_embeddings(emb),
                              "classification").item() == 0.0
    before = teacher.model.encoder.weight.clone()
    with torch.no_grad():
        student.encoder.weight.add_(1.0)
    teacher.update(student)
    torch.testing.assert_close(teacher.model.encoder.weight, 0.1 * student.encoder.weight + 0.9 * before)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    loss = bregman_divergence(student.from_embeddings(emb), teacher.model.from_embeddings(emb), "classification")
    loss.backward()
    assert loss.item() > 0 and student.encoder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("grad_scale", [1.0, 1024.0])
def test_token_norm_is_the_smart_pytorch_step(grad_scale):
    """norm="token" as smart-pytorch writes it: noise = σ·randn; step = noise + η ∇_noise ℓ(f(x + noise), f(x));
    noise = step / (‖step‖∞ over the last dim + 1e-6): every token's perturbation has unit size, ε unused."""
    model = Tiny(5)
    emb = model.embeddings(IDS).detach()
    clean = model.from_embeddings(emb)
    sigma, eta = 1e-2, 1e-3
    noise = sigma * torch.randn(emb.shape, generator=torch.Generator().manual_seed(7))
    noise.requires_grad_()
    loss = divergence(model.from_embeddings(emb + noise), clean.detach(), "classification")
    (grad,) = torch.autograd.grad(loss, noise)
    step = noise.detach() + eta * grad
    noise = step / (torch.linalg.vector_norm(step, ord=float("inf"), dim=-1, keepdim=True) + 1e-6)
    expected = divergence(model.from_embeddings(emb + noise), clean, "classification")
    forward, calls = recording(model.from_embeddings)
    got = smart_loss(forward, emb, clean, "classification", sigma=sigma, epsilon=123.0, step_size=eta, steps=1,
                     generator=torch.Generator().manual_seed(7), grad_scale=grad_scale, norm="token")
    torch.testing.assert_close(got, expected)
    delta = calls[-1] - emb
    torch.testing.assert_close(delta.abs().amax(-1), torch.ones(IDS.shape), atol=1e-3, rtol=0)  # unit per token
    with pytest.raises(ValueError, match="norm must be one of"):
        smart_loss(model.from_embeddings, emb, clean, "classification", norm="l2")
