"""LoRA targets: `all-linear` done right for MoE, fused projections and multimodal wrappers.

`all-linear` = every `nn.Linear` inside the language model's decoder layers, without `lm_head`,
MoE routers and per-expert modules (fused 3-D expert weights are not `nn.Linear`s and are skipped
by construction). Fused `qkv_proj` / `gate_up_proj` are ordinary Linears and are included.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

from torch import nn

from ..errors import TunelabError

log = logging.getLogger("tunelab")

_NOT_LANGUAGE = ("vision", "visual", "multi_modal_projector", "mm_projector", "audio", "image")
_LAYER_LISTS = ("layers", "h", "blocks", "block", "decoder_layers")
_ROUTERS = ("gate", "router", "shared_expert_gate", "gating", "w_gate")
_EXPERTS = ("experts",)


@contextlib.contextmanager
def quiet_deprecations():
    """peft reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecated: a warning on every
    run that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def linear_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _in_language_model(name: str) -> bool:
    return not any(tag in part for part in name.split(".") for tag in _NOT_LANGUAGE)


def _in_decoder_layer(name: str) -> bool:
    parts = name.split(".")
    if not _in_language_model(name):
        return False
    return any(p in _LAYER_LISTS and i + 1 < len(parts) and parts[i + 1].isdigit() for i, p in enumerate(parts))


def decoder_layer(name: str) -> str | None:
    """The decoder layer a module belongs to ('model.layers.3'), or None outside the language model's layers."""
    if not _in_language_model(name):
        return None
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in _LAYER_LISTS and i + 1 < len(parts) and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return None


def _is_moe_internal(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in _ROUTERS or any(p in _EXPERTS for p in parts[:-1])


def _is_regex(text: str) -> bool:
    return any(c in text for c in "*+?[]()^$|\\")


def resolve_targets(model: nn.Module, lora_target: str | list) -> list[str]:
    """Full module names to wrap; an error listing the model's linear names when nothing matches."""
    linears = linear_modules(model)
    if lora_target == "all-linear":
        chosen = [n for n in linears if _in_decoder_layer(n) and not _is_moe_internal(n)]
        if not chosen:
            raise TunelabError(
                "lora_target: 'all-linear' found no nn.Linear inside the decoder layers; "
                f"linear modules: {_summary(linears)}"
            )
        return chosen
    if isinstance(lora_target, str) and _is_regex(lora_target):
        chosen = [n for n in linears if re.fullmatch(lora_target, n)]
        if not chosen:
            raise TunelabError(
                f"lora_target: regex {lora_target!r} matches no linear module; linear modules: {_summary(linears)}"
            )
        return chosen
    names = [s.strip() for s in lora_target.split(",")] if isinstance(lora_target, str) else list(lora_target)
    chosen, unmatched = [], []
    for key in names:
        # short names mean the language model's modules, never a vision tower's namesakes
        hits = [n for n in linears if n == key or (n.endswith("." + key) and _in_language_model(n))]
        if not hits:
            unmatched.append(key)
        chosen += [n for n in hits if n not in chosen]
    if unmatched:
        raise TunelabError(
            f"lora_target: {', '.join(map(repr, unmatched))} match no linear module; "
            f"linear modules: {_summary(linears)}"
        )
    return chosen


def _summary(linears: list[str]) -> str:
    """Distinct names with layer numbers folded, e.g. 'model.layers.*.self_attn.q_proj'."""
    folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in linears))
    return ", ".join(folded) if folded else "(none)"


def _has_moe_internals(model: nn.Module) -> bool:
    return any(_EXPERTS[0] in name.split(".") for name, _ in model.named_parameters())


def peft_target_modules(model: nn.Module, chosen: list[str]) -> list[str] | str:
    """Short suffix names when they select exactly `chosen` (what vLLM and most tools expect), else a regex;
    on a MoE model, the full names.

    peft >= 0.22 rewrites the targets of MoE models it knows (`convert_peft_config_for_transformers`, on
    wrapping and again on loading): a short name or a regex is resolved to leaf names, and `gate_proj` /
    `up_proj` / `down_proj` then also reach the fused 3-D expert weights. Only full module names pass through
    it unchanged, so the adapter that is saved loads back onto the modules it was trained on.
    """
    linears = linear_modules(model)
    want = set(chosen)
    if _has_moe_internals(model):
        return list(chosen)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    if {n for n in linears if n.rsplit(".", 1)[-1] in suffixes} == want:
        return suffixes
    patterns = sorted(
        {re.escape(re.sub(r"\.\d+\.", ".#.", n)).replace("\\#", r"\d+").replace("#", r"\d+") for n in chosen}
    )
    regex = "(?:" + "|".join(patterns) + ")"
    if {n for n in linears if re.fullmatch(regex, n)} != want:
        regex = "(?:" + "|".join(map(re.escape, chosen)) + ")"
    return regex


