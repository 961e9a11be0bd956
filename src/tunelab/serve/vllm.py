"""The vLLM command that serves the same models: base, adapters, saved chat template and stop ids.

tunelab's run folders load in vLLM as they are (a PEFT adapter, a tokenizer with `chat_template.jinja`,
`generation_config.json` whose eos ids are every end-of-turn token); this writes the flags that point
vLLM at each of them, so a GPU machine with vLLM serves what `tunelab serve` serves.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from .. import run_folder
from ..data.dataset import config_encoder
from ..data.templates import with_run_defaults
from ..errors import TunelabError
from ..infer.load import tokenizer_for
from .names import served_names

log = logging.getLogger("tunelab")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
TEMPLATE_FILE = "tunelab_vllm_template.jinja"  # the saved template with the run's defaults, written beside it


def _template(folder: Path) -> str | None:
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    config = folder / run_folder.TOKENIZER_CONFIG
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    return None


def _parsers(template: str) -> list[str]:
    """vLLM's tool-call and reasoning parsers for the format this template teaches."""
    flags = []
    if "<tool_call>" in template:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    elif "[TOOL_CALLS]" in template:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", "mistral"]
    elif '"parameters": ' in template:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    if "enable_thinking" in template and "<think>" in template:
        flags += ["--reasoning-parser", "qwen3"]
    elif "<｜Assistant｜><think>" in template:
        flags += ["--reasoning-parser", "deepseek_r1"]
    return flags


def vllm_command(
    model: str, adapters: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None
) -> list[str]:
    base, model_id, named = served_names(model, adapters)
    runs = [Path(d) for d in named.values()] or [Path(model)]
    cmd = ["vllm", "serve", base, "--served-model-name", model_id, "--host", host, "--port", str(port)]
    if named:
        ranks = [json.loads((d / run_folder.ADAPTER_CONFIG).read_text()).get("r", 8) for d in runs]
        rank = next((r for r in LORA_RANKS if r >= max(ranks)), None)
        if rank is None:
            raise TunelabError(f"LoRA rank {max(ranks)} is above what vLLM serves ({LORA_RANKS[-1]})")
        cmd += ["--enable-lora", "--max-loras", str(len(named)), "--max-lora-rank", str(rank), "--lora-modules"]
        cmd += [f"{name}={Path(d).resolve()}" for name, d in named.items()]
        for d in runs:
            if run_folder.adapter_base(d) and run_folder.adapter_base(d) != base:
                log.warning("%s was trained on %s, not %s", d, run_folder.adapter_base(d), base)
    templates = {d: t for d in runs if (t := _template(d)) is not None}
    if len(set(templates.values())) > 1:
        log.warning("the adapters were trained with different chat templates; vLLM serves one (%s's)", runs[0])
    configs = [run_folder.saved_config(d) for d in runs]
    defaults = [
        config_encoder(c, tokenizer_for(d, base, c.trust_remote_code)).defaults if c else {}
        for c, d in zip(configs, runs)
    ]
    if len({json.dumps(x, sort_keys=True) for x in defaults}) > 1:
        raise TunelabError(
            "the runs were trained with different system prompts, tools or thinking switches, and "
            "vLLM renders every adapter with one chat template; serve them with separate vLLM "
            "commands, or with tunelab serve (each adapter its own)"
        )
    chosen = runs[0] / "chat_template.jinja"
    if runs[0] in templates and defaults[0]:
        # vLLM applies no default system prompt: the template it is given inserts the trained one
        chosen = runs[0] / TEMPLATE_FILE
        chosen.write_text(with_run_defaults(templates[runs[0]], **defaults[0]), encoding="utf-8")
    if chosen.is_file():
        cmd += ["--chat-template", str(chosen.resolve())]
    elif runs[0] in templates:
        log.warning("%s has its chat template in tokenizer_config.json only; vLLM reads it from there", runs[0])
    if runs[0] in templates:
        cmd += _parsers(templates[runs[0]])
    if (runs[0] / run_folder.GENERATION_CONFIG).is_file():  # the stop ids training saved
        cmd += ["--generation-config", str(runs[0].resolve())]
    if any(c and c.trust_remote_code for c in configs):
        cmd.append("--trust-remote-code")
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def printable(cmd: list[str]) -> str:
    return " \\\n  ".join(shlex.join(part) for part in _lines(cmd))


def _lines(cmd: list[str]) -> list[list[str]]:
    """One flag (with its values) per line, for a command a person reads before running."""
    lines: list[list[str]] = [cmd[:3]]
    for arg in cmd[3:]:
        if arg.startswith("--"):
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return lines
