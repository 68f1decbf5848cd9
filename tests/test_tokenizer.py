"""Tokenizer ids against transformers.BertTokenizerFast on awkward text, from tokenizer.json and from vocab.txt."""
import json
import re
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


# ---- damaged tokenizer files: one-line errors naming the file ---------------------------------------------------

def tokenizer_dir(tmp_path, minilm_dir, names=("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
    for name in names:
        shutil.copy(minilm_dir / name, tmp_path / name)
    return tmp_path


def truncate(path, n):
    path.write_bytes(path.read_bytes()[:n])


@pytest.mark.parametrize("names, damage, file, message", [
    (("tokenizer.json",), lambda d: truncate(d / "tokenizer.json", 1000), "tokenizer.json",
     r" is not a readable tokenizer file \(EOF while parsing .* at line 1 column 1000\); re-create or re-download it"),
    (("tokenizer.json",), lambda d: (d / "tokenizer.json").write_bytes(b'{"version": "1.0\xff"}'), "tokenizer.json",
     r" is not a readable tokenizer file \(stream did not contain valid UTF-8\)"),
    (("tokenizer.json",), lambda d: (d / "tokenizer_config.json").write_text('{"mask_token": "<mask>"}'),
     "tokenizer.json", r" has no '<mask>' token; the file is truncated or from another tokenizer"),
    (("vocab.txt",), lambda d: (d / "vocab.txt").write_text(""), "vocab.txt",
     r" has no '\[UNK\]', '\[CLS\]', '\[SEP\]', '\[PAD\]', '\[MASK\]' tokens; the file is truncated"),
    (("vocab.txt",), lambda d: (d / "vocab.txt").write_text((d / "vocab.txt").read_text().replace("[CLS]\n", "")),
     "vocab.txt", r" has no '\[CLS\]' token; "),
    (("vocab.txt",), lambda d: (d / "vocab.txt").write_bytes(b"[PAD]\n[UNK]\nna\xefve\n"), "vocab.txt",
     r" line 3: byte 0xef is not valid UTF-8; re-save it as UTF-8 or re-download it"),
    (("vocab.txt",), lambda d: (d / "tokenizer_config.json").write_text('{"do_lower_case": true,\n "cls_token"}'),
     "tokenizer_config.json", r" line 2 column 13: not valid JSON \(Expecting ':' delimiter\)"),
    (("vocab.txt",), lambda d: (d / "tokenizer_config.json").write_text('{"cls_token": 5}'),
     "tokenizer_config.json", r": cls_token must be str, got 5$"),
    (("tokenizer.json",), lambda d: (d / "tokenizer_config.json").write_text('{"do_lower_case": "yes"}'),
     "tokenizer_config.json", r": do_lower_case must be bool, got 'yes'$"),
], ids=["truncated-json", "json-not-utf8", "json-without-mask", "empty-vocab", "vocab-without-cls", "vocab-not-utf8",
        "config-not-json", "token-not-a-string", "option-not-a-bool"])
def test_damaged_tokenizer_files_are_one_line_errors_naming_the_file(tmp_path, minilm_dir, names, damage, file,
                                                                      message):
    damage(tokenizer_dir(tmp_path, minilm_dir, names))
    with pytest.raises(minbert.CheckpointError, match=re.escape(f"minbert: {tmp_path / file}") + message) as err:
        minbert.Tokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)


def test_special_tokens_may_be_added_token_objects(tmp_path, minilm_dir):
    tokenizer_dir(tmp_path, minilm_dir, ("vocab.txt",))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"cls_token": {"__type": "AddedToken", "content": "[CLS]"}, "pad_token": None}))
    tok = minbert.Tokenizer.from_pretrained(tmp_path)
    assert tok.convert_ids_to_tokens(tok("hi")["input_ids"][0].tolist()) == ["[CLS]", "hi", "[SEP]"]
    assert tok.pad_token_id == 0
