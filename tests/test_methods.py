"""The CS224N projects' options end to end on the tiny model: evaluation every N steps, the best checkpoint by a
chosen metric, steps.jsonl and --plots, CFIMDB merged into SST, head specs from flags, PALs on some tasks, one
task per epoch, the annealing constant, LoRA scaling and BiLSTM dropout."""
import json
import shutil

import pytest
import torch

import minbert.training.evaluate as evaluate
import minbert.training.train as train
from conftest import WORDS, write_tsv
from minbert.heads import HeadConfig, MultitaskBert
from minbert.pals import PALsConfig
from minbert.optim import TaskSampler
from test_train import assert_same_weights, exits, kill_at_step, run_args, weights, without_timings
from minbert.training.config import TrainConfig


def records(run, name: str = "metrics.jsonl") -> list[dict]:
    return [without_timings(json.loads(line)) for line in (run / name).read_text().splitlines()]


def test_eval_every_best_metric_steps_log_plots_and_resume(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                           capsys):
    extra = ["--eval_every", "2", "--best_metric", "sts_mse", "--lr_schedule", "linear", "--head_lr", "2e-3"]
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *extra, "--plots"))
    a = tmp_path / "a"
    evaluations = records(a)
    # every 2 steps within an epoch, and at each epoch's end (steps 3 and 6)
    assert [(r["epoch"], r["step"]) for r in evaluations] == [(0, 2), (1, 3), (1, 4), (2, 6)]
    assert [("steps_per_task" in r) for r in evaluations] == [False, True, False, True]
    best = min(evaluations, key=lambda r: r["sts_mse"])  # lower is better for an MSE
    assert json.loads((a / "checkpoint.json").read_text())["best"] == f"checkpoints/step-{best['step']:06d}"
    assert MultitaskBert.checkpoint_metadata(a / "best")["sts_mse"] == best["sts_mse"]
    steps = records(a, "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6] and all(s["stepped"] for s in steps)
    assert all(s[f"loss_{t}"] > 0 for s in steps for t in ("sst", "para", "sts"))
    assert steps[-1]["lr"] < steps[0]["lr"] and steps[0]["head_lr"] == pytest.approx(2 * steps[0]["lr"])
    for name in ("losses.png", "dev.png"):
        assert (a / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # killed after step 5 (last saved set: step 4), resumed: the same evaluations, step log and weights
    kill_at_step(monkeypatch, 6)
    args_b = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *extra)
    exits(capsys, 130, "interrupted", train.main, args_b)
    monkeypatch.undo()
    assert [s["step"] for s in records(tmp_path / "b", "steps.jsonl")] == [1, 2, 3, 4, 5]
    train.main(args_b + ["--resume"])
    assert records(tmp_path / "b") == evaluations and records(tmp_path / "b", "steps.jsonl") == steps
    assert_same_weights(weights(a), weights(tmp_path / "b"))
    exits(capsys, 2, "--best_metric sst_pearson: choose one of", train.main,
          run_args(tiny_model_dir, tiny_data_dir, tmp_path / "c", "--best_metric", "sst_pearson"))


@pytest.fixture
def data_with_cfimdb(tiny_data_dir, tmp_path):
    """The tiny data plus CFIMDB train/dev files (binary sentiment: 0 negative, 1 positive)."""
    directory = tmp_path / "data"
    shutil.copytree(tiny_data_dir, directory)
    for split, n in (("train", 12), ("dev", 8)):
        write_tsv(directory / f"ids-cfimdb-{split}.csv", ["", "id", "sentence", "sentiment"],
                  [[i, f"cf{split}{i}", " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)), i % 2]
                   for i in range(n)])
    return directory


def test_cfimdb_merged_into_sst_trains_on_mapped_labels_and_is_scored_alone(tiny_model_dir, data_with_cfimdb,
                                                                            tmp_path, capsys):
    run = tmp_path / "run"
    metrics = train.main(run_args(tiny_model_dir, data_with_cfimdb, run, "--merge_cfimdb", "--cfimdb_label_map",
                                  "0:1,1:3", "--sentiment_head", "sentence:16:gelu", "--para_head", "product:8",
                                  "--sts_head", "signed_difference"))
    log = (run / "run.log").read_text()
    assert "sst: 60 train / 20 dev rows" in log  # 48 SST + 12 CFIMDB reviews in one stream
    assert {"cfimdb_acc", "cfimdb_macro_f1"} <= set(metrics) and "cfimdb_acc" in records(run)[-1]
    assert metrics["overall"] == pytest.approx((metrics["sst_acc"] + metrics["para_acc"]
                                                + (metrics["sts_pearson"] + 1) / 2) / 3)  # CFIMDB is not trained alone
    model = MultitaskBert.from_checkpoint(run / "best")
    assert model.config.cfimdb_labels == [1, 3] and str(model.config.head_spec("para")) == "product:8:relu"
    capsys.readouterr()
    scores = evaluate.main([str(run / "best"), "--data_dir", str(data_with_cfimdb), "--output_dir",
                            str(tmp_path / "pred")])
    assert scores["cfimdb_acc"] == pytest.approx(metrics["cfimdb_acc"])
    assert (tmp_path / "pred" / "cfimdb-dev-output.csv").read_text().count("\n") == 9  # header + 8 reviews
    for bad in ("0:7", "0:2,1:2", "1:4"):
        exits(capsys, 2, "--cfimdb_label_map must map 0 and 1 to two SST classes", train.main,
              run_args(tiny_model_dir, data_with_cfimdb, tmp_path / "x", "--merge_cfimdb", "--cfimdb_label_map", bad))


def test_merged_labels_follow_the_map(data_with_cfimdb):
    from minbert.data import merge_labels, read_task
    sst = read_task(data_with_cfimdb / "ids-sst-train.csv", "sst")
    cfimdb = read_task(data_with_cfimdb / "ids-cfimdb-train.csv", "cfimdb")
    merged = merge_labels(sst, cfimdb, [0, 4])
    assert merged.ids == sst.ids + cfimdb.ids and merged.labels == sst.labels + [4 * y for y in cfimdb.labels]


def test_pals_on_a_subset_of_tasks_leave_the_others_on_the_plain_encoder(tiny_model_dir):
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(str(tiny_model_dir), HeadConfig(), pals=PALsConfig(
        dim=8, num_heads=2, tasks=("sst",))).eval()
    with torch.no_grad():
        for p in model.pals.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert {n.split(".")[1] for n, _ in model.pals.named_parameters() if n.startswith("tasks.")} <= {"sst"} or \
        all("para" not in n and "sts" not in n for n, _ in model.pals.named_parameters())
    tok = model.tokenizer
    one = tok(["the movie was good", "bad"])
    pair = {f"{k}_{s}": v for s, texts in ((1, ["a man"]), (2, ["a dog"])) for k, v in tok(texts).items()}
    with torch.no_grad():
        with_pals = model("sst", one), model("para", pair)
        pals, model.pals = model.pals, None
        without = model("sst", one), model("para", pair)
        model.pals = pals
    assert not torch.allclose(with_pals[0], without[0])  # SST goes through its PALs
    assert torch.equal(with_pals[1], without[1])  # paraphrase does not
    with pytest.raises(Exception, match="--pals_tasks sst,imdb|unknown|imdb"):
        MultitaskBert.from_pretrained(str(tiny_model_dir), HeadConfig(), pals=PALsConfig(dim=8, num_heads=2,
                                                                                         tasks=("sst", "imdb")))


def test_random_epoch_scheduler_and_annealing_constant():
    sizes = {"sst": 8544, "para": 22646, "sts": 6040}
    sampler = TaskSampler(sizes, "random_epoch", batch_size=32, num_epochs=8, seed=1)
    plans = [sampler.schedule(e) for e in range(1, 9)]
    assert all(len(set(p)) == 1 and len(p) == sampler.steps_per_epoch for p in plans)  # one task a whole epoch
    assert len({p[0] for p in plans}) > 1  # drawn again each epoch
    for c in (0.8, 0.5):  # α = 1 - c (e - 1) / (E - 1): the last epoch samples ∝ n^(1 - c)
        last = TaskSampler(sizes, "annealed", num_epochs=5, anneal_c=c, seed=0).probabilities(5)
        weights = {t: n ** (1 - c) for t, n in sizes.items()}
        assert last == pytest.approx({t: w / sum(weights.values()) for t, w in weights.items()})
    cfg = TrainConfig.from_flags(scheduler="annealed", anneal_c=0.5, lora=4, lora_scaling="alpha", pals="pal",
                                 pals_tasks="sst", bilstm_dropout=0.1)
    assert cfg.loop.anneal_c == 0.5 and cfg.adapters.lora_config().scaling == "alpha"
    assert cfg.adapters.pals_config().tasks == ("sst",) and cfg.model.bilstm_dropout == 0.1


def test_bilstm_dropout_reaches_the_encoder():
    model = MultitaskBert.from_pretrained("bilstm", bilstm_dropout=0.15)
    assert model.bert.config.dropout == 0.15
    assert {m.p for m in model.bert.modules() if isinstance(m, torch.nn.Dropout)} == {0.15}


def test_training_seconds_leave_out_the_evaluation(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    import time
    real = train.evaluate

    def slow(*a, **kw):
        time.sleep(3)
        return real(*a, **kw)
    monkeypatch.setattr(train, "evaluate", slow)
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--eval_every", "2"))
    seconds = [json.loads(line)["train_seconds"] for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert len(seconds) == 4 and all(s < 3 for s in seconds[1:]), seconds  # the first window has the warm-up
