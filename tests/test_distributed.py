"""torchrun with 2 CPU processes (gloo) gives the same training as 1 process on the same global batches: summed
losses, PCGrad, GradNorm, SMART and the adapters (DoRA, PALs)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENCODER_WEIGHT = "bert.encoder.layer.0.output.dense.weight"


@pytest.mark.parametrize("extra, trained", [
    ([], ENCODER_WEIGHT), (["--pcgrad"], ENCODER_WEIGHT), (["--gradnorm"], ENCODER_WEIGHT),
    (["--smart"], ENCODER_WEIGHT), (["--pals", "pal", "--pals_dim", "12"], ENCODER_WEIGHT),
    (["--lora", "4", "--lora_variant", "dora"], "bert.encoder.layer.0.attention.self.query.lora_B")])
def test_two_gloo_processes_match_one(tiny_model_dir, tiny_data_dir, tmp_path, extra, trained):
    args = ["--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--epochs", "1", "--steps_per_epoch",
            "3", "--batch_size", "6", "--lr", "1e-3", "--hidden_dropout_prob", "0", "--eval_batch_size", "8", *extra]
    train.main(args + ["--output_dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "train.py"), *args,
                    "--output_dir", str(tmp_path / "two")], env=env, check=True, timeout=300, cwd=tmp_path)
    one, two = (load_file(tmp_path / run / "last" / "model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    initial = load_file(tiny_model_dir / "model.safetensors").get(trained.removeprefix("bert."))
    assert not torch.equal(one[trained], torch.zeros_like(one[trained]) if initial is None else initial)  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)
    log = (tmp_path / "two" / "run.log").read_text()
    assert "x 2 process(es)" in log and log.count("epoch 1:") == 1  # rank 0 alone logs and evaluates
