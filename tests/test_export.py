"""Export to transformers and sentence-transformers, checked with both as test-only oracles: the saved folder gives
minbert's outputs at the real tokens, its token ids and its sentence vectors; what cannot be expressed is refused."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import minbert
from conftest import TINY, random_batch
from minbert.heads import HeadConfig, MultitaskBert
from minbert.heads.export import export_sentence_transformer
from minbert.lora import VARIANTS, LoRAConfig, LoRALinear, apply_lora
from minbert.pals import PALsConfig
from test_model import assert_close_on_tokens
from test_tokenizer import AWKWARD, PAIRS, assert_same

TEXTS = ["the movie was very good", "A man plays the guitar.", "Héllo Wörld, naïve café!", "中文字符 and 日本語",
         "UPPER lower MiXeD", "don't stop-believing...", "it", ""]
SLOW_TOKENIZER = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)  # transformers 5 / 4


def perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B and a changed DoRA magnitude, so that the adapters really change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.add_(0.05 * torch.randn(m.lora_B.shape, generator=g))
                if m.variant == "dora":
                    m.magnitude.mul_(1 + 0.1 * torch.rand(m.magnitude.shape, generator=g))


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    """Same keys (adapters included) and bit-identical tensors as `before`."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("variant", [None, *VARIANTS])
def test_transformers_loads_the_saved_model_with_equal_outputs(tmp_path, tiny_model_dir, variant):
    ours = minbert.BertModel.from_pretrained(tiny_model_dir)
    if variant:  # "dense" also adapts the pooler
        apply_lora(ours, r=4, alpha=8, targets=("query", "value", "dense"), variant=variant)
        perturb_adapters(ours)
    before = snapshot(ours)
    ours.save_pretrained(tmp_path)
    assert_unchanged(ours, before)  # merged on the side: the caller's model keeps its adapters

    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("bert", ["BertModel"])
    assert "unpad" not in config and "attn_implementation" not in config
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == minbert.BertModel(ours.config).state_dict().keys()  # plain weight/bias, no lora_*
    theirs, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert_close_on_tokens(ours.eval()(**batch), theirs.eval()(**batch), batch["attention_mask"])
        assert_close_on_tokens(minbert.BertModel.from_pretrained(tmp_path)(**batch), theirs(**batch),
                               batch["attention_mask"])  # and minbert reads it back (train.py --model FOLDER)
        if variant:  # the merged weights are not the base weights
            base = minbert.BertModel.from_pretrained(tiny_model_dir)(**batch)["pooler_output"]
            assert (base - theirs(**batch).pooler_output).abs().max() > 1e-3


