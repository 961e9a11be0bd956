"""The TrainingArguments a tunelab config stands for: one process per GPU, precision, the engine's keys.

Training keys keep transformers' names, so this is mostly a copy; what it decides (no DataParallel,
autocast on CPUs, a loss guard instead of the NaN filter, the engine) is said where it is decided.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from ..config import Config
from . import distributed
from .optim import StochasticAdamW

log = logging.getLogger("tunelab")


class OneDeviceArguments(TrainingArguments):
    """TrainingArguments whose process never uses more than one GPU.

    With several GPUs visible to one process, Trainer wraps the model in `nn.DataParallel`: slower than
    one process per GPU, and it breaks code that reaches into the model. One process trains on one GPU;
    a launcher (torchrun, accelerate) starts one process per GPU to use them all.
    """

    @property
    def n_gpu(self) -> int:
        return min(super().n_gpu, 1)


def training_arguments(
    cfg: Config,
    dtype: torch.dtype,
    has_eval: bool,
    group_by_length: bool = False,
    moe: bool = False,
    engine_keys: dict | None = None,
):
    report = [] if cfg.report_to in ("none", "swanlab") else [cfg.report_to]
    if cfg.report_to == "tensorboard":
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(cfg.output_dir) / "runs"))
    on_gpu = torch.cuda.is_available()
    if on_gpu and torch.cuda.device_count() > 1 and distributed.world_size() == 1:
        log.info(
            "%d GPUs visible; this process trains on one (nproc_per_node: %s uses them all)",
            torch.cuda.device_count(),
            torch.cuda.device_count(),
        )
    return OneDeviceArguments(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the loss guard handles bad losses, without a host sync per micro-step
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps or cfg.logging_steps * 10 if has_eval else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16 and not cfg.pure_bf16,  # autocast, CPUs too; pure bf16 needs none
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        report_to=report,
        run_name=cfg.run_name or Path(cfg.output_dir).name,
        remove_unused_columns=False,
        disable_tqdm=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        ddp_timeout=cfg.ddp_timeout,
        ddp_find_unused_parameters=moe,  # routed experts may sit out a batch; nothing else does
        **(engine_keys or {}),
    )


def pure_bf16_optimizer(cfg: Config):
    if not cfg.pure_bf16:
        return None
    return StochasticAdamW, {"lr": cfg.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8}
