"""Load a model for inference the way training left it: base + adapters, each with its saved template.

A LoRA run folder holds the adapter, the tokenizer with the chat template it was trained with,
and the stop ids; a base model holds its own. Every later step (chat, generate, eval, export,
sweep) loads through here, and the base itself through the model loader training uses, so none
of them re-guesses what training did or misses a repair it made.

Remote code runs only when asked: a run folder named as `--model` remembers its `trust_remote_code`
(it vouches for the base it recorded); a base named explicitly needs `trust_remote_code=True`
(`--trust-remote-code`), as everywhere.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import run_folder
from ..config import Config
from ..data.dataset import config_encoder
from ..data.encode import Encoder
from ..data.tokenizer import load_tokenizer
from ..errors import TunelabError
from ..hub import resolve_model_path
from ..model.adapters import load_adapter
from ..model.loader import check_weights_format, load_model

log = logging.getLogger("tunelab")

BASE = "none"  # `--adapter none`: the base model, adapters switched off


@dataclass
class Variant:
    """One model to run: the base, a full fine-tune, or base + one adapter."""

    label: str
    tokenizer: object
    stop_ids: list[int]
    adapter_dir: str | None = None
    peft_name: str | None = None


def thinking_switch(tokenizer, think: bool | None) -> dict:
    """The template kwargs for `--think` / `--no-think`: `enable_thinking` where the template reads it."""
    from ..data.reasoning import has_switch

    if think is None:
        return {}
    if not has_switch(tokenizer):
        log.warning(
            "--%s: this chat template has no thinking switch (enable_thinking); ignored",
            "think" if think else "no-think",
        )
        return {}
    return {"enable_thinking": think}


def run_config(variant: "Variant", base_path: str) -> Config | None:
    """The config the variant was trained with (its adapter's run, or a full fine-tune's), None for a base."""
    return run_folder.saved_config(variant.adapter_dir or base_path)


def prompt_encoder(variant: "Variant", base_path: str) -> Encoder:
    """The encoder a variant's prompts are rendered with: its tokenizer with everything its run trained with
    (system prompt, tools, reasoning rule, thinking switch), the same `config_encoder` as training's."""
    return config_encoder(run_config(variant, base_path), variant.tokenizer)


def _arch(config_json: Path) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    data = json.loads(config_json.read_text())
    data = data.get("text_config", data) if "hidden_size" not in data else data
    return {k: data.get(k) for k in keys}


def check_same_base(adapter_dir: Path, base_path: str) -> None:
    """Refuse an adapter trained on another base before peft fails with a shape error, or worse, loads."""
    recorded = run_folder.adapter_base(adapter_dir)
    if not recorded:
        return
    here, there = Path(base_path), Path(recorded)
    if there.is_dir() and here.resolve() == there.resolve():
        return
    if there.is_dir() and (there / "config.json").exists() and (here / "config.json").exists():
        a, b = _arch(there / "config.json"), _arch(here / "config.json")
        if a != b:
            diff = ", ".join(f"{k} {b[k]} != {a[k]}" for k in a if a[k] != b[k])
            raise TunelabError(
                f"--adapter: '{adapter_dir}' was trained on '{recorded}', which differs from "
                f"--model '{base_path}' ({diff})"
            )


def _stop_ids(folder: Path, tokenizer, notes: list[str]) -> list[int]:
    """The saved stop ids, plus every end-of-turn id of the template (a base model's config often lacks them)."""
    from transformers import GenerationConfig

    ids = tokenizer.eos_token_id
    if (folder / run_folder.GENERATION_CONFIG).exists():
        ids = GenerationConfig.from_pretrained(folder).eos_token_id
    saved = [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]
    stops = list(dict.fromkeys([*saved, *Encoder(tokenizer).eot_ids]))
    if len(stops) > len(saved):
        note = f"stop ids {stops} for '{folder}' (added the template's end-of-turn ids {stops[len(saved) :]})"
        log.info(note)
        notes.append(note)
    return stops


