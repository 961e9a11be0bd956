"""What one training process needs to know of the others: who it is, when to wait, what they agree on.

Whether started by tunelab's launcher, torchrun or accelerate, every process runs the same
`train(cfg)`. In a single process each helper here does nothing, so the training code reads the same
for one process or many.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(timeout_s: int) -> None:
    """Join the process group first thing, so that rank 0 can prepare data while the others wait on it.

    `timeout_s` bounds every collective: a rank that died or hangs ends the job after that long
    instead of leaving the others waiting for ever (torch's default is 10 to 30 minutes).
    """
    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    if not is_main():  # one voice: the others speak only of problems
        logging.getLogger("tunelab").setLevel(logging.WARNING)


def shutdown() -> None:
    """Ends the process group before the interpreter does: a gloo group torn down at exit can abort the
    process ("terminate called without an active exception") after the run has finished and saved."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. tokenizing into the cache); the others run it after, reading its work."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over all ranks (the local values in one process)."""
    if not active():
        return values
    out = values.to(_device(), torch.float32)
    dist.all_reduce(out)
    return out / dist.get_world_size()


def total(value) -> float:
    """The sum of a number over all ranks."""
    if not active():
        return float(value)
    out = torch.as_tensor(value, dtype=torch.float64).to(_device())
    dist.all_reduce(out)
    return float(out)
