"""Task data: tab-separated readers, pre-tokenization, batching and training streams."""
from .batching import EncodedTask, TaskStream, batch_indices, collate, encode_dataset, eval_batches
from .readers import CFIMDB, QUORA, SPECS, SST, STS, DataError, TaskDataset, TaskSpec, load_split, read_task, split_path

__all__ = ["CFIMDB", "QUORA", "SPECS", "SST", "STS", "DataError", "EncodedTask", "TaskDataset", "TaskSpec",
           "TaskStream", "batch_indices", "collate", "encode_dataset", "eval_batches", "load_split", "read_task",
           "split_path"]
