"""Nothing finished is lost, and every fault is a clear stop: run-folder reuse and locking, checkpoint sets under
kill -9 (also mid-save), SIGTERM, a real full disk and a real file-size limit, tampered run folders, --resume checks,
file permissions, and the one-line errors of train.py and evaluate.py (exit code 2 for usage errors, 1 for the
rest). The faults are real: signals sent to a child process, a tmpfs filled up, RLIMIT_FSIZE."""
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minbert.training.evaluate as evaluate
import minbert.training.train as train
from test_train import assert_same_weights, exits, run_args, weights, without_timings
from minbert.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run: 2 epochs x 3 steps, saved at steps 2, 3 (end of epoch 1), 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, out, "--save_every", "2"))
    return out


def metrics_lines(run: Path) -> list[dict]:
    return [without_timings(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def leftovers(run: Path) -> list[str]:
    """Temporary files, and sets the pointer does not name."""
    pointer = json.loads((run / "checkpoint.json").read_text())
    named = {Path(pointer[k]).name for k in ("last", "best") if pointer[k]}
    return [str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp")] + \
        [p.name for p in (run / "checkpoints").iterdir() if p.name not in named]


@pytest.mark.parametrize("target, n, when, committed", [
    ("minbert.training.train:train_step", 5, "kill-before", 4),  # in the middle of training
    ("minbert.checkpoint:save_file", 3, "kill-after", 2),  # mid-save: step 3's weights written, not yet renamed
    ("minbert.training.state:TrainState.save", 3, "kill-after", 3),  # mid-save: step 4's set complete, uncommitted
    ("minbert.training.run_dir:RunDir.refresh", 2, "kill-before", 3),  # just after step 3's commit, before the links
    ("minbert.training.train:evaluate", 2, "kill-before", 4),  # during the last evaluation
])
def test_kill_9_anywhere_then_resume_is_bit_identical(reference, tiny_model_dir, tiny_data_dir, tmp_path, target,
                                                      n, when, committed):
    run = tmp_path / "run"
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_run.py"), target, str(n), when, *args],
                            env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert json.loads((run / "checkpoint.json").read_text())["step"] == committed
    train.main(args + ["--resume"])
    assert_same_weights(weights(reference), weights(run))
    assert metrics_lines(run) == metrics_lines(reference)
    assert (run / "best").resolve().name == (reference / "best").resolve().name
    assert leftovers(run) == []


def script(name: str, *args, fsize: int | None = None, env: dict | None = None, cwd=None):
    """Run tests/NAME or the root script NAME in a child process; `fsize` sets a real file-size limit there
    (RLIMIT_FSIZE, with SIGXFSZ ignored so a write past it fails with EFBIG, as writes on a full disk fail)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    path = ROOT / "tests" / name if (ROOT / "tests" / name).is_file() else ROOT / name
    return subprocess.run([sys.executable, str(path), *map(str, args)], env={**os.environ, "PYTHONPATH": str(ROOT),
                          **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if fsize else None)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB filesystem (tmpfs) to fill up; skipped where this process may not mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_keeps_the_last_set_and_resume_finishes_the_run(reference, tiny_model_dir, tiny_data_dir,
                                                                    small_disk):
    run, filler = small_disk / "run", small_disk / "filler"
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2")
    full = script("fault_run.py", "minbert.checkpoint:save_file", 3, "fill-disk-before", *args,
                  env={"FILL_PATH": str(filler)})  # the disk fills just before step 3's weights are written
    assert full.returncode == 1, full.stderr[-2000:]
    assert re.fullmatch(rf"error: could not save step 3 to {run}/checkpoints/step-000003: No space left on device "
                        rf"\(the disk or quota is full: free space, or write somewhere else\); the last saved "
                        rf"checkpoint, {run}/checkpoints/step-000002, is intact: once that is fixed, continue with "
                        r"--resume", last_line(full)), full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    assert leftovers(run) == [] and (run / "last").resolve().name == "step-000002"  # the failed set is gone at once
    filler.unlink()
    train.main(args + ["--resume"])
    assert_same_weights(weights(reference), weights(run))
    assert metrics_lines(run) == metrics_lines(reference)


@pytest.mark.parametrize("fsize, message", [
    (300, r"error: cannot write {run}/train_config.json: File too large"),  # at the start
    (40_000, r"error: could not save step 2 to {run}/checkpoints/step-000002: File too large \(a file-size limit "
             r"was reached, see `ulimit -f`: raise it, or write somewhere else\); no checkpoint was saved yet"),
])
def test_a_file_size_limit_anywhere_is_a_one_line_error(tiny_model_dir, tiny_data_dir, tmp_path, fsize, message):
    run = tmp_path / "run"
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2")
    limited = script("train.py", *args, fsize=fsize)
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr[-2000:]
    assert re.match(message.format(run=run), last_line(limited)), last_line(limited)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("step-")]
    train.main(args)  # nothing was committed: the folder is reused as it is


def test_a_file_size_limit_during_export_is_a_one_line_error(reference, tmp_path):
    export = tmp_path / "export"
    limited = script("evaluate.py", reference / "best", "--export", export, fsize=40_000)
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr[-2000:]
    assert re.fullmatch(rf"error: cannot write {export}/model.safetensors: File too large \(a file-size limit was "
                        r"reached, see `ulimit -f`: raise it, or write somewhere else\)", last_line(limited))
    assert not [p for p in export.rglob("*") if p.name.endswith(".tmp")]


def test_a_run_killed_in_its_first_save_is_reused_or_resumed(reference, tiny_model_dir, tiny_data_dir, tmp_path):
    for continued in ("--resume", None):
        run = tmp_path / f"run{continued}"
        args = run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2")
        killed = script("fault_run.py", "minbert.checkpoint:save_file", 1, "kill-after", *args)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert not (run / "checkpoint.json").exists() and list((run / "checkpoints").iterdir())  # a set, uncommitted
        train.main(args + ([continued] if continued else []))  # starting over is continuing: nothing was committed
        assert_same_weights(weights(reference), weights(run))
        assert metrics_lines(run) == metrics_lines(reference)


def test_a_sweep_whose_run_was_killed_in_its_first_save_resumes(tiny_model_dir, tiny_data_dir, tmp_path):
    args = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "sweep", "--epochs", "1", "--sweep", "lr=1e-3,1e-4")
    killed = script("fault_run.py", "minbert.checkpoint:save_file", 3, "kill-after", *args)  # run 2's first save
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "sweep" / "lr=0.0001" / "seed11711" / "checkpoint.json").exists()
    train.main(args + ["--resume"])
    assert len((tmp_path / "sweep" / "summary.csv").read_text().splitlines()) == 1 + 2


def test_sigterm_saves_the_step_it_stands_at_and_resume_is_bit_identical(reference, tiny_model_dir, tiny_data_dir,
                                                                         tmp_path):
    run = tmp_path / "run"
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2")
    stopped = script("fault_run.py", "minbert.training.train:train_step", 5, "sigterm-before", *args)  # 5: no save
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert last_line(stopped) == (f"stopped by SIGTERM after step 5; its checkpoint is {run}/last; continue with: "
                                  f"python train.py ... --output_dir {run} --resume")
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 5
    stood = json.loads((run / "last" / "train_state.json").read_text())["progress"]
    assert stood["seconds_since_eval"] > 0 and stood["tokens_since_eval"] > 0  # steps 4 and 5, since epoch 1's end
    train.main(args + ["--resume"])
    assert_same_weights(weights(reference), weights(run))
    assert metrics_lines(run) == metrics_lines(reference)  # train_tokens too: epoch 2's count steps 4 and 5
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train_seconds"] >= stood[
        "seconds_since_eval"]
    # before the loop there is no step to save: SIGTERM stops at once
    early = script("fault_run.py", "minbert.training.train:load_data", 1, "sigterm-before", *run_args(
        tiny_model_dir, tiny_data_dir, tmp_path / "early"))
    assert early.returncode == 143 and last_line(early).startswith("stopped by SIGTERM; continue with:")
    assert not (tmp_path / "early" / "checkpoint.json").exists()


def test_a_tampered_run_folder_is_refused_and_never_followed(reference, tiny_model_dir, tiny_data_dir, tmp_path,
                                                            capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2", "--resume")
    pointer = json.loads((run / "checkpoint.json").read_text())
    outside = tmp_path / "outside"
    shutil.copytree(run / pointer["last"], outside / "step-000006")
    for last in ("../outside/step-000006", str(outside / "step-000006")):
        (run / "checkpoint.json").write_text(json.dumps({**pointer, "last": last}))
        exits(capsys, 1, rf"checkpoint.json: 'last' is '{re.escape(last)}', not a set of this run "
                         r"\(checkpoints/step-NNNNNN\); the file was edited or damaged", train.main, args)
    (run / "checkpoint.json").write_text(json.dumps(pointer))
    manifest = run / pointer["last"] / "manifest.json"
    entries = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({"../../outside/step-000006/config.json": entries["config.json"], **entries}))
    exits(capsys, 1, "is incomplete: ../../outside/step-000006/config.json is missing", train.main, args)
    # checkpoints/ replaced by a link: refused, and nothing behind the link is deleted
    target = tmp_path / "elsewhere"
    (target / "step-000001").mkdir(parents=True)
    (target / ".keep.tmp").write_text("mine")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(target)
    exits(capsys, 1, rf"{run}/checkpoints is a link; minbert keeps a run's checkpoint sets in a real folder",
          train.main, args)
    assert sorted(p.name for p in target.iterdir()) == [".keep.tmp", "step-000001"]


def test_reusing_an_output_folder_needs_resume_or_overwrite(reference, tiny_model_dir, tiny_data_dir, tmp_path,
                                                            capsys):
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--epochs", "1"))
    exits(capsys, 2, rf"^train.py: error: {run} already holds a run \(checkpoint.json, checkpoints, last\): add "
                     "--resume to continue it, --overwrite to delete it and start over", train.main,
          run_args(tiny_model_dir, tiny_data_dir, run, "--epochs", "1"))
    (run / "notes.txt").write_text("mine")
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--overwrite", "--seed", "7"))
    assert [r["epoch"] for r in metrics_lines(run)] == [1, 2]  # the new run's lines only
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite deletes the run's files, nothing else
    assert json.loads((run / "train_config.json").read_text())["run"]["seed"] == 7
    # a run that stopped before its first checkpoint left nothing to lose: the folder is reused as it is
    stopped = tmp_path / "stopped"
    exits(capsys, 1, "ids-sst-train.csv: file not found", train.main,
          run_args(tiny_model_dir, tmp_path / "nodata", stopped))
    assert sorted(p.name for p in stopped.iterdir()) == ["run.lock", "run.log", "train_config.json"]
    train.main(run_args(tiny_model_dir, tiny_data_dir, stopped, "--epochs", "1"))
    assert "file not found" not in (stopped / "run.log").read_text()


def test_a_second_run_on_a_busy_folder_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    first = RunDir.open(tmp_path / "run")  # holds the lock, as a running train.py does
    exits(capsys, 1, rf"^error: {tmp_path / 'run'} is in use by another run \(process {os.getpid()}\)", train.main,
          run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run"))
    first.close()
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--epochs", "1"))


def test_resume_refuses_changed_options_changed_data_and_damaged_sets(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                     capsys):
    run = tmp_path / "run"
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--epochs", "1")
    exits(capsys, 2, rf"--resume, but {run} holds no saved checkpoint to continue", train.main, args + ["--resume"])
    train.main(args)
    exits(capsys, 2, r"--resume with options that change the run: --batch_size 2 \(the run used 4\), --lr 0.0001 "
                     r"\(the run used 0.001\), --pcgrad True \(the run used False\); give them as they were",
          train.main, args + ["--resume", "--lr", "1e-4", "--batch_size", "2", "--pcgrad"])
    train.main(args + ["--resume", "--eval_batch_size", "3", "--amp", "off"])  # how, not what: allowed

    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_data_dir.iterdir():
        (data / f.name).write_text(f.read_text())
    lines = (data / "quora-train.csv").read_text().splitlines(keepends=True)
    (data / "quora-train.csv").write_text("".join(lines[:-1]))
    exits(capsys, 2, "--resume, but the training data differs from the run's", train.main,
          run_args(tiny_model_dir, data, run, "--epochs", "1", "--resume"))

    state = run / "last" / "train_state.safetensors"
    damaged = bytearray(state.read_bytes())
    damaged[-1] ^= 0xFF
    state.write_bytes(bytes(damaged))
    exits(capsys, 1, r"checkpoint set .*step-000003 is damaged: train_state.safetensors differs from its manifest",
          train.main, args + ["--resume"])


def test_a_folder_from_the_old_layout_is_refused_clearly(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "old"
    (run / "last").mkdir(parents=True)
    (run / "train_state.json").write_text("{}")
    exits(capsys, 2, "holds no saved checkpoint to continue \\(it was written by an older minbert", train.main,
          run_args(tiny_model_dir, tiny_data_dir, run, "--resume"))
    exits(capsys, 2, "already holds a run \\(last, train_state.json\\)", train.main,
          run_args(tiny_model_dir, tiny_data_dir, run))


def test_checkpoint_files_are_readable_under_umask_022(tiny_model_dir, tiny_data_dir, tmp_path):
    old = os.umask(0o022)
    try:
        train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--epochs", "1"))
    finally:
        os.umask(old)
    for path in (tmp_path / "run").rglob("*"):
        if not path.is_symlink():
            mode = path.stat().st_mode & 0o777
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_unwritable_output_folder_is_a_one_line_error(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    out, real_mkdir = tmp_path / "ro" / "run", Path.mkdir

    def read_only(self, *args, **kwargs):  # CI runs as root, where chmod cannot make a folder read-only
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", read_only)
    exits(capsys, 1, rf"^error: cannot use output folder {out}: Permission denied \(check that it is writable",
          train.main, run_args(tiny_model_dir, tiny_data_dir, out))


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--lr", "0"], "--lr must be greater than 0, got 0.0"),
    (["--lr", "-0.00001"], "--lr must be greater than 0, got -1e-05"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--steps_per_epoch", "0"], "--steps_per_epoch must be at least 1, got 0"),
    (["--tasks", "sst,imdb"], "--tasks: unknown task\\(s\\) imdb"),
    (["--pcgrad", "--scheduler", "random"], "--aggregator pcgrad combines the tasks of one step, which --scheduler "
                                            "random trains one at a time: use --scheduler all"),
    (["--resume", "--overwrite"], "choose one of --resume .* and --overwrite"),
    (["--pcgrad", "--aggregator", "mgda"], "--pcgrad is --aggregator pcgrad: it cannot combine with --aggregator mgda"),
    (["--gradnorm", "--aggregator", "cagrad"], "--gradnorm backpropagates every task at once, so no task gradients "
                                               "are left for --aggregator cagrad to combine"),
    (["--loss_weighting", "famo", "--smart"], "--loss_weighting famo compares each task's loss before and after"),
    (["--loss_weighting", "uw", "--aggregator", "nash_mtl", "--scheduler", "round_robin"],
     "--aggregator nash_mtl and --loss_weighting uw combine the tasks of one step, which --scheduler round_robin"),
    (["--aggregator", "cagrad", "--cagrad_c", "-1"], "--cagrad_c must be at least 0, got -1.0"),
    (["--task_order", "sst,para"], "--task_order sst,para must list each of --tasks sst,para,sts once"),
])
def test_bad_options_are_usage_errors(tiny_model_dir, tiny_data_dir, tmp_path, capsys, flags, message):
    exits(capsys, 2, f"train.py: error: {message}", train.main,
          run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", *flags))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_bad_data_and_models_stop_before_training(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_data_dir.iterdir():
        (data / f.name).write_text(f.read_text())
    with open(data / "sts-dev.csv", "a") as f:
        f.write("99\tsdev3\ta b\tc d\t1.0\n")
    exits(capsys, 1, r"^error: sts-dev.csv line 22: id 'sdev3' already used on line 5", train.main,
          run_args(tiny_model_dir, data, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    (data / "sts-dev.csv").write_text("\tid\tsentence1\tsentence2\tsimilarity\n")
    exits(capsys, 1, r"^error: sts-dev.csv: no usable sts dev rows \(it is empty\)", train.main,
          run_args(tiny_model_dir, data, tmp_path / "run"))
    exits(capsys, 1, r"^error: minbert: model .*nope.* not found", train.main,
          run_args(tmp_path / "nope", tiny_data_dir, tmp_path / "run"))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    exits(capsys, 1, r"model.safetensors is truncated or corrupt", train.main,
          run_args(broken, tiny_data_dir, tmp_path / "run"))


def test_sequential_schedule_that_misses_a_task_warns(tiny_model_dir, tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--scheduler", "sequential", "--task_order",
                        "sts,para,sst", "--epochs", "1"))
    assert "warning: --scheduler sequential with 3 steps per epoch never reaches para, sst (the order needs 36 " \
           "steps); raise --steps_per_epoch or change --task_order" in (run / "run.log").read_text()


@pytest.mark.parametrize("scheduler, effect", [("annealed", "it samples exactly as proportional (alpha = 1)"),
                                               ("random_epoch", "it trains a single task")])
def test_epoch_based_schedule_in_one_epoch_warns(tiny_model_dir, tiny_data_dir, tmp_path, scheduler, effect):
    for epochs in ("1", "2"):
        run = tmp_path / f"run{epochs}"
        train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--scheduler", scheduler, "--epochs", epochs))
        warned = f"warning: --scheduler {scheduler} changes from epoch to epoch; with --epochs 1 {effect}: split " \
                 "the budget, e.g. --epochs 3 with a third of the steps" in (run / "run.log").read_text()
        assert warned == (epochs == "1")


def test_masked_lm_refuses_torchrun_and_resume(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    args = ["--option", "mlm", "--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--output_dir",
            str(tmp_path / "mlm")]
    exits(capsys, 2, "--option mlm cannot --resume", train.main, args + ["--resume"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    exits(capsys, 2, "--option mlm runs in one process .*start it with python train.py", train.main, args)
    assert not (tmp_path / "mlm").exists()


def test_evaluate_errors_name_the_file_and_the_fix(reference, tiny_data_dir, tmp_path, capsys):
    data = ["--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p")]
    exits(capsys, 1, rf"{reference} is a training run folder, not a checkpoint: pass {reference}/best", evaluate.main,
          [str(reference), *data])
    torch.save({}, tmp_path / "pickled.pt")
    exits(capsys, 1, "refusing .*pickled.pt: pickled checkpoints", evaluate.main, [str(tmp_path / "pickled.pt"), *data])
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in (reference / "best").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "config.json").write_text('{"format": "minbert-multitask/1",')
    exits(capsys, 1, r"ckpt/config.json line 1 column 34: not valid JSON", evaluate.main, [str(copy), *data])
    (copy / "config.json").write_bytes((reference / "best" / "config.json").read_bytes())
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-100])
    exits(capsys, 1, r"ckpt/model.safetensors is truncated or corrupt", evaluate.main, [str(copy), *data])
    exits(capsys, 2, "--batch_size must be at least 1", evaluate.main, [str(copy), *data, "--batch_size", "0"])
