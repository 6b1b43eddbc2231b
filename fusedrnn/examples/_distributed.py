"""Data-parallel training for the examples: `torchrun --nproc-per-node N -m fusedrnn.examples.memory ...`.

Without torchrun (WORLD_SIZE unset or 1) nothing changes: one process, no process group. Under torchrun every
rank draws the same global batch (same seed) and trains on its own contiguous slice of it; DDP averages the
gradients, so N processes take the same steps as one process on the whole batch. Only rank 0 prints and
writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ._common import Progress
from ._common import device as default_device


class _Silent:
    def update(self, n: int, **metrics) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def progress(self, total: int, label: str = ""):
        return Progress(total, label) if self.is_main else _Silent()

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around `model` when distributed (its parameters start equal: DDP broadcasts rank 0's)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, *tensors: torch.Tensor):
        """This rank's slice (dim 0) of each global-batch tensor."""
        if not self.distributed:
            return tensors
        n = tensors[0].shape[0]
        if n % self.world_size:
            # unequal slices would weight the ranks' samples unequally in DDP's average
            raise SystemExit(f"the batch ({n}) must divide evenly over {self.world_size} processes")
        size = n // self.world_size
        return tuple(t[self.rank * size:(self.rank + 1) * size] for t in tensors)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup() -> Ranks:
    """Join torchrun's process group (env:// rendezvous) when WORLD_SIZE > 1: NCCL on GPUs, else gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks(device=default_device())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Ranks(rank, world_size, dev)


def run_on_ranks(main, args):
    """main(args, ranks) inside the process group (setup()), which is left again however main ends."""
    ranks = setup()
    try:
        return main(args, ranks)
    finally:
        ranks.close()
