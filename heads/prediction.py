"""The prediction API of MultitaskBert: scores of encoded task files (what evaluation and ensembles use) and labels
of plain texts or pairs, for any of the model's tasks."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from minbert.data import EncodedTask, TaskDataset, eval_batches
from minbert.errors import ConfigError
from minbert.runtime import autocast, resolve_precision


class Prediction:
    """Mixed into MultitaskBert: `predict(task, inputs)` and the scores behind it."""

    @torch.inference_mode()
    def predict_scores(self, encoded: EncodedTask, batch_size: int = 256, amp: str = "auto",
                       progress: bool = True) -> dict[str, torch.Tensor]:
        """Scores by id for every row (class probabilities, a binary task's probability, or a regression score), in
        large length-sorted batches. `amp` as train.py's --amp: auto (bf16 or fp16 on CUDA, float32 on the CPU),
        bf16, fp16 or off."""
        head = self.scoring_head(encoded.task)
        was_training = self.training
        self.eval()
        device, out = next(self.parameters()).device, {}
        precision = resolve_precision(device, amp)
        for batch in tqdm(eval_batches(encoded, batch_size), total=-(-len(encoded) // batch_size),
                          desc=f"predict {encoded.task}", disable=not progress, leave=False):
            with autocast(device, precision):
                y = self(head, {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})
            scores = self.objectives[head].scores(y)
            if head != encoded.task:  # CFIMDB merged into SST: [p(negative), p(positive)] from the SST classes
                low, high = self.config.cfimdb_labels
                expected = scores @ torch.arange(scores.shape[-1], dtype=scores.dtype, device=scores.device)
                positive = ((expected - low) / (high - low)).clamp(0, 1)  # > 0.5: nearer the positive class
                scores = torch.stack([1 - positive, positive], dim=-1)  # (B, 2)
            out.update(zip(batch["ids"], scores.cpu()))
        self.train(was_training)
        return {i: out[i] for i in encoded.ids}

    def scoring_head(self, task: str) -> str:
        """The head that scores `task`: its own, or SST's for CFIMDB merged into SST training."""
        if task in self.heads:
            return task
        if task == "cfimdb" and self.config.cfimdb_labels:
            return "sst"
        raise ConfigError(f"this model has no {task!r} head (its tasks: {', '.join(self.config.tasks)})")

    def predict(self, task: str, inputs: list, batch_size: int = 64, max_length: int = 128,
                amp: str = "auto") -> list:
        """The label of each input of `task`: texts for a single-sentence task, (text, text) pairs for a pair task.
        Labels are as the task's files write them (a label_map's strings, class numbers, or a score in the
        task's range); `amp` as in predict_scores."""
        self.scoring_head(task)  # refuses a task this model cannot score
        spec, pairs = self.config.task(task), None
        if spec.is_pair:
            if not all(isinstance(x, (tuple, list)) and len(x) == 2 for x in inputs):
                raise ConfigError(f"predict({task!r}, ...): {task} is a pair task: pass (text, text) pairs")
            inputs, pairs = [a for a, _ in inputs], [b for _, b in inputs]
        elif not all(isinstance(x, str) for x in inputs):
            raise ConfigError(f"predict({task!r}, ...): {task} reads one text per input: pass a list of strings")
        dataset = TaskDataset(spec, Path("<texts>"), [str(i) for i in range(len(inputs))], list(inputs), pairs)
        scores = self.predict_scores(self.encode(dataset, max_length), batch_size, amp, progress=False)
        return spec.label_names(spec.labels(torch.stack(list(scores.values())))) if scores else []

    def predict_sentiment(self, texts: list[str], task: str = "sst", batch_size: int = 64, max_length: int = 128,
                          amp: str = "auto") -> list[int]:
        """Class per text (SST: 0 very negative ... 4 very positive; CFIMDB: 0 or 1); `amp` as in predict_scores."""
        return self.predict(task, texts, batch_size, max_length, amp)

    def predict_paraphrase(self, pairs: list[tuple[str, str]], batch_size: int = 64, max_length: int = 128,
                           amp: str = "auto") -> list[int]:
        """1 if the two questions are paraphrases, else 0."""
        return self.predict("para", pairs, batch_size, max_length, amp)

    def predict_similarity(self, pairs: list[tuple[str, str]], batch_size: int = 64, max_length: int = 128,
                           amp: str = "auto") -> list[float]:
        """Similarity in [0, 5] per pair."""
        return self.predict("sts", pairs, batch_size, max_length, amp)
