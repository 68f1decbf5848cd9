"""Early stopping (--early_stopping_patience / _threshold, also across --resume and under a config file) and
--config files of options (flat or as train_config.json, flags override, unknown or mistyped names refused)."""
import json

import pytest

import minbert.training.train as train
from test_train import assert_same_weights, exits, kill_at_step, run_args, weights, without_timings
from minbert.training.config import TrainConfig, parse_args


def records(run) -> list[dict]:
    return [without_timings(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_stops_after_the_patience_and_says_why(tiny_model_dir, tiny_data_dir, tmp_path):
    # a threshold no gain reaches: the first evaluation sets the best, every later one is stale
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--epochs", "4", "--eval_every", "2",
                        "--early_stopping_patience", "2", "--early_stopping_threshold", "10"))
    lines = records(run)
    assert [(r["epoch"], r["step"]) for r in lines] == [(0, 2), (1, 3), (1, 4)]  # evaluations at steps 2, 3, 4
    best = max(lines[:2], key=lambda r: r["overall"])  # best/ keeps any gain; the patience needs one above 10
    assert "stopped" not in lines[1] and lines[-1]["stopped"] == (
        f"early stopping at epoch 2 step 4: overall gained no more than 10 over its best ({best['overall']:.4f} "
        f"at step {best['step']}) in 2 evaluation(s) in a row")
    assert lines[-1]["stopped"] in (run / "run.log").read_text()
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 4  # its last set is where it stopped
    # a patience longer than the run: it runs to its end
    full = tmp_path / "full"
    train.main(run_args(tiny_model_dir, tiny_data_dir, full, "--early_stopping_patience", "5"))
    assert [r["epoch"] for r in records(full)] == [1, 2] and not any("stopped" in r for r in records(full))


def test_a_resumed_run_stops_where_the_uninterrupted_one_does(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                              capsys):
    flags = ("--epochs", "4", "--eval_every", "2", "--early_stopping_patience", "2", "--early_stopping_threshold",
             "10")  # it stops at the evaluation of step 4
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *flags))
    kill_at_step(monkeypatch, 4)  # after step 3's evaluation, one stale: the resumed run must know it
    args = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *flags)
    exits(capsys, 130, "interrupted", train.main, args)
    monkeypatch.undo()
    train.main(args + ["--resume"])
    assert records(tmp_path / "b") == records(tmp_path / "a")
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    stopped = [r for r in records(tmp_path / "a") if "stopped" in r]
    assert len(stopped) == 1 and stopped[0]["step"] == 4  # it did stop early
    train.main(args + ["--resume"])  # a run that stopped early stays stopped
    assert records(tmp_path / "b") == records(tmp_path / "a")


def test_a_config_file_gives_the_options_and_flags_override_it(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--epochs", "1", "--pooling", "cls"))
    saved = run / "train_config.json"  # every run's options file is a config file; its resume/overwrite are not read
    cfg = parse_args(["--config", str(saved), "--lr", "3e-4", "--resume"])
    expected = json.loads(saved.read_text())
    expected["optim"]["lr"], expected["run"]["resume"] = 3e-4, True
    assert cfg.to_dict() == expected
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(expected))  # --resume still holds a config file to the run's own options
    exits(capsys, 2, r"--resume with options that change the run: --lr 0.0003 \(the run used 0.001\)", train.main,
          ["--config", str(changed), "--resume"])
    train.main(["--config", str(saved), "--resume"])  # the run's own options: it continues (it had finished)
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"model": str(tiny_model_dir), "pooling": "cls", "pcgrad": True, "head_lr": 2e-3,
                                "overwrite": True}))
    cfg = parse_args(["--config", str(flat), "--no-pcgrad"])
    assert (cfg.model.model, cfg.heads.pooling, cfg.methods.pcgrad, cfg.optim.head_lr, cfg.run.overwrite) == \
        (str(tiny_model_dir), "cls", False, 2e-3, False)
    assert TrainConfig.from_flags(**{"model": str(tiny_model_dir), "pooling": "cls"}).flags() == \
        parse_args(["--config", str(flat), "--no-pcgrad", "--head_lr", "1e-3"]).flags()


@pytest.mark.parametrize("content, message", [
    ({"lr": 1e-4, "learning_rate": 1e-4, "optim": {"wd": 0}}, "unknown option\\(s\\) learning_rate, wd"),
    ({"batch_size": "32"}, 'batch_size must be int, got "32"'),
    ({"epochs": 1.5}, "epochs must be int, got 1.5"),
    ({"bucket": 1}, "bucket must be bool, got 1"),
    ({"pooling": "max"}, "pooling must be one of .*, got 'max'"),
    ({"lr": -1}, "--lr must be greater than 0, got -1"),
    (None, "--config .*missing.json not found"),
    ("{oops", "--config .*bad.json line 1 column 2: not valid JSON"),
])
def test_a_bad_config_file_is_a_usage_error_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    exits(capsys, 2, f"train.py: error: .*{message}", train.main, ["--config", str(path)])
