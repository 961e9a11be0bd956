"""Real tokenizers and chat templates from ../shared/tokenizers, rebuilt as loadable tokenizers.

Template-only families (gemma-3, phi-4, DeepSeek-R1, Mistral) are paired with the Qwen2.5
vocabulary plus their own special tokens, which is enough to test how their templates split turns.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

SHARED_TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"

FULL = ("qwen2.5-instruct", "qwen3", "llama-3.2-3b-instruct", "phi-3-mini-4k-instruct")
TEMPLATE_ONLY = (
    "gemma-3-4b-it",
    "phi-4",
    "phi-4-mini-instruct",
    "deepseek-r1-distill-qwen",
    "mistral-v1",
    "mistral-v3",
)
ALL = FULL + TEMPLATE_ONLY


def load_or_skip(family: str, workdir: Path):
    """`load(family)`, or the test skipped, naming what is missing, where ../shared lacks it."""
    import pytest

    if not available(family):
        pytest.skip(f"../shared/tokenizers/{family} not present")
    return load(family, workdir)


def available(family: str) -> bool:
    return (SHARED_TOKENIZERS / "qwen2.5-instruct" / "vocab.json").exists() and (
        SHARED_TOKENIZERS / family.split("-v")[0] if family.startswith("mistral") else SHARED_TOKENIZERS / family
    ).exists()


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def _template_of(family: str) -> tuple[str, dict]:
    if family.startswith("mistral"):
        name = "chat_template_v1_spm.jinja" if family.endswith("v1") else "chat_template_v3_spm.jinja"
        text = (SHARED_TOKENIZERS / "mistral" / name).read_text()
        return text, {"bos_token": "<s>", "eos_token": "</s>"}
    cfg = json.loads((SHARED_TOKENIZERS / family / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template")
    if family == "gemma-3-4b-it":
        template = json.loads((SHARED_TOKENIZERS / family / "chat_template.json").read_text())["chat_template"]
    if isinstance(template, list):
        template = next(t["template"] for t in template if t["name"] == "default")
    return template, cfg


def load(family: str, workdir: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = SHARED_TOKENIZERS / family
    if family in ("qwen2.5-instruct", "qwen3", "phi-3-mini-4k-instruct"):
        return AutoTokenizer.from_pretrained(src)
    if family == "llama-3.2-3b-instruct":
        dst = workdir / family
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "derived" / "tokenizer.json", dst / "tokenizer.json")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(src / name, dst / name)
        return AutoTokenizer.from_pretrained(dst)
    template, cfg = _template_of(family)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(SHARED_TOKENIZERS / "qwen2.5-instruct" / "derived" / "tokenizer.json")
    )
    specials = {_token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    specials |= {v["content"] for v in cfg.get("added_tokens_decoder", {}).values() if v.get("special")}
    # tokens the template writes literally, e.g. '<start_of_turn>' or '[INST]'
    specials |= set(re.findall(r"<[^<>\s'\"{}]{2,40}>|\[/?[A-Z_]{3,20}\]", template))
    # the R1 distills' think markers are ordinary added tokens (151648/151649, not special), as in Qwen3
    plain = {"<think>", "</think>"} if family == "deepseek-r1-distill-qwen" else set()
    specials = sorted(t for t in specials if t and t not in plain)
    tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    if plain:
        tok.add_tokens(sorted(plain))
    for key in ("bos_token", "eos_token", "pad_token"):
        value = _token_text(cfg.get(key))
        if value:
            setattr(tok, key, value)
    tok.chat_template = template
    return tok


def builtin_styled(tokenizer, name: str):
    """A copy of a test tokenizer with tunelab's built-in template `name` and the special tokens it writes."""
    import copy

    from tunelab.data.templates import BUILTIN, REQUIRED_TOKENS

    tok = copy.deepcopy(tokenizer)
    if REQUIRED_TOKENS[name]:
        tok.add_special_tokens(
            {"additional_special_tokens": list(REQUIRED_TOKENS[name])}, replace_extra_special_tokens=False
        )
    tok.chat_template = BUILTIN[name]
    return tok


def trl_template(name: str) -> str | None:
    """A chat template TRL ships (its `{% generation %}`-marked training variants among them), or None."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    path = Path(spec.origin).parent / "chat_templates" / name if spec is not None else None
    return path.read_text(encoding="utf-8") if path is not None and path.exists() else None


def trained_runs(tok, sample) -> list[str]:
    """The decoded runs of consecutive trained tokens of a sample."""
    out, run = [], []
    for tid, label in zip(sample.input_ids, sample.labels):
        if label != -100:
            run.append(tid)
        elif run:
            out, run = out + [tok.decode(run)], []
    return out + ([tok.decode(run)] if run else [])
