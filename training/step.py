"""One optimizer step of multi-task training: task losses (with SMART), one backward per task, and the task
gradients summed, combined by PCGrad or weighted by GradNorm."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from data import TASKS
from heads import MultitaskBert
from minbert.runtime import autocast
from optim import EMATeacher, GradNorm, LossScaler, bregman_divergence, pcgrad, smart_loss

from .config import TrainConfig
from .distributed import GradientAllReduce


MAX_SKIPPED_IN_A_ROW = 20  # fp16: steps skipped for inf/NaN in a row before the run stops


class NonFiniteLoss(RuntimeError):
    """A task loss became NaN or inf; raised before the optimizer step, so the weights are still good."""


@dataclass
class Runtime:
    """Where a step runs: the device, the compute precision ("fp32", "bf16", "fp16") and the ranks."""

    device: torch.device
    precision: str = "fp32"
    ranks: GradientAllReduce = field(default_factory=GradientAllReduce)


@dataclass
class MethodState:
    """The multi-task methods' state beside the model, saved with each checkpoint: GradNorm's task weights,
    SMART's EMA teacher, PCGrad's shuffling RNG (its own, so every rank projects in the same order) and the fp16
    loss scale."""

    gradnorm: GradNorm | None = None
    teacher: EMATeacher | None = None
    pcgrad_generator: torch.Generator | None = None
    scaler: LossScaler = field(default_factory=lambda: LossScaler(enabled=False))

    @classmethod
    def create(cls, model: MultitaskBert, cfg: TrainConfig, precision: str = "fp32") -> MethodState:
        m = cfg.methods
        if m.gradnorm:
            model.gradnorm_parameters(m.gradnorm_layer)  # a clear error now rather than in the first step
        return cls(GradNorm(cfg.tasks, m.gradnorm_alpha) if m.gradnorm else None,
                   EMATeacher(model) if m.smart and m.smart_bregman else None,
                   torch.Generator().manual_seed(cfg.run.seed) if m.pcgrad else None,
                   LossScaler(enabled=precision == "fp16"))


@dataclass
class StepResult:
    """The task losses of the global batch, this rank's non-pad tokens, and whether the optimizer stepped (an fp16
    step with inf/NaN values is skipped as a whole)."""

    losses: dict[str, float]
    tokens: int
    stepped: bool = True


def task_loss(model: MultitaskBert, task: str, batch: dict, cfg: TrainConfig, state: MethodState) -> torch.Tensor:
    """The task's loss, plus λ·R_s (SMART, Jiang et al. 2020 eq. 3) on the embedding-layer output and μ·D_Breg
    against the EMA teacher (§3.2) when those are on."""
    m = cfg.methods
    if not m.smart:
        return model.loss(task, batch)
    embeddings, mask, paired = model.embed(batch)  # (B, T, H)
    forward = lambda emb: model.from_embeddings(task, emb, mask, paired)  # noqa: E731
    out = forward(embeddings)
    kind = TASKS[task].smart_divergence
    loss = model.objectives[task].loss(out, batch["labels"]) + m.smart_lambda * smart_loss(
        forward, embeddings, out, kind, m.smart_noise, m.smart_eps, m.smart_step_size, m.smart_steps,
        grad_scale=state.scaler.scale_value)
    if state.teacher:
        with torch.no_grad():
            target = state.teacher.model.from_embeddings(task, *state.teacher.model.embed(batch))
        loss = loss + m.smart_bregman * bregman_divergence(out, target, kind)
    return loss


def train_step(model: MultitaskBert, optimizer: torch.optim.Optimizer, streams: dict, tasks: list[str],
               cfg: TrainConfig, state: MethodState, rt: Runtime) -> StepResult:
    """One optimizer step on `grad_accum` batches of each task in `tasks`. By default one backward per task (only
    one task's graph alive at a time) and the task gradients summed; --pcgrad combines them on the shared
    parameters with PCGrad while task-specific parameters (heads, streams, PALs) keep their own; --gradnorm
    backpropagates Σ w_i L_i with learned w. Under fp16 every backward is of the scaled loss, and every task's
    gradients are unscaled and checked before they meet (PCGrad's dot products, GradNorm's norms, clipping)."""
    optimizer.zero_grad(set_to_none=True)
    accum, scaler = cfg.loop.grad_accum, state.scaler
    trainable = [p for p in model.parameters() if p.requires_grad]
    shared = model.shared_parameters() if cfg.methods.pcgrad else []
    losses = {t: torch.zeros((), device=rt.device) for t in tasks}  # read once per step: a single device sync
    found_inf = torch.zeros(1, device=rt.device)  # set by the loss scaler when a gradient overflows
    tokens, task_grads, measured = 0, [], []

    def draw(task: str) -> torch.Tensor:
        """This rank's loss on its rows of the next batch, weighted so the mean over ranks is the global mean."""
        nonlocal tokens
        batch = next(streams[task])
        share = batch.get("share", 1.0)  # this rank's fraction of the global batch
        if share == 0:  # a global batch smaller than the number of ranks left this one no rows
            return torch.zeros((), device=rt.device)
        weight = share * rt.ranks.world / accum
        tokens += sum(int(v.sum()) for k, v in batch.items() if k.startswith("attention_mask"))  # still on the CPU
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        with autocast(rt.device, rt.precision):
            loss = task_loss(model, task, batch, cfg, state) * weight
        losses[task] += loss.detach()
        return loss

    if state.gradnorm:  # every task's graph at once: GradNorm needs all gradient norms on the shared layer
        layer = model.gradnorm_parameters(cfg.methods.gradnorm_layer)
        for _ in range(accum):
            task_losses = [draw(t) for t in tasks]
            measured.append(state.gradnorm.measure(task_losses, layer, rt.ranks.mean, scaler.scale_value))
            scaler.scale(state.gradnorm.weighted_sum(task_losses)).backward()
    else:
        for task in tasks:
            for _ in range(accum):
                loss = draw(task)
                if loss.requires_grad:  # False for a parameter-free head (cosine) on a frozen encoder
                    scaler.scale(loss).backward()
            if cfg.methods.pcgrad:  # move this task's shared gradients aside; the next backward starts from zero
                rt.ranks.gradients(trainable)  # PCGrad projects the gradients of the global batch
                scaler.unscale_(shared, found_inf)  # at scale 1 and checked before any dot product
                task_grads.append([p.grad for p in shared])
                for p in shared:
                    p.grad = None
    if not cfg.methods.pcgrad:
        rt.ranks.gradients(trainable)
    in_shared = {id(p) for p in shared}  # PCGrad's shared gradients are unscaled already
    scaler.unscale_([p for p in trainable if id(p) not in in_shared], found_inf)
    values = torch.cat([rt.ranks.mean(torch.stack(list(losses.values()))), found_inf]).tolist()  # the one sync
    losses = dict(zip(losses, values[:-1]))  # the global batch's losses: the same on every rank, as is found_inf
    bad = [f"the {t} loss is {v}" for t, v in losses.items() if not math.isfinite(v)] + \
        (["a gradient is inf or NaN"] if values[-1] else []) + \
        (["a GradNorm gradient norm is inf or NaN"] if any(not torch.isfinite(n).all() for n, _ in measured) else [])
    if bad:  # every rank takes this decision on the same values
        if not scaler.enabled:  # float32 / bf16: a non-finite loss stops the run before the update
            raise NonFiniteLoss(bad[0])
        scaler.update(skipped=True)  # fp16: skip the whole step, try again at half the scale
        if scaler.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteLoss(f"{scaler.skipped_in_a_row} steps in a row were skipped under fp16 ({bad[0]}; loss "
                                f"scale now {scaler.scale_value:g})")
        optimizer.zero_grad(set_to_none=True)
        return StepResult(losses, tokens, stepped=False)
    scaler.update(skipped=False)
    if cfg.methods.pcgrad:  # random projection order from its own seeded RNG, the same on every rank
        for p, g in zip(shared, pcgrad(task_grads, generator=state.pcgrad_generator)):
            p.grad = g
    for norms, current in measured:
        state.gradnorm.update(norms, current)
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    if state.teacher:
        state.teacher.update(model)
    return StepResult(losses, tokens)
