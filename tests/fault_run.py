"""Run train.py with one function wrapped so that, at its n-th call, a real fault strikes this process: SIGKILL, as
`kill -9` does (no handler, no cleanup), before that call or after it returns; SIGTERM before it, as a scheduler
sends; or, before it, the disk is filled (a file at $FILL_PATH grows until the kernel says ENOSPC). Under torchrun,
$FAULT_RANK arms one rank only. Used by test_reliability.py and test_distributed.py.

    python tests/fault_run.py MODULE:ATTRIBUTE N kill-before|kill-after|sigterm-before|fill-disk-before TRAIN_ARGS...
"""
import errno
import importlib
import os
import signal
import sys


def fill_disk(path: str) -> None:
    """Write zeros to `path` until the filesystem is full (the file is left there: the disk stays full)."""
    with open(path, "ab", buffering=0) as f:
        block = bytes(1 << 16)
        while True:
            try:
                f.write(block)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return
                block = block[:len(block) // 2]


FAULTS = {"kill": lambda: os.kill(os.getpid(), signal.SIGKILL),
          "sigterm": lambda: os.kill(os.getpid(), signal.SIGTERM),
          "fill-disk": lambda: fill_disk(os.environ["FILL_PATH"])}


def arm(target: str, n: int, action: str) -> None:
    fault, _, when = action.rpartition("-")
    module_name, attribute = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and when == "before":
            FAULTS[fault]()
        result = real(*args, **kwargs)
        if calls[0] == n and when == "after":
            FAULTS[fault]()
        return result
    setattr(owner, name, wrapper)


if __name__ == "__main__":
    target, n, action, *argv = sys.argv[1:]
    if os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        arm(target, int(n), action)
    import minbert.training.train as train
    train.main(argv)
