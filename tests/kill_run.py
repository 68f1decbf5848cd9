"""Run train.py with one function wrapped so that its n-th call kills this process with SIGKILL, as `kill -9` does
(no exception handler, no cleanup): before that call, or after it returns. Used by test_reliability.py.

    python tests/kill_run.py MODULE:ATTRIBUTE N before|after TRAIN_ARGS...
"""
import importlib
import os
import signal
import sys


def arm(target: str, n: int, when: str) -> None:
    module_name, attribute = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls[0] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapper)


if __name__ == "__main__":
    target, n, when, *argv = sys.argv[1:]
    arm(target, int(n), when)
    import train
    train.main(argv)
