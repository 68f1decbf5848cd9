"""Dynamic loss scaling for fp16 mixed precision (Micikevicius et al. 2018, "Mixed Precision Training", §3.2).

Losses are multiplied by S before backward so small gradients survive fp16; gradients are divided by S again and
checked: a step with any inf/NaN gradient is skipped and S halves, and after `growth_interval` good steps in a row
S doubles. Unlike a stock scaler, which unscales and checks once per step, `unscale_` can be called on each task's
gradients as they are set aside (PCGrad), so every task's gradient is checked and brought back to scale 1 before
it meets another task's.
"""
from __future__ import annotations

import torch

MAX_SKIPPED_IN_A_ROW = 20  # fp16: steps skipped for inf/NaN in a row before the run stops


class NonFiniteLoss(RuntimeError):
    """A loss or gradient became NaN or inf; raised before the optimizer step, so the weights are still good."""


class LossScaler:
    """The scale S, its growth tracker, and the count of skipped steps; `enabled=False` is scale 1, no checks."""

    def __init__(self, enabled: bool = True, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale_value = init_scale if enabled else 1.0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0  # steps since the scale last changed
        self.skipped = 0  # skipped steps in all
        self.skipped_in_a_row = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """S · loss, for backward."""
        return loss * self.scale_value if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params: list[torch.Tensor], found_inf: torch.Tensor) -> None:
        """Divide the gradients of `params` (one device) by S, in place, and set `found_inf` (1,) to 1 if any of
        them is inf or NaN; the caller reads `found_inf` once per step (a single device sync)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled and grads:
            inv_scale = torch.full((1,), 1.0 / self.scale_value, device=found_inf.device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

    def check(self, problems: list[str]) -> bool:
        """The non-finite guard of every training loop, after the step's values are read: True to take the step.
        A problem (e.g. "the sst loss is nan") stops the run at once in float32 and bf16 (NonFiniteLoss); under
        fp16 the step is skipped and S halves, and MAX_SKIPPED_IN_A_ROW skips in a row stop it."""
        if not problems:
            self.update(skipped=False)
            return True
        if not self.enabled:
            raise NonFiniteLoss(problems[0])
        self.update(skipped=True)
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteLoss(f"{self.skipped_in_a_row} steps in a row were skipped under fp16 ({problems[0]}; "
                                f"loss scale now {self.scale_value:g})")
        return False

    def update(self, skipped: bool) -> None:
        """After a step: halve S when it was skipped for non-finite values, double it after growth_interval good
        steps in a row."""
        if not self.enabled:
            return
        if skipped:
            self.scale_value *= self.backoff_factor
            self.good_steps, self.skipped, self.skipped_in_a_row = 0, self.skipped + 1, self.skipped_in_a_row + 1
            return
        self.good_steps, self.skipped_in_a_row = self.good_steps + 1, 0
        if self.good_steps == self.growth_interval:
            self.scale_value *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "good_steps": self.good_steps, "skipped": self.skipped,
                "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped, self.skipped_in_a_row = int(state["skipped"]), int(state["skipped_in_a_row"])

