"""train.py -> evaluate.py end to end on a tiny random model and tiny CSVs: checkpoints, resume, failures."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from heads import MultitaskBert


def run_args(model_dir, data_dir, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out), "--epochs", "2",
            "--steps_per_epoch", "3", "--batch_size", "4", "--lr", "1e-3", "--eval_batch_size", "8", *extra]


def test_train_then_evaluate_writes_checkpoints_logs_and_prediction_files(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                          capsys):
    metrics = train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run"))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(metrics) == {"sst_acc", "para_acc", "sts_pearson", "overall"}
    best = max(records, key=lambda r: r["overall"])
    assert MultitaskBert.checkpoint_metadata(run / "best")["overall"] == best["overall"]
    config = json.loads((run / "train_config.json").read_text())
    assert config["model"] == str(tiny_model_dir) and config["epochs"] == 2

    capsys.readouterr()
    scores = evaluate.main([str(run / "best"), "--data_dir", str(tiny_data_dir), "--output_dir",
                            str(tmp_path / "pred"), "--plots"])
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


def test_kill_and_resume_equals_an_uninterrupted_run(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    args = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", "--save_every", "2")
    train.main(args)
    real_step, calls = train.train_step, {"n": 0}

    def dies_at_step_5(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # a kill after the state saved at step 4
        return real_step(*a, **kw)
    monkeypatch.setattr(train, "train_step", dies_at_step_5)
    args_b = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", "--save_every", "2")
    with pytest.raises(KeyboardInterrupt):
        train.main(args_b)
    monkeypatch.setattr(train, "train_step", real_step)
    assert json.loads((tmp_path / "b" / "train_state.json").read_text())["global_step"] == 4
    train.main(args_b + ["--resume"])
    a, b = load_file(tmp_path / "a" / "last" / "model.safetensors"), load_file(tmp_path / "b" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    last = lambda run: json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: v for k, v in last("a").items() if "seconds" not in k and "per_s" not in k} == \
        {k: v for k, v in last("b").items() if "seconds" not in k and "per_s" not in k}


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                monkeypatch, capsys):
    real_loss, calls = MultitaskBert.loss, {"n": 0}

    def nan_in_epoch_2(self, task, batch):
        calls["n"] += 1
        loss = real_loss(self, task, batch)
        return loss * float("nan") if calls["n"] > 10 else loss  # 3 tasks x 3 steps in epoch 1
    monkeypatch.setattr(MultitaskBert, "loss", nan_in_epoch_2)
    with pytest.raises(SystemExit) as exit_info:
        train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run"))
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "loss is nan at epoch 2 step 1; training stopped" in out and str(tmp_path / "run" / "best") in out
    assert MultitaskBert.checkpoint_metadata(tmp_path / "run" / "best")["epoch"] == 1


@pytest.mark.parametrize("option,extra,frozen,trained", [
    ("pretrain", [], ["bert."], []),
    ("finetune", ["--finetune_last", "1"], ["bert.embeddings.", "bert.encoder.layer.0."],
     ["bert.encoder.layer.1."]),  # (the pooler gets no gradient: --pooling mean)
])
def test_freezing_options(tiny_model_dir, tiny_data_dir, tmp_path, option, extra, frozen, trained):
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--option", option, *extra))
    torch.manual_seed(train.TrainConfig.seed)  # the initialisation train.py started from
    before = MultitaskBert.from_pretrained(str(tiny_model_dir)).state_dict()
    after = load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("heads."))
    for key, value in after.items():
        if key.startswith(tuple(frozen)):
            assert torch.equal(value, before[key]), key
        if key.startswith(tuple(trained)):
            assert not torch.equal(value, before[key]), key


def test_bad_inputs_exit_with_one_line(tiny_model_dir, tiny_data_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"error: ids-sst-train.csv: file not found \(looked for"):
        train.main(run_args(tiny_model_dir, tmp_path, tmp_path / "run"))
    with pytest.raises(SystemExit, match="error: minbert: model .*nope.* not found"):
        train.main(run_args(tmp_path / "nope", tiny_data_dir, tmp_path / "run"))
    with pytest.raises(SystemExit, match="error: --resume, but .* does not exist"):
        train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "fresh", "--resume"))
    torch.save({}, tmp_path / "pickled.pt")
    with pytest.raises(SystemExit, match="refusing .*pickled.pt: pickled checkpoints"):
        evaluate.main([str(tmp_path / "pickled.pt"), "--data_dir", str(tiny_data_dir)])


def test_lora_adapter_only_checkpoint_reproduces_scores_and_checks_its_base(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                           capsys):
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--lora", "4", "--lora_variant", "dora",
                        "--lora_targets", "query,value,dense", "--save_adapters_only"))
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
    scores = evaluate.main([str(run / "best"), "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p")])
    assert scores == pytest.approx({k: best[k] for k in scores}, abs=1e-9)

    # the same adapters on other base weights: refused with a clear message
    other = tmp_path / "other-base"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = load_file(other / "model.safetensors")
    weights["encoder.layer.0.output.dense.bias"] += 1
    from safetensors.torch import save_file
    save_file(weights, other / "model.safetensors")
    config = json.loads((run / "best" / "config.json").read_text())
    (run / "best" / "config.json").write_text(json.dumps({**config, "base_model": str(other)}))
    with pytest.raises(SystemExit, match="holds adapters trained on base model .*other-base.* but that name now "
                                         "gives other weights"):
        evaluate.main([str(run / "best"), "--data_dir", str(tiny_data_dir)])


def one_batch_per_task(model) -> dict:
    tok = model.tokenizer
    pair = lambda a, b: {**{f"{k}_1": v for k, v in tok(a).items()}, **{f"{k}_2": v for k, v in tok(b).items()}}
    return {"sst": {**tok(["the movie was good", "awful film", "i do not know"]), "labels": torch.tensor([4, 0, 2])},
            "para": {**pair(["how do i", "what is it"], ["how can i", "why"]), "labels": torch.tensor([1, 0])},
            "sts": {**pair(["a man plays", "a cat"], ["the man plays", "the question"]),
                    "labels": torch.tensor([4.5, 0.5])}}


def test_pcgrad_step_projects_shared_gradients_and_leaves_heads_alone(tiny_model_dir):
    from types import SimpleNamespace
    from optim import pcgrad
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(str(tiny_model_dir)).eval()  # no dropout: both passes see one function
    batches = one_batch_per_task(model)
    names = [n for n, p in model.named_parameters()]
    per_task = []
    for task, batch in batches.items():  # the reference: each task's full gradient on its own
        model.zero_grad()
        model.loss(task, batch).backward()
        per_task.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    shared = [n for n in names if not n.startswith("heads.")]
    torch.manual_seed(5)
    expected = dict(zip(shared, pcgrad([[g[n] for n in shared] for g in per_task])))

    args = SimpleNamespace(grad_accum=1, amp=False, smart=False, pcgrad=True, grad_clip=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(5)
    train.train_step(model, optimizer, {t: iter([b]) for t, b in batches.items()}, list(batches),
                     torch.device("cpu"), args, train.Extras())
    grads = dict(model.named_parameters())
    for n in shared:
        torch.testing.assert_close(grads[n].grad, expected[n], atol=1e-6, rtol=1e-5)
    for i, task in enumerate(batches):  # heads: their own task's gradient, untouched
        for n in names:
            if n.startswith(f"heads.{task}."):
                torch.testing.assert_close(grads[n].grad, per_task[i][n])
    summed = sum(g["bert.encoder.layer.0.attention.self.query.weight"] for g in per_task)
    assert not torch.allclose(grads["bert.encoder.layer.0.attention.self.query.weight"].grad, summed), \
        "these tasks conflict, so PCGrad must differ from the plain sum"


@pytest.mark.parametrize("extra", [["--pcgrad"], ["--gradnorm"], ["--smart", "--smart_bregman", "0.5"],
                                   ["--pals", "pal", "--pals_dim", "12", "--pals_share_ve_vd"],
                                   ["--scheduler", "annealed"], ["--scheduler", "sequential", "--task_order",
                                                                 "sts,para,sst"]])
def test_methods_train_and_resume_exactly(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, extra):
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", "--save_every", "2", *extra))
    real_step, calls = train.train_step, {"n": 0}

    def dies_at_step_5(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*a, **kw)
    monkeypatch.setattr(train, "train_step", dies_at_step_5)
    args_b = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", "--save_every", "2", *extra)
    with pytest.raises(KeyboardInterrupt):
        train.main(args_b)
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(args_b + ["--resume"])
    a, b = (load_file(tmp_path / r / "last" / "model.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(record["steps_per_task"].values()) == 3 * (1 if "--scheduler" in extra else 3)
    if "--gradnorm" in extra:
        weights = [record[f"gradnorm_w_{t}"] for t in ("sst", "para", "sts")]
        assert sum(weights) == pytest.approx(3.0) and weights != [1.0, 1.0, 1.0]


def test_ensembles_average_member_probabilities(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
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
    # by hand: average each member's probabilities, then label
    from data import encode_dataset, load_split
    members = [MultitaskBert.from_checkpoint(r) for r in runs]
    expected = {}
    for task in ("sst", "para", "sts"):
        dev = load_split(tiny_data_dir, task, "dev")
        probs = [evaluate.predict(m, encode_dataset(dev, m.tokenizer, 128, m.config.pair_encoding), 8,
                                  torch.device("cpu"), progress=False) for m in members]
        mean = {i: (probs[0][i] + probs[1][i]) / 2 for i in dev.ids}
        expected[task] = evaluate.labels(task, mean)
    lines = (tmp_path / "p12" / "sts-dev-output.csv").read_text().splitlines()[1:]
    written = {line.split(",")[0].strip(): float(line.split(",")[1]) for line in lines}
    assert written == pytest.approx(expected["sts"], abs=1e-6)
    lines = (tmp_path / "p12" / "sst-dev-output.csv").read_text().splitlines()[1:]
    assert {line.split(",")[0].strip(): int(line.split(",")[1]) for line in lines} == expected["sst"]
    gold = load_split(tiny_data_dir, "para", "dev")
    acc = sum(expected["para"][i] == y for i, y in zip(gold.ids, gold.labels)) / len(gold)
    assert pair["para_acc"] == pytest.approx(acc)


def test_sweep_writes_one_row_per_run(tiny_model_dir, tiny_data_dir, tmp_path):
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "sweep", "--epochs", "1",
                        "--sweep", "lr=1e-3,1e-4", "sentiment_head=mlp", "--seeds", "2"))
    rows = (tmp_path / "sweep" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("run,seed,sst_acc,para_acc,sts_pearson,overall") and len(rows) == 1 + 2 * 2
    assert (tmp_path / "sweep" / "lr=0.0001,sentiment_head=mlp" / "seed11712" / "best" / "model.safetensors").is_file()
    table = (tmp_path / "sweep" / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 2 and " ± " in table[2]
    config = json.loads((tmp_path / "sweep" / "lr=0.0001,sentiment_head=mlp" / "seed11711" /
                         "train_config.json").read_text())
    assert config["lr"] == 1e-4 and config["sentiment_head"] == "mlp" and config["seed"] == 11711
    with pytest.raises(SystemExit, match="expected NAME=v1,v2"):
        train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "bad", "--sweep", "nope=1"))


def test_masked_lm_pretraining_improves_and_feeds_finetuning(tiny_model_dir, tiny_data_dir, tmp_path):
    record = train.main(["--option", "mlm", "--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir),
                         "--output_dir", str(tmp_path / "mlm"), "--epochs", "3", "--batch_size", "8", "--lr", "3e-3",
                         "--hidden_dropout_prob", "0"])
    log = (tmp_path / "mlm" / "run.log").read_text()
    before = float(log.split("accuracy before: ")[1].split()[0])
    assert record["masked_token_accuracy"] > before
    losses = [json.loads(line)["loss"] for line in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    import minbert
    mlm = minbert.BertForMaskedLM.from_pretrained(tmp_path / "mlm")  # the head comes back too: no warning
    assert not torch.equal(mlm.cls.predictions.bias, torch.zeros_like(mlm.cls.predictions.bias))
    train.main(run_args(tmp_path / "mlm", tiny_data_dir, tmp_path / "ft", "--epochs", "1"))
    ft = load_file(tmp_path / "ft" / "last" / "model.safetensors")
    assert ft["bert.embeddings.word_embeddings.weight"].shape == mlm.bert.embeddings.word_embeddings.weight.shape


def test_bilstm_baseline_trains_and_reloads(tiny_data_dir, tmp_path):
    run = tmp_path / "bilstm"
    train.main(["--model", "bilstm", "--data_dir", str(tiny_data_dir), "--output_dir", str(run), "--epochs", "1",
                "--steps_per_epoch", "3", "--batch_size", "4", "--lr", "1e-3"])
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["encoder"] == "bilstm" and config["bert"]["num_layers"] == 2
    model = MultitaskBert.from_checkpoint(run / "best")
    assert type(model.bert).__name__ == "BiLSTMEncoder"
    scores = evaluate.main([str(run / "best"), "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p")])
    assert set(scores) == {"sst_acc", "para_acc", "sts_pearson", "overall"}
