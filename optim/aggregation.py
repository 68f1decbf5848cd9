"""Gradient aggregators for multi-task learning: the k task gradients of the shared parameters become one, Σ_j w_j g_j,
with the (k,) weights w computed from the Gram matrix G_ij = g_i·g_j alone (float64, CPU). By default (scale="sum")
every method has the scale of summed losses (k identical gradients g give k·g); scale="paper" keeps the paper's."""
from __future__ import annotations

import inspect
import math
from itertools import combinations
from typing import Callable, Sequence

import torch
from torch import Tensor

from .pcgrad import _projection_weights

_F32_EPS = torch.finfo(torch.float32).eps  # G comes from float32 products: eigenvalues below ~this·λ_max are noise
_TOL = 1e-9  # KKT tolerance of the exact solvers, on G scaled to unit trace


def _combine(task_grads: Sequence[Sequence[Tensor | None]], weights: Callable[[Tensor], Tensor],
             workspace: dict | None = None) -> list[Tensor | None]:
    """Flatten to (k, D) float32, w = weights((flat @ flat.T).double().cpu()), Σ_j w_j g_j split back per parameter in
    its dtype (None where no task has a gradient, and then no weights are computed). With a `workspace` dict the
    (k, D) matrix is kept there and refilled on the next call of the same shape: a step then allocates nothing big."""
    k = len(task_grads)
    if k == 0:
        raise ValueError("need at least one task")
    num_params = len(task_grads[0])
    if any(len(grads) != num_params for grads in task_grads):
        raise ValueError("every task must give one entry per parameter")

    # A reference gradient per parameter fixes its shape, dtype and device; None where no task has one.
    refs = [next((g[p] for g in task_grads if g[p] is not None), None) for p in range(num_params)]
    present = [p for p in range(num_params) if refs[p] is not None]
    if not present:
        return [None] * num_params
    device = refs[present[0]].device
    sizes = [refs[p].numel() for p in present]

    shape = (k, sum(sizes))  # (k, D), D = total number of gradient entries
    flat = (workspace or {}).get("flat")
    if flat is None or flat.shape != shape or flat.device != device:
        flat = torch.empty(shape, dtype=torch.float32, device=device)
        if workspace is not None:
            workspace["flat"] = flat
    for row, g in zip(flat, task_grads):
        torch.cat([(g[p] if g[p] is not None else torch.zeros_like(refs[p])).reshape(-1).to(device, torch.float32)
                   for p in present], out=row)
    w = weights((flat @ flat.T).double().cpu())  # (k,) from the (k, k) Gram matrix, computed once
    combined = w.to(device, torch.float32) @ flat  # (D,)

    out: list[Tensor | None] = [None] * num_params
    for p, chunk in zip(present, combined.split(sizes)):
        out[p] = chunk.view_as(refs[p]).to(refs[p].dtype)
    return out


def _unit_trace(gram: Tensor) -> Tensor:
    trace = gram.diagonal().sum()
    return gram / trace if trace > 0 else gram


def _nnqp(Q: Tensor, c: Tensor) -> Tensor:
    """argmin_{s ≥ 0} ½sᵀQs + cᵀs for PSD Q and c in its range: Lawson & Hanson's active-set NNLS (1974, ch. 23) on Q,
    exact and finite; the free block Q_PP stays nonsingular as a free index is only added at a negative gradient."""
    k = len(Q)
    s, free = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.bool)
    for _ in range(4 * k):  # a cap for rounding's sake; exact arithmetic needs fewer
        grad = Q @ s + c  # the multipliers of the fixed (zero) entries
        if not ((~free) & (grad < -_TOL)).any():
            break
        free[torch.where(free, math.inf, grad).argmin()] = True
        while free.any():  # solve on the free set; step back to the first entry the solution makes <= 0
            idx = free.nonzero()[:, 0]
            z = torch.zeros(k, dtype=torch.float64)
            z[idx] = torch.linalg.lstsq(Q[idx][:, idx], -c[idx, None], driver="gelsd").solution[:, 0]
            if (z[idx] > 0).all():
                s = z
                break
            ratios = torch.where(free & (z <= 0), s / (s - z).clamp(min=1e-300), math.inf)  # s = z = 0: 0
            j = ratios.argmin()
            s = s + ratios[j] * (z - s)
            s[j] = 0.0
            free &= s > 0
            s = torch.where(free, s, 0.0)
    return s


