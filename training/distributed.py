"""Data parallelism under torchrun: every rank draws the same global batch, keeps its share of the rows, and the
gradients are averaged over the ranks by an explicit all-reduce after each backward pass."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GradientAllReduce:
    """The ranks of a torchrun job (gloo on CPU, NCCL on CUDA) and the collective operations training needs.

    Not DistributedDataParallel: its reducer expects one forward per backward, while SMART and GradNorm run several,
    and PCGrad needs each task's gradient reduced on its own. The cost: communication does not overlap backward."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: torch.device) -> "GradientAllReduce":
        """Join the torchrun job described by the environment (WORLD_SIZE, RANK ...); a single process otherwise."""
        if int(os.environ.get("WORLD_SIZE", 1)) == 1:
            return cls()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @staticmethod
    def local_device(device: torch.device) -> torch.device:
        """This rank's GPU (LOCAL_RANK) when training on CUDA under torchrun; `device` otherwise."""
        if device.type != "cuda" or int(os.environ.get("WORLD_SIZE", 1)) == 1:
            return device
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device

    def broadcast(self, model: torch.nn.Module) -> None:
        """Rank 0's weights everywhere (heads are initialised randomly)."""
        if self.world > 1:
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, 0)

    def gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each gradient by its mean over the ranks, in one flat all-reduce; a parameter with no gradient on
        any rank keeps None (AdamW skips it)."""
        if self.world == 1:
            return
        present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)  # NCCL: on GPU
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        params = [p for p, seen in zip(params, present.tolist()) if seen]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.div_(self.world).split([p.numel() for p in params])):
            p.grad = g.view_as(p)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (GradNorm's gradient norms and losses, the logged task losses)."""
        if self.world > 1:
            dist.all_reduce(x)
            x = x / self.world
        return x

    def close(self) -> None:
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
