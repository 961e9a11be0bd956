"""Preference data (stages dpo and kto): records read (see `pref_formats`), each side encoded, split, counted.

Each side of a pair is the conversation prompt + completion rendered and tokenized by the SFT `Encoder`, so its
prompt is token for token what SFT trains and inference feeds, and only the completion's assistant turns (each
with its end-of-turn) are labelled (`Conversation.train_from`). Whatever `train_on` says, a preference loss
scores completions only: the prompt's own assistant turns are never labelled.

A side must be one sequence, since the loss compares one log-probability per side. A completion turn that the
template renders differently once later turns follow (a dropped history think block, a moved system prompt)
would need a sample of its own (see `turns`), and the whole-conversation sample leaves exactly that turn
unlabelled, so such a record is refused rather than scored on part of its completion; `reasoning: last` or
`drop` usually makes it one sequence again.

KTO: each example also has a `kl` side, its prompt with the completion of the next example in the data
(wrapping around), encoded the same way; KTO estimates the KL term from these mismatched pairs.

There is no tokenization cache for preference data yet: it is encoded on every run, in one process.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from itertools import islice

import numpy as np
from tqdm.auto import tqdm

from ..config import Config
from ..constants import IGNORE_INDEX
from ..errors import TunelabError
from .conversation import Conversation
from .dataset import SKIPPED_SHOWN, config_encoder, read_tools, split
from .encode import Encoded, Encoder
from .pref_formats import PreferenceRecord, read_groups
from .readers import CHUNK_RECORDS

__all__ = [
    "PairSample",
    "PreferenceData",
    "PreferenceRecord",
    "PreferenceStats",
    "build_preference_data",
    "encode_preferences",
    "read_preferences",
]

BATCH = 256  # conversations per encode_many call
KL_TRIES = 8  # examples tried for a KL completion before the example's own is used
TOO_LONG = "prompt longer than cutoff_len"


@dataclass
class PairSample:
    chosen: Encoded  # KTO: the example's completion, desirable or not (`label`)
    rejected: Encoded | None
    label: bool | None
    source: str
    kl: Encoded | None = None  # KTO: the prompt with another example's completion


@dataclass
class PreferenceStats:
    stage: str = "dpo"
    records: Counter = field(default_factory=Counter)  # per format
    pairs: int = 0  # training pairs (kto: examples) kept
    eval_pairs: int = 0
    desirable: int = 0
    undesirable: int = 0
    prompt_tokens: int = 0
    chosen_tokens: int = 0  # completion tokens; kto: of desirable completions
    rejected_tokens: int = 0  # kto: of undesirable completions
    trained_tokens: int = 0  # labelled tokens, every side
    prompt_lengths: dict = field(default_factory=dict)  # p50 / p90 / p99 / max
    completion_lengths: dict = field(default_factory=dict)
    truncated: Counter = field(default_factory=Counter)  # pairs by side: chosen, rejected, both; kto: completion, kl
    dropped: Counter = field(default_factory=Counter)  # per reason
    skipped: list[str] = field(default_factory=list)  # the first records skipped under bad_records: skip

    def count_skipped(self, errors: list[str]) -> None:
        if errors:
            self.dropped["bad record (bad_records: skip)"] += len(errors)
            self.skipped += errors[: max(0, SKIPPED_SHOWN - len(self.skipped))]

    def count(self, samples: list[PairSample]) -> None:
        self.pairs = len(samples)
        prompts, completions = [], []
        for s in samples:
            prompt = prompt_length(s.chosen)
            prompts.append(prompt)
            sides = [(s.chosen, "chosen" if s.label in (None, True) else "rejected")]
            if s.rejected is not None:
                sides.append((s.rejected, "rejected"))
            for side, name in sides:
                n = len(side.input_ids) - prompt_length(side)
                completions.append(n)
                setattr(self, f"{name}_tokens", getattr(self, f"{name}_tokens") + n)
                self.trained_tokens += side.n_trained
            if s.label is None:
                cut = [
                    name for side, name in ((s.chosen, "chosen"), (s.rejected, "rejected")) if side and side.truncated
                ]
                if cut:
                    self.truncated["both" if len(cut) == 2 else cut[0]] += 1
            else:
                self.desirable += s.label
                self.undesirable += not s.label
                self.truncated["completion"] += s.chosen.truncated
                self.truncated["kl"] += s.kl is not None and s.kl.truncated
        self.prompt_tokens = sum(prompts)
        self.prompt_lengths, self.completion_lengths = percentiles(prompts), percentiles(completions)
        self.truncated = +self.truncated

    def to_json(self) -> dict:
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v for f in fields(self)}


@dataclass
class PreferenceData:
    train: list[PairSample]
    eval: list[PairSample]
    encoder: Encoder
    stats: PreferenceStats


def prompt_length(sample: Encoded) -> int:
    """Tokens before the first labelled one: the prompt as this side renders it."""
    return next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))


def percentiles(values: list[int]) -> dict:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = np.sort(values)
    at = {q: int(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]) for q in (0.5, 0.9, 0.99)}
    return {"p50": at[0.5], "p90": at[0.9], "p99": at[0.99], "max": int(ordered[-1])}


def read_preferences(cfg: Config, specs: list[str], stats: PreferenceStats) -> list[PreferenceRecord]:
    """Every preference record of `specs`: pairs under stage dpo, KTO examples under stage kto (a pair gives two)."""
    return [r for group in read_groups(cfg, specs, stats, read_tools(cfg.tools)) for r in group]


def build_preference_data(cfg: Config, tokenizer) -> PreferenceData:
    """Train and eval pairs (KTO examples) for a preference stage, held out by record as SFT holds them out."""
    encoder = config_encoder(cfg, tokenizer)
    encoder.train_on = "assistant"  # with train_from: every completion turn, no prompt turn (module doc)
    stats = PreferenceStats(stage=cfg.stage)
    tools = read_tools(cfg.tools)
    groups = read_groups(cfg, cfg.datasets, stats, tools)
    if cfg.max_samples:
        groups = groups[: cfg.max_samples]
    if not groups:
        raise TunelabError(f"{', '.join(cfg.datasets)}: the dataset is empty")
    if cfg.eval_datasets:
        train_groups, eval_groups = groups, read_groups(cfg, cfg.eval_datasets, PreferenceStats(), tools)
    else:
        train_groups, eval_groups = split(groups, cfg.val_size, cfg.seed)
    skip = cfg.bad_records == "skip"
    kto = cfg.stage == "kto"
    train = encode_preferences(encoder, [r for g in train_groups for r in g], kto, stats, skip)
    held = encode_preferences(encoder, [r for g in eval_groups for r in g], kto, PreferenceStats(), skip)
    if not train:
        reasons = ", ".join(f"{n} {why}" for why, n in stats.dropped.items())
        raise TunelabError(f"every training pair was dropped ({reasons}); raise cutoff_len (now {cfg.cutoff_len})")
    stats.count(train)
    stats.eval_pairs = len(held)
    return PreferenceData(train, held, encoder, stats)


def encode_preferences(
    encoder: Encoder, records: list[PreferenceRecord], kto: bool, stats: PreferenceStats, skip_bad: bool = False
) -> list[PairSample]:
    """Encode every record's sides (and KTO's KL sides); a record the template refuses stops the build, or with
    `skip_bad` is counted as skipped; a pair cut to nothing by cutoff_len is dropped and counted."""
    out: list[tuple[int, PairSample]] = []
    skipped: list[str] = []
    bar = tqdm(
        total=len(records) * (1 + kto),
        desc="encode pairs",
        unit="record",
        leave=False,
        mininterval=1,
        delay=2,
        disable=len(records) <= 2 * CHUNK_RECORDS,
    )
    with bar:
        for start in range(0, len(records), BATCH):
            batch = records[start : start + BATCH]
            convs = []
            for r in batch:
                convs.append(r.side(r.chosen, r.source if kto else f"{r.source} (chosen)"))
                if r.rejected is not None:
                    convs.append(r.side(r.rejected, f"{r.source} (rejected)"))
            encoded = iter(encode_sides(encoder, convs))
            for k, r in enumerate(batch, start):
                results = [next(encoded)] + ([next(encoded)] if r.rejected is not None else [])
                sides = [s for s in results if isinstance(s, Encoded)]
                if len(sides) < len(results):
                    bad = next(s for s in results if isinstance(s, TunelabError))
                    if not skip_bad:
                        raise bad
                    skipped.append(str(bad))
                elif all(s.n_trained for s in sides):
                    out.append((k, PairSample(sides[0], sides[1] if len(sides) > 1 else None, r.label, r.source)))
                else:
                    stats.dropped[TOO_LONG if any(s.truncated for s in sides) else "no trainable token"] += 1
            bar.update(len(batch))
        if kto:
            _add_kl(encoder, records, out, bar)
    stats.count_skipped(skipped)
    return [s for _, s in out]


def encode_sides(encoder: Encoder, convs: list[Conversation]) -> list[Encoded | TunelabError]:
    """Each conversation's one sequence, or the error that refuses it, in order: a batch the template refuses
    is encoded again one by one, so that one bad record does not take its neighbours with it."""
    try:
        samples = encoder.encode_many(convs)
    except TunelabError as exc:
        if len(convs) == 1:
            return [exc]
        return [x for conv in convs for x in encode_sides(encoder, [conv])]
    out: list[Encoded | TunelabError] = []
    for sample in samples:  # a conversation's whole sample first, then any turn it had to train apart
        if not sample.own_turn:
            out.append(sample)
        elif isinstance(out[-1], Encoded):
            out[-1] = TunelabError(
                f"{out[-1].source}: the chat template renders assistant message {sample.turn} of the completion "
                "differently once later turns follow (it drops or moves part of it, often history reasoning), "
                "so the completion is not one sequence as a preference side must be; set reasoning: last or "
                "drop, or end the completion at that turn"
            )
    return out


def _add_kl(encoder: Encoder, records: list[PreferenceRecord], kept: list[tuple[int, PairSample]], bar) -> None:
    """KTO's mismatched sides: example k's prompt with the completion of the next example (wrapping around)
    whose prompt is another one, so a pair read as two KTO examples never pairs a prompt with its own other
    completion. Where that makes no sequence (its calls name tools the prompt lacks, or nothing is left after
    cutoff_len), the next few examples are tried, then the example's own completion."""
    pending = [(k, sample, _candidates(records, k)) for k, sample in kept]
    for r in range(KL_TRIES):
        pending = [p for p in pending if r < len(p[2])]
        failed = []
        for start in range(0, len(pending), BATCH):
            batch = pending[start : start + BATCH]
            convs = [_kl_side(records, k, candidates[r]) for k, _, candidates in batch]
            encoded = iter(encode_sides(encoder, [c for c in convs if isinstance(c, Conversation)]))
            for item, conv in zip(batch, convs):
                result = next(encoded) if isinstance(conv, Conversation) else conv
                if isinstance(result, Encoded) and result.n_trained:
                    item[1].kl = result
                else:
                    failed.append(item)
            if r == 0:
                bar.update(len(batch))
        pending = failed
    for _, sample in kept:
        if sample.kl is None:
            sample.kl = sample.chosen


def _candidates(records: list[PreferenceRecord], k: int) -> list[int]:
    n, prompt = len(records), records[k].prompt
    return list(islice((j for j in ((k + d) % n for d in range(1, n)) if records[j].prompt is not prompt), KL_TRIES))


def _kl_side(records: list[PreferenceRecord], k: int, j: int) -> Conversation | TunelabError:
    try:
        return records[k].side(records[j].chosen, f"{records[k].source} (kl)")
    except TunelabError as exc:
        return exc
