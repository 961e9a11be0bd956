"""Which engine spreads a run over its processes, and that engine's configuration, written by tunelab.

- ddp: every process holds the whole model and averages gradients (torch DDP).
- fsdp2: parameters, gradients and optimizer state sharded over the processes (PyTorch FSDP2, through
  accelerate as transformers' Trainer drives it).
- deepspeed: ZeRO stage 2 (gradients and optimizer state) or 3 (parameters too), through accelerate.

The user writes `distributed: fsdp2` or `distributed: deepspeed` + `zero_stage: 3`; the engine files
that recipes pass around by hand (`zero3.yaml`, `ds_config.json`, `fsdp_config`) are made here, with
"auto" left where transformers fills in the run's own batch sizes, learning rate and precision.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import TunelabError
from . import distributed

log = logging.getLogger("tunelab")

DEEPSPEED_FILE = "tunelab_deepspeed.json"


USABLE = 0.95  # of a GPU's memory a run may plan to fill; the caching allocator needs the rest


@dataclass(frozen=True)
class Engine:
    name: str  # "single", "ddp", "fsdp2" or "deepspeed"
    reason: str  # why, for the log line and the run summary


def choose(cfg: Config, world: int, fits_one_device: bool | None = None) -> Engine:
    """The engine for `world` processes; `fits_one_device` is the estimate's verdict for `auto` (None = unknown)."""
    import torch

    wanted = "deepspeed" if cfg.deepspeed else cfg.distributed
    if world <= 1 and wanted in ("auto", "ddp"):
        return Engine("single", "one process")
    if world <= 1 and not torch.cuda.is_available():
        return Engine("single", f"one process on CPU: {wanted} needs 2 or more (nproc_per_node)")
    if wanted != "auto":
        source = f"deepspeed: {cfg.deepspeed}" if cfg.deepspeed else f"distributed: {wanted}"
        return Engine(wanted, source)
    if fits_one_device is False:
        return Engine(
            "fsdp2",
            "auto: the model with its gradients and optimizer state does not fit one device, so "
            "it is sharded over the processes",
        )
    return Engine(
        "ddp",
        "auto: the model with its gradients and optimizer state fits one device"
        + ("" if fits_one_device else " (nothing to compare with: no GPU here, or no estimate for this model)"),
    )


