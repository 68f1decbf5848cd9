"""Optimisation for multi-task fine-tuning: AdamW, LR schedules, PCGrad, GradNorm, SMART and task sampling."""
from .adamw import AdamW, param_groups_for_weight_decay
from .gradnorm import GradNorm
from .loss_scaling import LossScaler
from .pcgrad import pcgrad
from .sampling import TaskSampler, annealing_alpha, batches_per_task
from .schedules import lr_lambda
from .smart import EMATeacher, bregman_divergence, divergence, smart_loss

__all__ = [
    "AdamW",
    "EMATeacher",
    "GradNorm",
    "LossScaler",
    "TaskSampler",
    "annealing_alpha",
    "batches_per_task",
    "bregman_divergence",
    "divergence",
    "lr_lambda",
    "param_groups_for_weight_decay",
    "pcgrad",
    "smart_loss",
]
