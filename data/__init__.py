"""Task data: the task registry and task files, readers, pre-tokenization, batching and training streams."""
from .batching import EncodedTask, TaskStream, batch_indices, collate, encode_dataset, eval_batches
from .readers import (DataError, TaskDataset, load_split, merge_labels, open_task_file, read_task, split_path,
                      subset_rows)
from .tasks import TASKS, Task, get_task, overall, read_task_file

__all__ = ["DataError", "EncodedTask", "TASKS", "Task", "TaskDataset", "TaskStream", "batch_indices", "collate",
           "encode_dataset", "eval_batches", "get_task", "load_split", "merge_labels", "open_task_file", "overall",
           "read_task", "read_task_file", "split_path", "subset_rows"]
