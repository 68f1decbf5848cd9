"""LoRA / rsLoRA / DoRA adapters against PEFT (test-only oracle) on tiny random BERTs."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
import transformers

import minbert
from conftest import TINY, random_batch
from minbert.lora import (LoRAConfig, LoRAEmbedding, LoRALinear, apply_lora, count_parameters, lora_state_dict,
                          mark_trainable, merge_lora)

R, ALPHA = 4, 8
H, I, L = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
QV, QKVD = ("query", "value"), ("query", "key", "value", "dense")
# (in, out) of every Linear each target list adapts: per layer q/k/v and attention.output (H, H), intermediate
# (H, I), output (I, H); plus the pooler (H, H), which "dense" also matches
SHAPES = {QV: [(H, H)] * 2 * L, QKVD: ([(H, H)] * 4 + [(H, I), (I, H)]) * L + [(H, H)]}
VARIANTS = ["lora", "rslora", "dora"]


def base_models(seed: int = 0) -> tuple[transformers.BertModel, minbert.BertModel]:
    """A seeded random transformers.BertModel and a minbert.BertModel holding the same weights."""
    torch.manual_seed(seed)
    hf = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    ours = minbert.BertModel(minbert.BertConfig(**TINY)).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)  # HF also stores position_ids / token_type_ids buffers
    return hf, ours


def adapted_pair(variant: str, targets: tuple, seed: int = 0, scaling: str = "alpha_over_r"
                 ) -> tuple[peft.PeftModel, minbert.BertModel]:
    """PEFT and minbert adapters on the same base, with the same perturbed (non-zero) A, B and magnitude. Scaling
    'alpha' (s = α) is PEFT's s = lora_alpha / r with lora_alpha = α·r."""
    hf, ours = base_models(seed)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA * (R if scaling == "alpha" else 1), target_modules=list(targets),
                             lora_dropout=0.0, use_rslora=variant == "rslora", use_dora=variant == "dora")
    theirs = peft.get_peft_model(hf, config).eval()
    apply_lora(ours, r=R, alpha=ALPHA, targets=targets, variant=variant, scaling=scaling)
    mark_trainable(ours, "lll")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, m in adapted_modules(ours):
            p = theirs.base_model.model.get_submodule(name)
            pairs = [(p.lora_A["default"].weight, m.lora_A), (p.lora_B["default"].weight, m.lora_B)]
            if variant == "dora":
                pairs.append((p.lora_magnitude_vector["default"].weight, m.magnitude))
                torch.testing.assert_close(m.magnitude, pairs[-1][0], atol=1e-6, rtol=0)  # m₀ = ‖W₀‖_row
            for src, dst in pairs:
                src.add_(0.05 * torch.randn(src.shape, generator=g))
                dst.copy_(src)
    return theirs, ours


def adapted_modules(model: torch.nn.Module) -> list:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def max_diff(a: dict, b: dict, mask: torch.Tensor) -> float:
    """Largest difference of hidden states (unmasked tokens) and pooler outputs of two minbert-style outputs."""
    keep = mask.bool()
    return max((a["last_hidden_state"] - b["last_hidden_state"])[keep].abs().max().item(),
               (a["pooler_output"] - b["pooler_output"]).abs().max().item())


def as_dict(hf_out) -> dict:
    return {"last_hidden_state": hf_out.last_hidden_state, "pooler_output": hf_out.pooler_output}