def test_minilm_saved_by_minbert_matches_transformers_on_real_text(tmp_path):
    ours, tok = minbert.BertModel.from_pretrained("minilm"), minbert.Tokenizer.from_pretrained("minilm")
    ours.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    theirs = transformers.BertModel.from_pretrained(tmp_path).eval()
    batch = tok(TEXTS)
    assert_same(batch, transformers.AutoTokenizer.from_pretrained(tmp_path)(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert_close_on_tokens(ours(**batch), theirs(**batch), batch["attention_mask"])


@pytest.mark.parametrize("lower", [True, False], ids=["uncased-tokenizer.json", "cased-vocab.txt"])
def test_saved_tokenizer_gives_the_same_ids_in_transformers(tmp_path, minilm_dir, lower):
    if lower:  # read from tokenizer.json
        ours = minbert.Tokenizer.from_pretrained(minilm_dir)
    else:  # built from vocab.txt, cased
        (tmp_path / "vocab.txt").write_text((minilm_dir / "vocab.txt").read_text(encoding="utf-8"), encoding="utf-8")
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
        ours = minbert.Tokenizer.from_pretrained(tmp_path)
    ours(AWKWARD, max_length=24)  # leaves truncation set on the backend; the saved file must not keep it
    saved = tmp_path / "saved"
    ours.save_pretrained(saved, model_max_length=512)
    assert json.loads((saved / "tokenizer.json").read_text())["truncation"] is None
    assert json.loads((saved / "tokenizer_config.json").read_text())["do_lower_case"] == lower
    for loader in (transformers.AutoTokenizer, transformers.BertTokenizerFast, SLOW_TOKENIZER, minbert.Tokenizer):
        theirs = loader.from_pretrained(saved)
        for max_length in (512, 24):
            kw = dict(padding=True, truncation=True, max_length=max_length, return_token_type_ids=True,
                      return_tensors="pt") if loader is not minbert.Tokenizer else dict(max_length=max_length)
            assert_same(ours(AWKWARD, max_length=max_length), theirs(AWKWARD, **kw))
            assert_same(ours(AWKWARD, PAIRS, max_length=max_length), theirs(AWKWARD, PAIRS, **kw))
    assert transformers.AutoTokenizer.from_pretrained(saved).model_max_length == 512


def sentence_vectors(model: MultitaskBert, texts: list[str]) -> torch.Tensor:
    """minbert's sentence vectors: the model's pooling of its encoder output, (B, D)."""
    batch = model.tokenizer(texts)
    with torch.no_grad():
        return model.pooling(model.bert(**batch), batch["attention_mask"])


def vectors_from_files(directory, texts: list[str]) -> torch.Tensor:
    """Sentence vectors built by hand from the exported files: transformers' tokenizer and BertModel, then each
    module modules.json lists after the Transformer (Pooling, Dense), as its config.json describes."""
    modules = json.loads((directory / "modules.json").read_text())
    assert (modules[0]["path"], modules[0]["type"]) == ("", "sentence_transformers.models.Transformer")
    max_length = json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"]
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    with torch.no_grad():
        x = transformers.BertModel.from_pretrained(directory).eval()(**batch).last_hidden_state  # (B, T, H)
    for module in modules[1:]:
        config = json.loads((directory / module["path"] / "config.json").read_text())
        if module["type"] == "sentence_transformers.models.Pooling":
            modes = [k for k, on in config.items() if k.startswith("pooling_mode_") and on]
            assert config["word_embedding_dimension"] == x.shape[-1] and len(modes) == 1, config
            x = {"pooling_mode_mean_tokens": lambda: (x * mask).sum(1) / mask.sum(1),
                 "pooling_mode_cls_token": lambda: x[:, 0]}[modes[0]]()  # (B, H)
        else:
            assert module["type"] == "sentence_transformers.models.Dense", module
            assert config == {"in_features": x.shape[-1], "out_features": x.shape[-1], "bias": True,
                              "activation_function": "torch.nn.modules.activation.Tanh"}
            w = load_file(directory / module["path"] / "model.safetensors")
            x = torch.tanh(F.linear(x, w["linear.weight"], w["linear.bias"]))
    return x


@pytest.fixture(scope="module", params=["tiny-mean", "tiny-cls", "tiny-pooler", "minilm-mean"])
def exported(request, tiny_model_dir, tmp_path_factory):
    """(model, its sentence vectors, folder): a MultitaskBert with non-trivial DoRA adapters (on the pooler too),
    exported."""
    source, pooling = request.param.split("-")
    lora = LoRAConfig(r=4, alpha=8, targets=("query", "value", "dense"), variant="dora")
    model = MultitaskBert.from_pretrained(tiny_model_dir if source == "tiny" else "minilm",
                                          HeadConfig(pooling=pooling), lora=lora).eval()
    perturb_adapters(model)
    vectors = sentence_vectors(model, TEXTS)
    before = snapshot(model)
    directory = export_sentence_transformer(model, tmp_path_factory.mktemp(request.param))
    assert_unchanged(model, before)
    return model, vectors, directory


def test_exported_files_give_minbert_sentence_vectors(exported):
    model, vectors, directory = exported
    assert json.loads((directory / "sentence_bert_config.json").read_text()) == \
        {"max_seq_length": min(model.bert.config.max_position_embeddings, 512), "do_lower_case": False}
    assert (directory / "2_Dense").exists() == (model.pooling.kind == "pooler")
    d = (vectors_from_files(directory, TEXTS) - vectors).abs().max().item()
    assert d < 1e-5, d
    assert torch.equal(sentence_vectors(model, TEXTS), vectors)  # the model still has its adapters


def test_sentence_transformers_gives_minbert_sentence_vectors(exported):
    st = pytest.importorskip("sentence_transformers")
    model, vectors, directory = exported
    st_model = st.SentenceTransformer(str(directory), device="cpu")
    expected = ["Transformer", "Pooling"] + (["Dense"] if model.pooling.kind == "pooler" else [])
    assert [type(m).__name__ for m in st_model] == expected
    assert st_model.max_seq_length == min(model.bert.config.max_position_embeddings, 512)
    d = (st_model.encode(TEXTS, convert_to_tensor=True) - vectors).abs().max().item()
    assert d < 1e-5, d


def test_max_seq_length_is_written_and_checked(tmp_path, tiny_model_dir):
    model = MultitaskBert.from_pretrained(tiny_model_dir, HeadConfig())
    export_sentence_transformer(model, tmp_path, max_seq_length=16)
    assert json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"] == 16
    with pytest.raises(ValueError, match=r"max_seq_length 65 is outside the encoder's 1\.\.64 positions"):
        export_sentence_transformer(model, tmp_path, max_seq_length=65)


def refused_model(case: str, tiny_model_dir) -> MultitaskBert:
    """A model whose sentence vectors cannot be exported: the BiLSTM baseline, cross pairs, PALs or concat pooling."""
    if case == "bilstm":
        return MultitaskBert.from_pretrained("bilstm")
    heads = {"cross": HeadConfig(pair_encoding="cross"), "concat": HeadConfig(pooling="concat")}.get(case, HeadConfig())
    return MultitaskBert.from_pretrained(tiny_model_dir, heads,
                                         pals=PALsConfig(kind="lowrank", dim=4) if case == "pals" else None)


@pytest.mark.parametrize("case, message", [
    ("bilstm", "the bilstm baseline is not a BERT encoder"),
    ("cross", "trained on cross-encoded pairs .* --pair_encoding bi"),
    ("pals", "PALs cannot be exported"),
    ("concat", "concat pooling has no sentence-transformers equivalent .* --pooling mean, cls or pooler"),
])
def test_what_cannot_be_expressed_is_refused_in_one_line(tmp_path, tiny_model_dir, case, message):
    model = refused_model(case, tiny_model_dir)
    with pytest.raises(ValueError, match=message) as refusal:
        export_sentence_transformer(model, tmp_path / "out")
    assert "\n" not in str(refusal.value) and str(tmp_path / "out") in str(refusal.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_evaluate_export_writes_a_folder_both_libraries_load(tmp_path, tiny_model_dir, capsys):
    """`python evaluate.py CKPT --export DIR` on a multi-task checkpoint whose encoder was fine-tuned (LoRA merged)."""
    import minbert.training.evaluate as evaluate
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(tiny_model_dir, HeadConfig(pooling="cls"),
                                          lora=LoRAConfig(r=4, alpha=8, variant="dora")).eval()
    perturb_adapters(model)
    model.save(tmp_path / "ckpt", {"step": 1})
    vectors = sentence_vectors(model, TEXTS)
    out = str(tmp_path / "out")
    assert evaluate.main([str(tmp_path / "ckpt"), "--export", out]) == {"export": out}
    assert "SentenceTransformer(" in capsys.readouterr().out
    theirs = transformers.BertModel.from_pretrained(tmp_path / "out").eval()
    batch = model.tokenizer(TEXTS)
    with torch.no_grad():
        hidden = theirs(**batch).last_hidden_state
    assert (hidden[:, 0] - vectors).abs().max().item() < 1e-5
    assert (vectors_from_files(tmp_path / "out", TEXTS) - vectors).abs().max().item() < 1e-5
    with pytest.raises(SystemExit) as info:
        evaluate.main([str(tmp_path / "ckpt"), str(tmp_path / "ckpt"), "--export", str(tmp_path / "x")])
    assert info.value.code == 2 and "--export takes one checkpoint" in capsys.readouterr().err


def test_export_writes_a_model_card_with_the_metrics_and_the_command(tiny_model_dir, tiny_data_dir, tmp_path):
    import minbert.training.evaluate as evaluate
    import minbert.training.train as train
    from test_train import run_args
    from minbert.training.config import parse_args
    run = tmp_path / "run"
    train.main(run_args(tiny_model_dir, tiny_data_dir, run, "--epochs", "1", "--pooling", "cls", "--no-bucket"))
    evaluate.main([str(run / "best"), "--export", str(tmp_path / "out")])
    card = (tmp_path / "out" / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: sentence-transformers" in front and f"base_model: {tiny_model_dir}" in front
    metrics = MultitaskBert.checkpoint_metadata(run / "best")
    assert f"| overall | {metrics['overall']:.4f} |" in body and f"step {metrics['step']}" in body
    command = body.split("```bash\n")[1].split("\n```")[0]
    assert command.startswith("python train.py ") and "--pooling cls" in command and "--no-bucket" in command
    trained = json.loads((run / "train_config.json").read_text())
    assert parse_args(command.split()[2:]).to_dict() == {  # the command gives the run's options back
        **trained, "run": {**trained["run"], "resume": False, "overwrite": False}}
    assert "SentenceTransformer(" in body
