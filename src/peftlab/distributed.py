"""Data-parallel training of one run over several processes (PyTorch DDP through the Trainer).

With `executor.nproc_per_run: N`, the process executor (and each Ray task) starts a run's worker under
torchrun (`python -m torch.distributed.run --standalone --nproc_per_node N -m peftlab.worker ...`).
Every process builds the same model and data and runs the same code; the Trainer shards the batches
(a global batch of N x batch_size) and averages the gradients (gloo on the CPU, NCCL on GPUs).

One run folder, written by rank 0 only: the other ranks (replicas) write into a private temporary
folder that is deleted when they end, so no code path needs a rank check of its own. What all ranks
must agree on, rank 0 decides and broadcasts: the checkpoint to resume from, and the checkpoint folder
(the Trainer saves weights on rank 0 only, and with `load_best_model_at_end` every rank loads the best
checkpoint back from it).

Why not `torchrun peftlab run ...`: the experiment loop decides which runs to train, skips finished
ones, writes the report, trains mixtures; each of those steps would need a rank check. Launching
torchrun per run keeps the loop in one process and DDP inside a run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def world_size() -> int:
    """Processes of this run (WORLD_SIZE, set by torchrun and accelerate launch; 1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_replica() -> bool:
    """A process of a data-parallel run other than rank 0: it trains, but its files are thrown away."""
    return world_size() > 1 and rank() > 0


def setup() -> None:
    """Join the run's process group (before anything else uses torch.distributed). The Trainer (through
    accelerate) finds the group already there and wraps the model in DistributedDataParallel."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def agree(decide: Callable[[], T]) -> T:
    """`decide()` on rank 0, its result on every rank (a single process just decides)."""
    import torch.distributed as dist

    if world_size() <= 1 or not dist.is_initialized():
        return decide()
    box = [decide() if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def barrier() -> None:
    """Wait for every rank (a single process does not wait)."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch_argv(nproc: int, module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args` in `nproc` processes (torchrun, one machine)."""
    if nproc <= 1:
        return [sys.executable, "-m", module, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a rendezvous on a free local port: several runs may launch at once
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]
