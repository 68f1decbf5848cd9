"""train.py -> evaluate.py end to end on a tiny random model and tiny CSVs: checkpoints, methods, resume, baselines."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minbert.training.evaluate as evaluate
import minbert.training.train as train
from minbert.data import TASKS
from minbert.heads import MultitaskBert
from minbert.training.config import TrainConfig
from minbert.training.step import MethodState, Runtime


def run_args(model_dir, data_dir, out, *extra) -> list[str]:
    """A tiny run with dropout on, so resuming exactly needs the dropout RNG streams restored."""
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out), "--epochs", "2",
            "--steps_per_epoch", "3", "--batch_size", "4", "--lr", "1e-3", "--hidden_dropout_prob", "0.1",
            "--eval_batch_size", "8", *extra]


def exits(capsys, code: int, pattern: str, main, argv) -> str:
    """Run a script's main, expect exit `code` and a one-line stderr message matching `pattern`; return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == code, err
    assert re.search(pattern, err), err
    return err


def weights(run) -> dict:
    return load_file(Path(run) / "last" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if "seconds" not in k and "per_s" not in k}


def test_train_then_evaluate_writes_checkpoints_logs_and_prediction_files(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                          capsys):
    metrics = train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run"))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert list(metrics) == ["sst_acc", "sst_macro_f1", "para_acc", "para_f1", "sts_pearson", "sts_spearman",
                             "sts_mse", "overall"]
    best = max(records, key=lambda r: r["overall"])
    assert MultitaskBert.checkpoint_metadata(run / "best")["overall"] == best["overall"]
    assert metrics == {k: best[k] for k in metrics}
    config = json.loads((run / "train_config.json").read_text())
    assert config["model"]["model"] == str(tiny_model_dir) and config["loop"]["epochs"] == 2
    # one checkpoint set per saved step; the pointer names last and best, the links follow it
    pointer = json.loads((run / "checkpoint.json").read_text())
    assert pointer["last"] == "checkpoints/step-000006" and (run / "last").resolve() == run / pointer["last"]
    assert (run / "best").resolve() == run / pointer["best"] == run / f"checkpoints/step-{best['step']:06d}"
    assert {p.name for p in (run / "checkpoints").iterdir()} == {Path(pointer[k]).name for k in ("last", "best")}

    capsys.readouterr()
    scores = evaluate.main([str(run / "best"), "--data_dir", str(tiny_data_dir), "--output_dir",
                            str(tmp_path / "pred"), "--plots", "--batch_size", "8"])  # training's eval batches
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == scores
    assert scores == pytest.approx({k: best[k] for k in scores}, abs=1e-9)  # same numbers as in training
    files = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert files == ["para-dev-confusion.png", "para-dev-output.csv", "sst-dev-confusion.png", "sst-dev-output.csv",
                     "sst-test-output.csv", "sts-dev-output.csv", "sts-dev-residuals.png", "sts-test-output.csv"]
    # no para-test-output.csv: that test file is absent and is skipped
    for name, header, n, ids in (("sst-dev-output.csv", "Predicted_Sentiment", 20, "sstdev"),
                                 ("sst-test-output.csv", "Predicted_Sentiment", 10, "sstt"),
                                 ("para-dev-output.csv", "Predicted_Is_Paraphrase", 20, "qdev"),
                                 ("sts-test-output.csv", "Predicted_Similiary", 10, "stst")):
        lines = (tmp_path / "pred" / name).read_text().splitlines()
        assert lines[0].split("\t")[1].strip() == header
        rows = [line.split(",") for line in lines[1:]]
        assert [r[0].strip() for r in rows] == [f"{ids}{i}" for i in range(n)]  # file order, every id once
        values = [float(r[1]) for r in rows]
        assert all(0 <= v <= 5 for v in values)
    sst_pred = {r.split(",")[0].strip(): int(r.split(",")[1]) for r in
                (tmp_path / "pred" / "sst-dev-output.csv").read_text().splitlines()[1:]}
    gold = [i % 5 for i in range(20)]
    assert sum(sst_pred[f"sstdev{i}"] == gold[i] for i in range(20)) / 20 == pytest.approx(scores["sst_acc"])


