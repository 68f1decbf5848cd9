"""Task heads and the multi-task model built on the shared encoder."""
from .multitask import HeadConfig, MultitaskBert
from .pooling import POOLINGS, Pooling
from .task_heads import PAIR_HEADS, SENTIMENT_HEADS, PairHead, SentimentHead

__all__ = ["HeadConfig", "MultitaskBert", "Pooling", "PairHead", "SentimentHead", "POOLINGS", "PAIR_HEADS",
           "SENTIMENT_HEADS"]
