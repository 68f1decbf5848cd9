"""Tests for data/: readers on the real files and on broken tmp files, collate, bucketing, stream resume."""
import re
import shutil
from pathlib import Path

import pytest
import torch

import minbert.training.train as train
from minbert.data import (TASKS, DataError, TaskStream, batch_indices, collate, encode_dataset, eval_batches,
                          load_split, read_task)
from minbert.data.readers import FIELD_LIMIT
from test_train import exits, run_args

SST, QUORA, STS = TASKS["sst"], TASKS["para"], TASKS["sts"]

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")

# file -> (rows in README table, rows skipped by default)
README_ROWS = {
    "ids-sst-train.csv": (8544, 0), "ids-sst-dev.csv": (1101, 0), "ids-sst-test-student.csv": (2210, 0),
    "ids-cfimdb-train.csv": (1707, 0), "ids-cfimdb-dev.csv": (245, 0), "ids-cfimdb-test-student.csv": (488, 0),
    "quora-train.csv": (22646, 2), "quora-dev.csv": (20214, 2),
    "sts-train.csv": (6040, 0), "sts-dev.csv": (863, 0), "sts-test-student.csv": (1725, 0),
}


class FakeTok:
    """Whitespace tokenizer with the minbert tokenizer API: [CLS]=1, [SEP]=2, pad=0."""

    pad_token_id = 0

    def __init__(self):
        self.vocab = {}

    def _ids(self, text):
        return [self.vocab.setdefault(w, len(self.vocab) + 3) for w in text.split()]

    def encode(self, texts, pair_texts=None, max_length=512):
        all_ids, all_types = [], []
        for k, text in enumerate(texts):
            ids = [1, *self._ids(text), 2]
            types = [0] * len(ids)
            if pair_texts is not None:
                second = [*self._ids(pair_texts[k]), 2]
                ids, types = ids + second, types + [1] * len(second)
            all_ids.append(ids[:max_length])
            all_types.append(types[:max_length])
        return all_ids, all_types

    def pad(self, input_ids, token_type_ids):
        width = max(map(len, input_ids))

        def fill(rows):
            return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        return {"input_ids": fill(input_ids), "attention_mask": fill([[1] * len(r) for r in input_ids]),
                "token_type_ids": fill(token_type_ids)}


def write(tmp_path, text, name="f.csv", raw=None):
    path = tmp_path / name
    path.write_bytes(raw if raw is not None else text.encode())
    return path


# ---------------------------------------------------------------- real files

@needs_data
@pytest.mark.parametrize("name", sorted(README_ROWS))
def test_real_row_counts(name):
    rows, skipped = README_ROWS[name]
    task = name.split("-")[1] if name.startswith("ids-") else name.split("-")[0].replace("quora", "para")
    data = read_task(DATA / name, task, labeled="test-student" not in name)
    assert len(data) + len(data.skipped) == rows
    assert len(data.skipped) == skipped
    assert all(t == t.strip() and t for t in data.texts + (data.pairs or []))
    assert (data.pairs is not None) == (task in ("para", "sts"))
    if data.labels is not None:
        assert len(data.labels) == len(data)


@needs_data
def test_real_quora_dev_broken_rows():
    data = load_split(DATA, "para", "dev")
    assert len(data) == 20212 and set(data.labels) == {0, 1}
    assert [m.split(":")[0] for m in data.skipped] == ["quora-dev.csv line 2577", "quora-dev.csv line 14222"]
    with pytest.raises(DataError, match=r"^quora-dev\.csv line 2577: empty label in column 'is_duplicate'"):
        load_split(DATA, "para", "dev", strict=True)


@needs_data
def test_real_labels_and_stripping():
    sst, sts = load_split(DATA, "sst", "train"), load_split(DATA, "sts", "dev")
    assert set(sst.labels) == set(range(5)) and not sst.texts[0].startswith(" ")
    assert all(isinstance(v, float) and 0 <= v <= 5 for v in sts.labels)
    test = load_split(DATA, "sst", "test")
    assert test.labels is None and test.ids[0] == "b7573736a6ddf7be102b7fee0"


# ---------------------------------------------------------------- errors on written files

SST_HEAD = "\tid\tsentence\tsentiment\n"
STS_HEAD = "\tid\tsentence1\tsentence2\tsimilarity\n"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        read_task(tmp_path / "nope.csv", SST)
    assert str(tmp_path / "nope.csv") in str(err.value) and "--data_dir" in str(err.value)


