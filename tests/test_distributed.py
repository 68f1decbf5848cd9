"""torchrun with 2 CPU processes (gloo) gives the same training as 1 process on the same global batches: summed
losses, PCGrad, GradNorm, SMART, the adapters (DoRA, PALs) and the other aggregators and loss weightings; a fault
on one rank (kill -9, SIGTERM, an error, a file-size limit) stops every rank within seconds with one message, and
--resume under torchrun is bit-identical."""
import csv
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minbert.training.train as train
from test_reliability import metrics_lines
from test_train import assert_same_weights, run_args, weights

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENCODER_WEIGHT = "bert.encoder.layer.0.output.dense.weight"


def parity_args(model_dir, data_dir, *extra) -> list[str]:
    """A one-epoch tiny run without dropout, so 1 and 2 processes draw the same numbers."""
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--epochs", "1", "--steps_per_epoch", "3",
            "--batch_size", "6", "--lr", "1e-3", "--hidden_dropout_prob", "0", "--eval_batch_size", "8", *extra]


@pytest.mark.parametrize("extra, trained", [
    ([], ENCODER_WEIGHT), (["--pcgrad"], ENCODER_WEIGHT), (["--gradnorm"], ENCODER_WEIGHT),
    (["--smart"], ENCODER_WEIGHT), (["--pals", "pal", "--pals_dim", "12"], ENCODER_WEIGHT),
    (["--lora", "4", "--lora_variant", "dora"], "bert.encoder.layer.0.attention.self.query.lora_B"),
    (["--aggregator", "nash_mtl"], ENCODER_WEIGHT), (["--loss_weighting", "famo"], ENCODER_WEIGHT),
    (["--loss_weighting", "uw", "--aggregator", "gradvac"], ENCODER_WEIGHT)])