def _project(gram: Tensor, u: Tensor) -> Tensor:
    """Weights v of the projection of Σu_i g_i onto the dual cone {x : g_i·x ≥ 0}: argmin vᵀGv s.t. v ≥ u (Quinton & Rey
    2024, Prop. 1), as v = u + s with s ≥ 0."""
    G = _unit_trace(gram)
    return u + _nnqp(G, G @ u)


def _min_norm(gram: Tensor) -> Tensor:
    """argmin over the simplex of wᵀGw: on the simplex wᵀ(G + 11ᵀ)w = wᵀGw + 1, whose minimum is > 0, so w = s/Σs with
    s = argmin_{s ≥ 0} ½sᵀ(G + 11ᵀ)s − Σs (the KKT conditions match)."""
    s = _nnqp(_unit_trace(gram) + 1.0, -torch.ones(len(gram), dtype=torch.float64))
    return s / s.sum()


def _nash_solve(gram: Tensor, iters: int = 200) -> Tensor:
    """α > 0 with Gα = 1/α, the minimiser of the strictly convex ½αᵀGα − Σ log α_i, by damped Newton (self-concordant:
    it stays in α > 0); G is made PSD and lifted by 1e-10·I so that singular G still has a (large, finite) solution."""
    lam, V = torch.linalg.eigh(gram)
    G = (V * (lam.clamp(min=0) + 1e-10)) @ V.T
    alpha = torch.ones(len(G), dtype=torch.float64)
    for _ in range(iters):
        grad = G @ alpha - 1 / alpha
        step = torch.linalg.solve(G + torch.diag(alpha ** -2), grad)
        decrement = float(grad @ step) ** 0.5  # Newton decrement
        alpha = alpha - (step / (1 + decrement) if decrement > 0.25 else step)
        if decrement < 1e-10:
            break
    return alpha


class Aggregator:
    """Base class: argument checks, the scale rule, state (tensor attributes in _state, and `generator`) and the one
    __call__. Subclasses give _weights(gram, losses), the paper's weights."""

    name = ""
    needs_losses = False
    _mean_scale = False  # the paper's combination has the scale of a mean: scale="sum" multiplies the weights by k
    _state: tuple[str, ...] = ()

    def __init__(self, num_tasks: int, scale: str = "sum"):
        if num_tasks < 1:
            raise ValueError(f"need at least one task, got num_tasks={num_tasks}")
        if scale not in ("sum", "paper"):
            raise ValueError(f"scale must be 'sum' or 'paper', got {scale!r}")
        self.num_tasks, self.scale = num_tasks, scale
        self.last_weights: Tensor | None = None
        self.generator: torch.Generator | None = None
        self._workspace: dict = {}  # the (k, D) gradient matrix, kept between calls (see _combine)

    def _weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        raise NotImplementedError

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """(k,) float64 CPU weights from the (k, k) Gram matrix (and the (k,) task losses where needs_losses)."""
        k = self.num_tasks
        if tuple(gram.shape) != (k, k):
            raise ValueError(f"{self.name}: expected a ({k}, {k}) Gram matrix, got {tuple(gram.shape)}")
        if self.needs_losses and (losses is None or tuple(losses.shape) != (k,)):
            raise ValueError(f"{self.name}: needs the ({k},) task losses")
        losses = None if losses is None else losses.detach().to("cpu", torch.float64)
        w = self._weights(gram.detach().to("cpu", torch.float64), losses)
        self.last_weights = w * k if self._mean_scale and self.scale == "sum" else w
        return self.last_weights

    def __call__(self, task_grads: Sequence[Sequence[Tensor | None]],
                 losses: Tensor | None = None) -> list[Tensor | None]:
        """One combined gradient per parameter from task_grads[i][p] (None = zero), in each parameter's dtype."""
        if len(task_grads) != self.num_tasks:
            raise ValueError(f"{self.name}: expected {self.num_tasks} tasks' gradients, got {len(task_grads)}")
        return _combine(task_grads, lambda gram: self.weights(gram, losses), self._workspace)

    def state_dict(self) -> dict[str, Tensor]:
        state = {name: getattr(self, name).clone() for name in self._state}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = self.state_dict()
        if sorted(state) != sorted(expected):
            raise ValueError(f"{self.name}: state needs the keys {sorted(expected)}, got {sorted(state)}")
        for name, value in state.items():
            if value.shape != expected[name].shape:
                raise ValueError(f"{self.name}: state {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(expected[name].shape)}")
        for name in self._state:
            setattr(self, name, state[name].to("cpu", expected[name].dtype).clone())
        if self.generator is not None:
            self.generator.set_state(state["generator"].to("cpu", torch.uint8).clone())


