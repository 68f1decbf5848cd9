"""Task heads and the multi-task model built on the shared encoder."""
from .config import HeadConfig
from .multitask import MultitaskBert
from .pooling import POOLINGS, Pooling
from .task_heads import HeadSpec, TaskHead

__all__ = ["HeadConfig", "HeadSpec", "MultitaskBert", "Pooling", "TaskHead", "POOLINGS"]
