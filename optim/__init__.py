"""Optimisation for multi-task fine-tuning: AdamW, LR schedules, PCGrad and task sampling."""
from .adamw import AdamW, param_groups_for_weight_decay
from .pcgrad import pcgrad
from .sampling import TaskSampler, annealing_alpha, batches_per_task
from .schedules import lr_lambda

__all__ = [
    "AdamW",
    "TaskSampler",
    "annealing_alpha",
    "batches_per_task",
    "lr_lambda",
    "param_groups_for_weight_decay",
    "pcgrad",
]