class _Seeded(Aggregator):
    """A method with a random task order, from its own torch.Generator (its state is saved as "generator")."""

    def __init__(self, num_tasks: int, seed: int = 0, scale: str = "sum"):
        super().__init__(num_tasks, scale)
        self.generator = torch.Generator().manual_seed(seed)

    def _order(self, i: int) -> list[int]:
        others = [j for j in range(self.num_tasks) if j != i]
        return [others[r] for r in torch.randperm(len(others), generator=self.generator).tolist()]


class Sum(Aggregator):
    """The plain sum, w = 1: what summed losses give."""

    name = "sum"

    def _weights(self, gram, losses):
        return torch.ones(self.num_tasks, dtype=torch.float64)


class Mean(Aggregator):
    """The mean, w = 1/k: sum/k by definition, whatever `scale`."""

    name = "mean"

    def _weights(self, gram, losses):
        return torch.full((self.num_tasks,), 1 / self.num_tasks, dtype=torch.float64)


class PCGrad(_Seeded):
    """PCGrad (Yu et al. 2020, Alg. 1), optim.pcgrad's own weights: the projected gradients are summed, so the paper's
    scale is the sum's (factor 1)."""

    name = "pcgrad"

    def _weights(self, gram, losses):
        return torch.tensor(_projection_weights(gram.tolist(), True, self.generator), dtype=torch.float64)


class MGDA(Aggregator):
    """MGDA (Sener & Koltun 2018, Eq. 3): the min-norm point of the convex hull of g_i/n_i (their
    gradient_normalizers: none, l2 ‖g_i‖, loss L_i, loss+ L_i‖g_i‖); its weights multiply the raw g_i, as their scaled
    losses do. A convex combination: scale="sum" is k times the paper's."""

    name = "mgda"
    _mean_scale = True

    def __init__(self, num_tasks: int, normalization: str = "none", scale: str = "sum"):
        super().__init__(num_tasks, scale)
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"mgda normalization must be none, l2, loss or loss+, got {normalization!r}")
        self.normalization = normalization
        self.needs_losses = normalization in ("loss", "loss+")

    def _weights(self, gram, losses):
        n = torch.ones(self.num_tasks, dtype=torch.float64)  # (k,) n_i
        if self.normalization in ("l2", "loss+"):
            n = n * gram.diagonal().clamp(min=0).sqrt()
        if self.normalization in ("loss", "loss+"):
            n = n * losses
        n = torch.where(n != 0, n, torch.ones_like(n))  # a zero gradient (or loss) stays as it is
        return _min_norm(gram / (n[:, None] * n[None, :]))


class IMTLG(Aggregator):
    """IMTL-G (Liu et al. 2021, "Towards impartial multi-task learning", Sec. 3.2): Σα = 1 and d = Σα_i g_i has equal
    projections d·u_i on the unit gradients, i.e. Gα ∝ (‖g_i‖), α ∝ G⁺(‖g_i‖) (the pseudo-inverse form of Quinton &
    Rey 2024, for dependent gradients). Weights summing to one: scale="sum" is k times the paper's."""

    name = "imtl_g"
    _mean_scale = True

    def _weights(self, gram, losses):
        G = _unit_trace(gram)
        v = torch.linalg.pinv(G, rtol=self.num_tasks * _F32_EPS, hermitian=True) @ G.diagonal().clamp(min=0).sqrt()
        return v / v.sum() if v.sum().abs() > _TOL else torch.zeros_like(v)  # Σv = 0: equal projections only at d = 0