def kill_at_step(monkeypatch, n: int) -> None:
    """train_step raises KeyboardInterrupt (Ctrl-C) at its n-th call."""
    real_step, calls = train.train_step, {"n": 0}

    def dies(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(*a, **kw)
    monkeypatch.setattr(train, "train_step", dies)


@pytest.mark.parametrize("extra", [[], ["--pcgrad"], ["--gradnorm"], ["--smart", "--smart_bregman", "0.5"],
                                   ["--pals", "pal", "--pals_dim", "12", "--pals_share_ve_vd"],
                                   ["--scheduler", "annealed"], ["--scheduler", "sequential", "--task_order",
                                                                 "sts,para,sst", "--steps_per_epoch", "9"],
                                   # every method that keeps state between steps
                                   ["--aggregator", "gradvac"],
                                   ["--aggregator", "nash_mtl", "--nash_update_every", "3"],
                                   ["--loss_weighting", "famo"], ["--loss_weighting", "dwa", "--dwa_every", "2"],
                                   ["--loss_weighting", "rlw"], ["--loss_weighting", "uw", "--aggregator", "cagrad"],
                                   ["--loss_weighting", "imtl_l", "--aggregator", "upgrad"]])
def test_methods_train_and_resume_exactly(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys, extra):
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", "--save_every", "2", *extra))
    kill_at_step(monkeypatch, 5)
    args_b = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", "--save_every", "2", *extra)
    exits(capsys, 130, "interrupted; continue with: .* --resume", train.main, args_b)
    monkeypatch.undo()
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 4
    train.main(args_b + ["--resume"])
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    records = {r: [without_timings(json.loads(line)) for line in (tmp_path / r / "metrics.jsonl").read_text()
                   .splitlines()] for r in "ab"}
    assert records["a"] == records["b"] and len(records["a"]) == 2
    steps = 9 if "--steps_per_epoch" in extra else 3
    assert sum(records["a"][-1]["steps_per_task"].values()) == steps * (1 if "--scheduler" in extra else 3)
    if "--gradnorm" in extra:
        w = [records["a"][-1][f"gradnorm_w_{t}"] for t in ("sst", "para", "sts")]
        assert sum(w) == pytest.approx(3.0) and w != [1.0, 1.0, 1.0]
    for kind in ("aggregator", "loss_weighting"):  # the task weights of every evaluation
        if f"--{kind}" in extra:
            w = [records["a"][-1][f"{kind.split('_')[-1]}_w_{t}"] for t in ("sst", "para", "sts")]
            assert all(map(math.isfinite, w)) and w != [1.0, 1.0, 1.0]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                monkeypatch, capsys):
    real_loss, calls = MultitaskBert.loss, {"n": 0}

    def nan_in_epoch_2(self, task, batch):
        calls["n"] += 1
        loss = real_loss(self, task, batch)
        return loss * float("nan") if calls["n"] > 10 else loss  # 3 tasks x 3 steps in epoch 1
    monkeypatch.setattr(MultitaskBert, "loss", nan_in_epoch_2)
    run = tmp_path / "run"
    err = exits(capsys, 1, r"^error: the para loss is nan at epoch 2 step 1; training stopped", train.main,
                run_args(tiny_model_dir, tiny_data_dir, run))
    assert str(run / "best") in err and err in "error: " + (run / "run.log").read_text().splitlines()[-1]
    assert MultitaskBert.checkpoint_metadata(run / "best")["epoch"] == 1