def test_two_gloo_processes_match_one(tiny_model_dir, tiny_data_dir, tmp_path, extra, trained):
    args = parity_args(tiny_model_dir, tiny_data_dir, *extra)
    train.main(args + ["--output_dir", str(tmp_path / "one")])
    job = torchrun("train.py", args + ["--output_dir", tmp_path / "two"], cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    one, two = (load_file(tmp_path / run / "last" / "model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    initial = load_file(tiny_model_dir / "model.safetensors").get(trained.removeprefix("bert."))
    assert not torch.equal(one[trained], torch.zeros_like(one[trained]) if initial is None else initial)  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)
    log = (tmp_path / "two" / "run.log").read_text()
    assert "x 2 process(es)" in log and log.count("epoch 1:") == 1  # rank 0 alone logs and evaluates


def torchrun(script: str, args: list, cwd: Path, env: dict | None = None, fsize: int | None = None):
    """`torchrun --nproc_per_node 2 SCRIPT ARGS` (2 gloo processes); `fsize` sets a real file-size limit on them
    (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG). A job that hangs fails the test."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    started = time.perf_counter()
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), str(ROOT / script), *map(str, args)],
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})},
                         cwd=cwd, capture_output=True, text=True, timeout=180, preexec_fn=limit if fsize else None)
    job.seconds = time.perf_counter() - started
    return job


def our_lines(job) -> list[str]:
    """What minbert printed to stderr (torchrun adds its own report of the failed processes)."""
    return [line for line in job.stderr.splitlines() if line.startswith(("error:", "train.py: error:", "stopped"))]


@pytest.fixture(scope="module")
def two_rank_reference(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run with dropout on (each rank draws its own masks), saved at steps 2, 3, 4, 6."""
    out = tmp_path_factory.mktemp("two-rank") / "run"
    job = torchrun("train.py", run_args(tiny_model_dir, tiny_data_dir, out, "--save_every", "2"), out.parent)
    assert job.returncode == 0, job.stderr[-3000:]
    return out


@pytest.mark.parametrize("fault, committed, message", [
    ("kill-before", 4, r"error: rank 0 lost the other processes of the torchrun job during the \w[\w -]+ \(.*"
                       r"(closed|reset) by peer.*\); one of them stopped: its message is above"),
    ("sigterm-before", 5, "stopped by SIGTERM after step 5; its checkpoint is .*/last; continue with: python "
                          "train.py ... --output_dir .* --resume"),
])
def test_a_fault_on_one_rank_stops_the_job_and_resume_under_torchrun_is_bit_identical(
        two_rank_reference, tiny_model_dir, tiny_data_dir, tmp_path, fault, committed, message):
    run = tmp_path / "run"
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2")
    job = torchrun("tests/fault_run.py", ["minbert.training.train:train_step", 5, fault, *args], tmp_path,
                   {"FAULT_RANK": "1"})
    assert job.returncode != 0 and job.seconds < 90, job.stderr[-3000:]  # a rank never waits for a stopped one
    assert len(our_lines(job)) == 1 and re.fullmatch(message, our_lines(job)[0]), job.stderr[-3000:]
    assert json.loads((run / "checkpoint.json").read_text())["step"] == committed
    resumed = torchrun("train.py", [*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(two_rank_reference), weights(run))
    assert metrics_lines(run) == metrics_lines(two_rank_reference)


@pytest.mark.parametrize("extra, fsize, code, message", [
    (["--resume", "--lr", "1e-4"], None, 2, r"train.py: error: --resume with options that change the run: --lr "
                                            r"0.0001 \(the run used 0.001\)"),
    (["--overwrite"], 40_000, 1, r"error: could not save step 2 to .*step-000002: File too large"),  # a full disk
])
def test_an_error_on_rank_0_stops_every_rank_with_one_message(two_rank_reference, tiny_model_dir, tiny_data_dir,
                                                              tmp_path, extra, fsize, code, message):
    run = tmp_path / "run"
    shutil.copytree(two_rank_reference, run, symlinks=True)
    job = torchrun("train.py", [*run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2"), *extra],
                   tmp_path, fsize=fsize)
    assert job.returncode != 0 and job.seconds < 90, job.stderr[-3000:]
    assert len(our_lines(job)) == 1 and re.match(message, our_lines(job)[0]), job.stderr[-3000:]
    assert re.search(rf"exitcode\s*: {code} ", job.stderr)  # torchrun's report of the ranks' exit codes
    assert "[rank" not in job.stderr  # no rank died of an uncaught exception (torchrun prefixes their tracebacks)


@pytest.mark.parametrize("target", ["minbert.training.distributed:GradientAllReduce.close",  # as it leaves the job
                                    "minbert.training.train:env_rank"])  # after the session, as it prints
def test_a_sigterm_after_an_error_does_not_hide_its_message(two_rank_reference, tiny_model_dir, tiny_data_dir,
                                                            tmp_path, target):
    """torchrun SIGTERMs the ranks that are left when one stops: a rank already stopping with an error still prints
    it (here rank 0 gets the SIGTERM after an error on every rank; before the fix it died silently, exit code -15)."""
    run = tmp_path / "run"
    shutil.copytree(two_rank_reference, run, symlinks=True)
    args = [*run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2"), "--resume", "--lr", "1e-4"]
    job = torchrun("tests/fault_run.py", [target, 1, "sigterm-before", *args], tmp_path, {"FAULT_RANK": "0"})
    assert job.returncode != 0 and job.seconds < 90, job.stderr[-3000:]
    assert len(our_lines(job)) == 1 and our_lines(job)[0].startswith(
        "train.py: error: --resume with options that change the run: --lr 0.0001"), job.stderr[-3000:]


def test_a_sweep_under_torchrun_runs_every_seed_and_matches_one_process(tiny_model_dir, tiny_data_dir, tmp_path):
    """Each run of a sweep opens its own process group (the second used to reuse the first's store keys, connect to
    closed sockets and hang); rank 0 alone writes and prints the summary."""
    args = parity_args(tiny_model_dir, tiny_data_dir, "--seeds", "2")
    train.main(args + ["--output_dir", str(tmp_path / "one")])
    job = torchrun("train.py", [*args, "--output_dir", tmp_path / "two"], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("| run | seeds |") == 1
    one, two = (list(csv.DictReader((tmp_path / run / "summary.csv").open())) for run in ("one", "two"))
    assert [r["seed"] for r in two] == ["11711", "11712"] and one[0].keys() == two[0].keys()
    for a, b in zip(one, two):
        for metric in list(a)[2:]:
            assert float(b[metric]) == pytest.approx(float(a[metric]), abs=1e-4), metric
