"""Single process or `torchrun` DDP: process-group set-up and the deterministic data order.

Data order is a pure function of (seed, step, rank), so a resumed run continues with exactly the
batches it would have seen, and N ranks with per-rank batch b see the same global batch as one
process with batch N*b.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mouserecon.device import pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Initialise DDP when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = pick_device(device).type == "cuda"
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")  # one GPU per rank
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        log.info("DDP rank %d/%d on %s (%s)", rank, world_size, dev, dist.get_backend())
    return DistInfo(rank, world_size, local_rank, dev)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is True on any rank (keeps skip/stop decisions identical)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def batch_indices(step: int, num_samples: int, batch_size: int, info: DistInfo, seed: int) -> list[int]:
    """Sample indices of this rank's share of the global batch at optimiser step `step`.

    The stream is the concatenation of per-epoch permutations (epoch e shuffled with seed + e);
    the global batch of step s is stream[s*G : (s+1)*G] with G = batch_size * world_size, and rank r
    takes the r-th contiguous block of `batch_size`.
    """
    assert num_samples > 0, "no training samples"
    global_batch = batch_size * info.world_size
    start = step * global_batch + info.rank * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[offset]))
    return out
