"""The one config object: flat YAML keys, `key=value` overrides, validated once at load.

Training keys keep the names of transformers' `TrainingArguments` so a tutorial's values carry over;
the rest follow LLaMA-Factory where it has a name for the same thing. Every problem in a file is
reported at once, each naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from .errors import TunelabError


LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
)

CHOICES: dict[str, tuple] = {
    "model_hub": ("hf", "modelscope"),
    "dataset_format": ("auto", "alpaca", "dolly", "sharegpt", "messages", "text"),
    "template": ("auto", "chatml", "llama3", "gemma", "alpaca", "dolly"),
    "train_on": ("assistant", "last", "all"),
    "finetuning_type": ("lora", "full"),
    "report_to": ("none", "tensorboard", "swanlab", "wandb"),
    "lr_scheduler_type": LR_SCHEDULERS,
    "attn_implementation": ("auto", "eager", "sdpa", "flash_attention_2"),
    "on_bad_loss": ("stop", "skip", "warn"),
    "optim": ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit"),
}


@dataclass
class Config:
    # model
    model: str = ""
    model_hub: str = "hf"
    trust_remote_code: bool = False
    # pickle-based .bin/.pt weights can run code when loaded; only safetensors load unless this is set
    allow_pickle: bool = False
    attn_implementation: str = "auto"
    # data
    dataset: Union[str, list] = ""
    eval_dataset: Union[str, list, None] = None
    dataset_format: str = "auto"
    columns: Union[dict, None] = None
    template: str = "auto"
    system: Union[str, None] = None
    cutoff_len: int = 1024
    max_samples: Union[int, None] = None
    val_size: float = 0.0
    train_on: str = "assistant"
    # null = on where it is exact (models whose attention masks follow position_ids), else off
    packing: Union[bool, None] = None
    # null = on when not packing: batches of similar lengths waste less padding
    group_by_length: Union[bool, None] = None
    # adapters
    finetuning_type: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: Union[str, list] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    # run folder
    output_dir: str = ""
    overwrite_output_dir: bool = False
    resume_from_checkpoint: Union[str, None] = None
    report_to: str = "none"
    run_name: Union[str, None] = None
    # TrainingArguments names
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Union[int, None] = None
    eval_steps: Union[int, None] = None
    seed: int = 42
    gradient_checkpointing: bool = False
    # a NaN/inf loss, or one over loss_spike_factor x its running mean: stop (naming the last checkpoint),
    # skip the step, or warn
    on_bad_loss: str = "stop"
    loss_spike_factor: Union[float, None] = None
    bf16: Union[bool, None] = None
    fp16: Union[bool, None] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def datasets(self) -> list[str]:
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)

    @property
    def eval_datasets(self) -> list[str]:
        if self.eval_dataset is None:
            return []
        return [self.eval_dataset] if isinstance(self.eval_dataset, str) else list(self.eval_dataset)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
REQUIRED = ("model", "dataset", "output_dir")
POSITIVE = ("cutoff_len", "lora_r", "lora_alpha", "per_device_train_batch_size", "per_device_eval_batch_size",
            "gradient_accumulation_steps", "logging_steps", "save_steps", "max_samples", "save_total_limit",
            "eval_steps", "loss_spike_factor")
UNIT_INTERVAL = ("lora_dropout", "warmup_ratio")


def _allowed_types(name: str) -> tuple:
    hint = eval(FIELDS[name].type, {"Union": Union}) if isinstance(FIELDS[name].type, str) else FIELDS[name].type
    if get_origin(hint) is Union:
        return tuple(t if t is not type(None) else type(None) for t in get_args(hint))
    return (hint,)


def _type_name(types: tuple) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _coerce(name: str, value: Any) -> tuple[Any, str | None]:
    """Return (value, error). Ints are accepted where floats are; '1e-4' strings (YAML 1.1) become floats."""
    types = _allowed_types(name)
    if value is None and type(None) in types:
        return None, None
    if isinstance(value, bool):
        return (value, None) if bool in types else (value, f"expected {_type_name(types)}")
    if float in types and isinstance(value, str):
        try:
            return float(value), None
        except ValueError:
            pass
    if float in types and isinstance(value, int):
        return float(value), None
    for t in types:
        if t is not type(None) and isinstance(value, t):
            return value, None
    return value, f"expected {_type_name(types)}"


# Names other tools use for our keys, so the hint is right where spelling similarity is not.
ALIASES = {"batch_size": "per_device_train_batch_size", "epochs": "num_train_epochs", "lr": "learning_rate",
           "max_length": "cutoff_len", "max_seq_length": "cutoff_len", "max_len": "cutoff_len",
           "lora_rank": "lora_r", "target_modules": "lora_target", "model_name_or_path": "model",
           "evaluation_strategy": "eval_steps", "torch_dtype": "bf16", "dtype": "bf16",
           "grad_accum": "gradient_accumulation_steps", "warmup_steps": "warmup_ratio"}


def unknown_key(key: str) -> str:
    close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    return f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")


def _check(cfg: dict) -> list[str]:
    problems = []
    bad = set(cfg)
    for key, value in list(cfg.items()):
        if key not in FIELDS:
            problems.append(unknown_key(key))
            cfg.pop(key)
            continue
        value, err = _coerce(key, value)
        if err:
            problems.append(f"{key}: {value!r} is not valid, {err}")
            continue
        cfg[key] = value
        bad.discard(key)
        if key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
        if key in POSITIVE and value is not None and value <= 0:
            problems.append(f"{key}: {value!r} must be greater than 0")
        if key in UNIT_INTERVAL and not 0 <= value < 1:
            problems.append(f"{key}: {value!r} must be in [0, 1)")
    for key in REQUIRED:
        if not cfg.get(key):
            problems.append(f"{key}: missing; it is required")
    problems += _check_combinations({k: v for k, v in cfg.items() if k not in bad})
    return problems


def _check_combinations(cfg: dict) -> list[str]:
    problems = []
    val_size = cfg.get("val_size", 0.0)
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        problems.append(f"val_size: {val_size!r} must be a fraction in [0, 1) or a whole count of records")
    if cfg.get("bf16") and cfg.get("fp16"):
        problems.append("bf16 and fp16: both true; choose one")
    if cfg.get("learning_rate", 1.0) <= 0:
        problems.append(f"learning_rate: {cfg['learning_rate']!r} must be greater than 0")
    if cfg.get("num_train_epochs", 1.0) <= 0 and cfg.get("max_steps", -1) <= 0:
        problems.append("num_train_epochs: must be greater than 0 unless max_steps is set")
    columns = cfg.get("columns")
    if columns is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        problems.append(f"columns: {columns!r} must map field names to column names (strings)")
    return problems


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings; values are read as YAML so `lora_r=16` is an int and `bf16=true` a bool."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TunelabError(f"override '{pair}': expected key=value")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def from_dict(data: dict, source: str = "config") -> Config:
    cfg = dict(data)
    problems = _check(cfg)
    if problems:
        raise TunelabError(f"{source}: " + "; ".join(problems))
    return Config(**cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML file, apply overrides (they win), and validate the result once."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise TunelabError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise TunelabError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TunelabError(f"{path}: expected a mapping of keys to values at the top level")
        data = loaded or {}
        base = path.parent
        data = _resolve_relative_paths(data, base)
    if overrides:
        data.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(data, source)


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Data paths in a YAML file are relative to that file when they exist there, so examples run from anywhere."""
    def fix(p):
        if isinstance(p, str) and not Path(p).is_absolute() and not Path(p).exists() and (base / p).exists():
            return str(base / p)
        return p
    out = dict(data)
    for key in ("dataset", "eval_dataset", "model"):
        if key in out:
            out[key] = [fix(p) for p in out[key]] if isinstance(out[key], list) else fix(out[key])
    return out


def dump_config(cfg: Config, path: str | Path, extra: dict | None = None) -> None:
    data = cfg.to_dict()
    if extra:
        data.update(extra)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
