"""Data parallelism under torchrun: every rank draws the same global batch, keeps its share of the rows, and the
gradients are averaged over the ranks by an explicit all-reduce after each backward pass. What one rank does alone
(rank 0's files and evaluation) runs in a `together` block, so an error there stops every rank, not only one."""
import functools
import itertools
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minbert.errors import CheckpointError, ConfigError, MinbertError, RunError

SHARED_ERRORS = (ConfigError, CheckpointError, RunError, MinbertError)  # the kinds an error keeps across ranks


def env_rank() -> int:
    """This process's rank in the torchrun job (0 outside one), read before or without the process group."""
    return int(os.environ.get("RANK", 0)) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else 0


SESSIONS = itertools.count()  # the process groups this process opened: a sweep opens one per run


@functools.cache
def job_store(rank: int, world: int) -> dist.Store:
    """The torchrun job's key-value store (its agent hosts it; rank 0 does under another launcher), connected once
    per process, under this restart's prefix as torch's env:// rendezvous does."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0)
    return dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@dataclass
class GradientAllReduce:
    """The ranks of a torchrun job (gloo on CPU, NCCL on CUDA) and the collective operations training needs.

    Not DistributedDataParallel: its reducer expects one forward per backward, while SMART and GradNorm run several,
    and PCGrad needs each task's gradient reduced on its own. The cost: communication does not overlap backward."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives put tensors
    store: dist.Store | None = None  # this process group's keys in the job's store

    @classmethod
    def from_env(cls, device: torch.device) -> "GradientAllReduce":
        """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK ...) on this rank's GPU
        when `device` is CUDA; a single process on `device` otherwise. Each call opens a process group under keys of
        its own: one reusing the last one's keys would connect to its closed sockets and wait forever."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            return cls(device=device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        store = dist.PrefixStore(f"minbert/session_{next(SESSIONS)}", job_store(rank, world))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
        return cls(rank, world, device, store)

    def _collective(self, what: str, call, *args, **kwargs):
        """Run one torch.distributed call; a peer that stopped (its socket closed) is a one-line RunError."""
        try:
            return call(*args, **kwargs)
        except RuntimeError as err:  # gloo and NCCL report a lost peer so
            reason = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip()).split(". ")[0][:200]  # gloo: "[file:line] ..."
            raise RunError(f"rank {self.rank} lost the other processes of the torchrun job during {what} ({reason}); "
                           "one of them stopped: its message is above") from None

    @contextmanager
    def together(self):
        """A block that may fail on some ranks only (rank 0's files, a download): on leaving it every rank learns
        whether any failed, and then all raise the first failing rank's error, so none waits for a stopped one.
        Every rank must enter the same blocks in the same order, and no collective may run inside one."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except Exception as err:
            self._agree(err)
            raise
        self._agree(None)

    def _agree(self, error: Exception | None) -> None:
        """Share (kind, message) of each rank's error; raise the first failing rank's on the others."""
        mine = None
        if error is not None:
            kind = next((i for i, c in enumerate(SHARED_ERRORS) if isinstance(error, c)), None)
            mine = (kind, str(error)) if kind is not None else \
                (SHARED_ERRORS.index(RunError), f"rank {self.rank} stopped: {type(error).__name__}: {error}")
        everyone = [None] * self.world
        self._collective("the check that every rank got through", dist.all_gather_object, everyone, mine)
        first = next((r for r, e in enumerate(everyone) if e is not None), None)
        if first is not None and first != self.rank:
            kind, message = everyone[first]
            raise SHARED_ERRORS[kind](message) from None

    def broadcast(self, model: torch.nn.Module) -> None:
        """Rank 0's weights everywhere (heads are initialised randomly; a resumed run's weights are rank 0's)."""
        if self.world > 1:
            for tensor in model.state_dict().values():
                self._collective("the broadcast of the weights", dist.broadcast, tensor, 0)

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable; tensors included) on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self._collective("a broadcast from rank 0", dist.broadcast_object_list, box, 0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        everyone = [None] * self.world
        self._collective("the gathering of the ranks' states", dist.all_gather_object, everyone, obj)
        return everyone

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (a stop request that reached one process only)."""
        if self.world == 1:
            return flag
        x = torch.tensor([float(flag)], device=self.device)
        self._collective("the stop check", dist.all_reduce, x, op=dist.ReduceOp.MAX)
        return bool(x.item())

    def gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each gradient by its mean over the ranks, in one flat all-reduce; a parameter with no gradient on
        any rank keeps None (AdamW skips it)."""
        if self.world == 1:
            return
        present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)  # NCCL: on GPU
        self._collective("the gradient all-reduce", dist.all_reduce, present, op=dist.ReduceOp.MAX)
        params = [p for p, seen in zip(params, present.tolist()) if seen]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        self._collective("the gradient all-reduce", dist.all_reduce, flat)
        for p, g in zip(params, flat.div_(self.world).split([p.numel() for p in params])):
            p.grad = g.view_as(p)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (GradNorm's gradient norms and losses, the logged task losses)."""
        if self.world > 1:
            self._collective("the all-reduce of the losses", dist.all_reduce, x)
            x = x / self.world
        return x

    def close(self, failed: bool = False) -> None:
        """Leave the job: after a barrier when all went well; at once after an error, so a rank that stopped never
        waits for the others (they stop within seconds, when their next collective finds it gone)."""
        if self.world > 1:
            if not failed:
                self._collective("the final barrier", dist.barrier)
                self._wait_until_all_passed_the_barrier()
            dist.destroy_process_group()

    def _wait_until_all_passed_the_barrier(self, timeout_s: float = 60.0) -> None:
        """Count the ranks out on the job's rendezvous store: a rank that closes its gloo sockets as soon as its own
        barrier returns can cut off a slower peer still reading the barrier's last message (gloo issue 155)."""
        self.store.add("passed_final_barrier", 1)
        deadline = time.monotonic() + timeout_s
        while self.store.add("passed_final_barrier", 0) < self.world:
            if time.monotonic() > deadline:
                raise RunError(f"rank {self.rank}: the other ranks of the torchrun job did not get through the final "
                               f"barrier within {timeout_s:.0f} s of this one; one of them stopped: its message is above")
            time.sleep(0.01)
