"""minbert: a hand-written BERT for multi-task fine-tuning (CS224N), loading real Hugging Face checkpoints."""
from .config import BertConfig
from .errors import CheckpointError, ConfigError, MinbertError
from .model import BertForMaskedLM, BertModel
from .tokenizer import Tokenizer

__all__ = ["BertConfig", "BertModel", "BertForMaskedLM", "Tokenizer", "CheckpointError", "ConfigError", "MinbertError"]
