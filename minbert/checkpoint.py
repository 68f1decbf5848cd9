"""Checkpoint files: written atomically (a temporary name in the same folder, flushed to disk, then renamed into
place) and read back with errors that name the file."""
import json
import os
import re
import secrets
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, WriteError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
TMP_SUFFIX = ".tmp"  # temporary files and folders end with this; a killed writer may leave them behind
UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), restored at once
os.umask(UMASK)


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (`.NAME.<random>.tmp`), created with the process umask's permissions."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), flush it to disk, then rename it to `path`: readers see the old file or the new one,
    never half of one, even after a kill or a full disk (the temporary file is removed on any error). A failed
    write (full disk, file-size limit, permissions) is a WriteError naming `path`."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # as a plain open() would create it (some writers use 0600)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else rust_os_error(err)
        if cause is None or isinstance(err, WriteError):
            raise
        raise WriteError(path, cause) from None
    fsync_dir(path.parent)


def rust_os_error(err: BaseException) -> OSError | None:
    """The OSError behind an error of a Rust writer (safetensors, tokenizers), which ends in "(os error N)"."""
    found = re.search(r"\(os error (\d+)\)", str(err)) if isinstance(err, Exception) else None
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_json(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a missing, unparsable or non-object file is a CheckpointError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"minbert: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise CheckpointError(f"minbert: {path}{where}: not valid JSON ({getattr(err, 'msg', err)}); the file is "
                              "corrupt or was edited by hand") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"minbert: {path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_tensors(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a truncated or corrupt file is a CheckpointError naming it."""
    try:
        with safe_open(Path(path), "pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"minbert: {path} not found") from None
    except SafetensorError as err:
        raise CheckpointError(f"minbert: {path} is truncated or corrupt ({err}); re-create or re-download it") from None