def tokenizer_for(folder: Path, base_path: str, trust: bool):
    source = folder if (folder / run_folder.TOKENIZER_CONFIG).exists() else Path(base_path)
    tok = load_tokenizer(str(source), trust_remote_code=trust)
    if not getattr(tok, "chat_template", None):
        raise TunelabError(f"{source}: no chat template saved with this tokenizer")
    return tok


def _label(path: str, taken: set) -> str:
    name = Path(path).name or path
    label, n = name, 2
    while label in taken:
        label, n = f"{name}-{n}", n + 1
    taken.add(label)
    return label


class InferenceModel:
    """A base model with zero or more adapters; `use(variant)` switches between them in place."""

    def __init__(
        self,
        model,
        base_path: str,
        variants: list[Variant],
        trust_remote_code: bool = False,
        notes: list[str] | None = None,
    ):
        self.model = model.eval()
        self.base_path = base_path
        self.variants = variants
        self.trust_remote_code = trust_remote_code
        self.notes = notes or []

    @property
    def device(self):
        return self.model.device

    @contextmanager
    def use(self, variant: Variant):
        if variant.peft_name is not None:
            self.model.set_adapter(variant.peft_name)
            yield self.model
        elif hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield self.model
        else:
            with nullcontext():
                yield self.model


def split_run_folder(model: str, adapters: list[str] | None) -> tuple[str, list[str]]:
    """A LoRA run folder passed as `--model` stands for its base plus itself."""
    folder = Path(model)
    if not adapters and run_folder.is_adapter(folder):
        base = run_folder.adapter_base(folder)
        if not base:
            raise TunelabError(f"{folder}: adapter_config.json names no base model; pass --model BASE --adapter DIR")
        return base, [str(folder)]
    if adapters and run_folder.is_adapter(folder) and not (folder / run_folder.MODEL_CONFIG).is_file():
        raise TunelabError(
            f"--model: '{folder}' is a LoRA run folder, not a model; pass it alone (--model {folder}: its base comes "
            f"from adapter_config.json), or pass its base as --model with --adapter {folder}"
        )
    return model, list(adapters or [])


def load_inference(
    model: str,
    adapters: list[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> InferenceModel:
    named = Path(model)
    model, adapters = split_run_folder(model, adapters)
    for a in adapters:
        if a != BASE and not run_folder.is_adapter(a):
            raise TunelabError(
                f"--adapter: '{a}' holds no adapter_config.json"
                if Path(a).is_dir()
                else f"--adapter: folder '{a}' not found"
            )
    base_path = resolve_model_path(model)
    settings = [c for c in (run_folder.saved_config(p) for p in [base_path, *adapters] if p != BASE) if c]
    named_run = run_folder.saved_config(named) if named.is_dir() else None
    trust = trust_remote_code or bool(named_run and named_run.trust_remote_code)
    allow_pickle = any(c.allow_pickle for c in settings)
    check_weights_format(base_path, allow_pickle, "--model")
    for a in adapters:
        if a != BASE:
            check_weights_format(a, allow_pickle, "--adapter")
            check_same_base(Path(a), base_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    notes: list[str] = []
    lm = load_model(base_path, dtype, "auto", trust, allow_pickle, notes=notes)

    variants, taken = [], set()
    if not adapters:
        tok = tokenizer_for(Path(base_path), base_path, trust)
        variants.append(Variant(_label(base_path, taken), tok, _stop_ids(Path(base_path), tok, notes)))
    base_tok = None
    for i, a in enumerate(adapters):
        if a == BASE:
            base_tok = base_tok or tokenizer_for(Path(base_path), base_path, trust)
            variants.append(Variant(_label("base", taken), base_tok, _stop_ids(Path(base_path), base_tok, notes)))
            continue
        tok = tokenizer_for(Path(a), base_path, trust)
        lm = load_adapter(lm, a, f"adapter{i}", len(tok))
        variants.append(Variant(_label(a, taken), tok, _stop_ids(Path(a), tok, notes), a, f"adapter{i}"))
    return InferenceModel(lm.to(device), base_path, variants, trust, notes)