def attach_lora(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    chosen = resolve_targets(model, cfg.lora_target)
    targets = peft_target_modules(model, chosen)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
    )
    with quiet_deprecations():
        model = get_peft_model(model, lora)
    check_wrapped(model, chosen)
    log.info(
        "LoRA r=%d alpha=%d on %d modules (%s)",
        cfg.lora_r,
        cfg.lora_alpha,
        len(chosen),
        targets if isinstance(targets, str) else ", ".join(targets),
    )
    return model


def check_wrapped(model: nn.Module, chosen: list[str]) -> None:
    """Refuse a LoRA that peft placed elsewhere than on `chosen`: a new peft release that reinterprets the
    targets (experts, routers) must stop the run, not train something the user never asked for."""
    config = next(iter(model.peft_config.values()))
    extra_params = sorted(getattr(config, "target_parameters", None) or [])
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    }
    stray = sorted(wrapped - set(chosen))
    if extra_params or stray:
        raise TunelabError(
            "peft wrapped more than lora_target chose (a change in peft's target matching?): "
            + ", ".join((extra_params + stray)[:5])
            + "; pin peft to the version in constraints.txt"
        )


def adapter_has_embeddings(folder: Path) -> bool:
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        return False
    with safe_open(str(weights), "pt") as f:
        return any("embed_tokens" in k or "lm_head" in k for k in f.keys())


def load_adapter(lm: nn.Module, adapter: str, name: str, tokenizer_size: int) -> nn.Module:
    """`lm` with the adapter in folder `adapter` loaded as `name` (a PeftModel; later adapters join it).

    A tokenizer larger than the base's embeddings (tokens added in training) needs embeddings the
    adapter carries; without them the new rows would be random, so that is refused.
    """
    from peft import PeftModel

    rows = lm.get_input_embeddings().weight.shape[0]
    if tokenizer_size > rows:
        if not adapter_has_embeddings(Path(adapter)):
            raise TunelabError(
                f"--adapter: '{adapter}' has a tokenizer of {tokenizer_size} tokens but the base has "
                f"{rows} embedding rows and the adapter carries no embeddings"
            )
        lm.resize_token_embeddings(tokenizer_size)
    try:
        if isinstance(lm, PeftModel):
            lm.load_adapter(adapter, adapter_name=name)
            return lm
        with quiet_deprecations():
            return PeftModel.from_pretrained(lm, adapter, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TunelabError(
            f"--adapter: '{adapter}' does not fit this base model ({str(exc).splitlines()[0][:300]})"
        ) from None
    except Exception as exc:  # a truncated or garbage safetensors file
        raise TunelabError(
            f"--adapter: cannot read '{adapter}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''})"
        ) from None


def check_whole(model: nn.Module, state_dict: dict | None = None) -> None:
    """Refuse to write weights that are not whole: every trained tensor present, non-empty, at its full shape.

    Sharded engines (ZeRO-3, FSDP) hold each rank's slice in the parameters; saved without gathering,
    an adapter comes out empty or as 1-D shards, which peft and vLLM then reject (or worse, load).
    `state_dict` is what is about to be written (gathered by the engine); without it, the parameters.
    """
    expected = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        for adapter, layer in (getattr(module, "lora_A", None) or {}).items():
            r, base = module.r[adapter], module.get_base_layer()
            rows, cols = getattr(base, "out_features", None), getattr(base, "in_features", None)
            for part, shape in (("lora_A", (r, cols)), ("lora_B", (rows, r))):
                if None not in shape:
                    expected[f"{name}.{part}.{adapter}.weight"] = shape
    tensors = dict(model.named_parameters()) if state_dict is None else state_dict
    trained = [n for n, p in model.named_parameters() if p.requires_grad] or list(expected)
    problems = []
    for name in trained:
        tensor = tensors.get(name)
        if tensor is None:
            problems.append(f"{name} is missing")
        elif tensor.numel() == 0:
            problems.append(f"{name} is empty")
        elif tuple(tensor.shape) != expected[name]:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, not {expected[name]}")
    if problems:
        raise TunelabError(
            "the trained weights are not whole (a sharded engine's slices, not gathered), so they "
            f"were not saved: {'; '.join(problems[:3])}"
            + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        )
