"""The output folder of a training run, and the guarantee that nothing finished in it is lost.

    OUTPUT_DIR/
      checkpoints/step-000300/   one checkpoint set: weights, config and tokenizer (a checkpoint evaluate.py reads),
                                 train_state.* (optimizer, LR schedule, data positions, RNG, metrics so far, best
                                 record) and manifest.json (size and SHA-256 of every file)
      checkpoint.json            the pointer: which set is `last` and which is `best`; replacing it commits a set
      last, best                 links to those sets, refreshed after each commit
      metrics.jsonl              one line per evaluation, rewritten from the committed set
      steps.jsonl                one line per step: task losses and learning rates (cut back on --resume)
      train_config.json, run.log the options and the log
      run.lock                   held while a process uses the folder (the OS releases it when the process dies)

A set is written under a temporary name, flushed and renamed, and only then does the pointer move, so a kill or a
full disk at any moment leaves the old set or the new one. Sets the pointer does not name, and temporary files, are
removed when the next process opens the folder. The pointer may only name sets in the run's own checkpoints/, which
must be a real folder, and cleanup never follows a link.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from minbert.checkpoint import TMP_SUFFIX, atomic_write, fsync_dir, read_json, save_json, temporary_name
from minbert.errors import CheckpointError, ConfigError, RunError, WriteError, os_error_hint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

POINTER = "checkpoint.json"
FORMAT = "minbert-run/1"
CHECKPOINTS = "checkpoints"
LINKS = ("last", "best")
MANIFEST = "manifest.json"
STEPS = "steps.jsonl"
# what a run leaves in its folder, and what --overwrite deletes (never anything else the folder holds): its results
# (a folder holding any is refused without --resume or --overwrite), and its logs (replaced silently when no result
# was saved: the run stopped before its first checkpoint)
RUN_RESULTS = (POINTER, CHECKPOINTS, *LINKS, "metrics.jsonl",
               "train_state.json", "train_state.safetensors")  # these two: the layout before checkpoint sets
RUN_LOGS = ("train_config.json", "run.log", STEPS, "plots", "tensorboard", "wandb", "wandb_id")  # the last: --report_to
OPTIONS = "train_config.json"
SET_NAME = re.compile(rf"{CHECKPOINTS}/step-\d{{6,}}")  # what the pointer may name


def refuse_run_folder(path: Path) -> None:
    """A run folder passed where a checkpoint is wanted: say which of its checkpoints to pass."""
    if any((path / marker).exists() for marker in (POINTER, CHECKPOINTS, "last")):
        raise CheckpointError(f"minbert: {path} is a training run folder, not a checkpoint: pass {path / 'best'} "
                              f"(the best dev checkpoint) or {path / 'last'} (the latest)")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: the size and SHA-256 of every file of a set, so a later --resume can verify it."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in sorted(folder.iterdir())}
    save_json(files, folder / MANIFEST)


def verify_manifest(folder: Path) -> None:
    """Raise CheckpointError naming the first file of a set that is missing, truncated or changed."""
    manifest = read_json(folder / MANIFEST)
    for name, expected in manifest.items():
        path = folder / name
        if Path(name).name != name or not path.is_file() or path.is_symlink():
            raise CheckpointError(f"minbert: checkpoint set {folder} is incomplete: {name} is missing")
        if path.stat().st_size != expected["bytes"] or file_digest(path) != expected["sha256"]:
            raise CheckpointError(f"minbert: checkpoint set {folder} is damaged: {name} differs from its manifest "
                                  "(truncated or changed after it was saved)")


def saved_results(path: Path, extra_files=()) -> list[str]:
    """The names in `path` that hold a run's results (none: no run, or one that stopped before its first commit,
    whose checkpoints/ then holds at most an uncommitted set)."""
    path = Path(path)
    ignored = () if os.path.lexists(path / POINTER) else (CHECKPOINTS,)
    return [name for name in dict.fromkeys((*RUN_RESULTS, *extra_files))
            if name not in ignored and os.path.lexists(path / name)]


def remove(entry: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


class RunDir:
    """One run's output folder, opened by a single process: the lock, the log and the checkpoint sets."""

    def __init__(self, path: Path, lock_fd: int | None = None):
        self.path, self._lock_fd = Path(path), lock_fd

    # ---- opening ----------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, resume: bool = False, overwrite: bool = False, extra_files=()) -> RunDir:
        """Lock the folder for this process, then: with `resume`, check that a run was started there (whether it
        committed a set says `pointer()`); with `overwrite`, delete the run it holds; otherwise refuse a folder that
        holds a run. `extra_files` are further names the run writes (masked-LM pre-training writes a model there)."""
        path, run = Path(path), None
        try:
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path, cls._lock(path))
            if (path / CHECKPOINTS).is_symlink():
                raise RunError(f"{path / CHECKPOINTS} is a link; minbert keeps a run's checkpoint sets in a real "
                               "folder inside the run folder: remove the link (what it points to is not touched), or "
                               "choose another --output_dir")
            results, committed = saved_results(path, extra_files), (path / POINTER).is_file()
            if resume and not committed and (results or not (path / OPTIONS).is_file()):
                why = "it was written by an older minbert, whose runs cannot be continued: start over with " \
                      "--overwrite" if (path / "train_state.json").is_file() else \
                    f"its {POINTER} is missing: restore it, or start over with --overwrite" if results else \
                    "no run was started there: check --output_dir, or drop --resume"
                raise ConfigError(f"--resume, but {path} holds no saved checkpoint to continue ({why})")
            if results and not (resume or overwrite):
                raise ConfigError(f"{path} already holds a run ({', '.join(results[:3])}): add --resume to continue "
                                  "it, --overwrite to delete it and start over, or choose another --output_dir")
            if not (resume and committed):  # a new run, or one that never committed a set: start afresh
                for name in (*results, *RUN_LOGS):
                    remove(path / name)
            run._remove_stale()
            return run
        except BaseException as err:
            if run is not None:
                run.close()
            if isinstance(err, OSError):
                raise RunError(f"cannot use output folder {path}: {err.strerror or err} (check that it is writable "
                               "and the disk has space, or choose another --output_dir)") from None
            raise

    @staticmethod
    def _lock(path: Path) -> int | None:
        """An exclusive lock on run.lock, which the OS drops when the process ends, however it ends."""
        fd = os.open(path / "run.lock", os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"{path} is in use by another run (process {owner}); wait for it to finish or choose "
                           "another --output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    def close(self) -> None:
        """Release the lock (also released by the OS if the process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_stale(self) -> None:
        """Temporary files of killed writers, and sets the pointer does not name (a save killed before its commit)."""
        keep = {Path(p).name for p in (self.pointer() or {}).values() if isinstance(p, str) and SET_NAME.fullmatch(p)}
        checkpoints = self.path / CHECKPOINTS
        for entry in [*self.path.glob(f".*{TMP_SUFFIX}"), *checkpoints.glob(f".*{TMP_SUFFIX}"),
                      *(e for e in checkpoints.glob("step-*") if e.name not in keep)]:
            remove(entry)

    # ---- the committed state ------------------------------------------------------------------------------------

    def pointer(self) -> dict | None:
        """The committed pointer ({"last": "checkpoints/step-...", "best": ... or None, ...}), None before the first;
        one naming anything but a set of this run's checkpoints/ is refused."""
        if not (self.path / POINTER).is_file():
            return None
        pointer = read_json(self.path / POINTER)
        if pointer.get("format") != FORMAT:
            raise CheckpointError(f"minbert: {self.path / POINTER} is not a {FORMAT} pointer")
        for key in ("last", "best"):
            value = pointer.get(key)
            if not (value is None and key == "best" or isinstance(value, str) and SET_NAME.fullmatch(value)):
                raise CheckpointError(f"minbert: {self.path / POINTER}: {key!r} is {value!r}, not a set of this run "
                                      f"({CHECKPOINTS}/step-NNNNNN); the file was edited or damaged: restore it, "
                                      "or start over with --overwrite")
        return pointer

    def last(self) -> Path:
        """The last committed set, verified against its manifest (and the best set with it)."""
        pointer = self.pointer()
        if pointer is None:
            raise CheckpointError(f"minbert: {self.path} holds no committed checkpoint set")
        for name in {pointer["last"], pointer.get("best") or pointer["last"]}:
            verify_manifest(self.path / name)
        return self.path / pointer["last"]

    def commit(self, step: int, write, is_best: bool) -> Path:
        """Save a set: `write(folder)` fills a temporary folder, which becomes checkpoints/step-NNNNNN; then the
        pointer moves to it (as `last`, and `best` when `is_best`), the links follow and older sets are removed."""
        name = f"{CHECKPOINTS}/step-{step:06d}"
        final, pointer = self.path / name, self.pointer() or {}
        if name in (pointer.get("last"), pointer.get("best")):
            raise RunError(f"{final} is already committed; a step is saved once")
        tmp = temporary_name(final)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            write_manifest(tmp)
            fsync_dir(tmp)
            if final.exists():  # left by a save killed before its commit
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(final.parent)
            best = name if is_best else pointer.get("best")
            save_json({"format": FORMAT, "last": name, "best": best, "step": step}, self.path / POINTER)  # commit
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if (self.pointer() or {}).get("last") != name:  # renamed but not committed: no use to anyone
                shutil.rmtree(final, ignore_errors=True)
            kept = f"the last saved checkpoint, {self.path / pointer['last']}, is intact" if pointer else \
                "no checkpoint was saved yet"
            raise RunError(f"could not save step {step} to {final}: {err.strerror or err}{os_error_hint(err)}; "
                           f"{kept}: once that is fixed, continue with --resume") from None
        try:
            self.refresh()
        except OSError as err:  # committed: only the links and metrics.jsonl lag, and the next open redoes them
            raise RunError(f"step {step} was saved to {final}, but {err.filename or self.path} could not be "
                           f"updated: {err.strerror or err}{os_error_hint(err)}; continue with --resume") from None
        return final

    def refresh(self) -> None:
        """Make the links and metrics.jsonl match the committed pointer, and drop the sets it no longer names."""
        pointer = self.pointer()
        if pointer is None:
            return
        for link in LINKS:
            target = pointer.get(link)
            if target:
                tmp = temporary_name(self.path / link)
                os.symlink(target, tmp, target_is_directory=True)
                os.replace(tmp, self.path / link)
        history = read_json(self.path / pointer["last"] / "train_state.json")["progress"]["history"]
        atomic_write(self.path / "metrics.jsonl",
                     lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in history)))
        self._remove_stale()

    # ---- log and options --------------------------------------------------------------------------------------

    def write_options(self, options: dict) -> None:
        """train_config.json: the run's options (what --resume compares against)."""
        save_json(options, self.path / OPTIONS)

    def log(self, message: str, echo: bool = True) -> None:
        """Append to run.log, and print unless `echo` is False."""
        if echo:
            print(message)
        self._append("run.log", message)

    def log_step(self, record: dict) -> None:
        """One line of steps.jsonl (a step's task losses and learning rates, for training curves)."""
        self._append(STEPS, json.dumps(record))

    def drop_steps_after(self, step: int) -> None:
        """Keep the steps.jsonl lines up to `step` (a resumed run redoes the steps after its checkpoint)."""
        path = self.path / STEPS
        if path.is_file():
            lines = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines)))

    def _append(self, name: str, line: str) -> None:
        try:
            with open(self.path / name, "a") as f:
                f.write(line + "\n")
        except OSError as err:
            raise WriteError(self.path / name, err) from None
