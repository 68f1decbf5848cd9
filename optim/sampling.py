"""Per-step task choice for multi-task training: random, round robin, proportional, annealed, sequential, and one
random task for a whole epoch."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

MODES = ("random", "round_robin", "proportional", "annealed", "sequential", "random_epoch")


def batches_per_task(sizes: Mapping[str, int], batch_size: int) -> dict[str, int]:
    """Batches in one pass over each task: ceil(N_i / batch_size)."""
    return {task: math.ceil(n / batch_size) for task, n in sizes.items()}


def annealing_alpha(epoch: int, num_epochs: int, c: float = 0.8) -> float:
    """Annealed-sampling exponent (Stickland & Murray 2019, sec. 4): alpha = 1 - c (e - 1) / (E - 1), e 1-based."""
    if num_epochs == 1:
        return 1.0
    return 1.0 - c * (epoch - 1) / (num_epochs - 1)


class TaskSampler:
    """Deterministic per-step task choice; an epoch holds sum_i batches_i steps (``batches`` from ``batches_per_task``),
    or with ``one_pass`` (random_epoch only) the batches of one pass over the epoch's task.

    ``sizes`` (N_i, e.g. training examples) drive the probabilities of ``proportional`` (p_i ∝ N_i) and ``annealed``
    (p_i ∝ N_i^alpha); ``order`` (default: ``sizes``' order) is the task order of ``round_robin`` and ``sequential``.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        mode: str,
        *,
        batch_size: int = 1,
        num_epochs: int = 1,
        order: Sequence[str] | None = None,
        anneal_c: float = 0.8,
        seed: int = 0,
        one_pass: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; expected one of {MODES}")
        self.tasks = list(order) if order is not None else list(sizes)
        if sorted(self.tasks) != sorted(sizes):
            raise ValueError(f"order {self.tasks} must be a permutation of the tasks {list(sizes)}")
        self.sizes = {task: sizes[task] for task in self.tasks}
        if one_pass and mode != "random_epoch":
            raise ValueError("one_pass epochs are random_epoch's: one pass over the epoch's task")
        self.mode, self.num_epochs, self.anneal_c, self.seed, self.one_pass = mode, num_epochs, anneal_c, seed, one_pass
        self.batches = batches_per_task(self.sizes, batch_size)
        self.steps_per_epoch = sum(self.batches.values())

    def probabilities(self, epoch: int) -> dict[str, float]:
        """Per-step task probabilities of the random modes in ``epoch`` (1-based)."""
        if self.mode == "random":
            weights = [1.0] * len(self.tasks)
        elif self.mode == "proportional":
            weights = [float(self.sizes[t]) for t in self.tasks]
        elif self.mode == "annealed":
            alpha = annealing_alpha(epoch, self.num_epochs, self.anneal_c)
            weights = [float(self.sizes[t]) ** alpha for t in self.tasks]
        else:
            raise ValueError(f"mode {self.mode!r} is not random")
        total = sum(weights)
        return {t: w / total for t, w in zip(self.tasks, weights)}

    def schedule(self, epoch: int) -> list[str]:
        """The full task sequence of ``epoch``, a pure function of (seed, epoch) so resuming reproduces it."""
        if self.mode == "sequential":
            return [t for t in self.tasks for _ in range(self.batches[t])]
        if self.mode == "round_robin":  # cycle the order, skipping tasks whose batches this epoch are used up
            rounds = max(self.batches.values())
            return [t for r in range(rounds) for t in self.tasks if r < self.batches[t]]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.mode == "random_epoch":  # the whole epoch on one task drawn uniformly; `one_pass`: one pass over it
            task = self.tasks[int(torch.randint(len(self.tasks), (1,), generator=generator))]
            return [task] * (self.batches[task] if self.one_pass else self.steps_per_epoch)
        probs = torch.tensor(list(self.probabilities(epoch).values()), dtype=torch.float64)  # (num_tasks,)
        draws = torch.multinomial(probs, self.steps_per_epoch, replacement=True, generator=generator)
        return [self.tasks[i] for i in draws.tolist()]
