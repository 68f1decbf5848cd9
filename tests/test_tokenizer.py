"""Tokenizer ids against transformers.BertTokenizerFast on awkward text, from tokenizer.json and from vocab.txt."""
import json
import shutil

import pytest
import torch
import transformers

import minbert

AWKWARD = ["Héllo Wörld, naïve café!", "中文字符 and 日本語のテキスト", "emoji 🤖🎉 ok", "", "   ",
           "UPPER lower MiXeD", "don't stop-believing...", "word " * 700, "a\tb\nc\u200bd", "İstanbul ǅ ﬁ"]
PAIRS = ["short", "", "another sentence that is rather long " * 20, "x", "é", "中", "🎉", "b", "q", "z"]


def assert_same(ours: dict, theirs: dict):
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours[key].dtype == torch.long
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("max_length", [512, 24])
def test_tokenizer_json_matches_bert_tokenizer_fast(minilm_dir, max_length):
    ours = minbert.Tokenizer.from_pretrained("minilm")
    theirs = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    kw = dict(padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    assert_same(ours(AWKWARD, max_length=max_length), theirs(AWKWARD, **kw))
    assert_same(ours(AWKWARD, PAIRS, max_length=max_length), theirs(AWKWARD, PAIRS, **kw))


@pytest.mark.parametrize("lower", [True, False])
def test_vocab_txt_only_respects_do_lower_case(tmp_path, minilm_dir, lower):
    shutil.copy(minilm_dir / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    ours = minbert.Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    kw = dict(padding=True, truncation=True, max_length=40, return_tensors="pt")
    assert_same(ours(AWKWARD, max_length=40), theirs(AWKWARD, **kw))
    assert_same(ours(AWKWARD, PAIRS, max_length=40), theirs(AWKWARD, PAIRS, **kw))
    assert (ours(["HELLO"])["input_ids"][0, 1].item() == ours(["hello"])["input_ids"][0, 1].item()) == lower


def test_padding_is_to_the_longest_item_and_pairs_are_cls_a_sep_b_sep():
    tok = minbert.Tokenizer.from_pretrained("minilm")
    batch = tok(["a b", "a"], ["c", "d e f"], max_length=512)
    assert batch["input_ids"].shape == (2, 7)  # [CLS] a [SEP] d e f [SEP]
    ids = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert ids[:6] == ["[CLS]", "a", "b", "[SEP]", "c", "[SEP]"]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1, 1, 1]
    truncated = tok(["w " * 50], ["v " * 10], max_length=16)  # longest side is cut first
    tokens = tok.convert_ids_to_tokens(truncated["input_ids"][0].tolist())
    assert len(tokens) == 16 and tokens.count("v") == 6 and tokens.count("w") == 7


def test_tokenizer_json_is_overridden_by_do_lower_case(tmp_path, minilm_dir):
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    tok = minbert.Tokenizer.from_pretrained(tmp_path)
    assert tok(["HELLO"])["input_ids"][0, 1] != tok(["hello"])["input_ids"][0, 1]
