"""BertModel against transformers.BertModel (test-only oracle) on tiny random configs and the embedded MiniLM."""
import json

import pytest
import torch
import transformers

import minbert
from conftest import TINY, random_batch


def hf_config(**overrides) -> transformers.BertConfig:
    return transformers.BertConfig(**{**TINY, **overrides})


def assert_close_on_tokens(ours: dict, theirs, mask: torch.Tensor, atol: float = 1e-5) -> float:
    """Hidden states compared on unmasked positions, pooler everywhere; returns the largest difference."""
    keep = mask.bool()
    d_hidden = (ours["last_hidden_state"] - theirs.last_hidden_state)[keep].abs().max().item()
    d_pool = (ours["pooler_output"] - theirs.pooler_output)[keep[:, 0]].abs().max().item()
    assert d_hidden < atol and d_pool < atol, (d_hidden, d_pool)
    return max(d_hidden, d_pool)


def test_config_defaults_are_bert_base_and_unknown_keys_are_ignored(tmp_path):
    c = minbert.BertConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == \
        (30522, 768, 12, 12, 3072)
    assert (c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps, c.hidden_dropout_prob) == \
        (512, 2, 1e-12, 0.1)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                      "architectures": ["BertModel"], "use_cache": True}))
    c = minbert.BertConfig.from_json_file(tmp_path / "config.json")
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (64, 4, 12)


def test_parameter_paths_match_hugging_face(tiny_config):
    ours = minbert.BertModel(tiny_config).state_dict()
    theirs = transformers.BertModel(hf_config()).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.endswith(("position_ids", "token_type_ids"))}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_matches_transformers_on_random_weights(implementation, hidden_act):
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_config(hidden_act=hidden_act, layer_norm_eps=1e-7)).eval()
    ours = minbert.BertModel(minbert.BertConfig(**{**TINY, "hidden_act": hidden_act, "layer_norm_eps": 1e-7,
                                                    "attn_implementation": implementation})).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert_close_on_tokens(ours(**batch), hf(**batch), batch["attention_mask"])
        # no mask and no token types: the defaults
        assert_close_on_tokens(ours(batch["input_ids"]), hf(batch["input_ids"]),
                               torch.ones_like(batch["input_ids"]))


def test_reference_and_sdpa_attention_agree_with_masks_and_dropout_off(tiny_config):
    torch.manual_seed(1)
    eager = minbert.BertModel(minbert.BertConfig(**{**TINY, "attn_implementation": "eager"})).eval()
    sdpa = minbert.BertModel(minbert.BertConfig(**{**TINY, "attn_implementation": "sdpa"})).eval()
    sdpa.load_state_dict(eager.state_dict())
    batch = random_batch(TINY["vocab_size"], B=3, T=17)
    with torch.no_grad():
        a, b = eager(**batch), sdpa(**batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(a["last_hidden_state"][keep], b["last_hidden_state"][keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(a["pooler_output"], b["pooler_output"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_padded_rows_are_finite_under_autocast(implementation, dtype):
    model = minbert.BertModel(minbert.BertConfig(**{**TINY, "attn_implementation": implementation})).eval()
    batch = random_batch(TINY["vocab_size"])
    batch["attention_mask"][1] = 0  # a row with nothing to attend to
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(**batch)
    assert torch.isfinite(out["last_hidden_state"]).all() and torch.isfinite(out["pooler_output"]).all()


def test_masked_positions_do_not_change_unmasked_outputs(tiny_config):
    model = minbert.BertModel(tiny_config).eval()
    batch = random_batch(TINY["vocab_size"])
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][batch["attention_mask"] == 0] = 7  # change only padding tokens
    with torch.no_grad():
        a, b = model(**batch)["last_hidden_state"], model(**other)["last_hidden_state"]
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(a[keep], b[keep])


def test_masked_lm_head_matches_transformers(tmp_path):
    torch.manual_seed(2)
    hf = transformers.BertForPreTraining(hf_config()).eval()  # bert.* + cls.predictions.* + cls.seq_relationship.*
    hf.save_pretrained(tmp_path)
    ours = minbert.BertForMaskedLM.from_pretrained(tmp_path)
    ref = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        logits, ref_logits = ours(**batch), ref(**batch).logits
    keep = batch["attention_mask"].bool()
    assert (logits - ref_logits)[keep].abs().max() < 1e-5
    assert ours.cls.predictions.bias.data_ptr() != ours.bert.embeddings.word_embeddings.weight.data_ptr()
    # the decoder is tied: a change to the word embeddings moves the logits
    with torch.no_grad():
        ours.bert.embeddings.word_embeddings.weight[5] += 1.0
        assert not torch.allclose(ours(**batch), logits)


def test_minilm_matches_transformers_and_sentence_embeddings(minilm_dir):
    model = minbert.BertModel.from_pretrained("minilm")
    tok = minbert.Tokenizer.from_pretrained("minilm")
    hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    texts = ["A man is playing a guitar.", "The movie was a total waste of two hours , sadly .", "Hi"]
    batch = tok(texts)
    hf_batch = hf_tok(texts, padding=True, truncation=True, return_tensors="pt")
    for key in batch:
        assert torch.equal(batch[key], hf_batch[key])
    with torch.no_grad():
        out, ref = model(**batch), hf(**hf_batch)
    assert_close_on_tokens(out, ref, batch["attention_mask"])
    m = batch["attention_mask"].unsqueeze(-1).float()
    ours = (out["last_hidden_state"] * m).sum(1) / m.sum(1)
    theirs = (ref.last_hidden_state * m).sum(1) / m.sum(1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # all-MiniLM-L6-v2 is a sentence-embedding model: paraphrases are closer than unrelated text
    cos = torch.nn.functional.cosine_similarity
    e = torch.nn.functional.normalize(ours, dim=-1)
    e2 = model(**tok(["Someone plays the guitar."]))["last_hidden_state"].mean(1)
    assert cos(e2, e[0:1]) > cos(e2, e[1:2])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_unpadded_path_equals_the_padded_path_with_gradients(implementation):
    torch.manual_seed(4)
    configs = [minbert.BertConfig(**{**TINY, "attn_implementation": implementation, "unpad": u}) for u in (True, False)]
    fast, padded = minbert.BertModel(configs[0]), minbert.BertModel(configs[1])
    padded.load_state_dict(fast.state_dict())
    batch = random_batch(TINY["vocab_size"], B=3, T=13)
    keep = batch["attention_mask"].bool()
    outs = []
    for model in (fast, padded):
        out = model(**batch)
        (out["last_hidden_state"][keep].pow(2).sum() + out["pooler_output"].sum()).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0]["last_hidden_state"][keep], outs[1]["last_hidden_state"][keep])
    assert torch.all(outs[0]["last_hidden_state"][~keep] == 0)  # padding positions are skipped, left at 0
    for (name, p), q in zip(fast.named_parameters(), padded.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
