"""Readers for task files: the CS224N tab-separated files (SST, CFIMDB, Quora, STS) and any task a task file
defines; delimiter, columns and labels come from the task (data/tasks.py)."""
from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from minbert.errors import MinbertError

from .tasks import Task, get_task

# Characters a field may hold. The csv module's default, 131072, refuses long reviews; a field over 16 Mi characters
# is lines run together, a broken row. The limit is process-wide: importing this module raises it, never lowers it.
FIELD_LIMIT = 2**24
csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))


class DataError(MinbertError, ValueError):
    """A problem with a data file; the message is one line naming file, line, problem and fix."""


@dataclass
class TaskDataset:
    """All usable rows of one file; `pairs` holds second sentences, `skipped` the messages of dropped rows."""

    spec: Task
    path: Path
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list[int | float] | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.ids)


def _decoded_lines(path: Path, first_only: bool = False):
    """Yield the file's lines (or just its first) decoded one by one, so a bad byte is reported with its line
    number."""
    try:
        with path.open("rb") as f:
            content = f.readline() if first_only else f.read()
    except OSError as err:
        raise DataError(f"{path.name}: cannot read {path.resolve()} ({err.strerror}); check its permissions") from None
    for number, raw in enumerate(content.splitlines(keepends=True), start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path.name} line {number}: byte 0x{raw[err.start]:02x} at column {err.start + 1} "
                            f"is not valid UTF-8 (re-save the file as UTF-8)") from None


def _refused(err: csv.Error) -> str:
    """What a line the csv module refuses (a field over FIELD_LIMIT) means."""
    return f"{err}; are lines run together? check the line breaks"


def _rows(reader: csv.DictReader):
    """(line, row) for each row; a row the csv module refuses comes as (line, ValueError), and reading goes on with
    the next line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            row = ValueError(_refused(err))
        yield reader.reader.line_num, row  # the underlying reader's count: DictReader's misses a refused row


def open_task_file(path: str | Path, spec: Task, labeled: bool = True,
                   header_only: bool = False) -> tuple[csv.DictReader, list[str]]:
    """A reader of the task file's rows and its header, the task's columns checked; `header_only` reads just the
    first line (what a run checks of every file before it reads any data)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path.name}: {path.resolve()} is a folder, not a data file (pass the file, or the folder "
                        "holding the task files as --data_dir)")
    if not path.is_file():
        raise DataError(f"{path.name}: file not found (looked for {path.resolve()}; "
                        f"pass --data_dir pointing at the folder holding the task files)")
    quoting = csv.QUOTE_NONE if spec.delimiter == "\t" else csv.QUOTE_MINIMAL  # the CS224N files quote nothing
    reader = csv.DictReader(_decoded_lines(path, header_only), delimiter=spec.delimiter, quoting=quoting)
    try:
        found = reader.fieldnames or []
    except csv.Error as err:
        raise DataError(f"{path.name} line 1 (the header): {_refused(err)}") from None
    wanted = [spec.id_column, *spec.text_columns] + ([spec.label_column] if labeled else [])
    missing = [c for c in wanted if c not in found]
    if missing:
        close = {c: difflib.get_close_matches(c, found, n=1) for c in missing}
        hint = "; ".join(f"{c!r} is spelt {m[0]!r} in the file?" for c, m in close.items() if m)
        raise DataError(f"{path.name} line 1: missing column(s) {', '.join(map(repr, missing))} "
                        f"(found {', '.join(map(repr, found))}{'; ' + hint if hint else ''}; check the header, the "
                        f"task's columns, or that this is a {spec.name} file)")
    return reader, found


