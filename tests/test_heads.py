"""Pooling, task heads and losses against hand-written formulas; the bi-encoder; checkpoints and prediction API."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import minbert
from minbert.heads import HeadConfig, HeadSpec, MultitaskBert, Pooling, TaskHead
from minbert.data import TASKS, Task


def tiny_multitask(tiny_model_dir, **head_kw) -> MultitaskBert:
    torch.manual_seed(0)
    return MultitaskBert.from_pretrained(str(tiny_model_dir), HeadConfig(**head_kw)).eval()


def test_poolings_by_hand():
    h = torch.randn(2, 4, 6)
    out = {"last_hidden_state": h, "pooler_output": torch.randn(2, 6)}
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(Pooling("pooler", 6)(out, mask), out["pooler_output"])
    assert torch.equal(Pooling("cls", 6)(out, mask), h[:, 0])
    mean = Pooling("mean", 6)(out, mask)
    torch.testing.assert_close(mean[0], (h[0, 0] + h[0, 1]) / 2)  # padding ignored
    torch.testing.assert_close(mean[1], h[1].mean(0))
    concat = Pooling("concat", 6)
    assert concat.out_dim == 12
    torch.testing.assert_close(concat(out, mask), torch.cat([torch.tanh(concat.dense(mean)), h[:, 0]], -1))


def head(text: str, pair: bool = True, in_dim: int = 8, outputs: int = 1, task: str = "para") -> TaskHead:
    return TaskHead(HeadSpec.parse(text, pair, cross=False), in_dim, outputs, 0.0, TASKS[task]).eval()


def test_pair_heads_by_hand():
    u, v = torch.randn(5, 8), torch.randn(5, 8)
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
    torch.testing.assert_close(head("cosine")(u, v), (cos + 1) * 2.5)
    torch.testing.assert_close(head("cosine_relu")(u, v), cos.clamp(min=0) * 5)
    torch.testing.assert_close(head("dot")(u, v), (u * v).sum(-1))
    for text, features in (("features", torch.cat([u, v, (u - v).abs(), u * v], -1)), ("concat", torch.cat([u, v], -1)),
                           ("difference", (u - v).abs()), ("signed_difference", u - v), ("product", u * v)):
        h = head(text)
        assert h.out.in_features == features.shape[-1] and len(h.mlp) == 0
        torch.testing.assert_close(h(u, v), features @ h.out.weight[0] + h.out.bias[0])
    # a bare cos head starts as the task's parameter-free score: a logit for paraphrase, a 0-5 score for similarity
    torch.testing.assert_close(head("cosine_logit")(u, v), 5.0 * cos - 2.5)
    torch.testing.assert_close(head("cos", task="sts")(u, v), 2.5 * cos + 2.5)
    # a defined regression task's range [1, 3]: the scores and the cos head's start map [-1, 1] onto it
    rating = Task.from_definition("rating", {"kind": "pair_regression", "files": {"train": "a", "dev": "b"},
                                             "text_columns": ["a", "b"], "range": [1, 3]}, "test")
    in_range = lambda text: TaskHead(HeadSpec.parse(text, True, False), 8, 1, 0.0, rating).eval()  # noqa: E731
    torch.testing.assert_close(in_range("cosine")(u, v), cos + 2)
    torch.testing.assert_close(in_range("cosine_relu")(u, v), cos.clamp(min=0) * 2 + 1)
    torch.testing.assert_close(in_range("cos")(u, v), cos + 2)


def test_mlp_heads_by_hand():
    u, v = torch.randn(4, 8), torch.randn(4, 8)
    h = head("features:6,3:gelu")
    (l1, _), (l2, _) = h.mlp[0:2], h.mlp[2:4]
    assert [l1.in_features, l1.out_features, l2.out_features, h.out.in_features] == [32, 6, 3, 3]
    x = torch.cat([u, v, (u - v).abs(), u * v], -1)
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5))  # noqa: E731
    torch.testing.assert_close(h(u, v), (gelu(gelu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)
                                         @ h.out.weight.T + h.out.bias).squeeze(-1))
    sst = head("mlp", pair=False, outputs=5, task="sst")  # the CS224N projects' 768 -> 256 -> 64 -> 5
    assert [m.out_features for m in sst.modules() if isinstance(m, torch.nn.Linear)] == [256, 64, 5]
    assert isinstance(sst.mlp[1][0], torch.nn.ReLU) and sst(u).shape == (4, 5)
    relu = head("product:4", in_dim=8)
    torch.testing.assert_close(relu(u, v), (torch.relu((u * v) @ relu.mlp[0].weight.T + relu.mlp[0].bias)
                                            @ relu.out.weight.T + relu.out.bias).squeeze(-1))
    train = TaskHead(HeadSpec.parse("sentence:16", False, False), 8, 5, 0.5, TASKS["sst"]).train()
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in train.modules()) == 2  # input and hidden
    assert str(HeadSpec.parse("mlp", False, False)) == "sentence:256,64:relu"


@pytest.mark.parametrize("text, match", [("bogus", "unknown features 'bogus'"), ("features:12,x", "widths must be "),
                                         ("features:0", "positive"), ("features:8:tanh", "activation one of")])
def test_bad_head_specs_are_refused(text, match):
    with pytest.raises(minbert.ConfigError, match=match):
        HeadSpec.parse(text, True, False)


@pytest.mark.parametrize("kw, match", [
    (dict(para_head="cosine_relu"), "gives a score, not a logit"),  # was read as a logit: almost all "paraphrase"
    (dict(para_head="dot"), "gives a score, not a logit"),
    (dict(para_head="features", para_loss="cosine_embedding"), "reads the output of --para_head cosine"),
    (dict(sentiment_head="features"), "reads one sentence's vector"),
    (dict(sts_head="sentence:8"), "reads the two sentence vectors"),
    (dict(para_head="linear"), "needs|add --pair_encoding cross"),
    (dict(pair_encoding="cross", sts_head="cosine"), "cross-encoded pair's vector"),
    (dict(multi_stream=8, shared_layer=8), "choose one of"),
    (dict(stream_activation="tanh"), "none or relu"),
    (dict(sts_loss="huber"), "huber"),
])
def test_head_and_loss_combinations_that_make_no_sense_are_refused(kw, match):
    with pytest.raises(minbert.ConfigError, match=match):
        HeadConfig(**kw)


def pair_batch(tok, firsts: list[str], seconds: list[str]) -> dict:
    return {f"{k}_{s}": v for s, texts in ((1, firsts), (2, seconds)) for k, v in tok(texts).items()}


def test_losses_match_their_formulas(tiny_model_dir):
    model = tiny_multitask(tiny_model_dir)
    tok = model.tokenizer
    one = {**tok(["the movie was good", "bad film"]), "labels": torch.tensor([4, 0])}
    logits = model("sst", one)
    expected = -(logits.log_softmax(-1)[[0, 1], [4, 0]]).mean()
    torch.testing.assert_close(model.loss("sst", one), expected)
    pair = pair_batch(tok, ["a man", "what is it"], ["a dog plays", "why"])
    z = model("para", pair)
    y = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(model.loss("para", {**pair, "labels": y.long()}),
                               -(y * torch.sigmoid(z).log() + (1 - y) * (1 - torch.sigmoid(z)).log()).mean())
    s = model("sts", pair)
    torch.testing.assert_close(model.loss("sts", {**pair, "labels": torch.tensor([3.0, 1.5])}),
                               ((s - torch.tensor([3.0, 1.5])) ** 2).mean())


def test_cosine_embedding_and_rescaled_similarity_losses(tiny_model_dir):
    model = tiny_multitask(tiny_model_dir, para_head="cosine", para_loss="cosine_embedding", sts_head="cosine",
                           sts_loss="mse_rescaled")
    tok = model.tokenizer
    firsts, seconds = ["a man plays", "what is it", "the dog"], ["a dog plays", "why", "the dog"]
    pair = pair_batch(tok, firsts, seconds)
    vec = lambda texts: model.pooling(model.bert(**tok(texts)), tok(texts)["attention_mask"])  # noqa: E731
    u, v = vec(firsts), vec(seconds)
    labels = torch.tensor([1, 0, 1])
    reference = torch.nn.CosineEmbeddingLoss()(u, v, 2 * labels - 1)  # PyTorch's loss, targets 1 / -1
    torch.testing.assert_close(model.loss("para", {**pair, "labels": labels}), reference, atol=1e-6, rtol=1e-5)
    cos = F.cosine_similarity(u, v)
    gold = torch.tensor([4.0, 0.5, 5.0])
    torch.testing.assert_close(model.loss("sts", {**pair, "labels": gold}), ((cos - (gold / 2.5 - 1)) ** 2).mean(),
                               atol=1e-6, rtol=1e-5)
    assert model.predict_paraphrase([("the dog", "the dog")], amp="off") == [1]  # cos 1 > 0.5


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_bi_encoder_joint_call_equals_separate_calls(tiny_model_dir, activation):
    model = tiny_multitask(tiny_model_dir, multi_stream=8, sts_head="cosine", stream_activation=activation)
    tok = model.tokenizer
    a, b = tok(["the man plays the guitar very well", "a"]), tok(["dog", "it is not the same question"])
    joint = model("sts", {**{f"{k}_1": v for k, v in a.items()}, **{f"{k}_2": v for k, v in b.items()}})
    act = F.relu if activation == "relu" else (lambda x: x)
    def vectors(x):
        v = model.pooling(model.bert(x["input_ids"], x["attention_mask"], x["token_type_ids"]), x["attention_mask"])
        return torch.cat([act(model.shared_stream(v)), act(model.streams["sts"](v))], dim=-1)
    u, v = vectors(a), vectors(b)
    torch.testing.assert_close(joint, (F.cosine_similarity(u, v) + 1) * 2.5, atol=1e-5, rtol=0)


def test_shared_layer_only_model(tiny_model_dir):
    model = tiny_multitask(tiny_model_dir, shared_layer=6, sentiment_head="linear")
    assert not hasattr(model, "streams") and model.heads["sst"].out.in_features == 6
    assert model.heads["para"].out.in_features == 24  # features of two 6-wide vectors
    tok = model.tokenizer
    x = tok(["the movie was good", "bad"])
    pooled = model.pooling(model.bert(**x), x["attention_mask"])
    torch.testing.assert_close(model("sst", x), model.heads["sst"].out(model.shared_stream(pooled)))  # linear
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.shared_stream.parameters())


def write_first_format_checkpoint(tiny_model_dir, directory: Path) -> dict[str, torch.Tensor]:
    """A minbert-multitask/1 checkpoint as the code before head specs wrote it: the MLP sentiment head as `net.{0,2,4}`
    (Linear-ReLU-Linear-ReLU-Linear), cosine_logit as scalar `scale` and `bias`, no stream activation field (the
    streams had a ReLU). Returns its tensors."""
    torch.manual_seed(1)
    model = MultitaskBert.from_pretrained(str(tiny_model_dir), HeadConfig(
        sentiment_head="mlp", para_head="cosine_logit", sts_head="cosine", multi_stream=8))
    old_names = {"heads.sst.mlp.0": "heads.sst.net.0", "heads.sst.mlp.2": "heads.sst.net.2",
                 "heads.sst.out": "heads.sst.net.4"}
    tensors = {}
    for key, value in model.state_dict().items():
        value = value + 0.05 * torch.randn_like(value)
        prefix, leaf = key.rsplit(".", 1)
        if prefix == "heads.para.out":  # a·cos + b with scalar parameters
            tensors[f"heads.para.{'scale' if leaf == 'weight' else 'bias'}"] = value.reshape(())
        else:
            tensors[f"{old_names.get(prefix, prefix)}.{leaf}"] = value
    model.save(directory)
    config = json.loads((directory / "config.json").read_text())
    config["format"] = "minbert-multitask/1"
    config["heads"] = {k: config["heads"][k] for k in ("tasks", "pooling", "pair_encoding", "sentiment_head",
                                                       "para_head", "sts_head", "multi_stream", "dropout")}
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors")
    return tensors


def test_checkpoints_of_the_first_format_load_and_score_unchanged(tiny_model_dir, tmp_path):
    """Old head names, scalar cosine_logit parameters and ReLU streams: the outputs are the old formulas on the
    saved tensors."""
    w = write_first_format_checkpoint(tiny_model_dir, tmp_path / "old")
    model = MultitaskBert.from_checkpoint(tmp_path / "old")
    assert model.config.stream_activation == "relu" and str(model.config.head_spec("para")) == "cos"
    tok = model.tokenizer
    texts, firsts, seconds = ["the movie was very good", "awful film"], ["how do i play guitar", "a cat"], \
        ["how to play the guitar", "the man"]
    linear = lambda x, name: x @ w[f"{name}.weight"].T + w[f"{name}.bias"]  # noqa: E731

    def streams(texts: list[str], task: str) -> torch.Tensor:  # ReLU(shared) ; ReLU(task stream)
        x = tok(texts)
        pooled = model.pooling(model.bert(**x), x["attention_mask"])
        return torch.cat([linear(pooled, "shared_stream").relu(), linear(pooled, f"streams.{task}").relu()], -1)
    with torch.no_grad():
        h = streams(texts, "sst")
        sst = linear(linear(linear(h, "heads.sst.net.0").relu(), "heads.sst.net.2").relu(), "heads.sst.net.4")
        torch.testing.assert_close(model("sst", tok(texts)), sst)
        pair = pair_batch(tok, firsts, seconds)
        cos = F.cosine_similarity(streams(firsts, "para"), streams(seconds, "para"))
        torch.testing.assert_close(model("para", pair), w["heads.para.scale"] * cos + w["heads.para.bias"])
        cos = F.cosine_similarity(streams(firsts, "sts"), streams(seconds, "sts"))
        torch.testing.assert_close(model("sts", pair), (cos + 1) * 2.5)


def test_cfimdb_merged_into_sst_is_scored_by_the_sst_head(tiny_model_dir):
    from minbert.data import TASKS, TaskDataset
    model = tiny_multitask(tiny_model_dir, cfimdb_labels=[0, 4])
    assert model.scoring_head("cfimdb") == "sst" and "cfimdb" not in model.heads
    texts = ["the movie was very good", "awful film", "i do not know"]
    dataset = TaskDataset(TASKS["cfimdb"], Path("<texts>"), ["a", "b", "c"], texts, None)
    scores = model.predict_scores(model.encode(dataset, 64), amp="off", progress=False)
    probs = model("sst", model.tokenizer(texts)).softmax(-1)
    positive = (probs @ torch.arange(5.0)) / 4  # expected SST class, mapped from [0, 4] to [0, 1]
    torch.testing.assert_close(torch.stack(list(scores.values())), torch.stack([1 - positive, positive], -1))
    assert model.predict_sentiment(texts, task="cfimdb", amp="off") == (positive > 0.5).long().tolist()
    with pytest.raises(minbert.ConfigError, match="has no 'cfimdb' head"):
        tiny_multitask(tiny_model_dir).scoring_head("cfimdb")


def test_cross_encoder_and_multi_stream(tiny_model_dir):
    model = tiny_multitask(tiny_model_dir, pair_encoding="cross", multi_stream=8, sentiment_head="mlp")
    assert model.config.para_head == model.config.sts_head == "linear"
    batch = model.tokenizer(["a man", "what"], ["a dog", "why is it"])
    assert model("para", batch).shape == (2,) and model("sts", batch).shape == (2,)
    assert model.heads["para"].out.in_features == 16  # shared stream (8) + task stream (8)
    with pytest.raises(minbert.ConfigError, match="unknown task"):
        HeadConfig(tasks=["sst", "imdb"])


def test_checkpoint_round_trip_and_prediction_api(tiny_model_dir, tmp_path):
    model = tiny_multitask(tiny_model_dir, pooling="concat")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "ckpt", {"epoch": 3, "sst_acc": 0.5})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == \
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    loaded = MultitaskBert.from_checkpoint(tmp_path / "ckpt")
    assert MultitaskBert.checkpoint_metadata(tmp_path / "ckpt") == {"epoch": 3, "sst_acc": 0.5}
    texts = ["the movie was very good", "awful film", "i do not know"]
    pairs = [("how do i play guitar", "how to play the guitar"), ("a cat", "the man")]
    assert loaded.predict_sentiment(texts) == model.predict_sentiment(texts)
    assert loaded.predict_paraphrase(pairs) == model.predict_paraphrase(pairs)
    torch.testing.assert_close(loaded.predict_similarity(pairs), model.predict_similarity(pairs))
    assert all(0 <= s <= 5 for s in loaded.predict_similarity(pairs))
    assert all(p in (0, 1) for p in loaded.predict_paraphrase(pairs))
    assert all(c in range(5) for c in loaded.predict_sentiment(texts))


def test_from_checkpoint_refuses_pickles_and_foreign_directories(tmp_path, tiny_model_dir):
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(minbert.CheckpointError, match="pickled checkpoints can run arbitrary code"):
        MultitaskBert.from_checkpoint(tmp_path / "model.pt")
    with pytest.raises(minbert.CheckpointError, match="pickled checkpoints"):
        MultitaskBert.from_checkpoint(tmp_path)
    with pytest.raises(minbert.CheckpointError, match="not a minbert-multitask/2 checkpoint config"):
        MultitaskBert.from_checkpoint(tiny_model_dir)


def test_inputs_longer_than_the_position_embeddings_are_truncated(tiny_model_dir, tmp_path):
    from conftest import write_tsv
    from minbert.data import read_task
    model = tiny_multitask(tiny_model_dir)
    assert model.fit_length(512) == 64 and model.fit_length(32) == 32
    write_tsv(tmp_path / "sst.csv", ["", "id", "sentence", "sentiment"], [[0, "long", "the movie " * 100, 3]])
    encoded = model.encode(read_task(tmp_path / "sst.csv", "sst"), max_length=512)
    assert len(encoded.segments[0][0][0]) == 64
    assert len(model.predict_sentiment(["very good " * 200], max_length=512)) == 1
