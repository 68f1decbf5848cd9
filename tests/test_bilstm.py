"""BiLSTM baseline encoder: shapes, padding invariance, learning a toy task, edge cases, use inside MultitaskBert."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, random_batch
from minbert.heads import HeadConfig, MultitaskBert
from minbert.bilstm import BiLSTMConfig, BiLSTMEncoder

SMALL = dict(vocab_size=TINY["vocab_size"], embedding_dim=16, hidden_size=24, num_layers=2)


def tiny(seed: int = 0, **kw) -> BiLSTMEncoder:
    torch.manual_seed(seed)
    return BiLSTMEncoder(BiLSTMConfig(**{**SMALL, **kw})).eval()


def test_shapes_and_config_round_trip():
    model, batch = tiny(), random_batch(TINY["vocab_size"])
    out = model(**batch)
    assert out["last_hidden_state"].shape == (3, 11, 24) and out["pooler_output"].shape == (3, 24)
    assert model.embeddings(batch["input_ids"], batch["token_type_ids"]).shape == (3, 11, 16)
    assert (out["last_hidden_state"][batch["attention_mask"] == 0] == 0).all()
    assert BiLSTMConfig.from_dict({**model.config.to_dict(), "unknown": 1}) == model.config
    with pytest.raises(ValueError, match="even"):
        BiLSTMConfig(vocab_size=10, hidden_size=7)


def test_padding_invariance():
    model, batch = tiny(), random_batch(TINY["vocab_size"])
    ref = model(**batch)
    mask = F.pad(batch["attention_mask"], (0, 5))  # five more padding columns ...
    ids = F.pad(batch["input_ids"], (0, 5))
    ids[mask == 0] = torch.randint(5, TINY["vocab_size"], (int((mask == 0).sum()),))  # ... holding arbitrary ids
    out = model(ids, mask)
    torch.testing.assert_close(out["last_hidden_state"][:, :11], ref["last_hidden_state"], rtol=0, atol=1e-6)
    assert (out["last_hidden_state"][:, 11:] == 0).all()
    torch.testing.assert_close(out["pooler_output"], ref["pooler_output"], rtol=0, atol=1e-6)
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):  # each row alone, unpadded
        alone = model(batch["input_ids"][i:i + 1, :n])
        torch.testing.assert_close(alone["last_hidden_state"][0], ref["last_hidden_state"][i, :n], rtol=0, atol=1e-6)
        torch.testing.assert_close(alone["pooler_output"][0], ref["pooler_output"][i], rtol=0, atol=1e-6)


def test_pooler_is_final_forward_and_backward_states():
    model, batch = tiny(num_layers=1), random_batch(TINY["vocab_size"])
    out = model(**batch)
    half = 12
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        h = out["last_hidden_state"][i]  # (T, H): forward half at the last real token, backward half at the first
        torch.testing.assert_close(out["pooler_output"][i], torch.cat([h[n - 1, :half], h[0, half:]]))


def test_learns_a_separable_toy_task():
    """Label 1 iff the sequence holds token 6 (else token 5), at a random place among random tokens."""
    g = torch.Generator().manual_seed(0)
    B, T = 32, 10
    labels = torch.arange(B) % 2
    ids = torch.randint(7, TINY["vocab_size"], (B, T), generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    ids[torch.arange(B), (torch.rand(B, generator=g) * lengths).long()] = 5 + labels
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids[mask == 0] = 0
    model = tiny(dropout=0.0).train()
    head = torch.nn.Linear(24, 2)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(head(model(ids, mask)["pooler_output"]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 < 0.5 < losses[0]


def test_empty_row_gives_zeros_and_gradients_flow():
    model, batch = tiny(), random_batch(TINY["vocab_size"])
    batch["attention_mask"][2] = 0
    out = model(**batch)
    assert (out["last_hidden_state"][2] == 0).all() and (out["pooler_output"][2] == 0).all()
    out["pooler_output"].sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.lstm.parameters())


def test_adapter_is_refused():
    model, batch = tiny(), random_batch(TINY["vocab_size"])
    with pytest.raises(ValueError, match="PALs"):
        model(**batch, adapter=object())


@pytest.mark.parametrize("pair_encoding", ["bi", "cross"])
def test_stands_in_for_bert_in_multitask_model(pair_encoding):
    torch.manual_seed(0)
    model = MultitaskBert(tiny(), HeadConfig(pooling="pooler", pair_encoding=pair_encoding)).eval()
    one, two = random_batch(TINY["vocab_size"], seed=1), random_batch(TINY["vocab_size"], T=7, seed=2)
    sst = {**one, "labels": torch.tensor([0, 3, 4])}
    pair = {**{f"{k}_1": v for k, v in one.items()}, **{f"{k}_2": v for k, v in two.items()}} \
        if pair_encoding == "bi" else one
    assert model("sst", sst).shape == (3, 5)
    assert model("para", pair).shape == model("sts", pair).shape == (3,)
    model.loss("sst", sst).backward()
    assert model.bert.lstm.weight_ih_l0.grad is not None
