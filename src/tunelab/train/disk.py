"""Refuse a run whose checkpoints will not fit, before the first step instead of at hour three."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from ..config import Config
from ..errors import TunelabError

GiB = 2**30


def checkpoint_bytes(model) -> int:
    """Trainable weights plus AdamW's two states for them, in their own dtype; a full run saves every weight."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def saves_planned(cfg: Config, n_train: int) -> int:
    steps_per_epoch = math.ceil(n_train / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps))
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs)
    saves = total // cfg.save_steps
    return (min(saves, cfg.save_total_limit) if cfg.save_total_limit else saves) + 1  # + the final weights


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(cfg: Config, model, n_train: int) -> int:
    """The bytes the run will need in `output_dir`; raises when the disk has less free."""
    need = checkpoint_bytes(model) * saves_planned(cfg, n_train)
    free = shutil.disk_usage(_existing(Path(cfg.output_dir).resolve())).free
    if need > free:
        raise TunelabError(
            f"output_dir: '{cfg.output_dir}' has {free / GiB:.2f} GiB free, but this run writes about "
            f"{need / GiB:.2f} GiB ({saves_planned(cfg, n_train)} saves of {checkpoint_bytes(model) / GiB:.2f} GiB: "
            "weights and optimizer states); lower save_total_limit, raise save_steps, or free space"
        )
    return need
