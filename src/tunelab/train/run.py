"""The training recipe, top to bottom: check the run folder, data, model, quirks, adapters, train, save.

Everything that can fail on user input is checked before anything is written to `output_dir`.
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
from ..config import RESUME_MAY_CHANGE, Config
from ..data.dataset import PadCollator, SampleDataset, TokenizedData, build_datasets
from ..data.packing import PackCollator, packing_is_exact
from ..data.stream import Position, stream_data
from ..data.tokenizer import prepare_tokenizer
from ..errors import Interrupted, TunelabError
from ..model.adapters import attach_lora
from ..model.loader import compute_dtype, enable_tf32, load_model
from ..model.quirks import count_parameters, enable_gradient_checkpointing, ensure_pad_token, set_stop_ids
from . import distributed, engines
from .arguments import pure_bf16_optimizer, training_arguments
from .callbacks import BarCallback, MetricsCallback, plot_loss, read_metrics
from .checkpoints import check_world, complete_checkpoints, latest_checkpoint, remove_leftovers
from .disk import check_disk
from .guards import LossGuard, SignalCheckpoint
from .launch import launch, needs_launch, processes_per_node
from .trainer import TokenCounter, TunelabTrainer

log = logging.getLogger("tunelab")


@dataclass
class TrainResult:
    output_dir: Path
    metrics: list[dict]
    summary: dict
    model: object = None  # the trained model, still in memory (a PeftModel for LoRA)


def _finished(out: Path) -> bool:
    """The summary is written last, atomically; weights without it are a finished run only when no
    checkpoint says otherwise (a kill during the final save leaves weights and checkpoints)."""
    weights = any(
        (out / name).exists()
        for name in ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    )
    return (out / run_folder.SUMMARY).exists() or (weights and not complete_checkpoints(out))


def plan_output_dir(cfg: Config) -> str | None:
    """Refuse to clobber a finished run; return the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TunelabError(f"output_dir: '{out}' exists and is not a folder")
    resume = cfg.resume_from_checkpoint
    if resume and resume != "auto":
        if not Path(resume).is_dir():
            raise TunelabError(f"resume_from_checkpoint: '{resume}' is not a checkpoint folder")
        return resume
    if out.is_dir() and _finished(out) and not cfg.overwrite_output_dir:
        raise TunelabError(
            f"output_dir: '{out}' holds a finished run; set overwrite_output_dir=true to replace "
            "it, or choose another output_dir"
        )
    if resume == "auto" and out.is_dir() and not cfg.overwrite_output_dir:
        return latest_checkpoint(out)
    return None


def _comparable(key: str, value):
    if key in ("model", "dataset", "eval_dataset"):
        paths = value if isinstance(value, list) else [value]
        resolved = [str(Path(v).resolve()) if isinstance(v, str) and Path(v).exists() else v for v in paths]
        return resolved if isinstance(value, list) else resolved[0]
    return value


def check_resume_config(cfg: Config, resume: str | None) -> None:
    """A resume under a changed config would silently mix two runs; refuse it, naming each change."""
    try:
        before = run_folder.saved_keys(Path(resume).parent) if resume else {}
    except TunelabError:  # unreadable: nothing to compare with
        return
    now = cfg.to_dict()
    changed = [
        k
        for k in now
        if k not in RESUME_MAY_CHANGE and k in before and _comparable(k, before[k]) != _comparable(k, now[k])
    ]
    if changed:
        raise TunelabError(
            "resume_from_checkpoint: "
            + "; ".join(f"{k} was {before[k]!r} in the run being resumed, now {now[k]!r}" for k in changed)
            + f"; a resumed run must compute the same steps (only {', '.join(sorted(RESUME_MAY_CHANGE))} may "
            "change): set it back, or start afresh with overwrite_output_dir=true"
        )


