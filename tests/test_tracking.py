"""--report_to: TensorBoard event files read back hold what metrics.jsonl and steps.jsonl hold, once per step, also
after a kill and --resume; a W&B run (offline) continues under its id."""
import json

import pytest

import minbert.training.train as train
from test_train import exits, kill_at_step, run_args


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_holds_the_metrics_and_steps_once_also_after_resume(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                          monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--save_every", "2", "--report_to", "tensorboard",
                    "--aggregator", "mgda")
    kill_at_step(monkeypatch, 6)  # steps 1-5 reported; step 5 lies past the checkpoint of step 4
    exits(capsys, 130, "interrupted", train.main, args)
    monkeypatch.undo()
    train.main(args + ["--resume"])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = lambda name: [(e.step, e.value) for e in events.Scalars(name)]  # noqa: E731
    metrics, steps = jsonl(run / "metrics.jsonl"), jsonl(run / "steps.jsonl")
    assert scalars("dev/overall") == [(r["step"], pytest.approx(r["overall"])) for r in metrics]
    assert scalars("train/loss_sst") == [(r["step"], pytest.approx(r["loss_sst"])) for r in steps]
    assert [s for s, _ in scalars("train/loss_sst")] == [1, 2, 3, 4, 5, 6]  # no step twice, none out of order
    assert [s for s, _ in scalars("train/aggregator_w_para")] == [1, 2, 3, 4, 5, 6]  # the method's task weights
    assert {"train/lr", "train/head_lr", "dev/sts_pearson"} <= set(events.Tags()["scalars"])


def test_wandb_offline_run_continues_under_its_id(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = run_args(tiny_model_dir, tiny_data_dir, run, "--report_to", "wandb")
    kill_at_step(monkeypatch, 5)
    exits(capsys, 130, "interrupted", train.main, args)
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_id = (run / "wandb_id").read_text()
    train.main(args + ["--resume"])
    assert (run / "wandb_id").read_text() == run_id
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)  # one id, continued
    assert all(any(p.suffix == ".wandb" for p in (run / "wandb" / name).iterdir()) for name in runs)