@pytest.mark.parametrize("targets", [QV, QKVD], ids=["qv", "qkvd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_match_peft(variant, targets):
    theirs, ours = adapted_pair(variant, targets)
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        a, b = ours(**batch), as_dict(theirs(**batch))
        with theirs.disable_adapter():
            base = as_dict(theirs(**batch))
    assert max_diff(a, base, batch["attention_mask"]) > 1e-2  # the adapters really change the output
    d = max_diff(a, b, batch["attention_mask"])
    print(f"max |minbert - PEFT| {variant} {'+'.join(targets)}: {d:.2e}")  # shown with pytest -s
    assert d < 1e-5, d
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_plain_alpha_scaling_matches_peft_with_alpha_times_r(variant):
    theirs, ours = adapted_pair(variant, QV, scaling="alpha")
    assert all(m.scaling == ALPHA for _, m in adapted_modules(ours))
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert max_diff(ours(**batch), as_dict(theirs(**batch)), batch["attention_mask"]) < 1e-5
    with pytest.raises(ValueError, match="rsLoRA's scale is"):
        apply_lora(base_models()[1], r=R, alpha=ALPHA, variant="rslora", scaling="alpha")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_peft(variant):
    """Same loss, same backward: A, B (and DoRA's magnitude, whose weight norm is detached) get PEFT's gradients."""
    theirs, ours = adapted_pair(variant, QKVD)
    batch = random_batch(TINY["vocab_size"])
    w = torch.randn(H, generator=torch.Generator().manual_seed(3))
    keep = batch["attention_mask"].bool()
    for out in (ours(**batch), as_dict(theirs(**batch))):
        ((out["last_hidden_state"][keep] @ w).square().mean() + out["pooler_output"].sum()).backward()
    for name, m in adapted_modules(ours):
        p = theirs.base_model.model.get_submodule(name)
        pairs = [(m.lora_A, p.lora_A["default"].weight), (m.lora_B, p.lora_B["default"].weight)]
        if variant == "dora":
            pairs.append((m.magnitude, p.lora_magnitude_vector["default"].weight))
        for mine, ref in pairs:
            assert mine.grad is not None and mine.grad.abs().sum() > 0, name
            torch.testing.assert_close(mine.grad, ref.grad, atol=1e-5, rtol=1e-4)
        assert m.weight.grad is None and m.bias.grad is None  # the base stays frozen


def test_dora_weight_norm_is_a_constant_in_backward():
    """Liu et al. 2024, §4.3: the gradient of B differs from the one through a non-detached norm."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), r=2, alpha=4, variant="dora")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    layer(x).square().sum().backward()
    B = layer.lora_B.detach().clone().requires_grad_()
    w = layer.weight + layer.scaling * (B @ layer.lora_A.detach())
    y = torch.nn.functional.linear(x, (layer.magnitude.detach() / w.norm(dim=1))[:, None] * w, layer.bias)
    y.square().sum().backward()
    assert not torch.allclose(layer.lora_B.grad, B.grad, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_B_gives_exactly_the_base_output(variant):
    _, base = base_models()
    _, adapted = base_models()
    apply_lora(adapted, r=R, alpha=ALPHA, targets=QKVD, variant=variant)
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        a, b = adapted(**batch), base(**batch)
    assert torch.equal(a["last_hidden_state"], b["last_hidden_state"])
    assert torch.equal(a["pooler_output"], b["pooler_output"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_keeps_outputs_and_base_keys_and_matches_peft(variant):
    theirs, ours = adapted_pair(variant, QKVD)
    base_keys = list(base_models()[1].state_dict())
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        before = ours(**batch)
        merge_lora(ours)
        after = ours(**batch)
    assert max_diff(before, after, batch["attention_mask"]) < 1e-5
    assert list(ours.state_dict()) == base_keys
    assert not adapted_modules(ours) and not lora_state_dict(ours)
    assert type(ours.encoder.layer[0].attention.self.query) is torch.nn.Linear
    merged = theirs.merge_and_unload().state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, merged[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", [QV, QKVD], ids=["qv", "qkvd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_keys_modes_and_parameter_counts(variant, targets):
    _, model = base_models()
    base = model.state_dict()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    total = sum(v.numel() for v in base.values())
    adapted_base = sum(i * o + o for i, o in SHAPES[targets])  # frozen W₀ and b of the adapted Linears
    adapters = sum(R * (i + o) + (o if variant == "dora" else 0) for i, o in SHAPES[targets])
    assert apply_lora(model, r=R, alpha=ALPHA, targets=targets, variant=variant) is model
    assert len(adapted_modules(model)) == len(SHAPES[targets])
    assert count_parameters(model) == (total - adapted_base + adapters, total + adapters)  # after apply: fm
    added = set(model.state_dict()) - set(base)
    assert set(base) <= set(model.state_dict())
    assert added == set(lora_state_dict(model))
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude") for k in added)
    for name, m in adapted_modules(model):
        assert m.weight is linears[name].weight and m.bias is linears[name].bias  # swapped in place, no copy
        assert torch.equal(m.weight, base[f"{name}.weight"]) and not m.weight.requires_grad
        assert m.lora_A.shape == (R, m.in_features) and m.lora_B.shape == (m.out_features, R)
    mark_trainable(model, "lll")
    assert count_parameters(model) == (adapters, total + adapters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == added
    mark_trainable(model, "fm")
    assert count_parameters(model) == (total - adapted_base + adapters, total + adapters)


def test_lll_leaves_a_task_head_outside_the_encoder_trainable():
    _, bert = base_models()
    head = torch.nn.Linear(H, 3)
    LoRAConfig(r=R, alpha=ALPHA, mode="lll").apply(bert)
    assert all(p.requires_grad for p in head.parameters())
    assert count_parameters(bert)[0] == R * 2 * H * 2 * L


def test_adapter_state_dict_round_trip_through_config(tmp_path):
    _, ours = adapted_pair("dora", QV)
    cfg = LoRAConfig(r=R, alpha=ALPHA, targets=QV, variant="dora", mode="fm")
    (tmp_path / "config.json").write_text(json.dumps({**ours.config.to_dict(), "lora": cfg.to_dict()}))
    save_file(lora_state_dict(ours), tmp_path / "adapter.safetensors")
    restored_cfg = LoRAConfig.from_dict(json.loads((tmp_path / "config.json").read_text())["lora"])
    assert restored_cfg == cfg
    _, fresh = base_models()
    restored_cfg.apply(fresh)
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "adapter.safetensors"), strict=False)
    assert not unexpected and set(missing) == set(base_models()[1].state_dict())
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert max_diff(fresh(**batch), ours(**batch), batch["attention_mask"]) == 0


def test_dropout_matches_peft_in_training():
    """With active dropout PEFT's DoRA rescales only W₀·dropout(x); same seed, same masks, same output."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    theirs = peft.get_peft_model(torch.nn.Sequential(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["0"], lora_dropout=0.5, use_dora=True)).train()
    ours = LoRALinear(torch.nn.Linear(8, 6), r=2, alpha=4, variant="dora", dropout=0.5).train()
    p = theirs.base_model.model[0]
    with torch.no_grad():
        ours.weight.copy_(base.weight), ours.bias.copy_(base.bias)
        p.lora_B["default"].weight.normal_()
        for src, dst in ((p.lora_A["default"].weight, ours.lora_A), (p.lora_B["default"].weight, ours.lora_B),
                         (p.lora_magnitude_vector["default"].weight, ours.magnitude)):
            dst.copy_(src)
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    ref = theirs(x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x), ref, atol=1e-6, rtol=0)


def test_no_matching_target_raises_with_the_available_names():
    _, model = base_models()
    with pytest.raises(ValueError, match=r"no nn.Linear or nn.Embedding matches targets \['attn'\].*'dense'.*'query'"):
        apply_lora(model, targets=("attn",))
    with pytest.raises(ValueError, match="variant"):
        apply_lora(model, variant="lokr")
    with pytest.raises(ValueError, match="mode"):
        LoRAConfig(mode="all")



@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_word_embeddings_adapter_matches_peft_and_merges(variant):
    """LoRA on the word embeddings (CS224N projects 000 and 002) as PEFT's Embedding layer: lora_A (r, V) from 0,
    lora_B (H, r); outputs, trainable counts and the merged table agree."""
    hf, ours = base_models()
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["word_embeddings",
                                                                                              "query"],
                                                     use_rslora=variant == "rslora")).eval()
    apply_lora(ours, r=R, alpha=ALPHA, targets=("word_embeddings", "query"), variant=variant)
    mark_trainable(ours, "lll")
    embedding = ours.embeddings.word_embeddings
    assert isinstance(embedding, LoRAEmbedding) and torch.equal(embedding.lora_A, torch.zeros(R, TINY["vocab_size"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, (LoRALinear, LoRAEmbedding)):
                p = theirs.base_model.model.get_submodule(name)
                a, b = (p.lora_embedding_A["default"], p.lora_embedding_B["default"]) \
                    if isinstance(m, LoRAEmbedding) else (p.lora_A["default"].weight, p.lora_B["default"].weight)
                for src, dst in ((a, m.lora_A), (b, m.lora_B)):
                    src.copy_(0.05 * torch.randn(src.shape, generator=g))
                    dst.copy_(src)
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        a, b = ours(**batch), as_dict(theirs(**batch))
        with theirs.disable_adapter():
            base = as_dict(theirs(**batch))
    assert max_diff(a, base, batch["attention_mask"]) > 1e-2
    assert max_diff(a, b, batch["attention_mask"]) < 1e-5
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    assert {"embeddings.word_embeddings.weight", "embeddings.word_embeddings.lora_A",
            "embeddings.word_embeddings.lora_B"} <= set(ours.state_dict())
    merged = merge_lora(ours)
    assert type(merged.embeddings.word_embeddings) is torch.nn.Embedding
    with torch.no_grad():
        assert max_diff(merged(**batch), a, batch["attention_mask"]) < 1e-5
    with pytest.raises(ValueError, match="DoRA adapts nn.Linear layers only"):
        apply_lora(base_models()[1], r=R, targets=("word_embeddings",), variant="dora")