def read_task(path: str | Path, spec: Task | str, labeled: bool = True, strict: bool = False,
              unique_ids: bool = False) -> TaskDataset:
    """Read one task file; broken rows are skipped and recorded, or raise DataError if `strict`. With `unique_ids`
    (dev and test files, whose predictions are keyed by id) a repeated id is always an error."""
    spec = get_task(spec) if isinstance(spec, str) else spec
    path = Path(path)
    reader, found = open_task_file(path, spec, labeled)
    data = TaskDataset(spec, path, pairs=[] if spec.is_pair else None, labels=[] if labeled else None)
    first_line = {}  # id -> line of its first row
    for line, row in _rows(reader):
        try:
            if isinstance(row, ValueError):
                raise row
            if row.get(None):  # DictReader files the cells beyond the header's under None
                raise ValueError(f"{len(row[None])} more field(s) than the header's {len(found)} (a stray tab?)")
            if not (row[spec.id_column] or "").strip():
                raise ValueError(f"empty id in column '{spec.id_column}'")
            texts = [(row[c] or "").strip() for c in spec.text_columns]
            for column, text in zip(spec.text_columns, texts):
                if not text:
                    raise ValueError(f"empty sentence in column '{column}'")
            label = spec.parse_label(row[spec.label_column] or "") if labeled else None
        except ValueError as err:
            message = f"{path.name} line {line}: {err} (fix the row, or run without --strict to skip it)"
            if strict:
                raise DataError(message) from None
            data.skipped.append(message)
            continue
        row_id = row[spec.id_column].strip()
        if unique_ids and row_id in first_line:
            raise DataError(f"{path.name} line {line}: id {row_id!r} already used on line "
                            f"{first_line[row_id]} (predictions are keyed by id: make the ids unique)")
        first_line.setdefault(row_id, line)
        data.ids.append(row_id)
        data.texts.append(texts[0])
        if data.pairs is not None:
            data.pairs.append(texts[1])
        if data.labels is not None:
            data.labels.append(label)
    return data


def merge_labels(base: TaskDataset, extra: TaskDataset, classes: list[int]) -> TaskDataset:
    """`base` with the rows of `extra` appended, extra's label i becoming base's class classes[i] (CFIMDB's
    negative/positive into SST's five classes)."""
    return TaskDataset(base.spec, base.path, base.ids + extra.ids, base.texts + extra.texts, None,
                       base.labels + [classes[label] for label in extra.labels], base.skipped + extra.skipped)


def subset_rows(data: TaskDataset, rows: int, seed: int) -> TaskDataset:
    """A seeded random `rows` of the dataset's rows, in file order (a fixed-size training set: the same rows every
    epoch and on every rank)."""
    keep = sorted(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:rows].tolist())
    pick = lambda values: None if values is None else [values[i] for i in keep]  # noqa: E731
    return TaskDataset(data.spec, data.path, pick(data.ids), pick(data.texts), pick(data.pairs), pick(data.labels),
                       data.skipped)


def split_path(data_dir: str | Path, task: Task | str, split: str) -> Path | None:
    """The task's file of `split` ("train", "dev" or "test", for the CS224N tasks the unlabeled test-student file)
    in data_dir; None for a test split the task does not have."""
    name = (get_task(task) if isinstance(task, str) else task).file(split)
    return None if name is None else Path(data_dir) / name


def load_split(data_dir: str | Path, task: Task | str, split: str, strict: bool = False,
               path: str | Path | None = None, report: Callable[[str], None] | None = None) -> TaskDataset:
    """Read `split` of `task` from `path`, or from its file in data_dir; test files are unlabeled, dev and test ids
    must be unique, and a file without a usable row is an error. Skipped rows are summarised to `report`."""
    task = get_task(task) if isinstance(task, str) else task
    data = read_task(path or split_path(data_dir, task, split), task, labeled=split != "test", strict=strict,
                     unique_ids=split != "train")
    if not data.ids:
        reason = f"all {len(data.skipped)} rows are broken, e.g. {data.skipped[0]}" if data.skipped else "it is empty"
        raise DataError(f"{data.path.name}: no usable {task.name} {split} rows ({reason}); check the file")
    if data.skipped and report is not None:
        report(f"{data.path.name}: skipped {len(data.skipped)} broken row(s): " + "; ".join(data.skipped[:5])
               + (" ..." if len(data.skipped) > 5 else ""))
    return data
