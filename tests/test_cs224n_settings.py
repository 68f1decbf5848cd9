"""The CS224N projects' settings that the flags express (issue: head-only dropout, fixed-size training subsets,
smart-pytorch's SMART step, training-set scores), each checked for what it does, and unchanged runs by default."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minbert.data import load_split, subset_rows
from minbert.heads import MultitaskBert
from minbert.training import train
from minbert.training.config import TrainConfig


def run_args(model_dir, data_dir, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out), "--epochs", "1",
            "--steps_per_epoch", "3", "--batch_size", "4", "--lr", "1e-3", "--eval_batch_size", "8", *extra]


def weights(run: Path) -> dict:
    return load_file(run / "last" / "model.safetensors")


def test_head_dropout_drops_in_the_heads_alone(tiny_model_dir):
    cfg = TrainConfig.from_flags(hidden_dropout_prob=0.0, head_dropout=0.5)
    model = MultitaskBert.from_pretrained(str(tiny_model_dir), cfg.head_config(), hidden_dropout_prob=0.0).train()
    assert {m.p for m in model.heads.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}
    assert {m.p for m in model.bert.modules() if isinstance(m, torch.nn.Dropout)} <= {0.0}
    batch = model.tokenizer(["the movie was good", "awful film"])
    embeddings, mask, paired = model.embed(batch)
    encoded = [model.bert.encode(embeddings, mask) for _ in range(2)]
    torch.testing.assert_close(encoded[0], encoded[1])  # the encoder draws no masks
    assert not torch.equal(model("sst", batch), model("sst", batch))  # the head does
    default = TrainConfig.from_flags(hidden_dropout_prob=0.2)
    assert default.head_config().dropout == 0.2 == default.replace(head_dropout=0.2).head_config().dropout
    with pytest.raises(ValueError, match=r"--head_dropout must be in \[0, 1\), got 1.0"):
        TrainConfig.from_flags(head_dropout=1.0)


def test_head_dropout_left_out_trains_as_before(tiny_model_dir, tiny_data_dir, tmp_path):
    """Without --head_dropout the heads use --hidden_dropout_prob: the same run, bit for bit."""
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", "--hidden_dropout_prob", "0.1"))
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", "--hidden_dropout_prob", "0.1",
                        "--head_dropout", "0.1"))
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "c", "--hidden_dropout_prob", "0.1",
                        "--head_dropout", "0.3"))
    a, b, c = (weights(tmp_path / r) for r in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_train_rows_is_a_seeded_subset_in_file_order(tiny_model_dir, tiny_data_dir, tmp_path):
    sst = load_split(tiny_data_dir, "sst", "train")
    picked = subset_rows(sst, 10, seed=5)
    assert len(picked) == 10 and set(picked.ids) <= set(sst.ids)
    assert picked.ids == [i for i in sst.ids if i in set(picked.ids)]  # file order
    assert [picked.labels[picked.ids.index(i)] for i in picked.ids] == [sst.labels[sst.ids.index(i)]
                                                                         for i in picked.ids]
    assert subset_rows(sst, 10, seed=5).ids == picked.ids != subset_rows(sst, 10, seed=6).ids
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--train_rows", "sst=10,sts=12"))
    state = json.loads((run / "last" / "train_state.json").read_text())
    assert {t: v["rows"] for t, v in state["data"].items()} == {"sst": 10, "para": 48, "sts": 12}
    assert "sst: a random 10 of its 48 train rows (--train_rows, seed 11711)" in (run / "run.log").read_text()
    for flags, match in ((["--train_rows", "sst=100"], "sst=100: ids-sst-train.csv has only 48 usable rows"),
                         (["--train_rows", "cfimdb=5"], "names cfimdb, which --tasks sst,para,sts does not train"),
                         (["--train_rows", "sst"], "must be TASK=N,...")):
        with pytest.raises(SystemExit) as code:
            train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "bad", "--overwrite", *flags))
        assert code.value.code == 2


def test_eval_train_scores_the_same_training_rows_at_every_evaluation(tiny_model_dir, tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--eval_train", "6", "--epochs", "2"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"train_sst_acc", "train_para_f1", "train_sts_pearson", "train_overall"} <= set(r) for r in records)
    # the last record's train_sst_acc, recomputed from the checkpoint on the sampled rows
    model = MultitaskBert.from_checkpoint(run / "last")
    sample = subset_rows(load_split(tiny_data_dir, "sst", "train"), 6, seed=11711)
    predicted = model.predict("sst", sample.texts)
    assert records[-1]["train_sst_acc"] == pytest.approx(
        sum(p == g for p, g in zip(predicted, sample.labels)) / 6)


def test_smart_token_norm_trains_otherwise_than_the_ball(tiny_model_dir, tiny_data_dir, tmp_path):
    for norm in ("ball", "token"):
        train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / norm, "--smart", "--smart_norm", norm,
                            "--smart_lambda", "10"))
    ball, token = weights(tmp_path / "ball"), weights(tmp_path / "token")
    assert any(not torch.equal(ball[k], token[k]) for k in ball)


def test_lora_on_word_embeddings_heads_and_streams(tiny_model_dir, tmp_path):
    """--lora_targets query,value,word_embeddings,heads,streams (projects 000 and 002): every head and stream Linear
    and the word embeddings get adapters, their base weights freeze; at the start the model computes what the plain
    one does (B = 0, embedding A = 0), and a checkpoint rebuilds it."""
    from minbert.heads import HeadConfig
    from minbert.lora import LoRAConfig, LoRAEmbedding, LoRALinear
    heads = HeadConfig(multi_stream=8, sentiment_head="mlp", dropout=0.0)
    torch.manual_seed(0)
    plain = MultitaskBert.from_pretrained(str(tiny_model_dir), heads, hidden_dropout_prob=0.0).eval()
    torch.manual_seed(0)
    lora = LoRAConfig(r=2, targets=("query", "value", "word_embeddings", "heads", "streams"))
    model = MultitaskBert.from_pretrained(str(tiny_model_dir), heads, lora, hidden_dropout_prob=0.0).eval()
    linears = {n: m for n, m in model.named_modules() if n.startswith(("heads", "shared_stream", "streams"))
               and isinstance(m, (torch.nn.Linear, LoRALinear))}
    assert linears and all(isinstance(m, LoRALinear) for m in linears.values())
    assert "heads.sst.mlp.0" in linears and "shared_stream" in linears and "streams.sts" in linears
    assert isinstance(model.bert.embeddings.word_embeddings, LoRAEmbedding)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)  # lll: adapters alone
    assert "heads.sst.out.lora_B" in trainable and "heads.sst.out.weight" not in trainable
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)  # the same base weights
    assert not unexpected and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in missing)
    batch = model.tokenizer(["the movie was good", "awful film"])
    with torch.no_grad():
        torch.testing.assert_close(model("sst", batch), plain("sst", batch), atol=0, rtol=0)
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAEmbedding)):
                m.lora_B.add_(0.1), m.lora_A.add_(0.1)
        out = model("sst", batch)
        assert not torch.allclose(out, plain("sst", batch))
    model.save(tmp_path / "ckpt")
    torch.testing.assert_close(MultitaskBert.from_checkpoint(tmp_path / "ckpt")("sst", batch), out)
    with pytest.raises(ValueError, match="--lora_targets streams adapts the streams of --multi_stream"):
        MultitaskBert.from_pretrained(str(tiny_model_dir), HeadConfig(), LoRAConfig(targets=("query", "streams")))
    with pytest.raises(ValueError, match=r"--lora_targets heads: the heads \(cosine_relu\) have no linear layer"):
        MultitaskBert.from_pretrained(str(tiny_model_dir), HeadConfig(tasks=["sts"]), LoRAConfig(targets=("heads",)))


def test_random_epoch_pass_is_one_pass_over_the_drawn_task(tiny_model_dir, tiny_data_dir, tmp_path):
    from minbert.optim import TaskSampler
    sampler = TaskSampler({"sst": 40, "para": 9, "sts": 20}, "random_epoch", batch_size=4, num_epochs=4, seed=3,
                          one_pass=True)
    for epoch in range(1, 5):
        plan = sampler.schedule(epoch)
        assert len(set(plan)) == 1 and len(plan) == {"sst": 10, "para": 3, "sts": 5}[plan[0]]
        fixed = TaskSampler({"sst": 40, "para": 9, "sts": 20}, "random_epoch", batch_size=4, seed=3).schedule(epoch)
        assert fixed == [plan[0]] * 18  # the same draw; today's epoch: sum of all tasks' batches
    run = tmp_path / "run"
    args = [a for a in run_args(tiny_model_dir, tiny_data_dir, run) if a not in ("--steps_per_epoch", "3")]
    train.main(args + ["--scheduler", "random_epoch", "--random_epoch_pass", "--epochs", "3", "--train_rows",
                       "sst=12,para=20,sts=8"])
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    batches = {"sst": 3, "para": 5, "sts": 2}
    for record in records:
        (task, n), = [(t, n) for t, n in record["steps_per_task"].items() if n]
        assert n == batches[task]
        assert [s for s in steps if s["epoch"] == record["epoch"]] and all(
            f"loss_{task}" in s for s in steps if s["epoch"] == record["epoch"])
    assert len(steps) == sum(sum(r["steps_per_task"].values()) for r in records)
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "bad", "--random_epoch_pass"))
