"""The run folder: what training writes next to the weights, and the one way later commands read it.

chat, generate, eval, export, serve and the web page all render prompts the way the run was trained;
they learn how from the saved config, read here into the same `Config` training validated (today's
defaults fill keys an older tunelab did not write; keys a newer tunelab wrote are an error naming them),
never from a raw dict with defaults restated beside each reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .config import FIELDS, Config, dump_config, from_dict
from .errors import TunelabError

CONFIG = "tunelab_config.yaml"
SUMMARY = "run_summary.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
TOOLS = "tunelab_tools.json"  # the config's `tools` file as trained, so a moved or edited source changes nothing
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
EXPORT_REPORT = "export_report.json"
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_run(folder: str | Path) -> bool:
    """Whether `folder` was written by `tunelab train` (not a plain model folder)."""
    return (Path(folder) / CONFIG).is_file()


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str | None:
    """The base model an adapter folder was trained on, as peft recorded it."""
    path = Path(folder) / ADAPTER_CONFIG
    return json.loads(path.read_text()).get("base_model_name_or_path") if path.is_file() else None


def write_config(cfg: Config, folder: str | Path) -> None:
    """The config as trained, with the tools it rendered copied beside it."""
    folder = Path(folder)
    dump_config(cfg, folder / CONFIG)
    if cfg.tools and Path(cfg.tools).is_file() and Path(cfg.tools).resolve() != (folder / TOOLS).resolve():
        shutil.copyfile(cfg.tools, folder / TOOLS)


def saved_keys(folder: str | Path) -> dict:
    """The saved config as written (an empty mapping for a folder that is no run): for comparing runs."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TunelabError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise TunelabError(f"{path}: expected a mapping of keys to values")
    return data


def saved_config(folder: str | Path) -> Config | None:
    """The config `folder` was trained with, or None when it is not a run folder (a base model)."""
    folder = Path(folder)
    if not is_run(folder):
        return None
    data = saved_keys(folder)
    newer = sorted(k for k in data if k not in FIELDS)
    if newer:
        raise TunelabError(
            f"{folder / CONFIG}: keys this tunelab does not know ({', '.join(newer)}); the run was "
            "written by a newer tunelab: upgrade to read it"
        )
    if (folder / TOOLS).is_file():
        data["tools"] = str(folder / TOOLS)
    return from_dict(data, source=str(folder / CONFIG))
