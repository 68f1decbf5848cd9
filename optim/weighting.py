"""Multi-task loss weightings as total = n(L) · Σ_i c_i(L_i) L_i + r: each c_i · L_i backpropagated alone, then r, then
every gradient scaled by n(L); observe(L) once per taken step after its last coefficient call, update(L') after the
optimizer step (FAMO), step() at an epoch's end. State lives on the CPU; coefficients come on the loss's device."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor

from .gradnorm import GradNorm


class LossWeighting:
    """Base class: equal weights' hooks (no regularizer, normalizer, parameters or updates) and the one __call__."""

    name = ""
    needs_new_losses = False
    _state: tuple[str, ...] = ()  # names of the tensor attributes state_dict saves and load_state_dict copies into

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    def coefficient(self, task: int, loss: Tensor) -> Tensor:
        """c_i from task i's detached scalar loss, on its device (with a graph to parameters() where there are any)."""
        return self.weights[task].to(loss.device)

    def regularizer(self) -> Tensor | None:
        return None

    def normalizer(self, losses: Tensor) -> Tensor | None:
        return None

    def __call__(self, losses: Tensor) -> Tensor:
        """n(L.detach()) · Σ_i c_i(L_i.detach()) L_i + r for the (k,) task losses with graph."""
        if losses.shape != (self.num_tasks,):
            raise ValueError(f"expected ({self.num_tasks},) losses, got {tuple(losses.shape)}")
        detached = losses.detach()
        total = sum(self.coefficient(i, detached[i]) * losses[i] for i in range(self.num_tasks))
        n, r = self.normalizer(detached), self.regularizer()
        total = total if n is None else n * total
        return total if r is None else total + r.to(total.device)

    def parameters(self) -> list[Tensor]:
        return []

    def to(self, device: torch.device | str) -> LossWeighting:
        """Move the learnable parameters to `device`, before an optimizer holds them (under torchrun their gradients
        are all-reduced with the model's, which NCCL does on the GPU)."""
        learned = {id(p) for p in self.parameters()}
        for name in self._state:
            if id(getattr(self, name)) in learned:
                setattr(self, name, getattr(self, name).detach().to(device).requires_grad_())
        return self

    def step(self) -> None:
        """At an epoch's end."""

    def update(self, new_losses: Tensor) -> None:
        """After a taken optimizer step, with the (k,) losses of the same batch recomputed; only if needs_new_losses."""

    def observe(self, losses: Tensor) -> None:
        """Once per taken step, after its last coefficient call, with the step's (k,) detached losses."""

    @property
    def weights(self) -> Tensor:
        """(k,) effective weights n · c_i (float32, CPU), for logging."""
        raise NotImplementedError

    def log(self) -> dict[str, float]:
        return {f"w_{i}": w for i, w in enumerate(self.weights.tolist())}

    def state_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach().clone() for name in self._state}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():  # in place: parameters() stay the tensors the caller's optimizer holds
            for name in self._state:
                getattr(self, name).copy_(state[name])


def _adam_state(optimizer: torch.optim.Adam, prefix: str) -> dict[str, Tensor]:
    """The single parameter's Adam moments and step as flat tensors ({} before the first step)."""
    return {f"{prefix}.{k}": v.clone() for k, v in optimizer.state_dict()["state"].get(0, {}).items()}


def _load_adam(optimizer: torch.optim.Adam, state: dict[str, Tensor], prefix: str) -> None:
    inner = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    optimizer.load_state_dict({"state": {0: inner} if inner else {},
                               "param_groups": optimizer.state_dict()["param_groups"]})


class UncertaintyWeighting(LossWeighting):
    """Kendall et al. 2018 (eq. 7, s_i = log σ_i²) as LibMTL's UW: Σ L_i / (2 exp(s_i)) + s_i / 2, s = parameters().
    LibMTL's init s_i = −0.5 gives c_i = e^0.5 / 2 ≈ 0.82 (0.82 × the summed losses); init=0 gives half the sum."""

    name = "uw"
    _state = ("s",)

    def __init__(self, num_tasks: int, init: float = -0.5):
        super().__init__(num_tasks)
        self.s = torch.full((num_tasks,), float(init), requires_grad=True)

    def coefficient(self, task: int, loss: Tensor) -> Tensor:
        return (0.5 * torch.exp(-self.s[task])).to(loss.device)

    def regularizer(self) -> Tensor:
        return self.s.sum() / 2

    def parameters(self) -> list[Tensor]:
        return [self.s]

    @property
    def weights(self) -> Tensor:
        return 0.5 * torch.exp(-self.s.detach())