def test_missing_column(tmp_path):
    path = write(tmp_path, "\tid\ttext\tsentiment\n0\ta\thello\t1\n")
    with pytest.raises(DataError, match=r"f\.csv line 1: missing column\(s\) 'sentence' \(found '', 'id', 'text'"):
        read_task(path, SST)


@pytest.mark.parametrize("spec,text,problem", [
    (SST, SST_HEAD + "0\ta\tgood\t3\n1\tb\tbad\tx\n", "line 3: unparsable label 'x' in column 'sentiment'"),
    (SST, SST_HEAD + "0\ta\tgood\t7\n", "line 2: label '7' out of range in column 'sentiment'"),
    (SST, SST_HEAD + "0\ta\tgood\t2.5\n", "line 2: label '2.5' out of range"),
    (STS, STS_HEAD + "0\ta\tx\ty\t5.5\n", "line 2: label '5.5' out of range in column 'similarity'"),
    (QUORA, "\tid\tsentence1\tsentence2\tis_duplicate\n0\ta\tx\ty\t2.0\n", "line 2: label '2.0' out of range"),
    (SST, SST_HEAD + "0\ta\tok\t1\n1\tb\t   \t1\n", "line 3: empty sentence in column 'sentence'"),
    (STS, STS_HEAD + "0\ta\tx\t\t1.0\n", "line 2: empty sentence in column 'sentence2'"),
    (SST, SST_HEAD + "0\ta\tgood\t3\n1\tb\tbad\t2\textra\tcells\n",
     "line 3: 2 more field(s) than the header's 4 (a stray tab?)"),
])
def test_bad_rows_skipped_or_strict(tmp_path, spec, text, problem):
    path = write(tmp_path, text)
    data = read_task(path, spec)
    assert len(data.skipped) == 1 and f"f.csv {problem}" in data.skipped[0]
    assert len(data) == text.count("\n") - 2
    with pytest.raises(DataError, match=re.escape("f.csv " + problem)):
        read_task(path, spec, strict=True)


@pytest.mark.parametrize("split", ["dev", "test"])
def test_duplicate_ids_in_dev_and_test_files_stop_with_both_lines(tmp_path, split):
    head = SST_HEAD if split == "dev" else "0\t\tid\tsentence\n"
    rows = ["0\ta\tgood\t3", "1\tb\tbad\t1", "2\ta\tfine\t2"] if split == "dev" else \
        ["1\t0.0\ta\tgood", "2\t1.0\tb\tbad", "3\t2.0\ta\tfine"]
    write(tmp_path, head + "\n".join(rows) + "\n", f"ids-sst-{split if split == 'dev' else 'test-student'}.csv")
    with pytest.raises(DataError, match=r"line 4: id 'a' already used on line 2 \(predictions are keyed by id"):
        load_split(tmp_path, "sst", split)
    write(tmp_path, SST_HEAD + "\n".join(["0\ta\tgood\t3", "1\ta\tbad\t1"]) + "\n", "ids-sst-train.csv")
    assert load_split(tmp_path, "sst", "train").ids == ["a", "a"]  # training rows are not keyed by id


@pytest.mark.parametrize("text, reason", [
    (SST_HEAD, "it is empty"),
    (SST_HEAD + "0\ta\tgood\tx\n1\tb\t \t2\n", "all 2 rows are broken, e.g. ids-sst-dev.csv line 2: unparsable"),
])
def test_a_file_without_usable_rows_stops_naming_it(tmp_path, text, reason):
    write(tmp_path, text, "ids-sst-dev.csv")
    with pytest.raises(DataError, match=rf"^ids-sst-dev\.csv: no usable sst dev rows \({reason}"):
        load_split(tmp_path, "sst", "dev")


def test_skipped_rows_are_reported(tmp_path):
    write(tmp_path, SST_HEAD + "0\ta\tgood\tx\n1\tb\tbad\t2\n", "ids-sst-train.csv")
    reports = []
    assert load_split(tmp_path, "sst", "train", report=reports.append).ids == ["b"]
    assert reports == ["ids-sst-train.csv: skipped 1 broken row(s): ids-sst-train.csv line 2: unparsable label 'x' "
                       "in column 'sentiment' (expected an integer 0-4) (fix the row, or run without --strict to "
                       "skip it)"]


