"""minbert: a hand-written BERT for multi-task fine-tuning (CS224N), loading real Hugging Face checkpoints.

The library's other packages sit beside this folder in a checkout (heads/, optim/, data/, training/) and are
minbert.heads, minbert.optim, minbert.data and minbert.training: installed, setup.py maps them so; in a checkout,
this package's path also holds the checkout's root. So the environment gets the one top-level name minbert."""
from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "setup.py").is_file() and (_checkout / "training" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (the package's __path__)

from .config import BertConfig
from .errors import CheckpointError, ConfigError, MinbertError
from .model import BertForMaskedLM, BertModel
from .tokenizer import Tokenizer

__all__ = ["BertConfig", "BertModel", "BertForMaskedLM", "Tokenizer", "CheckpointError", "ConfigError", "MinbertError"]
