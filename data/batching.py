"""Pre-tokenization, dynamic padding, (bucketed) batch order and resumable training streams."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator

import torch

from .readers import TaskDataset
from .tasks import Task

Segment = tuple[list[list[int]], list[list[int]]]  # (input_ids, token_type_ids) per row, unpadded


@dataclass
class EncodedTask:
    """A tokenized dataset: one segment (single / cross-encoded pair) or two (bi-encoded pair)."""

    task: str
    ids: list[str]
    segments: list[Segment]
    labels: list[int | float] | None
    is_regression: bool
    pad: Callable[[list[list[int]], list[list[int]]], dict[str, torch.Tensor]] = field(repr=False)
    spec: Task | None = field(default=None, repr=False)  # the task (None: masked-LM sentences)

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def lengths(self) -> list[int]:
        """Tokens per row, summed over segments (the quantity bucketing sorts by)."""
        return [sum(len(ids[i]) for ids, _ in self.segments) for i in range(len(self))]


def encode_dataset(dataset: TaskDataset, tok, max_length: int = 512, pair_encoding: str = "cross") -> EncodedTask:
    """Tokenize every row once; pairs become [CLS] a [SEP] b [SEP] ("cross") or two sequences ("bi")."""
    if pair_encoding not in ("cross", "bi"):
        raise ValueError(f"pair_encoding must be 'cross' or 'bi', got {pair_encoding!r}")
    if dataset.pairs is None:
        segments = [tok.encode(dataset.texts, max_length=max_length)]
    elif pair_encoding == "cross":
        segments = [tok.encode(dataset.texts, dataset.pairs, max_length=max_length)]
    else:
        segments = [tok.encode(texts, max_length=max_length) for texts in (dataset.texts, dataset.pairs)]
    return EncodedTask(dataset.task, list(dataset.ids), [tuple(s) for s in segments],
                       dataset.labels, dataset.spec.is_regression, tok.pad, dataset.spec)


def collate(encoded: EncodedTask, indices: list[int]) -> dict:
    """Pad the rows `indices` to the longest in the batch; bi-encoded keys get suffixes _1 and _2."""
    batch = {}
    for k, (input_ids, token_type_ids) in enumerate(encoded.segments):
        suffix = f"_{k + 1}" if len(encoded.segments) > 1 else ""
        padded = encoded.pad([input_ids[i] for i in indices], [token_type_ids[i] for i in indices])
        batch.update({key + suffix: value for key, value in padded.items()})
    if encoded.labels is not None:
        batch["labels"] = torch.tensor([encoded.labels[i] for i in indices],
                                       dtype=torch.float if encoded.is_regression else torch.long)
    batch["ids"] = [encoded.ids[i] for i in indices]
    return batch


def batch_indices(lengths: list[int], batch_size: int, generator: torch.Generator | None = None,
                  shuffle: bool = True, bucket: bool = False, chunk_batches: int = 50) -> list[list[int]]:
    """Split range(len(lengths)) into batches: random ("sortish" if bucket) or, unshuffled, file order / longest first."""
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i]) if bucket else list(range(n))
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]
    order = torch.randperm(n, generator=generator).tolist()
    if bucket:
        chunk = batch_size * chunk_batches
        order = [i for s in range(0, n, chunk) for i in sorted(order[s:s + chunk], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if bucket:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


@dataclass
class TaskStream:
    """Endless deterministic stream of training batches; pass p is shuffled with seed * 1000003 + p."""

    encoded: EncodedTask
    batch_size: int
    seed: int = 0
    bucket: bool = False
    pass_index: int = 0
    position: int = 0
    shard: tuple[int, int] = (0, 1)  # (rank, world size): each rank collates its rows of every global batch
    _plan: list[list[int]] = field(init=False, repr=False)

    def __post_init__(self):
        if len(self.encoded) == 0:
            raise ValueError(f"task {self.encoded.task!r} has no rows to stream")
        self._plan = self._make_plan()

    @property
    def batches_per_pass(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def _make_plan(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1000003 + self.pass_index)
        return batch_indices(self.encoded.lengths, self.batch_size, generator, shuffle=True, bucket=self.bucket)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.position >= len(self._plan):
            self.pass_index, self.position = self.pass_index + 1, 0
            self._plan = self._make_plan()
        self.position += 1
        rows = self._plan[self.position - 1]
        rank, world = self.shard
        batch = collate(self.encoded, rows[rank::world])
        batch["share"] = len(rows[rank::world]) / len(rows)  # this rank's fraction of the global batch
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"pass": self.pass_index, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_index, self.position = int(state["pass"]), int(state["position"])
        self._plan = self._make_plan()


def eval_batches(encoded: EncodedTask, batch_size: int) -> Iterator[dict]:
    """Yield all rows once, longest first, in padded batches; map predictions back through batch["ids"]."""
    for indices in batch_indices(encoded.lengths, batch_size, shuffle=False, bucket=True):
        yield collate(encoded, indices)