def prepare_model(cfg: Config, tokenizer, data: TokenizedData, model_path: str, empty: bool = False):
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's random init: the same config gives the same run, whatever ran before
    dtype = compute_dtype(True if cfg.pure_bf16 else cfg.bf16, cfg.fp16)
    notes: list[str] = []
    if dtype == torch.float16 and not torch.cuda.is_available():
        notes.append("fp16 mixed precision needs a GPU; training in fp32 on this CPU (bf16 runs on CPUs)")
        log.info(notes[-1])
        dtype = torch.float32
    # Trained weights stay fp32 (master weights) and the forward runs under autocast: in bf16 weights most
    # small updates round away, and fp16 weights cannot be unscaled. A frozen LoRA base needs no masters.
    weights = torch.float32 if cfg.finetuning_type == "full" and not cfg.pure_bf16 else dtype
    quant_bits = 4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else None
    model = load_model(
        model_path,
        weights,
        cfg.attn_implementation,
        cfg.trust_remote_code,
        cfg.allow_pickle,
        notes,
        compute=dtype,
        quant_bits=quant_bits,
        empty=empty,
        device_map=cfg.device_map,
    )
    if cfg.device_map:
        placed = sorted(
            {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
            or {p.device.type for p in model.parameters()}
        )
        notes.append(f"device_map {cfg.device_map}: layers placed on {', '.join(placed)}")
        log.info(notes[-1])
    if quant_bits:
        from peft import prepare_model_for_kbit_training

        # norms and embeddings to fp32, input gradients on; checkpointing is set up below, tunelab's way
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        notes.append(f"{quant_bits}-bit base (bitsandbytes{', NF4, double quantisation' if quant_bits == 4 else ''})")
        log.info(notes[-1])
    if enable_tf32():
        log.info("TF32 on for fp32 matmuls")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
        notes.append(f"embeddings resized from {rows} to {len(tokenizer)} rows for added tokens")
    pad_note = ensure_pad_token(tokenizer, model, data.encoder.eot_tokens)
    notes += [n for n in [pad_note, set_stop_ids(model, tokenizer, data.encoder.eot_ids)] if n]
    if cfg.gradient_checkpointing:
        notes.append(enable_gradient_checkpointing(model, input_grads=cfg.finetuning_type == "lora"))
    if cfg.finetuning_type == "lora":
        model = attach_lora(model, cfg)
    if cfg.pure_bf16:
        notes.append(pure_bf16(model))
    trainable, total = count_parameters(model)
    log.info("trainable params: %s / %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model, dtype, notes, (trainable, total)


def pure_bf16(model) -> str:
    """Trainable weights to bf16 too (peft keeps adapters fp32), with a warning of what that gives up."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
    note = (
        "pure_bf16: weights, gradients and optimizer states in bf16, no fp32 master copy; AdamW rounds "
        "updates stochastically, expect a slightly noisier loss than mixed precision"
    )
    log.warning(note)
    return note


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

    With several processes to run (`nproc_per_node`, `nnodes`, or several GPUs), this starts them and
    returns when they are done; each of them runs this same function.
    """
    launching = needs_launch(cfg)
    processes = processes_per_node(cfg) * cfg.nnodes if launching else int(os.environ.get("WORLD_SIZE", 1))
    if cfg.streaming and processes > 1:
        raise TunelabError(
            f"streaming: true trains in one process for now, and this run has {processes} (each "
            "would need its own share of the stream); set nproc_per_node: 1, or streaming: false "
            "to train on several"
        )
    if launching:  # what every rank would refuse, refused once before they start
        resume = plan_output_dir(cfg)
        check_resume_config(cfg, resume)
        check_world(resume, processes)
        return _launched_run(cfg)
    started = time.perf_counter()
    distributed.init(cfg.ddp_timeout)
    main = distributed.is_main()
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
        model, dtype, notes, (trainable, total) = prepare_model(
            cfg, tokenizer, data, model_path, empty=engines.loads_empty(cfg, engine)
        )
    reads_weights = engines.reads_weights(model)
    check_disk(cfg, model, 0 if cfg.streaming else len(data.train))
    callbacks = _callbacks(cfg, counter := TokenCounter())

    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        run_folder.write_config(cfg, out)  # now, so that a resume can check it trains the same run
        for name in remove_leftovers(out):
            log.info("removed %s, a checkpoint cut off while it was being saved", name)
        if resume is None:
            for stale in complete_checkpoints(out) + [out / run_folder.METRICS, out / run_folder.SUMMARY]:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    distributed.barrier()
    packing = packing_is_exact(model) if cfg.packing is None else cfg.packing
    if packing:
        flatten = getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
        collator = PackCollator(tokenizer.pad_token_id, cfg.cutoff_len, flatten=flatten)
        log.info("packing: each batch's samples share rows of up to %d tokens, no padding", cfg.cutoff_len)
    else:
        collator = PadCollator(tokenizer.pad_token_id)
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
    if main:
        engines.write_engine_config(args, out)
    log.info(
        "global batch: %d per device x %d accumulation x %d process%s = %d samples per step",
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        world,
        "es" if world > 1 else "",
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
    )
    trainer = TunelabTrainer(
        model=model,
        args=args,
        train_dataset=data.train if cfg.streaming else SampleDataset(data.train, tokenizer.pad_token_id),
        eval_dataset=SampleDataset(data.eval, tokenizer.pad_token_id) if data.eval else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=pure_bf16_optimizer(cfg),
        token_counter=counter,
        loss_guard=(guard := LossGuard(cfg.on_bad_loss, cfg.loss_spike_factor)),
    )
    del keep_alive  # the TrainingArguments now hold their own DeepSpeed config, if any
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarCallback())
    if resume:
        log.info("resuming from %s", resume)
        guard.restore(resume)
        if cfg.streaming:
            data.train.resume_from(Position.load(resume))
    signals = SignalCheckpoint(together=distributed.active())
    trainer.signals = signals
    trainer.add_callback(signals)
    signals.install()
    try:
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        finally:
            signals.restore()
        if signals.stopped:
            raise Interrupted(
                f"stopped by {signals.describe()} at step "
                f"{trainer.state.global_step}; checkpoint saved in {latest_checkpoint(cfg.output_dir)}; "
                "resume with the same command plus resume_from_checkpoint=auto"
            )
        if data.eval:
            trainer.evaluate()
    finally:
        _finish_loggers(cfg)

    seen = int(distributed.total(counter.seen))
    reading_ranks = int(distributed.total(int(reads_weights)))
    save_run(cfg, trainer, tokenizer, out)
    if not main:
        distributed.barrier()  # rank 0 writes the rest
        distributed.shutdown()
        return TrainResult(out, [], {}, trainer.model)
    plot_loss(out / run_folder.METRICS, out / run_folder.LOSS_PLOT)
    metrics = read_metrics(out / run_folder.METRICS)
    summary = {
        "tunelab_version": __version__,
        "model_path": model_path,
        "template": template,
        "stop_ids": list(model.generation_config.eos_token_id),
        "stop_tokens": data.encoder.eot_tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "trainable_params": trainable,
        "total_params": total,
        "train_samples": None if cfg.streaming else len(data.train),
        "eval_samples": len(data.eval),
        "trained_tokens": None if cfg.streaming else data.stats.trained_tokens,
        "tokens_trained_seen": seen,
        "processes": distributed.world_size(),
        "engine": engine.name,
        "ranks_reading_weights": reading_ranks,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "final_eval_loss": next((m["eval_loss"] for m in reversed(metrics) if "eval_loss" in m), None),
        "packing": packing,
        "labelled_loss": trainer.labelled_loss,
        "data_seconds": round(data_seconds, 4),
        "quirks": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if torch.cuda.is_available():  # rank 0's; the estimate's "peak per device" is what it predicts
        summary["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    staged = out / f".{run_folder.SUMMARY}.tmp"
    staged.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    os.replace(staged, out / run_folder.SUMMARY)  # last, and whole: its presence marks the run finished
    log.info("saved to %s (%.1fs)", out, summary["seconds"])
    distributed.barrier()
    distributed.shutdown()
    return TrainResult(out, metrics, summary, trainer.model)


def _launched_run(cfg: Config) -> TrainResult:
    """The run folder's facts after the processes are done (node 0 writes them; other nodes get {})."""
    launch(cfg)
    out = Path(cfg.output_dir)
    if cfg.node_rank != 0 or not (out / run_folder.SUMMARY).is_file():
        return TrainResult(out, [], {}, None)
    return TrainResult(
        out, read_metrics(out / run_folder.METRICS), json.loads((out / run_folder.SUMMARY).read_text()), None
    )


def is_moe(model) -> bool:
    config = getattr(model, "config", None)
    return any(getattr(config, name, 0) for name in ("num_experts", "num_local_experts", "n_routed_experts"))


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
