"""The tokenizer exactly as training uses it: loaded from the model folder, its chat template set."""

from __future__ import annotations

import logging

from ..errors import TunelabError
from ..hub import from_pretrained, resolve_model_path
from .templates import apply_template, missing_tokens

log = logging.getLogger("tunelab")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, path, trust_remote_code, "the tokenizer")


def prepare_tokenizer(cfg):
    """The tokenizer exactly as training uses it: loaded, template applied, template tokens present.

    A built-in template's missing special tokens are added for full training and refused for LoRA,
    whose frozen embeddings could never learn them.
    """
    model_path = resolve_model_path(cfg.model, cfg.model_hub, allow_pickle=cfg.allow_pickle)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    if cfg.dataset_format == "text" and not getattr(tokenizer, "chat_template", None):
        return tokenizer, model_path, "none"
    name = apply_template(tokenizer, cfg.template, cfg.model)
    missing = missing_tokens(tokenizer, cfg.template) if name != "auto" else []
    if missing and cfg.finetuning_type == "lora":
        raise TunelabError(
            f"template: {cfg.template!r} needs tokens {missing} that the tokenizer lacks; LoRA "
            "cannot train new embeddings: use template alpaca or dolly, or finetuning_type full"
        )
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        log.info("added template tokens %s to the tokenizer", missing)
    return tokenizer, model_path, name