def test_non_utf8_reports_line(tmp_path):
    raw = (SST_HEAD + "0\ta\tgood\t1\n1\tb\tna\xefve\t1\n").encode("latin-1")
    with pytest.raises(DataError, match=r"^f\.csv line 3: byte 0xef .*not valid UTF-8"):
        read_task(write(tmp_path, "", raw=raw), SST)


def test_a_folder_for_a_file_says_so(tmp_path):
    (tmp_path / "ids-sst-dev.csv").mkdir()
    with pytest.raises(DataError, match=rf"^ids-sst-dev\.csv: {tmp_path / 'ids-sst-dev.csv'} is a folder, not a data "
                                        r"file \(pass the file, or the folder holding the task files as --data_dir\)"):
        load_split(tmp_path, "sst", "dev")


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux's /proc/self/mem, a file read() refuses")
def test_an_unreadable_file_is_a_one_line_error():
    with pytest.raises(DataError, match=r"^mem: cannot read /proc/\d+/mem \(Input/output error\); check its"):
        read_task("/proc/self/mem", SST)


def test_fields_over_the_csv_modules_default_limit_are_read(tmp_path):
    review = "word " * 40_000  # 200,000 characters: over csv's default limit of 131,072
    path = write(tmp_path, SST_HEAD + f"0\ta\t{review}\t1\n1\tb\tshort\t2\n", "ids-sst-dev.csv")
    data = load_split(tmp_path, "sst", "dev", path=path)
    assert data.ids == ["a", "b"] and data.texts[0] == review.strip() and not data.skipped


def test_a_field_over_the_limit_is_a_broken_row_with_its_line(tmp_path):
    rows = ["0\ta\tgood\t1", f"1\tb\t{'x' * (FIELD_LIMIT + 1)}\t2", "2\tc\tfine\t3", "3\ta\tagain\t4"]
    write(tmp_path, SST_HEAD + "\n".join(rows) + "\n", "ids-sst-train.csv")
    problem = f"ids-sst-train.csv line 3: field larger than field limit ({FIELD_LIMIT}); are lines run together? " \
              "check the line breaks (fix the row, or run without --strict to skip it)"
    data = load_split(tmp_path, "sst", "train")
    assert data.ids == ["a", "c", "a"] and data.skipped == [problem]  # the rows after it are read, lines counted
    with pytest.raises(DataError, match=re.escape(problem)):
        load_split(tmp_path, "sst", "train", strict=True)
    write(tmp_path, SST_HEAD + "\n".join(rows[:1] + rows[2:]) + "\n", "ids-sst-dev.csv")  # dev ids are unique
    with pytest.raises(DataError, match=r"^ids-sst-dev\.csv line 4: id 'a' already used on line 2"):
        load_split(tmp_path, "sst", "dev")
    write(tmp_path, "x" * (FIELD_LIMIT + 1) + SST_HEAD + "\n".join(rows) + "\n", "ids-sst-test-student.csv")
    with pytest.raises(DataError, match=rf"^ids-sst-test-student\.csv line 1 \(the header\): field larger than "
                                        rf"field limit \({FIELD_LIMIT}\); are lines run together\?"):
        load_split(tmp_path, "sst", "test")


def test_train_stops_on_a_folder_or_with_strict_a_field_over_the_limit(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                      capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    with open(data / "sts-dev.csv", "a") as f:
        f.write(f"99\tsdev99\t{'x' * (FIELD_LIMIT + 1)}\tc d\t1.0\n")
    exits(capsys, 1, rf"^error: sts-dev\.csv line 22: field larger than field limit \({FIELD_LIMIT}\); are lines "
                     r"run together\? check the line breaks \(fix the row", train.main,
          run_args(tiny_model_dir, data, tmp_path / "run", "--strict"))
    (data / "quora-train.csv").unlink()
    (data / "quora-train.csv").mkdir()
    exits(capsys, 1, rf"^error: quora-train\.csv: {data / 'quora-train.csv'} is a folder, not a data file", train.main,
          run_args(tiny_model_dir, data, tmp_path / "run"))


def test_stray_quotes_kept_and_unlabeled(tmp_path):
    text = "0\t\tid\tsentence\n1\t0.0\ta\t ``it 's \"great\n2\t1.0\tb\t'' odd\n"
    data = read_task(write(tmp_path, text), SST, labeled=False)
    assert data.texts == ["``it 's \"great", "'' odd"] and data.ids == ["a", "b"] and data.labels is None


# ---------------------------------------------------------------- batching

def toy(tmp_path):
    text = STS_HEAD + "0\ta\tone two three\tfour\t1.5\n1\tb\tfive\tsix seven eight nine\t4.0\n"
    return read_task(write(tmp_path, text), STS)


def test_collate_cross(tmp_path):
    enc = encode_dataset(toy(tmp_path), FakeTok(), pair_encoding="cross")
    batch = collate(enc, [1, 0])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "ids"}
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [8, 7] and batch["input_ids"][1, -1] == 0
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert batch["labels"].dtype == torch.float and batch["labels"].tolist() == [4.0, 1.5]
    assert batch["ids"] == ["b", "a"]
    assert collate(enc, [0])["input_ids"].shape == (1, 7)  # padded to the batch, not the dataset