@pytest.mark.parametrize("option,extra,frozen,trained", [
    ("pretrain", [], ["bert."], []),
    ("finetune", ["--finetune_last", "1"], ["bert.embeddings.", "bert.encoder.layer.0."],
     ["bert.encoder.layer.1."]),  # (the pooler gets no gradient: --pooling mean)
])
def test_freezing_options(tiny_model_dir, tiny_data_dir, tmp_path, option, extra, frozen, trained):
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--option", option, *extra))
    torch.manual_seed(TrainConfig().run.seed)  # the initialisation train.py started from
    before = MultitaskBert.from_pretrained(str(tiny_model_dir)).state_dict()
    after = weights(tmp_path / "run")
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("heads."))
    for key, value in after.items():
        if key.startswith(tuple(frozen)):
            assert torch.equal(value, before[key]), key
        if key.startswith(tuple(trained)):
            assert not torch.equal(value, before[key]), key


def test_lora_adapter_only_checkpoint_reproduces_scores_and_checks_its_base(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                           capsys):
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--lora", "4", "--lora_variant", "dora",
                        "--lora_targets", "query,value,dense", "--save_adapters_only", "--save_every", "2"))
    log = (run / "run.log").read_text()
    trainable, total = (int(x.replace(",", "")) for x in re.search(r"([\d,]+) trainable of ([\d,]+)", log).groups())
    model = MultitaskBert.from_checkpoint(run / "last")
    heads = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("bert."))
    adapters = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in
                   ("lora_A", "lora_B", "magnitude"))
    assert trainable == heads + adapters and total == sum(p.numel() for p in model.parameters())
    small = load_file(run / "best" / "model.safetensors")
    assert {k for k in small if k.startswith("bert.")} == \
        {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude")}
    best = max((json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()),
               key=lambda r: r["overall"])
    # --batch_size 8 = run_args' --eval_batch_size: other batch shapes round float32 differently on some CPUs
    scores = evaluate.main([str(run / "best"), "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p"),
                            "--batch_size", "8"])
    assert scores == pytest.approx({k: best[k] for k in scores}, abs=1e-9)

    # the same adapters on other base weights: refused with a clear message
    other = tmp_path / "other-base"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tensors = load_file(other / "model.safetensors")
    tensors["encoder.layer.0.output.dense.bias"] += 1
    from safetensors.torch import save_file
    save_file(tensors, other / "model.safetensors")
    config = json.loads((run / "best" / "config.json").read_text())
    (run / "best" / "config.json").write_text(json.dumps({**config, "base_model": str(other)}))
    exits(capsys, 1, "holds adapters trained on base model .*other-base.* but that name now gives other weights",
          evaluate.main, [str(run / "best"), "--data_dir", str(tiny_data_dir)])


def one_batch_per_task(model) -> dict:
    tok = model.tokenizer
    pair = lambda a, b: {**{f"{k}_1": v for k, v in tok(a).items()}, **{f"{k}_2": v for k, v in tok(b).items()}}
    return {"sst": {**tok(["the movie was good", "awful film", "i do not know"]), "labels": torch.tensor([4, 0, 2])},
            "para": {**pair(["how do i", "what is it"], ["how can i", "why"]), "labels": torch.tensor([1, 0])},
            "sts": {**pair(["a man plays", "a cat"], ["the man plays", "the question"]),
                    "labels": torch.tensor([4.5, 0.5])}}


