"""`tunelab data`: what training will see, before any weights are loaded.

Counts per format, what was dropped and why, token lengths, the share of trained tokens, whether
every sample's labels end in an end-of-turn token, and rendered samples with trained tokens marked.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

import numpy as np

from ..config import Config
from ..constants import IGNORE_INDEX
from .dataset import TokenizedData, build_datasets
from .encode import Encoded
from .preference import build_preference_data
from .samples import Samples
from .templates import default_system
from .tokenizer import prepare_tokenizer

_ON, _OFF = "\x1b[1;32m", "\x1b[0m"


def _percentile(ordered, q: float) -> int:
    return int(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]) if len(ordered) else 0


def highlight(tokenizer, sample: Encoded, color: bool = True) -> str:
    """Decode a sample with its trained spans in green (or between [[ ]] when not on a terminal)."""
    on, off = (_ON, _OFF) if color else ("[[", "]]")
    parts: list[tuple[bool, str]] = []
    run: list[int] = []
    trained: bool | None = None
    for tid, label in zip(sample.input_ids, sample.labels):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            parts.append((trained, tokenizer.decode(run)))
            run = []
        run.append(tid)
        trained = is_trained
    if run:
        assert trained is not None  # set with the run's first token
        parts.append((trained, tokenizer.decode(run)))
    return "".join(f"{on}{text}{off}" if t else text for t, text in parts)


def load(cfg: Config) -> tuple[TokenizedData[Samples], object, str]:
    tokenizer, _, template = prepare_tokenizer(cfg)
    return build_datasets(cfg, tokenizer), tokenizer, template


def data_report(cfg: Config, n_samples: int = 3, color: bool = False) -> str:
    if cfg.stage != "sft":
        return preference_report(cfg, n_samples, color)
    data, tokenizer, template = load(cfg)
    s = data.stats
    lines = [
        f"records read: {sum(s.records.values())} (" + ", ".join(f"{fmt}: {n}" for fmt, n in s.records.items()) + ")"
    ]
    if cfg.streaming:
        lines.append(
            f"streaming: this report reads the first {sum(s.records.values())} records only; training "
            "reads the whole data as it goes"
        )
    if cfg.max_samples:
        lines.append(f"max_samples: first {data.conversations} kept")
    lines.append(f"train samples: {len(data.train)}   eval samples: {len(data.eval)}")
    dropped = sum(s.dropped.values())
    lines.append(
        f"dropped: {dropped}"
        + (" (" + ", ".join(f"{n} {why}" for why, n in s.dropped.items()) + ")" if dropped else "")
    )
    lines.append(f"truncated to cutoff_len {cfg.cutoff_len}: {s.truncated}")
    lengths = np.sort(data.train.lengths)
    lines.append(
        "tokens per sample: p50 {} / p90 {} / p99 {} / max {}".format(
            *(_percentile(lengths, q) for q in (0.5, 0.9, 0.99)), int(lengths[-1]) if len(lengths) else 0
        )
    )
    share = s.trained_tokens / max(s.total_tokens, 1)
    lines.append(f"trained tokens: {s.trained_tokens} of {s.total_tokens} ({share:.1%})")
    ok = "yes" if s.ends_with_eot == s.kept else f"NO ({s.kept - s.ends_with_eot} samples do not)"
    lines.append(f"labels end in an end-of-turn token {data.encoder.eot_tokens}: {ok}")
    lines.append(f"records whose messages hold special-token text (encoded as plain text): {s.literal_text}")
    lines.append(
        f"template: {template}   train_on: {cfg.train_on}   reasoning: {cfg.reasoning} "
        f"(the template shows reasoning: {data.encoder.reasoning_mode})"
    )
    lines.append(
        f"turns trained in samples of their own (rendered as inference would, cut at that turn): "
        f"{s.own_turns} samples, {s.own_turn_tokens} extra tokens"
    )
    default = default_system(tokenizer)
    if default:
        lines.append(
            f"records without a system message get the template's own system prompt {default!r}"
            + ("; this config's system: replaces it" if cfg.system else "; set system: in the config to train another")
        )
    if s.reasoning_lost:
        lines.append(
            f"WARNING: {s.reasoning_lost} turns keep reasoning the template cannot show; they train without it"
        )
    lines += _skipped_and_legend(s.skipped, n_samples, color, "samples")
    for i, sample in enumerate(data.train[:n_samples]):
        lines.append(
            f"\n--- sample {i} ({sample.source}; {len(sample.input_ids)} tokens, {sample.n_trained} trained) ---"
        )
        lines.append(highlight(tokenizer, sample, color))
    return "\n".join(lines)


def preference_report(cfg: Config, n_samples: int = 3, color: bool = False) -> str:
    """The preference stages' report: pairs (KTO examples), tokens per side, and what cutoff_len cuts and from
    which side, since a cut completion is scored on part of itself."""
    tokenizer, _, template = prepare_tokenizer(cfg)
    data = build_preference_data(cfg, tokenizer)
    s = data.stats
    unit = "examples" if cfg.stage == "kto" else "pairs"
    lines = [
        f"stage: {cfg.stage} (only the completions are trained; prompts render as inference renders them)",
        f"records read: {sum(s.records.values())} (" + ", ".join(f"{fmt}: {n}" for fmt, n in s.records.items()) + ")",
    ]
    if cfg.max_samples:
        lines.append(f"max_samples: first {cfg.max_samples} records kept")
    lines.append(f"train {unit}: {s.pairs}   eval {unit}: {s.eval_pairs}")
    if cfg.stage == "kto":
        lines.append(f"desirable: {s.desirable}   undesirable: {s.undesirable}")
    dropped = sum(s.dropped.values())
    lines.append(
        f"dropped: {dropped}"
        + (" (" + ", ".join(f"{n} {why}" for why, n in s.dropped.items()) + ")" if dropped else "")
    )
    t = s.truncated
    if cfg.stage == "kto":
        cut = f"{t['completion']} completions, {t['kl']} KL sequences"
    else:
        cut = f"{sum(t.values())} pairs ({t['chosen']} chosen only, {t['rejected']} rejected only, {t['both']} both)"
    lines.append(f"truncated to cutoff_len {cfg.cutoff_len}: {cut}")
    sides = ("desirable", "undesirable") if cfg.stage == "kto" else ("chosen", "rejected")
    lines.append(
        f"tokens: prompt {s.prompt_tokens}, {sides[0]} {s.chosen_tokens}, {sides[1]} {s.rejected_tokens} "
        f"(trained {s.trained_tokens})"
    )
    for name, lengths in (("prompt", s.prompt_lengths), ("completion", s.completion_lengths)):
        lines.append(f"{name} tokens: " + " / ".join(f"{q} {n}" for q, n in lengths.items()))
    lines.append(
        f"template: {template}   reasoning: {cfg.reasoning} "
        f"(the template shows reasoning: {data.encoder.reasoning_mode})"
    )
    default = default_system(tokenizer)
    if default and not cfg.system:
        lines.append(f"records without a system message get the template's own system prompt {default!r}")
    lines += _skipped_and_legend(s.skipped, n_samples, color, "sides")
    for i, pair in enumerate(data.train[:n_samples]):
        shown = [("chosen", pair.chosen), ("rejected", pair.rejected)]
        if pair.label is not None:
            shown = [("desirable" if pair.label else "undesirable", pair.chosen), ("kl", pair.kl)]
        for name, side in shown:
            if side is not None:
                lines.append(
                    f"\n--- {i} {name} ({pair.source}; {len(side.input_ids)} tokens, {side.n_trained} trained) ---"
                )
                lines.append(highlight(tokenizer, side, color))
    return "\n".join(lines)


def write_jsonl(cfg: Config, stream: TextIO = sys.stdout) -> int:
    """One {"input_ids", "labels"} object per training sample; labels unshifted, masked positions -100.
    Preference stages: one object per pair, each side ({"input_ids", "labels"}) under its name."""
    if cfg.stage != "sft":
        tokenizer, _, _ = prepare_tokenizer(cfg)
        pairs = build_preference_data(cfg, tokenizer).train
        for pair in pairs:
            sides = {"chosen": pair.chosen, "rejected": pair.rejected, "kl": pair.kl}
            row = {k: {"input_ids": v.input_ids, "labels": v.labels} for k, v in sides.items() if v is not None}
            stream.write(json.dumps(row if pair.label is None else {**row, "label": pair.label}) + "\n")
        return len(pairs)
    data, _, _ = load(cfg)
    for i in range(len(data.train)):
        stream.write(json.dumps(data.train.item(i)) + "\n")
    return len(data.train)


def _skipped_and_legend(skipped: list[str], n_samples: int, color: bool, what: str) -> list[str]:
    lines = [f"skipped: {message}" for message in skipped]
    if n_samples:
        lines.append(
            f"\n{what} as the model sees them; trained tokens "
            + ("in green" if color else "between [[ and ]] (the brackets are not in the text)")
        )
    return lines
