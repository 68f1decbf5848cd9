"""Pooling, task heads and losses against hand-written formulas; the bi-encoder; checkpoints and prediction API."""

import pytest
import torch
import torch.nn.functional as F

import minbert
from heads import HeadConfig, MultitaskBert, Pooling, PairHead, SentimentHead


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


def test_pair_heads_by_hand():
    u, v = torch.randn(5, 8), torch.randn(5, 8)
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
    torch.testing.assert_close(PairHead("cosine", 8, 0.0)(u, v), (cos + 1) * 2.5)
    torch.testing.assert_close(PairHead("cosine_relu", 8, 0.0)(u, v), cos.clamp(min=0) * 5)
    torch.testing.assert_close(PairHead("dot", 8, 0.0)(u, v), (u * v).sum(-1))
    head = PairHead("features", 8, 0.0)
    torch.testing.assert_close(head(u, v), head.out(torch.cat([u, v, (u - v).abs(), u * v], -1)).squeeze(-1))
    head = PairHead("cosine_logit", 8, 0.0)
    torch.testing.assert_close(head(u, v), 5.0 * cos - 2.5)
    for kind, width in (("concat", 16), ("difference", 8), ("linear", 8)):
        assert PairHead(kind, 8, 0.0).out.in_features == width
    with pytest.raises(ValueError, match="pair head must be one of"):
        PairHead("bogus", 8, 0.0)


def test_sentiment_heads_shapes():
    x = torch.randn(3, 8)
    assert SentimentHead("linear", 8, 5, 0.1)(x).shape == (3, 5)
    mlp = SentimentHead("mlp", 8, 2, 0.1)
    assert mlp(x).shape == (3, 2)
    assert [m.out_features for m in mlp.net if isinstance(m, torch.nn.Linear)] == [256, 64, 2]


def test_losses_match_their_formulas(tiny_model_dir):
    model = tiny_multitask(tiny_model_dir)
    tok = model.tokenizer
    one = {**tok(["the movie was good", "bad film"]), "labels": torch.tensor([4, 0])}
    logits = model("sst", one)
    expected = -(logits.log_softmax(-1)[[0, 1], [4, 0]]).mean()
    torch.testing.assert_close(model.loss("sst", one), expected)
    pair = {f"{k}_{s}": v for s, texts in ((1, ["a man", "what is it"]), (2, ["a dog plays", "why"]))
            for k, v in tok(texts).items()}
    z = model("para", pair)
    y = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(model.loss("para", {**pair, "labels": y.long()}),
                               -(y * torch.sigmoid(z).log() + (1 - y) * (1 - torch.sigmoid(z)).log()).mean())
    s = model("sts", pair)
    torch.testing.assert_close(model.loss("sts", {**pair, "labels": torch.tensor([3.0, 1.5])}),
                               ((s - torch.tensor([3.0, 1.5])) ** 2).mean())


def test_bi_encoder_joint_call_equals_separate_calls(tiny_model_dir):
    model = tiny_multitask(tiny_model_dir, multi_stream=8, sts_head="cosine")
    tok = model.tokenizer
    a, b = tok(["the man plays the guitar very well", "a"]), tok(["dog", "it is not the same question"])
    joint = model("sts", {**{f"{k}_1": v for k, v in a.items()}, **{f"{k}_2": v for k, v in b.items()}})
    def vectors(x):
        v = model.pooling(model.bert(x["input_ids"], x["attention_mask"], x["token_type_ids"]), x["attention_mask"])
        return torch.cat([F.relu(model.shared_stream(v)), F.relu(model.streams["sts"](v))], dim=-1)
    u, v = vectors(a), vectors(b)
    torch.testing.assert_close(joint, (F.cosine_similarity(u, v) + 1) * 2.5, atol=1e-5, rtol=0)


def test_cross_encoder_and_multi_stream(tiny_model_dir):
    model = tiny_multitask(tiny_model_dir, pair_encoding="cross", multi_stream=8, sentiment_head="mlp")
    assert model.config.para_head == model.config.sts_head == "linear"
    batch = model.tokenizer(["a man", "what"], ["a dog", "why is it"])
    assert model("para", batch).shape == (2,) and model("sts", batch).shape == (2,)
    assert model.heads["para"].out.in_features == 16  # shared stream (8) + task stream (8)
    with pytest.raises(ValueError, match="needs --pair_encoding cross"):
        HeadConfig(para_head="linear")
    with pytest.raises(ValueError, match="unknown task"):
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
    with pytest.raises(minbert.CheckpointError, match="not a minbert-multitask/1 checkpoint config"):
        MultitaskBert.from_checkpoint(tiny_model_dir)


def test_inputs_longer_than_the_position_embeddings_are_truncated(tiny_model_dir, tmp_path):
    from conftest import write_tsv
    from data import read_task
    model = tiny_multitask(tiny_model_dir)
    assert model.fit_length(512) == 64 and model.fit_length(32) == 32
    write_tsv(tmp_path / "sst.csv", ["", "id", "sentence", "sentiment"], [[0, "long", "the movie " * 100, 3]])
    encoded = model.encode(read_task(tmp_path / "sst.csv", "sst"), max_length=512)
    assert len(encoded.segments[0][0][0]) == 64
    assert len(model.predict_sentiment(["very good " * 200], max_length=512)) == 1
