"""Multi-process training with PyTorch's own engine: launch with torchrun, one process per device.

    torchrun --nproc_per_node 2 -m superdiffusion train CONFIG --out RUN

Each rank draws its own labelled and unlabelled crops (the samplers are seeded by rank), gradients
are averaged by DistributedDataParallel, validation cases are sharded without padding and their
metrics gathered, and only rank 0 writes logs and checkpoints. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("SUPERDIFFUSION_DIST_TIMEOUT", "300")))
_PATIENT = None  # a gloo group without a practical timeout, for waiting on rank 0's evaluation


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> tuple[int, int]:
    """Join the process group when started by torchrun; (rank, world size), (0, 1) otherwise."""
    if not launched_by_torchrun():
        return 0, 1
    global _PATIENT
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # made now, by every rank together: new_group itself waits only as long as TIMEOUT
        _PATIENT = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size()


def wait_for_rank0() -> None:
    """Every rank meets here once rank 0 has evaluated and written the run (which may take longer than
    TIMEOUT), so that no rank leaves, and tears its connections down, while another still works. A rank
    that dies meanwhile still ends the job: torchrun stops the others."""
    if dist.is_initialized():
        dist.barrier(group=_PATIENT)


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(items: list, rank: int, world: int) -> list:
    """Every world-th item: each case evaluated exactly once, no padding duplicates."""
    return items[rank::world]


def gather_dict(local: dict[str, Any]) -> dict[str, Any]:
    """Union of every rank's dict (keys are case ids, so nothing collides)."""
    if not dist.is_initialized():
        return local
    parts: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
