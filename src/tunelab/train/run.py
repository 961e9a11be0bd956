"""The training recipe: `train` decides how a run goes (here, or launched over several processes), and
`run_rank` is one process's part, top to bottom: prepare (the run folder checked, data, model, quirks,
adapters, the trainer), fit, finish (save, summary).

Everything that can fail on user input is checked before anything is written to `output_dir` (see `setup`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ProgressCallback

from .. import __version__, run_folder
from ..config import Config
from ..data.dataset import PadCollator, SampleDataset, TokenizedData, build_datasets
from ..data.packing import PackCollator, packing_is_exact
from ..data.preference import build_preference_data
from ..data.stream import Position, stream_data
from ..data.tokenizer import prepare_tokenizer
from ..errors import Interrupted, TunelabError
from . import distributed, engines, preference
from .arguments import pure_bf16_optimizer, training_arguments
from .callbacks import BarCallback, MetricsCallback, plot_loss, read_metrics
from .checkpoints import check_world, complete_checkpoints, latest_checkpoint, remove_leftovers
from .disk import check_disk
from .guards import LossGuard, SignalCheckpoint
from .launch import launch, needs_launch, processes_per_node
from .setup import check_resume_config, is_moe, plan_output_dir, prepare_model
from .trainer import TokenCounter, TunelabTrainer

log = logging.getLogger("tunelab")


@dataclass
class TrainResult:
    output_dir: Path
    metrics: list[dict]
    summary: dict
    model: object = None  # the trained model, still in memory (a PeftModel for LoRA)


def _callbacks(cfg: Config, counter: TokenCounter) -> list:
    callbacks = [MetricsCallback(Path(cfg.output_dir) / run_folder.METRICS, counter)]
    if cfg.report_to == "swanlab":
        try:
            from swanlab.integration.transformers import SwanLabCallback
        except ImportError:
            raise TunelabError(
                "report_to: 'swanlab' needs the swanlab package; pip install 'tunelab[swanlab]'"
            ) from None
        mode = os.environ.get("SWANLAB_MODE", "offline")
        folder = "log_dir" if "log_dir" in inspect.signature(SwanLabCallback.__init__).parameters else "logdir"
        callbacks.append(
            SwanLabCallback(
                project="tunelab",
                experiment_name=cfg.run_name or Path(cfg.output_dir).name,
                mode=mode,
                **{folder: str(Path(cfg.output_dir) / "swanlog")},
            )
        )
    return callbacks


def _finish_loggers(cfg: Config) -> None:
    """SwanLab keeps an offline run's records in memory until the run finishes; unfinished, the curves are lost."""
    if cfg.report_to == "swanlab":
        import swanlab

        swanlab.finish()


def train(cfg: Config) -> TrainResult:
    """Fine-tune as `cfg` says and leave a run folder that chat, export and serve read as is.

    Decides how the run goes: in this process (`run_rank`), or, with several processes to run
    (`nproc_per_node`, `nnodes`, or several GPUs), by starting them, each running `run_rank`, and returning
    when they are done.
    """
    launching = needs_launch(cfg)
    processes = processes_per_node(cfg) * cfg.nnodes if launching else int(os.environ.get("WORLD_SIZE", 1))
    if cfg.streaming and processes > 1:
        raise TunelabError(
            f"streaming: true trains in one process for now, and this run has {processes} (each "
            "would need its own share of the stream); set nproc_per_node: 1, or streaming: false "
            "to train on several"
        )
    if not launching:
        return run_rank(cfg)
    resume = plan_output_dir(cfg)  # what every rank would refuse, refused once before they start
    check_resume_config(cfg, resume)
    check_world(resume, processes)
    launch(cfg, run_rank)
    out = Path(cfg.output_dir)
    if cfg.node_rank != 0 or not (out / run_folder.SUMMARY).is_file():  # node 0 writes the run's facts
        return TrainResult(out, [], {}, None)
    return TrainResult(
        out, read_metrics(out / run_folder.METRICS), json.loads((out / run_folder.SUMMARY).read_text()), None
    )


def run_rank(cfg: Config) -> TrainResult:
    """This process's part of the run, as litgpt splits setup from fit: prepare, fit, finish. A single-process
    run calls it directly; a launched job runs it in each of its processes."""
    started = time.perf_counter()
    run = prepare(cfg)
    result = fit(run)
    return finish(run, result, started)


