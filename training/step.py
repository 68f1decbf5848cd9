"""One optimizer step of multi-task training, in phases: draw and forward each task (with SMART), its backward
(weighted by a loss weighting) and, for a gradient aggregator, its gradients on the shared parameters set aside;
the all-reduce over the ranks; unscale and check (fp16); combine (PCGrad, MGDA, ... or the plain sum); the optimizer
step and the methods' updates. Every method takes this one path."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from minbert.heads import MultitaskBert
from minbert.runtime import autocast
from minbert.optim import EMATeacher, GradNorm, LossScaler, bregman_divergence, smart_loss
from minbert.optim.aggregation import Aggregator, aggregator
from minbert.optim.weighting import LossWeighting, loss_weighting

from .config import TrainConfig
from .distributed import GradientAllReduce


@dataclass
class Runtime:
    """Where a step runs: the device, the compute precision ("fp32", "bf16", "fp16") and the ranks."""

    device: torch.device
    precision: str = "fp32"
    ranks: GradientAllReduce = field(default_factory=GradientAllReduce)


@dataclass
class MethodState:
    """The multi-task methods' state beside the model, saved with each checkpoint: GradNorm's task weights (it
    measures gradient norms with every task's graph alive), another loss weighting (UW's log-variances, FAMO's
    logits ...), the gradient aggregator (PCGrad's shuffling RNG, its own so that every rank projects in the same
    order; GradVac's targets ...), SMART's EMA teacher and the fp16 loss scale."""

    gradnorm: GradNorm | None = None
    weighting: LossWeighting | None = None
    aggregator: Aggregator | None = None  # None: the task gradients are summed where they accumulate
    teacher: EMATeacher | None = None
    scaler: LossScaler = field(default_factory=lambda: LossScaler(enabled=False))

    @classmethod
    def create(cls, model: MultitaskBert, cfg: TrainConfig, precision: str = "fp32") -> MethodState:
        m, k, gradnorm, weighting, combine = cfg.methods, len(cfg.tasks), None, None, None
        if m.weighting_name == "gradnorm":
            model.gradnorm_parameters(m.gradnorm_layer)  # a clear error now rather than in the first step
            gradnorm = GradNorm(cfg.tasks, m.gradnorm_alpha)
        elif m.weighting_name:
            weighting = loss_weighting(m.weighting_name, k, **m.hparams(m.weighting_name, cfg.run.seed)).to(
                next(model.parameters()).device)
        if m.aggregator_name != "sum":
            combine = aggregator(m.aggregator_name, k, **m.hparams(m.aggregator_name, cfg.run.seed))
        return cls(gradnorm, weighting, combine, EMATeacher(model) if m.smart and m.smart_bregman else None,
                   LossScaler(enabled=precision == "fp16"))

    def learned(self) -> list[torch.Tensor]:
        """The loss scales the weighting learns in the model's optimizer (UW's, IMTL-L's); GradNorm has its own."""
        return self.weighting.parameters() if self.weighting is not None else []

    def stateful(self) -> list[tuple[str, object]]:
        """(prefix, object) of the methods whose state_dict() the checkpoint set holds as tensors under the prefix
        (GradNorm's is saved in its own layout)."""
        methods = (("weighting", self.weighting), ("aggregator", self.aggregator),
                   ("teacher", self.teacher and self.teacher.model))
        return [(prefix, method) for prefix, method in methods if method is not None]

    def log(self, tasks: list[str]) -> dict[str, float]:
        """The task weights of the methods, by task, for metrics.jsonl (GradNorm's keys as they always were)."""
        if self.gradnorm:
            return self.gradnorm.log()
        weights = {}
        if self.weighting is not None:
            weights.update({f"weighting_w_{t}": w for t, w in zip(tasks, self.weighting.weights.tolist())})
        if self.aggregator is not None and self.aggregator.last_weights is not None:
            weights.update({f"aggregator_w_{t}": w for t, w in zip(tasks, self.aggregator.last_weights.tolist())})
        return weights


@dataclass
class StepResult:
    """The task losses of the global batch, this rank's non-pad tokens, and whether the optimizer stepped (an fp16
    step with inf/NaN values is skipped as a whole)."""

    losses: dict[str, float]
    tokens: int
    stepped: bool = True


@dataclass
class Passes:
    """What the forward and backward passes of a step leave: each task's loss of the global batch (on the device,
    summed over micro-batches), the tasks' gradients on the shared parameters set aside for an aggregator, GradNorm's
    measurements, this rank's tokens, the fp16 overflow flag, and the batches (for FAMO's second look)."""

    losses: dict[str, torch.Tensor]
    found_inf: torch.Tensor
    task_grads: list[list[torch.Tensor | None]] = field(default_factory=list)
    measured: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    tokens: int = 0
    batches: dict[str, list[tuple[dict, float]]] = field(default_factory=dict)


def task_loss(model: MultitaskBert, task: str, batch: dict, cfg: TrainConfig, state: MethodState) -> torch.Tensor:
    """The task's loss, plus λ·R_s (SMART, Jiang et al. 2020 eq. 3) on the embedding-layer output and μ·D_Breg
    against the EMA teacher (§3.2) when those are on."""
    m = cfg.methods
    if not m.smart:
        return model.loss(task, batch)
    embeddings, mask, paired = model.embed(batch)  # (B, T, H)
    forward = lambda emb: model.from_embeddings(task, emb, mask, paired)  # noqa: E731
    out = forward(embeddings)
    kind = model.divergences[task]
    loss = model.objectives[task].loss(out, batch["labels"]) + m.smart_lambda * smart_loss(
        forward, embeddings, out, kind, m.smart_noise, m.smart_eps, m.smart_step_size, m.smart_steps,
        grad_scale=state.scaler.scale_value, norm=m.smart_norm)
    if state.teacher:
        with torch.no_grad():
            target = state.teacher.model.from_embeddings(task, *state.teacher.model.embed(batch))
        loss = loss + m.smart_bregman * bregman_divergence(out, target, kind)
    return loss


def forward_and_backward(model: MultitaskBert, streams: dict, tasks: list[str], cfg: TrainConfig,
                         state: MethodState, rt: Runtime, trainable: list, shared: list) -> Passes:
    """Draw and forward each task's batches, then its backward: of c_i·L_i with a loss weighting's coefficient
    (GradNorm: of Σ w_i L_i, every task's graph at once, as it needs all gradient norms on the shared layer). With
    an aggregator, each task's shared gradients are all-reduced, unscaled, checked and set aside as it finishes."""
    accum, scaler, weighting = cfg.loop.grad_accum, state.scaler, state.weighting
    passes = Passes({t: torch.zeros((), device=rt.device) for t in tasks},  # read once per step: one device sync
                    torch.zeros(1, device=rt.device))  # set by the loss scaler when a gradient overflows
    keep = weighting is not None and weighting.needs_new_losses

    def draw(task: str) -> torch.Tensor:
        """This rank's loss on its rows of the next batch, weighted so the mean over ranks is the global mean."""
        batch = next(streams[task])
        share = batch.get("share", 1.0)  # this rank's fraction of the global batch
        if share == 0:  # a global batch smaller than the number of ranks left this one no rows
            return torch.zeros((), device=rt.device)
        weight = share * rt.ranks.world / accum
        passes.tokens += sum(int(v.sum()) for k, v in batch.items() if k.startswith("attention_mask"))  # on the CPU
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        if keep:
            passes.batches.setdefault(task, []).append((batch, weight))
        with autocast(rt.device, rt.precision):
            loss = task_loss(model, task, batch, cfg, state) * weight
        passes.losses[task] += loss.detach()
        return loss

    if state.gradnorm:
        layer = model.gradnorm_parameters(cfg.methods.gradnorm_layer)
        for _ in range(accum):
            task_losses = [draw(t) for t in tasks]
            passes.measured.append(state.gradnorm.measure(task_losses, layer, rt.ranks.mean, scaler.scale_value))
            scaler.scale(state.gradnorm.weighted_sum(task_losses)).backward()
        return passes
    for i, task in enumerate(tasks):
        for _ in range(accum):
            loss = draw(task)
            if weighting is not None:  # c_i from this micro-batch's loss on the global batch (FAMO uses its value)
                loss = weighting.coefficient(i, rt.ranks.mean(loss.detach()) * accum) * loss
            if loss.requires_grad:  # False for a parameter-free head (cosine) on a frozen encoder
                scaler.scale(loss).backward()
        if state.aggregator:  # move this task's shared gradients aside; the next backward starts from zero
            rt.ranks.gradients(trainable)  # the aggregator sees the gradients of the global batch
            scaler.unscale_(shared, passes.found_inf)  # at scale 1 and checked before the Gram matrix is formed
            passes.task_grads.append([p.grad for p in shared])
            for p in shared:
                p.grad = None
    regularizer = weighting.regularizer() if weighting is not None else None
    if regularizer is not None:  # UW's Σ s_i / 2: the same on every rank
        scaler.scale(regularizer).backward()
    return passes


@torch.no_grad()
def losses_again(model: MultitaskBert, passes: Passes, rt: Runtime) -> torch.Tensor:
    """The (k,) task losses of the global batch on the step's own batches after its update, without gradients
    (FAMO's second look; --smart, whose term needs gradients, is refused with FAMO)."""
    with autocast(rt.device, rt.precision):
        again = [sum(model.loss(task, batch).float() * weight for batch, weight in passes.batches[task])
                 for task in passes.losses]
    return rt.ranks.mean(torch.stack(again))


def train_step(model: MultitaskBert, optimizer: torch.optim.Optimizer, streams: dict, tasks: list[str],
               cfg: TrainConfig, state: MethodState, rt: Runtime) -> StepResult:
    """One optimizer step on `grad_accum` batches of each task in `tasks`: by default one backward per task (only
    one task's graph alive at a time) and the task gradients summed; a loss weighting scales each task's loss; an
    aggregator combines the task gradients on the shared parameters (heads, streams and PALs keep their own).
    Under fp16 every backward is of the scaled loss, and every task's gradients are unscaled and checked before
    they meet (an aggregator's Gram matrix, GradNorm's norms, clipping); a step with inf/NaN anywhere is skipped."""
    optimizer.zero_grad(set_to_none=True)
    scaler, weighting = state.scaler, state.weighting
    extra = state.learned()  # UW's / IMTL-L's loss scales, trained beside the model
    trainable = [p for p in model.parameters() if p.requires_grad] + extra
    shared = model.shared_parameters() if state.aggregator else []
    passes = forward_and_backward(model, streams, tasks, cfg, state, rt, trainable, shared)

    # ---- all-reduce, unscale and check ------------------------------------------------------------------------------
    if not state.aggregator:
        rt.ranks.gradients(trainable)
    in_shared = {id(p) for p in shared}  # an aggregator's shared gradients are unscaled already
    scaler.unscale_([p for p in trainable if id(p) not in in_shared], passes.found_inf)
    global_losses = rt.ranks.mean(torch.stack(list(passes.losses.values())))  # the same on every rank
    normalizer = weighting.normalizer(global_losses) if weighting is not None else None
    values = torch.cat([global_losses, passes.found_inf]).tolist()  # the one sync
    losses = dict(zip(passes.losses, values[:-1]))
    problems = [f"the {t} loss is {v}" for t, v in losses.items() if not math.isfinite(v)] + \
        (["a gradient is inf or NaN"] if values[-1] else []) + \
        (["a GradNorm gradient norm is inf or NaN"] if any(not torch.isfinite(n).all() for n, _ in passes.measured)
         else [])
    if not scaler.check(problems):  # every rank takes this decision on the same values
        optimizer.zero_grad(set_to_none=True)
        return StepResult(losses, passes.tokens, stepped=False)

    # ---- combine ----------------------------------------------------------------------------------------------------
    if state.aggregator:  # every rank combines the same all-reduced gradients into the same result
        loss_vector = torch.tensor(values[:-1], dtype=torch.float64)
        for p, g in zip(shared, state.aggregator(passes.task_grads, loss_vector)):
            p.grad = g
    if normalizer is not None:  # FAMO's 1/c, one factor for every gradient
        for p in trainable:
            if p.grad is not None:
                p.grad.mul_(normalizer)

    # ---- optimizer step and the methods' updates --------------------------------------------------------------------
    for norms, current in passes.measured:
        state.gradnorm.update(norms, current)
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    if state.teacher:
        state.teacher.update(model)
    if weighting is not None:
        weighting.observe(torch.tensor(values[:-1]))
        if weighting.needs_new_losses:
            weighting.update(losses_again(model, passes, rt).cpu())
    return StepResult(losses, passes.tokens)
