"""Optimisation for multi-task fine-tuning: AdamW, LR schedules, gradient aggregators (PCGrad, MGDA, CAGrad, ...),
loss weightings (GradNorm, UW, FAMO, ...), SMART, fp16 loss scaling and task sampling."""
from .adamw import AdamW, param_groups_for_weight_decay
from .aggregation import AGGREGATORS, Aggregator, aggregator
from .gradnorm import GradNorm
from .loss_scaling import MAX_SKIPPED_IN_A_ROW, LossScaler, NonFiniteLoss
from .pcgrad import pcgrad
from .sampling import TaskSampler, annealing_alpha, batches_per_task
from .schedules import lr_lambda
from .smart import EMATeacher, bregman_divergence, divergence, smart_loss
from .weighting import WEIGHTINGS, LossWeighting, loss_weighting

__all__ = [
    "AGGREGATORS",
    "AdamW",
    "Aggregator",
    "EMATeacher",
    "GradNorm",
    "LossScaler",
    "LossWeighting",
    "MAX_SKIPPED_IN_A_ROW",
    "NonFiniteLoss",
    "TaskSampler",
    "WEIGHTINGS",
    "aggregator",
    "annealing_alpha",
    "batches_per_task",
    "bregman_divergence",
    "divergence",
    "loss_weighting",
    "lr_lambda",
    "param_groups_for_weight_decay",
    "pcgrad",
    "smart_loss",
]
