"""PALs and low-rank layers (Stickland & Murray 2019): routing, gradients, parameter counts, placement, init."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import minbert
from conftest import TINY, random_batch
from minbert.model import additive_mask
from minbert.pals import PALs, PALsConfig

KINDS = ["pal", "lowrank", "mixed"]
SMALL = dict(dim=8, num_heads=4)  # d_s for the tiny model (hidden 32, 2 layers; mixed: layer 0 PAL, layer 1 low-rank)


def tiny(kind: str, tasks=("A", "B"), seed: int = 0, **options) -> tuple[minbert.BertModel, PALs]:
    torch.manual_seed(seed)
    config = minbert.BertConfig(**TINY)
    return minbert.BertModel(config).eval(), PALs(PALsConfig(kind=kind, **SMALL, **options), config, list(tasks)).eval()


def hidden(model, batch, adapter=None) -> torch.Tensor:
    return model(**batch, adapter=adapter)["last_hidden_state"]  # (B, T, H)


@pytest.mark.parametrize("kind", KINDS)
def test_routing_changes_only_that_tasks_path(kind):
    model, pals = tiny(kind)
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        a0, b0 = hidden(model, batch, pals.route("A")), hidden(model, batch, pals.route("B"))
        for p in pals["A"].parameters():
            p.add_(0.1)
        a1, b1 = hidden(model, batch, pals.route("A")), hidden(model, batch, pals.route("B"))
    assert (a1 - a0).abs().max() > 1e-2
    assert torch.equal(b1, b0)
    assert not torch.equal(a0, b0)  # the two tasks' random initialisations differ


def test_unknown_task_and_invalid_configs_raise():
    _, pals = tiny("pal")
    with pytest.raises(KeyError, match=r"unknown task 'C'.*\['A', 'B'\]"):
        pals.route("C")
    config = minbert.BertConfig(**TINY)
    for bad in (dict(kind="adapters"), dict(kind="lowrank", share_attention=True), dict(dim=0)):
        with pytest.raises(ValueError):
            PALsConfig(**bad)
    with pytest.raises(ValueError, match=r"splits d_s = 10 into num_heads = 4 heads: choose a multiple of 4"):
        PALsConfig(dim=10, num_heads=4)  # refused before a model is built (train.py: a usage error)
    PALsConfig(kind="lowrank", dim=10, num_heads=4)  # low-rank layers have no attention to split
    with pytest.raises(ValueError, match="distinct"):
        PALs(PALsConfig(**SMALL), config, ["A", "A"])


@pytest.mark.parametrize("share", [dict(), dict(share_ve_vd=True), dict(share_ve_vd=True, share_attention=True)],
                         ids=["per-layer", "shared-ve-vd", "shared-all"])
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_gradients_reach_only_the_routed_task(kind, share):
    if kind == "lowrank" and "share_attention" in share:
        share = dict(share_ve_vd=True)
    model, pals = tiny(kind, **share)
    batch = random_batch(TINY["vocab_size"])
    B, T = batch["input_ids"].shape
    h = torch.randn(B, T, TINY["hidden_size"])
    mask = additive_mask(batch["attention_mask"], torch.float32)
    for i in range(TINY["num_hidden_layers"]):
        assert pals.route("A")(i, h, mask).shape == (B, T, TINY["hidden_size"])
    out = model(**batch, adapter=pals.route("A"))
    assert out["last_hidden_state"].shape == (B, T, TINY["hidden_size"])
    out["pooler_output"].sum().backward()
    names = {n for n, _ in pals.named_parameters()}
    assert any(".attn." in n for n in names) == (kind != "lowrank")
    for name, p in pals.named_parameters():
        if name.startswith("A."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_low_rank_and_pal_compute_the_papers_ts():
    """Low-rank: V_D V_E h (g = identity); PAL: V_D MH(V_E h), MH without an output matrix, by hand (eager)."""
    _, pals = tiny("mixed", tasks=("A",))
    batch = random_batch(TINY["vocab_size"])
    h = torch.randn(3, batch["input_ids"].shape[1], TINY["hidden_size"])  # (B, T, H)
    mask = additive_mask(batch["attention_mask"], torch.float32)
    task = pals.route("A")
    with torch.no_grad():
        ve, vd = task.ve[1], task.vd[1]
        torch.testing.assert_close(task(1, h, mask), (h @ ve.weight.T + ve.bias) @ vd.weight.T + vd.bias)
        ve, vd, attn = task.ve[0], task.vd[0], task.attn[0]
        z = ve(h)  # (B, T, d_s)
        nh, hs = SMALL["num_heads"], SMALL["dim"] // SMALL["num_heads"]
        q, k, v = (lin(z).unflatten(-1, (nh, hs)).transpose(1, 2) for lin in (attn.query, attn.key, attn.value))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(hs) + mask).softmax(-1)  # (B, nh, T, T)
        g = (probs @ v).transpose(1, 2).flatten(-2)  # (B, T, d_s)
        torch.testing.assert_close(task(0, h, mask), vd(g))


@pytest.mark.parametrize("after_norm", [False, True], ids=["inside-LN", "after-LN"])
def test_placement_matches_a_manual_layer_loop(after_norm):
    """h' = LN(a + FFN(a) + TS(h)) with a = LN(h + SA(h)); after_norm: h' = LN(a + FFN(a)) + TS(h)."""
    model, pals = tiny("mixed", after_norm=after_norm)
    batch = random_batch(TINY["vocab_size"])
    task = pals.route("A")
    assert task.after_norm is after_norm
    mask = additive_mask(batch["attention_mask"], torch.float32)
    with torch.no_grad():
        x = model.embeddings(batch["input_ids"], batch["token_type_ids"])
        for i, layer in enumerate(model.encoder.layer):
            ts = task(i, x, mask)  # from the layer input
            a = layer.attention(x, mask)
            ffn = layer.output.dropout(layer.output.dense(layer.intermediate(a)))
            x = layer.output.LayerNorm(a + ffn) + ts if after_norm else layer.output.LayerNorm(a + ffn + ts)
        keep = batch["attention_mask"].bool()  # (the model skips padding; the manual loop computes it too)
        torch.testing.assert_close(hidden(model, batch, task)[keep], x[keep])
        other = tiny("mixed", after_norm=not after_norm)[1].route("A")
        assert (hidden(model, batch, other) - x).abs().max() > 1e-3


@pytest.mark.parametrize("after_norm", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_vd_gives_exactly_the_base(kind, after_norm):
    model, pals = tiny(kind, after_norm=after_norm)
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        for task in pals.values():
            for vd in task.vd:
                vd.weight.zero_(), vd.bias.zero_()
        assert torch.equal(hidden(model, batch, pals.route("A")), hidden(model, batch))


# Measured max |PALs model - base| over unpadded tokens on all-MiniLM-L6-v2 (384 hidden, 6 layers), seed 1, the
# paper's N(0, 0.02) init: pal 0.091, lowrank 0.39, mixed 0.33 (mean 0.014 / 0.054 / 0.040; the base's mean |h| is
# 0.26). The bounds leave room for other seeds; the module docstring gives the per-layer scale σ² √(d_s d_m).
INIT_BOUND = {"pal": 0.2, "lowrank": 0.6, "mixed": 0.6}


@pytest.mark.parametrize("kind", KINDS)
def test_paper_initialisation_moves_a_pretrained_model_by_a_bounded_amount(kind, minilm_dir):
    model = minbert.BertModel.from_pretrained(str(minilm_dir)).eval()
    torch.manual_seed(1)
    pals = PALs(PALsConfig(kind=kind), model.config, ["A"]).eval()
    batch = random_batch(model.config.vocab_size, T=16)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        diff = (hidden(model, batch, pals.route("A")) - hidden(model, batch))[keep].abs().max().item()
    assert 1e-3 < diff < INIT_BOUND[kind], diff
    for name, p in pals.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        else:
            assert abs(p.std().item() - model.config.initializer_range) < 0.002, name


H, L, N = 768, 12, 3  # bert-base shape, 3 tasks


def proj(d: int) -> int:
    """V_E (H -> d) and V_D (d -> H), weights and biases."""
    return 2 * H * d + d + H


def attn(d: int) -> int:
    """PAL attention q, k, v (d -> d), weights and biases; V_D stands in for the output matrix."""
    return 3 * (d * d + d)


COUNTS = [  # (kind, dim, share_ve_vd, share_attention) -> parameters for N tasks
    (("lowrank", None, False, False), N * L * proj(100)),
    (("lowrank", None, True, False), N * proj(100)),
    (("pal", None, False, False), N * L * (proj(204) + attn(204))),
    (("pal", None, True, False), N * (proj(204) + L * attn(204))),  # the paper's PALs: 1,819,836 per task
    (("pal", None, False, True), N * (L * proj(204) + attn(204))),
    (("pal", None, True, True), N * (proj(204) + attn(204))),
    (("mixed", None, False, False), N * (6 * (proj(204) + attn(204)) + 6 * proj(100))),
    (("mixed", None, True, False), N * (proj(204) + proj(100) + 6 * attn(204))),
    (("mixed", None, True, True), N * (proj(204) + proj(100) + attn(204))),
    (("mixed", 96, True, False), N * (proj(96) + 6 * attn(96))),  # one d_s: one shared pair for all layers
]


@pytest.mark.parametrize("options,expected", COUNTS, ids=["-".join(map(str, o)) for o, _ in COUNTS])
def test_parameter_counts_match_hand_formulas_on_bert_base(options, expected):
    kind, dim, share_ve_vd, share_attention = options
    config = PALsConfig(kind=kind, dim=dim, share_ve_vd=share_ve_vd, share_attention=share_attention)
    pals = PALs(config, minbert.BertConfig(), ["sst", "para", "sts"])
    assert sum(p.numel() for p in pals.parameters()) == expected
    heads = {(a.num_heads, a.head_size) for task in pals.values() for a in task.attn}  # 12 heads of 17 for d_s 204
    assert heads == (set() if kind == "lowrank" else {(12, (dim or 204) // 12)})


def test_config_and_state_dict_round_trip(tmp_path):
    config = PALsConfig(kind="mixed", share_ve_vd=True, after_norm=True, **SMALL)
    assert PALsConfig.from_dict({**config.to_dict(), "unknown": 1}) == config
    model, pals = tiny("mixed", tasks=("sst", "sts"), share_ve_vd=True, after_norm=True)
    assert {"sst.ve.0.weight", "sst.vd.0.bias", "sts.attn.0.query.weight"} <= set(pals.state_dict())
    save_file(pals.state_dict(), tmp_path / "pals.safetensors")
    torch.manual_seed(123)
    fresh = PALs(PALsConfig.from_dict(config.to_dict()), model.config, ["sst", "sts"]).eval()
    fresh.load_state_dict(load_file(tmp_path / "pals.safetensors"))
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(hidden(model, batch, fresh.route("sts")), hidden(model, batch, pals.route("sts")))
