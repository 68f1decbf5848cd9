"""Seconds per training step of every multi-task method beside summed losses: MiniLM, README command 1's batches.

    python bench/methods.py --data_dir ../shared/data                   # every aggregator and loss weighting
    python bench/methods.py --methods sum,pcgrad,famo --steps 6 --markdown

Each method runs in a fresh process (so no method inherits another's memory): it loads MiniLM and the training
sets, then runs train_step on the same batches as every other method (32 sentences or pairs of each of SST, Quora
and STS per step, length-bucketed as train.py draws them, the same seed): `--warmup` untimed steps, then `--steps`
timed ones. The methods take turns, `--rounds` times round robin, so a slow spell of the machine falls on all of
them alike; the table gives each method's median step and its ratio to summed.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minbert.data import TaskStream  # noqa: E402
from minbert.heads import MultitaskBert  # noqa: E402
from minbert.optim import AdamW  # noqa: E402
from minbert.optim.aggregation import AGGREGATORS  # noqa: E402
from minbert.optim.weighting import WEIGHTINGS  # noqa: E402
from minbert.training.config import TrainConfig  # noqa: E402
from minbert.training.step import MethodState, Runtime, train_step  # noqa: E402

TASKS = ["sst", "para", "sts"]


def method_flags(name: str) -> dict:
    """The train.py flags of a method name: an aggregator, a loss weighting, or 'sum' (neither)."""
    if name in AGGREGATORS:
        return {"aggregator": name}
    if name in WEIGHTINGS:
        return {"loss_weighting": name}
    raise SystemExit(f"unknown method {name!r}; choose from {', '.join(AGGREGATORS + WEIGHTINGS)}")


def time_steps(name: str, args) -> list[float]:
    """This process: the seconds of each timed train_step of one method."""
    torch.manual_seed(0)
    cfg = TrainConfig.from_flags(model="minilm", data_dir=args.data_dir, batch_size=args.batch_size,
                                 **method_flags(name))
    model = MultitaskBert.from_pretrained("minilm").train()
    state = MethodState.create(model, cfg, "fp32")
    learned = [{"params": state.learned(), "lr": cfg.optim.head_lr, "weight_decay": 0.0}] if state.learned() else []
    optimizer = AdamW(model.parameter_groups(cfg.optim.lr, cfg.optim.head_lr, cfg.optim.weight_decay) + learned,
                      lr=cfg.optim.lr)
    streams = {t: TaskStream(model.encode(cfg.data.read(cfg.task(t), "train"), cfg.model.max_length), args.batch_size,
                             seed=cfg.run.seed + i) for i, t in enumerate(TASKS)}
    seconds = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        train_step(model, optimizer, streams, TASKS, cfg, state, Runtime(torch.device("cpu")))
        if step >= args.warmup:
            seconds.append(time.perf_counter() - started)
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--methods", default=",".join(dict.fromkeys(AGGREGATORS + WEIGHTINGS)))
    p.add_argument("--steps", type=int, default=4, help="timed steps per method and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--_one", help=argparse.SUPPRESS)  # internal: time one method in this process, print JSON
    args = p.parse_args(argv)
    if args._one:
        print(json.dumps(time_steps(args._one, args)))
        return
    seconds = {m: [] for m in args.methods.split(",")}
    for round_ in range(args.rounds):
        for name in seconds:
            child = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--_one", name],
                                   capture_output=True, text=True, check=True)
            seconds[name] += json.loads(child.stdout.strip().splitlines()[-1])
            print(f"round {round_ + 1}: {name} {statistics.median(seconds[name]):.2f} s/step", file=sys.stderr)
    summed = statistics.median(seconds["sum"]) if "sum" in seconds else None
    rows = [[name, f"{statistics.median(s):.2f}", f"{statistics.median(s) / summed:.2f}×" if summed else "–"]
            for name, s in seconds.items()]
    header = ["method", "s / step", "vs summed"]
    if args.markdown:
        print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
        print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    else:
        print("\n".join(f"{r[0]:14s} {r[1]:>8s} {r[2]:>8s}" for r in [header] + rows))


if __name__ == "__main__":
    main()
