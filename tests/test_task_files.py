"""Tasks as data (--task_def): a task file's tasks train beside the CS224N tasks, travel in the checkpoint, are
scored by evaluate.py and predicted from Python without the file; a bad task file stops with one line naming the
file and the field."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from conftest import SHARED_DATA, WORDS, write_tsv
from minbert.data import TASKS, Task, read_task_file
from minbert.errors import ConfigError
from minbert.heads import MultitaskBert
from minbert.training import evaluate, train
from minbert.training.config import TrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"
LABELS = ["entailment", "neutral", "contradiction"]


def tiny_run(model_dir, data_dir, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out), "--epochs", "1",
            "--steps_per_epoch", "4", "--batch_size", "4", "--lr", "1e-3", "--max_length", "32",
            "--eval_batch_size", "8", *extra]


def read_predictions(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict((k.strip(), v.strip()) for k, v in (line.split(" , ") for line in lines[1:]))


@pytest.mark.skipif(not (SHARED_DATA / "ids-cfimdb-train.csv").is_file(), reason="needs ../shared/data")
def test_a_task_file_describing_cfimdb_trains_and_scores_as_the_builtin_task(tiny_model_dir, tmp_path):
    """examples/tasks/reviews.json is CFIMDB written as a task file: same seed, same dev accuracy and predictions."""
    builtin = train.main(tiny_run(tiny_model_dir, SHARED_DATA, tmp_path / "builtin", "--tasks", "sst,cfimdb"))
    defined = train.main(tiny_run(tiny_model_dir, SHARED_DATA, tmp_path / "defined", "--tasks", "sst,reviews",
                                  "--task_def", str(EXAMPLES / "reviews.json")))
    assert defined["reviews_acc"] == builtin["cfimdb_acc"] and defined["sst_acc"] == builtin["sst_acc"]
    assert defined["overall"] == builtin["overall"]
    for run, task in (("builtin", "cfimdb"), ("defined", "reviews")):
        evaluate.main([str(tmp_path / run / "best"), "--data_dir", str(SHARED_DATA), "--batch_size", "8",
                       "--output_dir", str(tmp_path / run / "predictions")])
    assert read_predictions(tmp_path / "defined" / "predictions" / "reviews-test-output.csv") == \
        read_predictions(tmp_path / "builtin" / "predictions" / "cfimdb-test-output.csv")


def sentence(rng) -> str:
    return " ".join(rng.choice(WORDS, size=rng.integers(2, 8)))


@pytest.fixture
def defined_tasks(tiny_data_dir, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny CS224N data plus a three-label NLI task (string labels, tab-separated) and a regression
    task in [-1, 3] (comma-separated, quoted), and the task file that defines them."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("dev", 18), ("test", 6)):
        rows = [[f"n{split}{i}", sentence(rng), sentence(rng)] + ([LABELS[i % 3]] if split != "test" else [])
                for i in range(n)]
        write_tsv(data / f"nli-{split}.tsv", ["id", "premise", "hypothesis"] + (["label"] if split != "test" else []),
                  rows)
    for split, n in (("train", 40), ("dev", 16)):
        with open(data / f"rating-{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["review_id", "review", "stars"])
            writer.writerows([[f"r{split}{i}", sentence(rng) + ", really", round(-1 + (i * 0.29) % 4, 2)]
                              for i in range(n)])
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps({
        "nli": {"kind": "pair_classification", "text_columns": ["premise", "hypothesis"], "label_column": "label",
                "files": {"train": "nli-train.tsv", "dev": "nli-dev.tsv", "test": "nli-test.tsv"},
                "label_map": ",".join(LABELS), "prediction_header": "Predicted_Label"},
        "rating": {"kind": "regression", "files": {"train": "rating-train.csv", "dev": "rating-dev.csv"},
                   "delimiter": ",", "id_column": "review_id", "text_columns": ["review"], "label_column": "stars",
                   "range": [-1, 3], "metrics": ["spearman", "pearson", "mse"], "head": "sentence:16:gelu"}}))
    return data, task_file


def test_defined_tasks_train_with_the_cs224n_tasks_and_are_scored_and_predicted_without_the_file(
        tiny_model_dir, defined_tasks, tmp_path, capsys):
    data, task_file = defined_tasks
    run = tmp_path / "run"
    metrics = train.main(tiny_run(tiny_model_dir, data, run, "--tasks", "sst,para,sts,nli,rating", "--task_def",
                                  str(task_file), "--pals", "pal", "--pals_dim", "12", "--pals_tasks", "nli,rating",
                                  "--lora", "4", "--smart", "--aggregator", "upgrad", "--best_metric", "rating_mse"))
    assert {"nli_acc", "nli_macro_f1", "rating_spearman", "rating_pearson", "rating_mse"} <= set(metrics)
    # overall: the mean of each task's main metric in [0, 1]; a correlation r counts as (r + 1) / 2
    parts = [metrics["sst_acc"], metrics["para_acc"], (metrics["sts_pearson"] + 1) / 2, metrics["nli_acc"],
             (metrics["rating_spearman"] + 1) / 2]
    assert metrics["overall"] == pytest.approx(sum(parts) / 5, abs=1e-12)
    assert "overall: mean of sst_acc, para_acc, (sts_pearson + 1) / 2, nli_acc, (rating_spearman + 1) / 2" in \
        (run / "run.log").read_text()

    task_file.unlink()  # the checkpoint carries the definitions
    capsys.readouterr()
    scored = evaluate.main([str(run / "best"), "--data_dir", str(data), "--batch_size", "8",
                            "--output_dir", str(tmp_path / "predictions")])
    assert scored == pytest.approx(metrics, abs=1e-9)
    assert "overall: mean of sst_acc, para_acc, (sts_pearson + 1) / 2, nli_acc, (rating_spearman + 1) / 2" in \
        capsys.readouterr().out
    # the prediction files hold the task's own labels; the metrics follow from them and the gold files
    dev = read_predictions(tmp_path / "predictions" / "nli-dev-output.csv")
    assert (tmp_path / "predictions" / "nli-dev-output.csv").read_text().startswith("id \t Predicted_Label \n")
    gold = {row["id"]: row["label"] for row in csv.DictReader(open(data / "nli-dev.tsv"), delimiter="\t")}
    assert set(dev.values()) <= set(LABELS) and dev.keys() == gold.keys()
    assert scored["nli_acc"] == pytest.approx(np.mean([dev[i] == gold[i] for i in gold]))
    assert len(read_predictions(tmp_path / "predictions" / "nli-test-output.csv")) == 6
    assert not (tmp_path / "predictions" / "rating-test-output.csv").exists()  # the task has no test file
    rating = read_predictions(tmp_path / "predictions" / "rating-dev-output.csv")
    stars = {row["review_id"]: float(row["stars"]) for row in csv.DictReader(open(data / "rating-dev.csv"))}
    predicted = np.array([float(rating[i]) for i in stars])
    assert ((-1 <= predicted) & (predicted <= 3)).all() and len(set(predicted)) > 1
    assert scored["rating_spearman"] == pytest.approx(spearmanr(predicted, list(stars.values())).statistic, abs=1e-6)
    assert scored["rating_pearson"] == pytest.approx(pearsonr(predicted, list(stars.values())).statistic, abs=1e-6)

    model = MultitaskBert.from_checkpoint(run / "best")
    rows = list(csv.DictReader(open(data / "nli-dev.tsv"), delimiter="\t"))[:5]
    assert model.predict("nli", [(r["premise"], r["hypothesis"]) for r in rows], max_length=32) == \
        [dev[r["id"]] for r in rows]
    reviews = list(csv.DictReader(open(data / "rating-dev.csv")))[:4]
    assert model.predict("rating", [r["review"] for r in reviews], max_length=32) == pytest.approx(
        [float(rating[r["review_id"]]) for r in reviews], abs=1e-5)
    with pytest.raises(ConfigError, match="nli is a pair task: pass \\(text, text\\) pairs"):
        model.predict("nli", ["just one text"])
    with pytest.raises(ConfigError, match="this model has no 'cfimdb' head"):
        model.predict("cfimdb", ["a film"])


def test_definitions_round_trip_and_builtins_are_task_file_entries():
    for task in TASKS.values():
        assert Task.from_definition(task.name, task.definition(), "x") == task
    nli = read_task_file(EXAMPLES / "nli.json")["nli"]
    assert nli.num_classes == 3 and nli.parse_label("neutral") == 1 and nli.label_names([2, 0]) == [
        "contradiction", "entailment"]
    assert nli.objective().name == "cross_entropy" and nli.objective().outputs(3) == 3
    rating = read_task_file(EXAMPLES / "nli.json")["rating"]
    assert rating.parse_label("4.5") == 4.5 and rating.objective("mse_rescaled").loss is not None
    with pytest.raises(ValueError, match=r"label '0.5' out of range in column 'stars' \(expected a number in \[1, 5\]"):
        rating.parse_label("0.5")


def write(tmp_path: Path, tasks, name: str = "tasks.json") -> Path:
    path = tmp_path / name
    path.write_text(tasks if isinstance(tasks, str) else json.dumps(tasks))
    return path


NLI = {"kind": "pair_classification", "files": {"train": "nli-train.tsv", "dev": "nli-dev.tsv"},
       "text_columns": ["premise", "hypothesis"], "label_map": LABELS}


@pytest.mark.parametrize("tasks, match", [
    ({"nli": {**NLI, "kind": "entailment"}}, r"task 'nli': field 'kind' must be one of classification, "
                                              r"pair_classification, regression, pair_regression, got \"entailment\""),
    ({"nli": {**NLI, "text_colums": ["p", "h"]}}, r"task 'nli': unknown field 'text_colums' \(did you mean "
                                                   r"'text_columns'\?\)"),
    ({"nli": {**NLI, "text_columns": ["premise"]}}, r"field 'text_columns' must be a list of 2 column name\(s\) for "
                                                    r"a pair_classification task"),
    ({"nli": {**NLI, "loss": "mse"}}, r"task 'nli': field 'loss' mse: use one of cross_entropy\b"),
    ({"nli": {**NLI, "loss": "bce"}}, r"field 'loss' bce: use one of cross_entropy$"),  # three labels: no bce
    ({"nli": {**NLI, "metrics": ["acc", "f1"]}}, r"field 'metrics' must be a list of metrics among acc, f1, "
                                                 r"macro_f1 \(f1 only with two labels"),
    ({"nli": {**NLI, "range": [0, 1]}}, r"field 'range' must be absent: a pair_classification task has labels"),
    ({"nli": {**NLI, "num_labels": 3}}, r"give one of 'num_labels' .* and 'label_map'"),
    ({"nli": {k: v for k, v in NLI.items() if k != "files"}}, r"field 'files' must name the train and dev files"),
    ({"sst": NLI}, r"task 'sst' is a built-in CS224N task; give yours another name"),
    ('{"nli": ' + json.dumps(NLI) + ', "nli": ' + json.dumps(NLI) + "}", r"task 'nli' is defined twice"),
    ('{"nli": {"kind": "classification",}}', r"tasks.json line 1 column 35: not valid JSON"),
    ({"nli": {**NLI, "kind": "pair_regression", "range": [5, 1], "label_map": None}},
     r"field 'label_map' must be absent: a pair_regression task has a range"),
])
def test_bad_task_files_name_the_file_and_the_field(tmp_path, tasks, match):
    path = write(tmp_path, tasks)
    with pytest.raises(ConfigError, match=match) as err:
        TrainConfig.from_flags(task_def=str(path), tasks="sst,nli")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_head_that_does_not_fit_the_task_is_refused(tmp_path):
    path = write(tmp_path, {"nli": {**NLI, "head": "sentence"}, "rating": {
        "kind": "regression", "files": {"train": "a", "dev": "b"}, "text_columns": ["t"], "range": [0, 1],
        "head": "cosine"}})
    with pytest.raises(ConfigError, match=r"task 'nli': head sentence: this task's head reads the two sentence "
                                          r"vectors"):
        TrainConfig.from_flags(task_def=str(path), tasks="sst,nli")
    with pytest.raises(ConfigError, match=r"task 'rating': head cosine: this task's head reads one sentence's"):
        TrainConfig.from_flags(task_def=str(path), tasks="sst,rating")
    with pytest.raises(ConfigError, match=r"unknown task\(s\) mytask; choose from sst,cfimdb,para,sts,nli,"
                                          r"rating$"):
        TrainConfig.from_flags(task_def=str(path), tasks="sst,mytask")


def test_a_misspelt_column_or_a_label_outside_the_map_stops_before_training(tiny_model_dir, defined_tasks,
                                                                             tmp_path, capsys):
    data, task_file = defined_tasks
    tasks = json.loads(task_file.read_text())
    bad = write(tmp_path, {"nli": {**tasks["nli"], "text_columns": ["premis", "hypothesis"]}}, "bad.json")
    with pytest.raises(SystemExit) as code:
        train.main(tiny_run(tiny_model_dir, data, tmp_path / "a", "--tasks", "sst,nli", "--task_def", str(bad)))
    err = capsys.readouterr().err
    assert code.value.code == 1 and not (tmp_path / "a" / "checkpoints").exists()
    assert "nli-train.tsv line 1: missing column(s) 'premis' (found 'id', 'premise', 'hypothesis', 'label'; " \
           "'premis' is spelt 'premise' in the file?" in err
    rows = (data / "nli-dev.tsv").read_text().splitlines()
    (data / "nli-dev.tsv").write_text("\n".join(rows[:3] + [rows[3].rsplit("\t", 1)[0] + "\tentails"] + rows[4:]))
    with pytest.raises(SystemExit) as code:
        train.main(tiny_run(tiny_model_dir, data, tmp_path / "b", "--tasks", "sst,nli", "--task_def",
                            str(task_file), "--strict"))
    assert code.value.code == 1
    assert ("nli-dev.tsv line 4: label 'entails' in column 'label' is not in the task's label_map (entailment, "
            "neutral, contradiction)") in capsys.readouterr().err


def test_yaml_task_files_read_as_json_ones(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = write(tmp_path, yaml.safe_dump({"nli": NLI}), "tasks.yaml")
    assert read_task_file(path) == read_task_file(write(tmp_path, {"nli": NLI}))
    twice = "nli:\n  kind: classification\nnli:\n  kind: regression\n"
    with pytest.raises(ConfigError, match=r"tasks.yaml: task 'nli' is defined twice"):
        read_task_file(write(tmp_path, twice, "tasks.yaml"))
    with pytest.raises(ConfigError, match=r"tasks.yaml line 3: not valid YAML \(expected .,. or .\]., but got"):
        read_task_file(write(tmp_path, "nli:\n  kind: [classification\n", "tasks.yaml"))


def test_a_checkpoint_written_before_task_files_loads_and_scores_unchanged(tiny_model_dir, tmp_path):
    """Checkpoints of earlier versions hold no task_defs in config.json: they load as the CS224N tasks."""
    from minbert.heads import HeadConfig
    model = MultitaskBert.from_pretrained(str(tiny_model_dir), HeadConfig()).eval()
    model.save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["heads"].pop("task_defs") == {}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    loaded = MultitaskBert.from_checkpoint(tmp_path / "ckpt")
    pairs = [("a man plays guitar", "the man is playing"), ("what is it", "why")]
    assert loaded.predict("sts", pairs) == model.predict("sts", pairs)
    assert loaded.predict_sentiment(["the movie was good"]) == model.predict("sst", ["the movie was good"])