class DynamicWeightAverage(LossWeighting):
    """Liu et al. 2019 (MTAN), eq. 7: w_i = k softmax_i(r / T), r_i = L̄_i(t−1) / L̄_i(t−2) of period-mean losses,
    w = 1 for the first two periods. A period is an epoch (step() closes it), or every=N observed steps. Sum scale."""

    name = "dwa"
    _state = ("history", "periods", "total", "count")

    def __init__(self, num_tasks: int, temperature: float = 2.0, every: int = 0):
        super().__init__(num_tasks)
        if temperature <= 0 or every < 0:
            raise ValueError(f"dwa needs temperature > 0 and every >= 0, got {temperature} and {every}")
        self.temperature, self.every = temperature, every
        self.history = torch.zeros(2, num_tasks, dtype=torch.float64)  # L̄(t−2), L̄(t−1)
        self.periods, self.count = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
        self.total = torch.zeros(num_tasks, dtype=torch.float64)  # Σ of the current period's observed losses

    def observe(self, losses: Tensor) -> None:
        self.total += losses.detach().double().cpu()
        self.count += 1
        if self.every and self.count == self.every:
            self._close()

    def step(self) -> None:
        if not self.every and self.count > 0:
            self._close()

    def _close(self) -> None:
        self.history[0], self.history[1] = self.history[1].clone(), self.total / self.count
        self.periods += 1
        self.total.zero_()
        self.count.zero_()

    @property
    def weights(self) -> Tensor:
        if self.periods < 2:
            return torch.ones(self.num_tasks)
        ratio = self.history[1] / self.history[0].clamp_min(1e-8)  # a zero loss: no division by zero
        return (self.num_tasks * torch.softmax(ratio / self.temperature, 0)).float()


class RandomLossWeighting(LossWeighting):
    """Lin et al. 2022 (TMLR), RLW with LibMTL's Normal: w = k softmax(ε), ε ~ N(0, I) from its own seeded generator;
    one draw per step (the first at construction, the next in observe), × k for the sum scale (E[w_i] = 1)."""

    name = "rlw"
    _state = ("w",)

    def __init__(self, num_tasks: int, seed: int = 0):
        super().__init__(num_tasks)
        self.generator = torch.Generator().manual_seed(seed)
        self.w = torch.empty(num_tasks)
        self._draw()

    def _draw(self) -> None:
        self.w.copy_(self.num_tasks * torch.softmax(torch.randn(self.num_tasks, generator=self.generator), 0))

    def observe(self, losses: Tensor) -> None:
        self._draw()  # the next step's weights: this step's coefficient calls are over

    @property
    def weights(self) -> Tensor:
        return self.w.clone()

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