class CAGrad(Aggregator):
    """CAGrad (Liu et al. 2021, "Conflict-averse gradient descent", Alg. 1): w = argmin over the simplex of g_w·g_0 +
    √φ‖g_w‖, φ = c²‖g_0‖², g_0 the mean; d = g_0 + √φ/‖g_w‖ g_w, divided by 1, 1 + c² or 1 + c (rescale 0, 1, 2).
    The mean's scale: scale="sum" is k times the paper's, as their code's "newgrad * num_tasks"."""

    name = "cagrad"
    _mean_scale = True

    def __init__(self, num_tasks: int, c: float = 0.4, rescale: int = 1, scale: str = "sum"):
        super().__init__(num_tasks, scale)
        if c < 0:
            raise ValueError(f"cagrad c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"cagrad rescale must be 0, 1 or 2, got {rescale}")
        self.c, self.rescale = c, rescale

    def _weights(self, gram, losses):
        G, k = _unit_trace(gram), self.num_tasks
        b = torch.full((k,), 1 / k, dtype=torch.float64)  # g_0 = Σ b_i g_i
        Gb = G @ b
        phi = self.c ** 2 * float(b @ Gb)

        divisor = (1.0, 1 + self.c ** 2, 1 + self.c)[self.rescale]
        # The KKT point by its support F, smallest first: Gb + r·Gw = λ1 on F (≥ elsewhere), r = √φ/‖g_w‖; with
        # p = G_FF⁻¹1, q = G_FF⁻¹(Gb)_F: w_F = p/Σp + e/r, e = (Σq/Σp)p − q, and ‖g_w‖² = 1/Σp + eᵀG_FFe/r² = φ/r².
        supports = [list(f) for size in range(1, k + 1) for f in combinations(range(k), size)] if phi > 0 else []
        for free in supports:
            G_FF = G[free][:, free]
            rhs = torch.stack([torch.ones(len(free), dtype=torch.float64), Gb[free]], 1)
            pq, info = torch.linalg.solve_ex(G_FF, rhs)
            p, q = pq[:, 0], pq[:, 1]
            if info != 0 or p.sum() <= 0:
                continue
            e = q.sum() / p.sum() * p - q
            r2 = (phi - float(e @ G_FF @ e)) * float(p.sum())
            if r2 <= 0:
                continue
            r = math.sqrt(r2)
            w = torch.zeros(k, dtype=torch.float64)
            w[free] = p / p.sum() + e / r
            multipliers = Gb + r * (G @ w) - (r + q.sum()) / p.sum()  # (k,), 0 on F
            if max(float((G_FF @ pq - rhs).abs().max()), float(-w.min()), float(-multipliers.min())) <= _TOL:
                return (b + r * w) / divisor
        return b / divisor  # φ = 0, or no KKT point (the optimum has g_w = 0): d = g_0, as their code gives then


class NashMTL(Aggregator):
    """Nash-MTL (Navon et al. 2022, Alg. 1): α > 0 with α_i (Ĝα)_i = 1 on Ĝ = G/‖G‖_F, as their code normalises; that α
    gives the sum's scale (k identical g give k·g), scale="paper" is α/√‖G‖_F, their fixed point for G itself (‖d‖ = √k
    whatever the gradients' scale). max_norm > 0 clips ‖d‖ = √(wᵀGw); the last α is reused between updates."""

    name = "nash_mtl"
    _state = ("alpha", "step")

    def __init__(self, num_tasks: int, max_norm: float = 1.0, update_every: int = 1, scale: str = "sum"):
        super().__init__(num_tasks, scale)
        if max_norm < 0:
            raise ValueError(f"nash_mtl max_norm must be >= 0 (0: no clip), got {max_norm}")
        if int(update_every) != update_every or update_every < 1:
            raise ValueError(f"nash_mtl update_every must be an integer >= 1, got {update_every}")
        self.max_norm, self.update_every = max_norm, int(update_every)
        self.alpha = torch.ones(num_tasks, dtype=torch.float64)  # (k,) last α, before the clip
        self.step = torch.zeros((), dtype=torch.int64)  # calls so far

    def _weights(self, gram, losses):
        if int(self.step) % self.update_every == 0:
            norm = float(torch.linalg.matrix_norm(gram))
            alpha = _nash_solve(gram / norm) if norm > 0 else torch.ones(self.num_tasks, dtype=torch.float64)
            self.alpha = alpha / math.sqrt(norm) if self.scale == "paper" and norm > 0 else alpha
        self.step = self.step + 1
        length = math.sqrt(max(float(self.alpha @ gram @ self.alpha), 0.0))  # ‖d‖
        return self.alpha * (self.max_norm / length) if 0 < self.max_norm < length else self.alpha.clone()


class AlignedMTL(Aggregator):
    """Aligned-MTL (Senushkin et al. 2023, Alg. 1): G = VΛVᵀ on its rank-r part, B = √λ_min VΛ^{-1/2}Vᵀ (their σ_min
    scaling) makes the aligned gradients ĝ_t = Σ_s B_ts g_s orthogonal with equal norms; w = B1. Their code sums the
    ĝ_t: the paper's scale is the sum's (factor 1)."""

    name = "aligned_mtl"

    def _weights(self, gram, losses):
        lam, V = torch.linalg.eigh(gram)
        keep = lam > lam.max() * self.num_tasks * _F32_EPS  # their rank cut
        if not keep.any():
            return torch.ones(self.num_tasks, dtype=torch.float64)
        lam, V = lam[keep], V[:, keep]
        return (lam.min().sqrt() * (V / lam.sqrt()) @ V.T).sum(1)


class UPGrad(Aggregator):
    """UPGrad (Quinton & Rey 2024, "Jacobian descent", Eq. 3 and Prop. 1): each g_i projected onto the dual cone
    {x : Jx ≥ 0}, i.e. min vᵀGv s.t. v ≥ e_i, and the mean of the projections (TorchJD): scale="sum" is k times it."""

    name = "upgrad"
    _mean_scale = True

    def _weights(self, gram, losses):
        return torch.stack([_project(gram, e) for e in torch.eye(self.num_tasks, dtype=torch.float64)]).mean(0)


class DualProj(Aggregator):
    """DualProj (Quinton & Rey 2024; GEM, Lopez-Paz & Ranzato 2017, Eq. 11): the mean gradient projected onto the dual
    cone, min vᵀGv s.t. v ≥ 1/k. The mean's scale: scale="sum" is k times it (the projection of the sum)."""

    name = "dualproj"
    _mean_scale = True

    def _weights(self, gram, losses):
        return _project(gram, torch.full((self.num_tasks,), 1 / self.num_tasks, dtype=torch.float64))


class GradVac(_Seeded):
    """GradVac (Wang et al. 2021, "Gradient vaccine", Alg. 1): PCGrad's sequential pass in random order, but g_i' is
    moved towards g_j whenever cos(g_i', g_j) = φ < φ̂_ij (Eq. 2), and φ̂_ij ← (1−β)φ̂_ij + βφ after each pair (Eq. 3,
    init 0, LibMTL's whole-model targets). The g_i' are summed: the paper's scale is the sum's (factor 1)."""

    name = "gradvac"
    _state = ("targets",)

    def __init__(self, num_tasks: int, beta: float = 0.5, seed: int = 0, scale: str = "sum"):
        super().__init__(num_tasks, seed, scale)
        if not 0 < beta <= 1:
            raise ValueError(f"gradvac beta must be in (0, 1], got {beta}")
        self.beta = beta
        self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)  # (k, k) φ̂_ij

    def _weights(self, gram, losses):
        k, G, targets = self.num_tasks, gram.tolist(), self.targets.tolist()
        weights = [0.0] * k
        for i in range(k):
            coef = [0.0] * k
            coef[i] = 1.0  # g_i' = Σ_m coef[m] g_m
            for j in self._order(i):
                dot = sum(coef[m] * G[m][j] for m in range(k))  # g_i'·g_j
                norm_i = math.sqrt(max(sum(coef[m] * coef[n] * G[m][n] for m in range(k) for n in range(k)), 0.0))
                norm_j = math.sqrt(max(G[j][j], 0.0))
                if norm_i == 0.0 or norm_j == 0.0:  # no direction to align
                    continue
                phi, target = max(-1.0, min(1.0, dot / (norm_i * norm_j))), targets[i][j]
                if phi < target < 1.0:  # Eq. 2
                    coef[j] += norm_i * (target * math.sqrt(1 - phi ** 2) - phi * math.sqrt(1 - target ** 2)) / (
                        norm_j * math.sqrt(1 - target ** 2))
                targets[i][j] = (1 - self.beta) * target + self.beta * phi  # Eq. 3
            weights = [w + c for w, c in zip(weights, coef)]
        self.targets = torch.tensor(targets, dtype=torch.float64)
        return torch.tensor(weights, dtype=torch.float64)


_METHODS = {cls.name: cls for cls in (Sum, Mean, PCGrad, MGDA, IMTLG, CAGrad, NashMTL, AlignedMTL, UPGrad, DualProj,
                                      GradVac)}
AGGREGATORS: tuple[str, ...] = tuple(_METHODS)


def aggregator(name: str, num_tasks: int, **hparams) -> Aggregator:
    """The aggregator `name` (one of AGGREGATORS) for num_tasks tasks; hparams are its command-line flags' names without
    the method prefix (cagrad: c, rescale; nash_mtl: max_norm, update_every; mgda: normalization; gradvac: beta, seed;
    pcgrad: seed), and scale ("sum" or "paper") for every method."""
    if name not in _METHODS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    cls = _METHODS[name]
    valid = [p for p in inspect.signature(cls).parameters if p != "num_tasks"]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"{name} has no hyper-parameter {', '.join(unknown)}; valid: {', '.join(valid)}")
    return cls(num_tasks, **hparams)