@pytest.mark.parametrize("pals", [None, "pal"])
def test_pcgrad_projects_shared_gradients_and_leaves_task_parameters_alone(tiny_model_dir, pals):
    from minbert.pals import PALsConfig
    from minbert.optim import pcgrad
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(str(tiny_model_dir), pals=pals and PALsConfig(pals, 12)).eval()
    batches = one_batch_per_task(model)  # eval mode: no dropout, so both passes compute one function
    per_task = []
    for task, batch in batches.items():  # the reference: each task's full gradient on its own
        model.zero_grad()
        model.loss(task, batch).backward()
        per_task.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    task_specific = ("heads.", "pals.")  # used by one task each: never projected
    shared = [n for n, _ in model.named_parameters() if not n.startswith(task_specific)]
    cfg = TrainConfig.from_flags(pcgrad=True, pals=pals, pals_dim=12)
    order = torch.Generator().manual_seed(cfg.run.seed)  # the projection order: the aggregator's own generator
    expected = dict(zip(shared, pcgrad([[g[n] for n in shared] for g in per_task], generator=order)))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train.train_step(model, optimizer, {t: iter([b]) for t, b in batches.items()}, list(batches), cfg,
                     MethodState.create(model, cfg), Runtime(torch.device("cpu")))
    params = dict(model.named_parameters())
    for n in shared:
        torch.testing.assert_close(params[n].grad, expected[n], atol=1e-6, rtol=1e-5)
    for i, task in enumerate(batches):  # heads and PALs: their own task's gradient, untouched
        for n in params:
            if n.startswith((f"heads.{task}.", f"pals.{task}.")):
                torch.testing.assert_close(params[n].grad, per_task[i][n])
    assert pals is None or any(n.startswith("pals.para.") and params[n].grad.abs().sum() > 0 for n in params)
    summed = sum(g["bert.encoder.layer.0.attention.self.query.weight"] for g in per_task)
    assert not torch.allclose(params["bert.encoder.layer.0.attention.self.query.weight"].grad, summed), \
        "these tasks conflict, so PCGrad must differ from the plain sum"


def test_ensembles_average_member_scores(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    runs = []
    for seed in ("1", "2"):
        train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / seed, "--seed", seed, "--epochs", "1"))
        runs.append(str(tmp_path / seed / "best"))
    single = evaluate.main([runs[0], "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p1")])
    assert evaluate.main([runs[0], runs[0], "--data_dir", str(tiny_data_dir), "--output_dir",
                          str(tmp_path / "p11")]) == single  # an ensemble of one model is that model
    pair = evaluate.main([*runs, "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p12")])
    out = capsys.readouterr().out
    assert "| ensemble of 2 |" in out and out.count(runs[0]) >= 1 and out.count(runs[1]) >= 1
    # by hand: average each member's scores, then label
    from minbert.data import encode_dataset, load_split
    members = [MultitaskBert.from_checkpoint(r) for r in runs]
    expected = {}
    for task in ("sst", "para", "sts"):
        dev = load_split(tiny_data_dir, task, "dev")
        scores = [m.predict_scores(encode_dataset(dev, m.tokenizer, 128, m.config.pair_encoding), 8, progress=False)
                  for m in members]
        mean = torch.stack([(scores[0][i] + scores[1][i]) / 2 for i in dev.ids])
        expected[task] = dict(zip(dev.ids, TASKS[task].labels(mean)))
    lines = (tmp_path / "p12" / "sts-dev-output.csv").read_text().splitlines()[1:]
    written = {line.split(",")[0].strip(): float(line.split(",")[1]) for line in lines}
    assert written == pytest.approx(expected["sts"], abs=1e-6)
    lines = (tmp_path / "p12" / "sst-dev-output.csv").read_text().splitlines()[1:]
    assert {line.split(",")[0].strip(): int(line.split(",")[1]) for line in lines} == expected["sst"]
    gold = load_split(tiny_data_dir, "para", "dev")
    acc = sum(expected["para"][i] == y for i, y in zip(gold.ids, gold.labels)) / len(gold)
    assert pair["para_acc"] == pytest.approx(acc)