class FAMO(LossWeighting):
    """Liu et al. 2023, Alg. 1 as the official code (Cranial-XIX/FAMO famo.py): z = softmax(ξ), D_i = L_i − m_i + ε,
    objective Σ z_i log D_i / c with c = Σ z_j / D_j, i.e. c_i = z_i / D_i and n = 1/c; ξ by its own Adam on the loss
    decrease log D(old) − log D(new). The effective weights sum to 1: the mean's scale, 1/k of the summed losses'."""

    name = "famo"
    needs_new_losses = True
    _state = ("xi", "min_losses")

    def __init__(self, num_tasks: int, lr: float = 0.025, weight_decay: float = 0.001,
                 min_losses: float | Sequence[float] = 0.0):
        super().__init__(num_tasks)
        self.xi = torch.zeros(num_tasks, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.xi], lr=lr, weight_decay=weight_decay)
        self.min_losses = torch.as_tensor(min_losses, dtype=torch.float32).expand(num_tasks).clone()
        self.prev_losses: Tensor | None = None  # the last observed step's losses, for update

    def _z(self, device: torch.device) -> Tensor:
        return torch.softmax(self.xi.detach(), -1).to(device)

    def coefficient(self, task: int, loss: Tensor) -> Tensor:
        return self._z(loss.device)[task] / (loss - self.min_losses[task].to(loss.device) + 1e-8)

    def normalizer(self, losses: Tensor) -> Tensor:
        return 1 / (self._z(losses.device) / (losses - self.min_losses.to(losses.device) + 1e-8)).sum()

    def observe(self, losses: Tensor) -> None:
        self.prev_losses = losses.detach().float().cpu()

    def update(self, new_losses: Tensor) -> None:
        """The official `update`: ∇_ξ = J_softmax(ξ)ᵀ (log D(old) − log D(new)), then one Adam step of ξ."""
        if self.prev_losses is None:
            raise RuntimeError("famo: observe(losses) must come before update(new_losses) in each step")
        delta = ((self.prev_losses - self.min_losses + 1e-8).log()
                 - (new_losses.detach().float().cpu() - self.min_losses + 1e-8).log())
        with torch.enable_grad():
            d = torch.autograd.grad(torch.softmax(self.xi, -1), self.xi, grad_outputs=delta)[0]
        self.optimizer.zero_grad()
        self.xi.grad = d
        self.optimizer.step()

    @property
    def weights(self) -> Tensor:
        z = self._z(torch.device("cpu"))
        if self.prev_losses is None:  # equal losses: n · c_i = z_i
            return z
        w = z / (self.prev_losses - self.min_losses + 1e-8)
        return w / w.sum()

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), **_adam_state(self.optimizer, "adam")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        _load_adam(self.optimizer, state, "adam")


class IMTLL(LossWeighting):
    """Liu et al. 2021 (IMTL), IMTL-L as LibMTL's loss-balance part: Σ exp(s_i) L_i − s_i, s = parameters() init 0,
    so c_i = 1 at init: the summed losses' scale."""

    name = "imtl_l"
    _state = ("s",)

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks)
        self.s = torch.zeros(num_tasks, requires_grad=True)

    def coefficient(self, task: int, loss: Tensor) -> Tensor:
        return torch.exp(self.s[task]).to(loss.device)

    def regularizer(self) -> Tensor:
        return -self.s.sum()

    def parameters(self) -> list[Tensor]:
        return [self.s]

    @property
    def weights(self) -> Tensor:
        return torch.exp(self.s.detach())


class GradNormWeighting(GradNorm, LossWeighting):
    """GradNorm (Chen et al. 2018) under this interface: c_i = w_i (detached, Σ w_i = k: sum scale). Its weights still
    move only by GradNorm's measure / update(norms, losses); step() with no arguments (an epoch's end) does nothing."""

    name = "gradnorm"

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025):
        GradNorm.__init__(self, [str(i) for i in range(num_tasks)], alpha, lr)
        LossWeighting.__init__(self, num_tasks)

    def coefficient(self, task: int, loss: Tensor) -> Tensor:
        return self.w.detach()[task].to(loss.device)

    def step(self, *args, **kwargs):
        """No arguments: an epoch's end, nothing to do; otherwise GradNorm.step(losses, shared_params, reduce)."""
        return GradNorm.step(self, *args, **kwargs) if args or kwargs else None

    def log(self) -> dict[str, float]:
        return {**LossWeighting.log(self), **{f"G_{i}": g for i, g in enumerate(self.grad_norms.tolist())},
                "grad_loss": self.grad_loss}

    def state_dict(self) -> dict[str, Tensor]:
        initial = {} if self.initial_losses is None else {"initial_losses": self.initial_losses.clone()}
        return {"w": self.weights, **initial, **_adam_state(self.optimizer, "adam")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.initial_losses = state["initial_losses"].clone() if "initial_losses" in state else None
        _load_adam(self.optimizer, state, "adam")


_METHODS = {cls.name: cls for cls in (UncertaintyWeighting, DynamicWeightAverage, RandomLossWeighting, FAMO, IMTLL,
                                      GradNormWeighting)}
WEIGHTINGS: tuple[str, ...] = tuple(_METHODS)


def loss_weighting(name: str, num_tasks: int, **hparams) -> LossWeighting:
    """The weighting `name` for num_tasks tasks; hparams are the flags' names without the method prefix."""
    if name not in _METHODS:
        raise ValueError(f"unknown loss weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
    valid = [p for p in inspect.signature(_METHODS[name].__init__).parameters if p not in ("self", "num_tasks")]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"unknown {name} hyper-parameter(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}")
    return _METHODS[name](num_tasks, **hparams)