@dataclass
class Prepared:
    """Everything `fit` and `finish` need, made by `prepare` before anything trains."""

    cfg: Config
    out: Path
    resume: str | None
    tokenizer: object
    model_path: str
    template: str
    data: TokenizedData
    data_seconds: float
    engine: engines.Engine
    model: object
    dtype: torch.dtype
    notes: list[str]
    params: tuple[int, int]  # (trainable, total)
    reads_weights: bool
    packing: bool
    trainer: TunelabTrainer
    counter: TokenCounter


def prepare(cfg: Config) -> Prepared:
    """The process group, the run folder checked, data, model (quirks, adapters), the trainer; the run folder
    written (rank 0) only once every check has passed."""
    distributed.init(cfg.ddp_timeout)
    resume = plan_output_dir(cfg)
    check_resume_config(cfg, resume)
    check_world(resume, distributed.world_size())
    tokenizer, model_path, template = prepare_tokenizer(cfg)
    data_started = time.perf_counter()
    if cfg.streaming:
        data = stream_data(cfg, tokenizer)
        log.info(
            "data: streamed from %s, %d steps; %d eval samples", ", ".join(cfg.datasets), cfg.max_steps, len(data.eval)
        )
    elif cfg.stage != "sft":
        data = build_preference_data(cfg, tokenizer)
        log.info("data: %d train / %d eval %s", len(data.train), len(data.eval), preference.unit(cfg))
    else:
        with distributed.main_first():  # rank 0 tokenizes into the cache; the others read it
            data = build_datasets(cfg, tokenizer)
        log.info(
            "data: %d train / %d eval samples, %d trained tokens",
            len(data.train),
            len(data.eval),
            data.stats.trained_tokens,
        )
    data_seconds = time.perf_counter() - data_started
    world = distributed.world_size()
    engine = engines.choose(cfg, world, engines.fits_one_device(cfg, world) if world > 1 else None)
    if engine.name != "single":
        log.info("engine: %s (%s)", engine.name, engine.reason)
    with engines.sharded_loading(cfg, engine) as keep_alive:
        model, dtype, notes, params = prepare_model(
            cfg, tokenizer, data, model_path, empty=engines.loads_empty(cfg, engine)
        )
    check_disk(cfg, model, 0 if cfg.streaming else len(data.train))
    callbacks = _callbacks(cfg, counter := TokenCounter())

    out = Path(cfg.output_dir)
    if distributed.is_main():
        log.info("run folder: %s", out.resolve())
        out.mkdir(parents=True, exist_ok=True)
        run_folder.write_config(cfg, out)  # now, so that a resume can check it trains the same run
        for name in remove_leftovers(out):
            log.info("removed %s, a checkpoint cut off while it was being saved", name)
        if resume is None:
            for stale in complete_checkpoints(out) + [out / run_folder.METRICS, out / run_folder.SUMMARY]:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    distributed.barrier()
    packing = packing_is_exact(model) if cfg.packing is None else cfg.packing
    flatten = getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
    if cfg.stage != "sft":
        collator = preference.pair_collator(tokenizer.pad_token_id, packing, cfg.cutoff_len, flatten)
    elif packing:
        collator = PackCollator(tokenizer.pad_token_id, cfg.cutoff_len, flatten=flatten)
    else:
        collator = PadCollator(tokenizer.pad_token_id)
    if packing:
        log.info("packing: each batch's samples share rows of up to %d tokens, no padding", cfg.cutoff_len)
    grouped = not (packing or cfg.streaming) if cfg.group_by_length is None else cfg.group_by_length
    args = training_arguments(
        cfg,
        dtype,
        bool(data.eval),
        group_by_length=grouped,
        moe=is_moe(model),
        engine_keys=engines.training_arguments(cfg, engine, model),
    )
    if cfg.streaming:
        args.ignore_data_skip = True  # the stream itself starts where the checkpoint says (data.stream)
    if distributed.is_main():
        engines.write_engine_config(args, out)
    log.info(
        "global batch: %d per device x %d accumulation x %d process%s = %d samples per step",
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        world,
        "es" if world > 1 else "",
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
    )
    if cfg.stage != "sft":
        trainer_class, datasets, extra = preference.trainer_parts(
            cfg, data, model, collator, engine.name, args.device, out, model_path
        )
    else:
        trainer_class, extra = TunelabTrainer, {}
        datasets = (
            data.train if cfg.streaming else SampleDataset(data.train, tokenizer.pad_token_id),
            SampleDataset(data.eval, tokenizer.pad_token_id) if data.eval else None,
        )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=pure_bf16_optimizer(cfg),
        token_counter=counter,
        loss_guard=LossGuard(cfg.on_bad_loss, cfg.loss_spike_factor),
        **extra,
    )
    del keep_alive  # the TrainingArguments now hold their own DeepSpeed config, if any
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarCallback())
    if resume:
        log.info("resuming from %s", resume)
        trainer.loss_guard.restore(resume)
        if cfg.streaming:
            data.train.resume_from(Position.load(resume))
    return Prepared(
        cfg,
        out,
        resume,
        tokenizer,
        model_path,
        template,
        data,
        data_seconds,
        engine,
        model,
        dtype,
        notes,
        params,
        engines.reads_weights(model),
        packing,
        trainer,
        counter,
    )


