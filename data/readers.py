"""Readers for the CS224N tab-separated task files (SST, CFIMDB, Quora, STS)."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A problem with a data file; the message is one line naming file, line, problem and fix."""


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task: its columns and label type (num_classes=None means a score in [0, max_score])."""

    task: str
    file_pattern: str  # e.g. "ids-sst-{split}.csv"
    text_columns: tuple[str, ...]
    label_column: str
    num_classes: int | None
    max_score: float = 5.0

    @property
    def is_regression(self) -> bool:
        return self.num_classes is None

    def parse_label(self, raw: str) -> int | float:
        """Parse and range-check one label; raises ValueError with a short reason."""
        if not raw.strip():
            raise ValueError(f"empty label in column '{self.label_column}'")
        expected = (f"a number in [0, {self.max_score:g}]" if self.is_regression
                    else f"an integer 0-{self.num_classes - 1}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"unparsable label {raw!r} in column '{self.label_column}' "
                             f"(expected {expected})") from None
        ok = (0.0 <= value <= self.max_score if self.is_regression
              else value.is_integer() and 0 <= value < self.num_classes)
        if not ok:
            raise ValueError(f"label {raw!r} out of range in column '{self.label_column}' "
                             f"(expected {expected})")
        return value if self.is_regression else int(value)


SST = TaskSpec("sst", "ids-sst-{split}.csv", ("sentence",), "sentiment", 5)
CFIMDB = TaskSpec("cfimdb", "ids-cfimdb-{split}.csv", ("sentence",), "sentiment", 2)
QUORA = TaskSpec("para", "quora-{split}.csv", ("sentence1", "sentence2"), "is_duplicate", 2)
STS = TaskSpec("sts", "sts-{split}.csv", ("sentence1", "sentence2"), "similarity", None)
SPECS = {spec.task: spec for spec in (SST, CFIMDB, QUORA, STS)}


@dataclass
class TaskDataset:
    """All usable rows of one file; `pairs` holds second sentences, `skipped` the messages of dropped rows."""

    spec: TaskSpec
    path: Path
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list[int | float] | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.spec.task

    def __len__(self) -> int:
        return len(self.ids)


def _decoded_lines(path: Path):
    """Yield the file's lines decoded one by one, so a bad byte is reported with its line number."""
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path.name} line {number}: byte 0x{raw[err.start]:02x} at column {err.start + 1} "
                            f"is not valid UTF-8 (re-save the file as UTF-8)") from None


def read_task(path: str | Path, spec: TaskSpec | str, labeled: bool = True, strict: bool = False) -> TaskDataset:
    """Read one task file; broken rows are skipped and recorded, or raise DataError if `strict`."""
    spec = SPECS[spec] if isinstance(spec, str) else spec
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: file not found (looked for {path.resolve()}; "
                        f"pass --data_dir pointing at the folder holding the task files)")
    reader = csv.DictReader(_decoded_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    found = reader.fieldnames or []
    wanted = ["id", *spec.text_columns] + ([spec.label_column] if labeled else [])
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"{path.name} line 1: missing column(s) {', '.join(map(repr, missing))} "
                        f"(found {', '.join(map(repr, found))}; check the header or that this is a {spec.task} file)")
    data = TaskDataset(spec, path, pairs=[] if len(spec.text_columns) == 2 else None,
                       labels=[] if labeled else None)
    for row in reader:
        try:
            if not (row["id"] or "").strip():
                raise ValueError("empty id in column 'id'")
            texts = [(row[c] or "").strip() for c in spec.text_columns]
            for column, text in zip(spec.text_columns, texts):
                if not text:
                    raise ValueError(f"empty sentence in column '{column}'")
            label = spec.parse_label(row[spec.label_column] or "") if labeled else None
        except ValueError as err:
            message = f"{path.name} line {reader.line_num}: {err} (fix the row, or run without --strict to skip it)"
            if strict:
                raise DataError(message) from None
            data.skipped.append(message)
            continue
        data.ids.append(row["id"].strip())
        data.texts.append(texts[0])
        if data.pairs is not None:
            data.pairs.append(texts[1])
        if data.labels is not None:
            data.labels.append(label)
    return data


def split_path(data_dir: str | Path, task: str, split: str) -> Path:
    """The standard CS224N file of `split` ("train", "dev" or "test" = the unlabeled test-student file)."""
    return Path(data_dir) / SPECS[task].file_pattern.format(split="test-student" if split == "test" else split)


def load_split(data_dir: str | Path, task: str, split: str, strict: bool = False,
               path: str | Path | None = None) -> TaskDataset:
    """Read `split` of `task` from `path`, or from its standard name in data_dir; test files are unlabeled."""
    return read_task(path or split_path(data_dir, task, split), SPECS[task], labeled=split != "test", strict=strict)