def layer_classes(model) -> list[str]:
    """The decoder-layer classes to shard one by one (transformers lists them as `_no_split_modules`)."""
    inner = model
    while not hasattr(inner, "_no_split_modules") or inner._no_split_modules is None:
        nxt = getattr(inner, "base_model", None) or getattr(inner, "model", None)
        if nxt is None or nxt is inner:
            break
        inner = nxt
    names = list(getattr(inner, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    found = [n for n in names if n in present]
    if not found:
        raise TunelabError(
            f"distributed: fsdp2 cannot find the decoder layers of {type(inner).__name__} to shard "
            f"(its _no_split_modules, {names or 'none'}, name no module in it); use distributed: "
            "deepspeed with zero_stage: 3, ddp, or one process with device_map: auto (its layers "
            "spread over the GPUs)"
        )
    return found


def fsdp_config(cfg: Config, model) -> dict:
    """transformers' `fsdp_config` for FSDP2: each decoder layer its own unit, a full state dict when saving."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": layer_classes(model),
        "reshard_after_forward": True,
        "cpu_offload": cfg.offload != "none",
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": True,  # rank 0's weights are sent to the others as they are sharded
        # (and, for that, fsdp_config must hold it: transformers exports it to the environment accelerate reads)
    }


def deepspeed_config(cfg: Config) -> dict:
    """A ZeRO-2/3 configuration as the DeepSpeed docs and the recipes write it; "auto" is filled by transformers."""
    zero: dict = {
        "stage": cfg.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if cfg.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                # the saved model is whole: ZeRO-3 gathers the 16-bit weights onto rank 0 at save time
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    else:
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 2e8, "reduce_scatter": True})
    if cfg.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload == "params":
        if cfg.zero_stage != 3:
            raise TunelabError("offload: 'params' needs zero_stage: 3 (ZeRO-2 keeps every parameter on each GPU)")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "bf16": {"enabled": "auto"},
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1e9,
        "wall_clock_breakdown": False,
    }


def deepspeed_settings(cfg: Config) -> dict:
    """The DeepSpeed configuration of the run: the user's own file, or the one tunelab writes."""
    return json.loads(Path(cfg.deepspeed).read_text()) if cfg.deepspeed else deepspeed_config(cfg)


def zero_stage(cfg: Config) -> int:
    if cfg.deepspeed:
        return int(deepspeed_settings(cfg).get("zero_optimization", {}).get("stage", 0))
    return cfg.zero_stage


def loads_empty(cfg: Config, engine: Engine) -> bool:
    """fsdp2: rank 0 alone reads the weights; every other rank builds the model unwritten and is
    sent its shards when accelerate shards the model (`cpu_ram_efficient_loading`), so a model larger than
    a machine's memory divided by its ranks never exists whole more than once. A quantized base is
    loaded by every rank (bitsandbytes weights cannot be rebuilt empty)."""
    return engine.name == "fsdp2" and not distributed.is_main() and not (cfg.load_in_4bit or cfg.load_in_8bit)


@contextlib.contextmanager
def sharded_loading(cfg: Config, engine: Engine):
    """While the model loads: under ZeRO-3 every parameter is partitioned as it is created (transformers
    loads under `deepspeed.zero.Init` while a DeepSpeed config is alive). For fsdp2 see `loads_empty`."""
    if engine.name == "deepspeed" and zero_stage(cfg) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers holds it weakly: it must live until TrainingArguments make their own
        yield HfDeepSpeedConfig(deepspeed_settings(cfg))
    else:
        yield None


def reads_weights(model) -> bool:
    """Whether this rank read the weight files itself (False: built unwritten, to be sent its shard)."""
    return not getattr(model, "_tunelab_unread", False)


def fits_one_device(cfg: Config, world: int) -> bool | None:
    """The estimate's verdict on DDP over `world` GPUs like this machine's, for `distributed: auto`; None
    without a GPU, or when the estimate cannot read this model (then auto keeps DDP: it never stops a run)."""
    import torch

    if cfg.distributed != "auto" or cfg.deepspeed or not torch.cuda.is_available():
        return None
    from ..model.estimate import estimate_memory

    try:
        need = estimate_memory(cfg, device="cuda", engine="ddp", world=world).total
    except Exception as exc:  # remote code and unusual configs: an estimate is advice, not a requirement
        log.info(
            "distributed auto: no memory estimate for this model (%s)",
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return None
    return need <= USABLE * torch.cuda.get_device_properties(0).total_memory


def training_arguments(cfg: Config, engine: Engine, model) -> dict:
    """The TrainingArguments keys that select the engine (none for one process or DDP)."""
    if engine.name == "fsdp2":
        return {"fsdp": "full_shard", "fsdp_config": fsdp_config(cfg, model)}
    if engine.name == "deepspeed":
        if cfg.deepspeed:
            return {"deepspeed": cfg.deepspeed}
        return {"deepspeed": deepspeed_config(cfg)}
    return {}


def write_engine_config(args, folder: Path) -> Path | None:
    """The DeepSpeed configuration a run used, "auto"s filled in, beside its weights, to read or reuse."""
    ds = getattr(args, "hf_deepspeed_config", None)
    if ds is None:
        return None
    path = Path(folder) / DEEPSPEED_FILE
    path.write_text(json.dumps(ds.config, indent=2))
    return path


PLAN = (  # (label, the config keys that select it, estimate engine, offload)
    ("ddp", "distributed: ddp", "ddp", "none"),
    ("fsdp2", "distributed: fsdp2", "fsdp2", "none"),
    ("fsdp2, offload", "distributed: fsdp2, offload: params", "fsdp2", "params"),
    ("zero-2", "distributed: deepspeed, zero_stage: 2", "zero2", "none"),
    ("zero-2, offload optimizer", "distributed: deepspeed, zero_stage: 2, offload: optimizer", "zero2", "optimizer"),
    ("zero-3", "distributed: deepspeed, zero_stage: 3", "zero3", "none"),
    ("zero-3, offload optimizer", "distributed: deepspeed, zero_stage: 3, offload: optimizer", "zero3", "optimizer"),
    ("zero-3, offload params", "distributed: deepspeed, zero_stage: 3, offload: params", "zero3", "params"),
)


def _configured(cfg: Config) -> tuple[str, str]:
    if cfg.deepspeed or cfg.distributed == "deepspeed":
        return f"zero{zero_stage(cfg)}", cfg.offload
    if cfg.distributed == "fsdp2":
        return "fsdp2", "params" if cfg.offload != "none" else "none"
    return "ddp", "none"


def format_plan(cfg: Config, world: int, gpu_bytes: int | None = None) -> str:
    """Per-GPU peak under each engine for `world` processes, which fit `gpu_bytes`, and what auto picks."""
    from ..model.estimate import estimate_memory, human_size

    whole = estimate_memory(cfg, device="cuda", engine="ddp", world=world).total
    fits = None if gpu_bytes is None else whole <= USABLE * gpu_bytes
    picked = choose(cfg, max(world, 2), fits)
    mine = _configured(cfg)
    lines = [
        f"per-GPU peak over {world} process{'es' if world > 1 else ''}"
        + (f", against {human_size(gpu_bytes).strip()} GPUs:" if gpu_bytes else ":")
    ]
    for label, keys, engine, offload in PLAN:
        need = estimate_memory(cfg, device="cuda", engine=engine, world=world, offload=offload).total
        verdict = "" if gpu_bytes is None else "  fits" if need <= USABLE * gpu_bytes else "  does not fit"
        marker = "  <- this config" if (engine, offload) == mine and cfg.distributed != "auto" else ""
        lines.append(f"  {label:<26}{human_size(need)}{verdict:<15}({keys}){marker}")
    lines.append(
        f"auto picks {picked.name}: {picked.reason.removeprefix('auto: ')}"
        + ("" if gpu_bytes else " (give --gpu-mem to compare with a GPU size)")
    )
    return "\n".join(lines)
