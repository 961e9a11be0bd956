"""Before a rank trains: the run folder checked (nothing clobbered, a resume that trains the same run) and the
model prepared (precision, quantization, quirks, adapters). Everything here can refuse user input before anything
is written."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import run_folder
from ..config import RESUME_MAY_CHANGE, Config
from ..data.dataset import TokenizedData
from ..errors import TunelabError
from ..model.adapters import attach_lora
from ..model.loader import compute_dtype, enable_tf32, load_model
from ..model.quirks import count_parameters, enable_gradient_checkpointing, ensure_pad_token, set_stop_ids
from .checkpoints import complete_checkpoints, latest_checkpoint

log = logging.getLogger("tunelab")


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


def is_moe(model) -> bool:
    config = getattr(model, "config", None)
    return any(getattr(config, name, 0) for name in ("num_experts", "num_local_experts", "n_routed_experts"))
