"""The task registry (data/tasks.py): losses, scores, labels and metrics against hand-derived values and sklearn."""
import math

import pytest
import torch

from minbert.data import TASKS, get_task, overall
from minbert.errors import ConfigError


def test_metrics_on_hand_derived_cases():
    sst = TASKS["sst"].evaluate([0, 1, 1, 2], [0, 1, 2, 2])
    # per-class F1: class 0: 1, class 1: 2·1/(2+1) = 2/3, class 2: 2·1/(1+2) = 2/3
    assert sst == pytest.approx({"sst_acc": 0.75, "sst_macro_f1": (1 + 2 / 3 + 2 / 3) / 3})
    assert list(sst) == TASKS["sst"].metric_names and TASKS["sst"].main_metric == "sst_acc"
    para = TASKS["para"].evaluate([1, 1, 0, 0], [1, 0, 1, 0])
    assert para == pytest.approx({"para_acc": 0.5, "para_f1": 0.5})  # tp 1, 2 predicted, 2 gold
    assert TASKS["para"].evaluate([0, 0], [1, 0])["para_f1"] == 0.0
    sts = TASKS["sts"].evaluate([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    # ranks differ by d = (0, 1, -1, 0): ρ = 1 - 6·Σd² / (n (n² - 1)) = 1 - 12/60
    assert sts == pytest.approx({"sts_pearson": 0.8, "sts_spearman": 0.8, "sts_mse": 0.5})
    assert list(sts) == TASKS["sts"].metric_names and TASKS["sts"].main_metric == "sts_pearson"
    scores = {"sst_acc": 0.5, "para_acc": 0.8, "sts_pearson": 0.6, "sts_mse": 9.0}
    assert overall(scores, [TASKS[t] for t in ("sst", "para", "sts")]) == pytest.approx((0.5 + 0.8 + 0.8) / 3)


def test_metrics_match_sklearn_on_random_predictions():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    pred, gold = torch.randint(0, 5, (200,), generator=g).tolist(), torch.randint(0, 5, (200,), generator=g).tolist()
    ours = TASKS["sst"].evaluate(pred, gold)
    assert ours["sst_macro_f1"] == pytest.approx(sklearn.f1_score(gold, pred, average="macro"))
    assert ours["sst_acc"] == pytest.approx(sklearn.accuracy_score(gold, pred))
    binary = [p % 2 for p in pred], [t % 2 for t in gold]
    assert TASKS["para"].evaluate(*binary)["para_f1"] == pytest.approx(sklearn.f1_score(binary[1], binary[0]))


def test_objectives_losses_scores_and_labels():
    logits, classes = torch.tensor([[2.0, 0.0, -1.0, 0.5, 0.0]]), torch.tensor([3])
    manual = -(logits[0, 3] - logits[0].exp().sum().log())
    ce = TASKS["sst"].objective()
    assert ce.name == "cross_entropy" and ce.loss(logits, classes) == pytest.approx(manual.item())
    assert ce.scores(logits).sum() == pytest.approx(1.0) and TASKS["sst"].labels(logits.softmax(-1)) == [0]
    z, y = torch.tensor([0.3, -2.0]), torch.tensor([1, 0])
    bce = -(math.log(1 / (1 + math.exp(-0.3))) + math.log(1 - 1 / (1 + math.exp(2.0)))) / 2
    assert TASKS["para"].objective().loss(z, y) == pytest.approx(bce)
    assert TASKS["para"].labels(TASKS["para"].objective().scores(z)) == [1, 0]
    s = torch.tensor([5.7, -0.2, 2.5])
    assert TASKS["sts"].objective().loss(s, torch.tensor([5.0, 0.0, 2.0])) == pytest.approx((0.49 + 0.04 + 0.25) / 3)
    assert TASKS["sts"].labels(TASKS["sts"].objective().scores(s)) == pytest.approx([5.0, 0.0, 2.5])
    # on the cosine head's output (cos + 1) * 2.5: cos = 0.8, -0.2, 0.3
    cosine_head = torch.tensor([4.5, 2.0, 3.25])
    embedding = TASKS["para"].objective("cosine_embedding")
    assert embedding.loss(cosine_head, torch.tensor([1, 0, 0])) == pytest.approx((1 - 0.8 + 0 + 0.3) / 3)
    assert TASKS["para"].labels(embedding.scores(cosine_head)) == [1, 0, 0]  # cos > 0.5
    rescaled = TASKS["sts"].objective("mse_rescaled")  # both sides from [0, 5] to [-1, 1]
    assert rescaled.loss(cosine_head, torch.tensor([5.0, 2.5, 0.0])) == pytest.approx(
        ((0.8 - 1) ** 2 + (-0.2 - 0) ** 2 + (0.3 + 1) ** 2) / 3)
    with pytest.raises(ConfigError, match="--sts_loss bce: use one of mse, mse_rescaled"):
        TASKS["sts"].objective("bce")


def test_registry_declares_files_headers_and_divergences():
    objectives = {t: task.objective() for t, task in TASKS.items()}
    assert {t: (task.kind, objectives[t].outputs(task.num_classes), objectives[t].divergence)
            for t, task in TASKS.items()} == {
        "sst": ("classification", 5, "classification"), "cfimdb": ("classification", 2, "classification"),
        "para": ("pair_classification", 1, "binary"), "sts": ("pair_regression", 1, "regression")}
    assert TASKS["sts"].prediction_header == "Predicted_Similiary"  # the CS224N starter code's spelling
    assert TASKS["para"].file("dev") == "quora-dev.csv" and TASKS["para"].is_pair
    assert TASKS["sst"].file("test") == "ids-sst-test-student.csv"
    assert [TASKS[t].prediction_name("test") for t in TASKS] == [f"{t}-test-output.csv" for t in TASKS]
    with pytest.raises(KeyError, match="unknown task 'imdb'; known tasks: sst, cfimdb, para, sts"):
        get_task("imdb")