def test_sweep_writes_one_row_per_run_and_resumes(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    args = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "sweep", "--epochs", "1", "--sweep", "lr=1e-3,1e-4",
                    "sentiment_head=mlp", "bucket=false", "--seeds", "2")
    train.main(args)
    rows = (tmp_path / "sweep" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("run,seed,sst_acc,sst_macro_f1,para_acc") and len(rows) == 1 + 2 * 2
    label = "lr=0.0001,sentiment_head=mlp,bucket=False"
    assert (tmp_path / "sweep" / label / "seed11712" / "best" / "model.safetensors").is_file()
    table = (tmp_path / "sweep" / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 2 and " ± " in table[2]
    config = json.loads((tmp_path / "sweep" / label / "seed11711" / "train_config.json").read_text())
    assert (config["optim"]["lr"], config["heads"]["sentiment_head"], config["data"]["bucket"],
            config["run"]["seed"]) == (1e-4, "mlp", False, 11711)
    exits(capsys, 2, "4 run\\(s\\) of this sweep already hold results .*: add --resume", train.main, args)
    # --resume reads the finished runs back without training them again
    monkeypatch.setattr(train, "train_step", lambda *a, **kw: pytest.fail("a finished run trained again"))
    train.main(args + ["--resume"])
    assert (tmp_path / "sweep" / "summary.csv").read_text().splitlines() == rows
    exits(capsys, 2, "--sweep 'nope=1': expected|unknown option 'nope'", train.main,
          run_args(tiny_model_dir, tiny_data_dir, tmp_path / "bad", "--sweep", "nope=1"))


def test_masked_lm_pretraining_improves_and_feeds_finetuning(tiny_model_dir, tiny_data_dir, tmp_path):
    record = train.main(["--option", "mlm", "--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir),
                         "--output_dir", str(tmp_path / "mlm"), "--epochs", "3", "--batch_size", "8", "--lr", "3e-3",
                         "--hidden_dropout_prob", "0"])
    log = (tmp_path / "mlm" / "run.log").read_text()
    before = float(log.split("accuracy before: ")[1].split()[0])
    assert record["masked_token_accuracy"] > before
    losses = [json.loads(line)["loss"] for line in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0]
    import minbert
    mlm = minbert.BertForMaskedLM.from_pretrained(tmp_path / "mlm")  # the head comes back too: no warning
    assert not torch.equal(mlm.cls.predictions.bias, torch.zeros_like(mlm.cls.predictions.bias))
    base = minbert.BertModel.from_pretrained(tiny_model_dir)
    moved = [k for k, v in mlm.bert.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert "embeddings.word_embeddings.weight" in moved and "encoder.layer.1.output.dense.weight" in moved
    # fine-tuning starts from the pre-trained encoder: its first forward equals the masked-LM model's encoder
    train.main(run_args(tmp_path / "mlm", tiny_data_dir, tmp_path / "ft", "--epochs", "1", "--lr", "1e-9",
                        "--head_lr", "1e-9", "--hidden_dropout_prob", "0"))
    ft = MultitaskBert.from_checkpoint(tmp_path / "ft" / "last")
    batch = ft.tokenizer(["the movie was good", "a man plays guitar"])
    with torch.no_grad():
        torch.testing.assert_close(ft.bert(**batch)["last_hidden_state"], mlm.bert(**batch)["last_hidden_state"],
                                   atol=1e-4, rtol=1e-4)


def test_bilstm_baseline_trains_reloads_and_reproduces_its_scores(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "bilstm"
    metrics = train.main(["--model", "bilstm", "--data_dir", str(tiny_data_dir), "--output_dir", str(run),
                          "--epochs", "1", "--steps_per_epoch", "3", "--batch_size", "4", "--lr", "1e-3",
                          "--gradnorm"])
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["encoder"] == "bilstm" and config["bert"]["num_layers"] == 2
    assert type(MultitaskBert.from_checkpoint(run / "best").bert).__name__ == "BiLSTMEncoder"
    scores = evaluate.main([str(run / "best"), "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p")])
    assert scores == pytest.approx(metrics, abs=1e-9)  # the reloaded checkpoint gives the training-time scores
    record = json.loads((run / "metrics.jsonl").read_text())
    assert record["gradnorm_w_sst"] != 1.0  # GradNorm balances the top LSTM layer
    base = ["--model", "bilstm", "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "x")]
    exits(capsys, 2, "--finetune_last counts BERT layers; the bilstm baseline has none", train.main,
          base + ["--finetune_last", "1"])
    exits(capsys, 2, "--compile compiles BERT layers; the bilstm baseline cannot be compiled", train.main,
          base + ["--compile", "--overwrite"])
    exits(capsys, 2, "--gradnorm_layer pooler needs a BERT encoder", train.main,
          base + ["--gradnorm", "--gradnorm_layer", "pooler", "--pooling", "pooler", "--overwrite"])