def test_collate_bi_and_classification(tmp_path):
    enc = encode_dataset(toy(tmp_path), FakeTok(), pair_encoding="bi")
    batch = collate(enc, [0, 1])
    assert set(batch) == {f"{k}_{s}" for k in ("input_ids", "attention_mask", "token_type_ids") for s in (1, 2)} | {
        "labels", "ids"}
    assert batch["input_ids_1"].shape == (2, 5) and batch["input_ids_2"].shape == (2, 6)
    assert batch["token_type_ids_2"].sum() == 0
    sst = read_task(write(tmp_path, SST_HEAD + "0\ta\tgood\t4\n", "s.csv"), SST)
    assert collate(encode_dataset(sst, FakeTok(), pair_encoding="bi"), [0])["labels"].dtype == torch.long
    with pytest.raises(ValueError):
        encode_dataset(sst, FakeTok(), pair_encoding="siamese")


def padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@needs_data
def test_bucketing_reduces_padding_on_real_sst():
    enc = encode_dataset(load_split(DATA, "sst", "train"), FakeTok())
    plain = batch_indices(enc.lengths, 32, torch.Generator().manual_seed(0))
    sortish = batch_indices(enc.lengths, 32, torch.Generator().manual_seed(0), bucket=True)
    for batches in (plain, sortish):
        assert sorted(i for b in batches for i in b) == list(range(len(enc)))
    assert padding(enc.lengths, sortish) < 0.3 * padding(enc.lengths, plain)
    first_lengths = [enc.lengths[b[0]] for b in sortish[:20]]
    assert first_lengths != sorted(first_lengths)  # batch order stays random


def test_unshuffled_order_and_eval_batches(tmp_path):
    lengths = [3, 9, 1, 9, 5]
    assert batch_indices(lengths, 2, shuffle=False) == [[0, 1], [2, 3], [4]]
    assert batch_indices(lengths, 2, shuffle=False, bucket=True) == [[1, 3], [4, 0], [2]]
    enc = encode_dataset(toy(tmp_path), FakeTok())
    batches = list(eval_batches(enc, 1))
    assert [b["ids"] for b in batches] == [["b"], ["a"]]


def test_task_stream_resume_and_determinism(tmp_path):
    rows = "".join(f"{i}\tid{i}\t{'w ' * (i % 7 + 1)}\t{i % 5}\n" for i in range(23))
    enc = encode_dataset(read_task(write(tmp_path, SST_HEAD + rows), SST), FakeTok())
    stream = TaskStream(enc, batch_size=4, seed=3, bucket=True)
    assert stream.batches_per_pass == 6
    first_pass = [next(stream)["ids"] for _ in range(6)]
    assert sorted(i for b in first_pass for i in b) == sorted(enc.ids)
    for _ in range(2):  # into pass 1
        next(stream)
    state = stream.state_dict()
    assert state == {"pass": 1, "position": 2}
    expected = [next(stream) for _ in range(9)]  # crosses into pass 2
    resumed = TaskStream(enc, batch_size=4, seed=3, bucket=True)
    resumed.load_state_dict(state)
    for a, b in zip(expected, (next(resumed) for _ in range(9))):
        assert a["ids"] == b["ids"] and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
    fresh = TaskStream(enc, batch_size=4, seed=3, bucket=True)
    assert [next(fresh)["ids"] for _ in range(6)] == first_pass
    assert next(TaskStream(enc, 4, seed=4, bucket=True))["ids"] != first_pass[0]