def fit(run: Prepared):
    """Train (and evaluate) to the end, or to a checkpoint saved on Ctrl-C / SIGTERM, which stops the run."""
    cfg, trainer = run.cfg, run.trainer
    signals = SignalCheckpoint(together=distributed.active())
    trainer.signals = signals
    trainer.add_callback(signals)
    signals.install()
    try:
        try:
            result = trainer.train(resume_from_checkpoint=run.resume)
        finally:
            signals.restore()
        if signals.stopped:
            raise Interrupted(
                f"stopped by {signals.describe()} at step "
                f"{trainer.state.global_step}; checkpoint saved in {latest_checkpoint(cfg.output_dir)}; "
                "resume with the same command plus resume_from_checkpoint=auto"
            )
        if run.data.eval:
            trainer.evaluate()
    finally:
        _finish_loggers(cfg)
    return result


def finish(run: Prepared, result, started: float) -> TrainResult:
    """Weights and tokenizer saved (gathered from every rank), then, on rank 0, the loss plot and the summary,
    written last: its presence marks the run finished."""
    cfg, trainer, out = run.cfg, run.trainer, run.out
    seen = int(distributed.total(run.counter.seen))
    reading_ranks = int(distributed.total(int(run.reads_weights)))
    save_run(cfg, trainer, run.tokenizer, out)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 writes the rest
        distributed.shutdown()
        return TrainResult(out, [], {}, trainer.model)
    plot_loss(out / run_folder.METRICS, out / run_folder.LOSS_PLOT)
    metrics = read_metrics(out / run_folder.METRICS)
    summary = _summary(run, result, metrics, seen, reading_ranks)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    staged = out / f".{run_folder.SUMMARY}.tmp"
    staged.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    os.replace(staged, out / run_folder.SUMMARY)  # last, and whole: its presence marks the run finished
    log.info("saved to %s (%.1fs)", out.resolve(), summary["seconds"])
    distributed.barrier()
    distributed.shutdown()
    return TrainResult(out, metrics, summary, trainer.model)


def _summary(run: Prepared, result, metrics: list[dict], seen: int, reading_ranks: int) -> dict:
    cfg, data, trainer = run.cfg, run.data, run.trainer
    summary = {
        "tunelab_version": __version__,
        "model_path": run.model_path,
        "template": run.template,
        "stop_ids": list(run.model.generation_config.eos_token_id),
        "stop_tokens": data.encoder.eot_tokens,
        "dtype": str(run.dtype).replace("torch.", ""),
        "trainable_params": run.params[0],
        "total_params": run.params[1],
        "train_samples": None if cfg.streaming else len(data.train),
        "eval_samples": len(data.eval),
        "trained_tokens": None if cfg.streaming else getattr(data.stats, "trained_tokens", None),
        "stage": cfg.stage,
        "tokens_trained_seen": seen,
        "processes": distributed.world_size(),
        "engine": run.engine.name,
        "ranks_reading_weights": reading_ranks,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "final_eval_loss": next((m["eval_loss"] for m in reversed(metrics) if "eval_loss" in m), None),
        "packing": run.packing,
        "labelled_loss": trainer.labelled_loss,
        "data_seconds": round(run.data_seconds, 4),
        "quirks": run.notes,
    }
    if torch.cuda.is_available():  # rank 0's; the estimate's "peak per device" is what it predicts
        summary["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    return summary


def save_run(cfg: Config, trainer: TunelabTrainer, tokenizer, out: Path) -> None:
    """Weights (adapter or full), tokenizer with its template, stop ids, and the resolved config.

    Every rank calls it: under a sharded engine the weights are gathered from all ranks before rank 0
    writes them (whole, or not at all: `TunelabTrainer._save` checks).
    """
    trainer.save_model(str(out))
    if not trainer.args.should_save:
        return
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; tunelab_config.yaml says what ran
    tokenizer.save_pretrained(out)
    gen = getattr(trainer.accelerator.unwrap_model(trainer.model), "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    run_folder.write_config(cfg, out)
