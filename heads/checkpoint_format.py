"""The multi-task checkpoint format: model.safetensors (weights, with metadata such as step and dev scores) and
config.json (encoder config, heads and task definitions, adapters), never pickle; and its legacy readers."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from minbert import BertModel, CheckpointError, Tokenizer
from minbert.bilstm import BiLSTMConfig, BiLSTMEncoder
from minbert.checkpoint import PICKLE_SUFFIXES, read_json, read_tensors, save_json, save_tensors
from minbert.loading import checked_config, load_checked
from minbert.lora import ADAPTER_PARAMS, LoRAConfig
from minbert.pals import PALsConfig

from .config import HeadConfig

FORMAT = "minbert-multitask/2"
LEGACY_FORMAT = "minbert-multitask/1"  # before head specs: old head parameter names, ReLU streams


def checkpoint_config(model, adapters_only: bool = False) -> dict:
    """config.json of a MultitaskBert: everything that rebuilds it, the definitions of its own tasks included."""
    return {"format": FORMAT, "base_model": model.base_model, "bert": model.bert.config.to_dict(),
            "encoder": "bert" if model.is_bert else "bilstm",
            "heads": dataclasses.asdict(model.config), "lora": model.lora and model.lora.to_dict(),
            "pals": model.pals_config and model.pals_config.to_dict(),
            "adapters_only": adapters_only, "base_fingerprint": model.base_fingerprint}


def save_model(model, directory: Path, metadata: dict | None = None, adapters_only: bool = False) -> None:
    """model.safetensors (with `metadata` inside), config.json and the tokenizer, each written atomically.
    `adapters_only` keeps what training changed (adapters, heads, trainable encoder weights) and refers to the base
    model for the rest."""
    directory = Path(directory)
    tensors = model.state_dict()
    if adapters_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        tensors = {k: v for k, v in tensors.items() if not k.startswith("bert.") or k in trainable}
    save_tensors(tensors, directory / "model.safetensors", {k: json.dumps(v) for k, v in (metadata or {}).items()})
    save_json(checkpoint_config(model, adapters_only), directory / "config.json")
    if model.tokenizer is not None:
        model.tokenizer.save(directory)


def load_model(cls, path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a model saved by `save_model` (pickled files are refused). An adapter-only checkpoint is loaded on
    top of its base model, which must be the one it was trained on."""
    path = Path(path)
    check_checkpoint_dir(path)
    config = read_json(path / "config.json")
    if config.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(f"minbert: {path / 'config.json'} is not a {FORMAT} checkpoint config "
                              "(a plain BERT checkpoint goes to train.py --model instead)")
    legacy = config["format"] == LEGACY_FORMAT
    saved, _ = read_tensors(path / "model.safetensors", device)
    try:
        head_fields = {**({"stream_activation": "relu"} if legacy else {}), **config["heads"]}
        heads, lora = HeadConfig(**head_fields), config.get("lora") and LoRAConfig.from_dict(config["lora"])
        pals = config.get("pals") and PALsConfig.from_dict(config["pals"])
        if config.get("adapters_only"):
            model = cls(BertModel.from_pretrained(config["base_model"]), heads, Tokenizer.from_pretrained(path),
                        config["base_model"], lora, pals)
        else:
            encoder = BiLSTMEncoder(BiLSTMConfig.from_dict(config["bert"])) \
                if config.get("encoder") == "bilstm" else BertModel(
                    checked_config(config["bert"], path / "config.json", saved, path / "model.safetensors"))
            model = cls(encoder, heads, Tokenizer.from_pretrained(path), config["base_model"], lora, pals,
                        config.get("base_fingerprint"))
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"minbert: {path / 'config.json'} does not describe a model "
                              f"({type(err).__name__}: {err})") from None
    if config.get("adapters_only") and model.base_fingerprint != config["base_fingerprint"]:
        raise CheckpointError(
            f"minbert: {path} holds adapters trained on base model {config['base_model']!r} (weights "
            f"{config['base_fingerprint'][:12]}), but that name now gives other weights "
            f"({model.base_fingerprint[:12]}); load it on the base model it was trained on")
    if legacy:
        saved = legacy_head_keys(saved)
    if config.get("adapters_only"):
        saved = {**model.state_dict(), **saved}  # the base supplies the rest; unknown keys still fail
    load_checked(model, saved, path / "model.safetensors", optional=())
    return model.to(device).eval()


def read_metadata(path: str | Path) -> dict:
    """The metadata saved with the weights (epoch, step, dev scores ...)."""
    _, metadata = read_tensors(Path(path) / "model.safetensors")
    return {k: json.loads(v) for k, v in metadata.items()}


def check_checkpoint_dir(path: Path) -> None:
    """Refuse pickles and folders without the checkpoint's two files, with a message that says what to pass."""
    pickles = [p for p in ([path] if path.is_file() else path.glob("*")) if p.suffix in PICKLE_SUFFIXES]
    if pickles and not (path / "model.safetensors").is_file():
        raise CheckpointError(f"minbert: refusing {pickles[0]}: pickled checkpoints can run arbitrary code; minbert "
                              "checkpoints are directories with model.safetensors and config.json")
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"minbert: {path} is not a minbert checkpoint (no {name}); "
                                  "pass the directory train.py wrote, e.g. runs/NAME/best")


def fingerprint(bert: BertModel) -> str:
    """SHA-256 of the encoder's weights (adapter tensors excluded): identifies the base of an adapter checkpoint."""
    h = hashlib.sha256()
    for key, value in sorted(bert.state_dict().items()):
        if key.rsplit(".", 1)[-1] not in ADAPTER_PARAMS:
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def legacy_head_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head weights of a minbert-multitask/1 checkpoint under today's names: SentimentHead `net` (a Linear, or
    Linear-ReLU-Linear-ReLU-Linear) and cosine_logit's scalar `scale`/`bias` become `mlp.*` and `out`."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "heads" and len(parts) == 3 and parts[2] in ("scale", "bias") and value.dim() == 0:
            key, value = f"heads.{parts[1]}.out.{'weight' if parts[2] == 'scale' else 'bias'}", value.reshape(
                (1, 1) if parts[2] == "scale" else (1,))
        elif parts[0] == "heads" and parts[2] == "net":
            layer = parts[3] if len(parts) == 5 else None  # net.{0,2,4}.weight, or net.weight
            key = ".".join(["heads", parts[1], "out" if layer in (None, "4") else f"mlp.{layer}", parts[-1]])
        out[key] = value
    return out
