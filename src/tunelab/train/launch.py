"""One `tunelab train CONFIG` for any number of processes: torchrun's own launcher, called from Python.

With N GPUs visible (or `nproc_per_node: N`), tunelab starts N processes itself through
`torch.distributed.launcher` (what `torchrun` runs), each training on one device; across machines the
same command runs on each with its own `node_rank`. Started by torchrun or accelerate instead, the
processes are already there and train directly. A failed rank ends the whole job, and the error names
the rank.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Callable

import torch

from ..config import Config
from ..errors import Interrupted, TunelabError

log = logging.getLogger("tunelab")

INTERRUPTED = 130  # a rank's exit code after a signal made it save and stop


def launched() -> bool:
    """Started by a launcher (torchrun, accelerate, ours): the process group's facts are in the environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def processes_per_node(cfg: Config) -> int:
    if cfg.nproc_per_node:
        return cfg.nproc_per_node
    if cfg.device_map:  # one process holds every GPU
        return 1
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def needs_launch(cfg: Config) -> bool:
    """Several processes, or a sharding engine on one GPU (it shards over a process group, even of one)."""
    sharding = bool(cfg.deepspeed) or cfg.distributed in ("fsdp2", "deepspeed")
    return not launched() and (processes_per_node(cfg) * cfg.nnodes > 1 or (sharding and torch.cuda.is_available()))


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range (32768 and up on Linux).

    A port the kernel hands out as free (bind to 0) is an ephemeral one: until the rendezvous binds it,
    any outgoing connection on the machine (another job's ranks reaching their store) may take it.
    """
    import random

    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise TunelabError("master_port: found no free port between 20000 and 32000; set master_port")


def _worker(argv: list[str]) -> None:
    """One process of the job (`python -m tunelab.train.launch ENTRY CONFIG_JSON [THREADS]`): ENTRY
    (`module:function`, the per-rank run the launcher was given) on the config, as a single process runs it.
    Its error is recorded for the launcher, which names the rank that failed."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    from ..logs import setup_logging

    setup_logging()
    entry, config, *threads = argv
    if threads:  # accelerate would set 1 thread where OMP_NUM_THREADS is unset
        os.environ["OMP_NUM_THREADS"] = threads[0]
        torch.set_num_threads(int(threads[0]))
    errors = get_error_handler()
    errors.initialize()
    try:
        from ..config import from_dict

        module, _, name = entry.partition(":")
        run_rank = getattr(importlib.import_module(module), name)
        run_rank(from_dict(json.loads(config)))
    except (Interrupted, KeyboardInterrupt) as exc:  # stopped by a signal (after saving, once training runs)
        errors.record_exception(exc)
        sys.exit(INTERRUPTED)
    except TunelabError as exc:  # the user's problem: one line, no traceback
        errors.record_exception(exc)
        print(f"tunelab: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except BaseException as exc:
        errors.record_exception(exc)
        raise


def launch(cfg: Config, run_rank: Callable[[Config], object]) -> None:
    """Run `run_rank(cfg)` in `processes_per_node x nnodes` processes, each a fresh Python (as torchrun starts
    them); `run_rank` is named by its module and name, so it must be a module-level function."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = processes_per_node(cfg)
    port = cfg.master_port or (free_port() if cfg.nnodes == 1 else 29500)
    args = [f"{run_rank.__module__}:{run_rank.__qualname__}", json.dumps(cfg.to_dict())]
    if not torch.cuda.is_available():  # processes sharing the cores must not each use all of them
        args.append(str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info(
        "starting %d process%s on this machine%s (%s)",
        nproc,
        "es" if nproc > 1 else "",
        f", node {cfg.node_rank} of {cfg.nnodes}" if cfg.nnodes > 1 else "",
        "one per GPU" if torch.cuda.is_available() else "CPU, gloo",
    )
    config = LaunchConfig(
        min_nodes=cfg.nnodes,
        max_nodes=cfg.nnodes,
        nproc_per_node=nproc,
        run_id=f"tunelab-{uuid.uuid4().hex[:8]}" if cfg.nnodes == 1 else f"tunelab-{cfg.master_addr}-{port}",
        rdzv_backend="static",
        rdzv_endpoint=f"{cfg.master_addr}:{port}",
        rdzv_configs={"rank": cfg.node_rank, "timeout": cfg.ddp_timeout},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        shutdown_timeout=cfg.ddp_timeout,
    )
    try:
        # Ctrl-C / SIGTERM: the launcher passes the signal on to every rank; they agree on a step, save once
        # and stop, and it waits up to ddp_timeout seconds for that before killing them.
        elastic_launch(config, sys.executable)("-m", "tunelab.train.launch", *args)
    except SignalException:
        raise Interrupted(_interrupted(cfg)) from None
    except ChildFailedError as exc:
        if all(f.exitcode == INTERRUPTED for f in exc.failures.values()):
            raise Interrupted(_interrupted(cfg)) from None
        failed_rank, failure = _root_cause(exc.failures)
        raise TunelabError(
            f"rank {failed_rank} of the training job failed ({_reason(failure)}); the other ranks "
            "were stopped. The last complete checkpoint stays usable: rerun with "
            "resume_from_checkpoint=auto"
        ) from None


def _interrupted(cfg: Config) -> str:
    from .checkpoints import latest_checkpoint

    saved = latest_checkpoint(cfg.output_dir) if Path(cfg.output_dir).is_dir() else None
    if saved is None:
        return "stopped by a signal before a checkpoint was saved"
    return (
        f"stopped by a signal; every rank stopped after the same step, checkpoint saved in {saved}; "
        "resume with the same command plus resume_from_checkpoint=auto"
    )


# What a rank reports when another one died under it: the collective lost its peer, or the launcher's SIGTERM.
_CONSEQUENCES = ("by peer", "timed out", "timeout", "connection reset", "connection closed", "ncclremoteerror")


def _root_cause(failures: dict) -> tuple[int, object]:
    """The failure that started it: not the ranks that lost their peer or were stopped by the launcher."""

    def consequence(item) -> bool:
        failure = item[1]
        return failure.exitcode == -signal.SIGTERM or any(c in _reason(failure).lower() for c in _CONSEQUENCES)

    return min(failures.items(), key=lambda item: (consequence(item), item[1].timestamp, item[0]))


def _reason(failure) -> str:
    message = getattr(failure, "message", "") or ""
    if isinstance(message, dict):
        message = message.get("message", "") or str(message)
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    if lines and not lines[-1].startswith("<N/A>"):
        return lines[-1].strip()
    code = getattr(failure, "exitcode", None)
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


if __name__ == "__main__":
    _worker(sys.argv[1:])
