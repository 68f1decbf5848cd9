"""Export the fine-tuned encoder of a MultitaskBert as a folder that transformers and sentence-transformers load.

The root of the folder is a transformers BertModel (config.json, model.safetensors, the tokenizer); modules.json,
sentence_bert_config.json, 1_Pooling/ and, for the tanh pooler, 2_Dense/ make it a sentence-transformers model whose
`encode` gives the sentence vectors the model's pooling gives (not normalised). Module names and config keys are
those of sentence-transformers' own hub models (e.g. all-MiniLM-L6-v2), the form its versions keep reading.
"""
from pathlib import Path

from minbert.bilstm import BiLSTMEncoder
from minbert.checkpoint import atomic_write, save_json, save_tensors
from minbert.errors import ConfigError
from minbert.model import merged_state_dict

from .multitask import MultitaskBert

POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                 "pooler": "pooling_mode_cls_token"}  # the pooler is [CLS] pooling, then 2_Dense (tanh)
TANH = "torch.nn.modules.activation.Tanh"
MAX_SEQ_LENGTH = 512


def export_refusal(model: MultitaskBert) -> str | None:
    """Why the model's sentence vectors cannot be exported, or None when they can."""
    if isinstance(model.bert, BiLSTMEncoder):
        return "the bilstm baseline is not a BERT encoder, and transformers has no model for it"
    if model.config.pair_encoding == "cross":
        return ("the encoder was trained on cross-encoded pairs ([CLS] a [SEP] b [SEP]), not to give sentence "
                "vectors; train with --pair_encoding bi to export")
    if model.pals is not None:
        return ("PALs cannot be exported: they are task-specific layers inside BERT, which transformers.BertModel "
                "lacks; train without --pals (LoRA adapters export, merged)")
    if model.pooling.kind not in POOLING_MODES:
        return (f"{model.pooling.kind} pooling has no sentence-transformers equivalent (mean, cls and pooler do); "
                "train with --pooling mean, cls or pooler")
    if model.tokenizer is None:
        return "the model has no tokenizer; build it with MultitaskBert.from_pretrained or from_checkpoint"
    return None


def pooling_config(kind: str, hidden_size: int) -> dict:
    """1_Pooling/config.json: exactly one pooling mode on."""
    modes = dict.fromkeys(("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                           "pooling_mode_mean_sqrt_len_tokens"), False)
    return {"word_embedding_dimension": hidden_size, **modes, POOLING_MODES[kind]: True}


def save_pooler_as_dense(model: MultitaskBert, directory: Path) -> None:
    """2_Dense: sentence_transformers.models.Dense holding the pooler's (merged) weights, tanh(W h_[CLS] + b)."""
    dense = merged_state_dict(model.bert.pooler.dense)  # {'weight': (H, H), 'bias': (H,)}
    out_features, in_features = dense["weight"].shape
    save_tensors({"linear." + k: v for k, v in dense.items()}, directory / "model.safetensors", {"format": "pt"})
    save_json({"in_features": in_features, "out_features": out_features, "bias": True,
               "activation_function": TANH}, directory / "config.json")


def model_card(model: MultitaskBert, directory: Path, metrics: dict | None = None, command: str | None = None) -> str:
    """README.md in the model-card form of sentence-transformers and the Hub: YAML metadata, then the base model,
    the tasks, the checkpoint's dev metrics, the command that trained it and how to load it."""
    base, tasks = model.base_model or "a BERT checkpoint", ", ".join(model.config.tasks)
    scores = {k: v for k, v in (metrics or {}).items() if isinstance(v, float)}
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags: [sentence-transformers, feature-extraction, sentence-similarity, minbert]",
             *([f"base_model: {base}"] if model.base_model else []), "---", "",
             f"# {directory.name}", "",
             f"A sentence encoder fine-tuned with minbert from {base} on the tasks {tasks}"
             f" ({model.pooling.kind} pooling, {model.config.pair_encoding}-encoded pairs); the task "
             "heads stay in minbert.", ""]
    if scores:
        lines += ["## Dev metrics", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4f} |" for k, v in scores.items()], ""]
        if "step" in (metrics or {}):
            lines[-1:-1] = ["", f"Of the checkpoint of epoch {metrics.get('epoch')}, step {metrics['step']}."]
    if command:
        lines += ["## Training", "", "```bash", command, "```", ""]
    lines += ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer",
              f"model = SentenceTransformer({str(directory)!r})",
              'embeddings = model.encode(["A man is playing a guitar.", "Someone plays guitar."])', "",
              "from transformers import AutoModel, AutoTokenizer",
              f"encoder, tokenizer = AutoModel.from_pretrained({str(directory)!r}), "
              f"AutoTokenizer.from_pretrained({str(directory)!r})", "```", ""]
    return "\n".join(lines)


def export_sentence_transformer(model: MultitaskBert, directory: str | Path, max_seq_length: int | None = None,
                                metrics: dict | None = None, command: str | None = None) -> Path:
    """Write the encoder and tokenizer as a transformers folder plus the sentence-transformers modules for the
    model's pooling, and README.md (model_card: `metrics` and `command` when given); LoRA/DoRA is merged into the
    saved weights (the model keeps its adapters). `max_seq_length` defaults to the encoder's positions, at most
    512. Raises ConfigError (a ValueError) for what cannot be expressed."""
    reason = export_refusal(model)
    if reason is not None:
        raise ConfigError(f"minbert: cannot export to {directory}: {reason}")
    positions = model.bert.config.max_position_embeddings
    max_seq_length = min(positions, MAX_SEQ_LENGTH) if max_seq_length is None else max_seq_length
    if not 0 < max_seq_length <= positions:
        raise ConfigError(f"minbert: cannot export to {directory}: max_seq_length {max_seq_length} is outside the "
                         f"encoder's 1..{positions} positions; pass at most {positions}")
    directory, pooler = Path(directory), model.pooling.kind == "pooler"
    model.bert.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory, model_max_length=positions)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")] + ([("2_Dense", "Dense")] if pooler else [])
    save_json([{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
               for i, (path, kind) in enumerate(modules)], directory / "modules.json")
    save_json({"max_seq_length": max_seq_length, "do_lower_case": False}, directory / "sentence_bert_config.json")
    save_json({"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
              directory / "config_sentence_transformers.json")
    save_json(pooling_config(model.pooling.kind, model.bert.config.hidden_size),
              directory / "1_Pooling" / "config.json")
    if pooler:
        save_pooler_as_dense(model, directory / "2_Dense")
    card = model_card(model, directory, metrics, command)
    atomic_write(directory / "README.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    return directory
