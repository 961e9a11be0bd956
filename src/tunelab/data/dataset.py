"""From the config's data keys to tokenized train/eval samples plus the counts a data report shows."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field, fields
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config
from ..errors import TunelabError
from . import cache
from .conversation import Conversation
from ..constants import IGNORE_INDEX, LOSS_POSITIONS, loss_positions
from .encode import Encoder
from .formats import detect_format, to_conversation
from .pool import Job, default_workers, run_chunks
from .readers import CHUNK_RECORDS, count_lines, read_records, record_chunks
from .samples import ENDS_WITH_EOT, LITERAL, OWN_TURN, TRUNCATED, Samples, concat
from .tools import parse_tools

log = logging.getLogger("tunelab")


@dataclass
class DataStats:
    records: Counter = field(default_factory=Counter)  # per format
    dropped: Counter = field(default_factory=Counter)  # per reason
    truncated: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    ends_with_eot: int = 0
    literal_text: int = 0  # samples whose messages hold special-token text, kept as plain text
    kept: int = 0
    own_turns: int = 0  # samples of one turn each (see data.turns)
    own_turn_tokens: int = 0
    reasoning_lost: int = 0  # turns whose reasoning the template cannot show
    skipped: list[str] = field(default_factory=list)  # the first records skipped under bad_records: skip

    def count(self, samples: Samples) -> None:
        """The sample counts, from the arrays: no sample is made a Python object for them."""
        lengths = samples.lengths
        self.kept = len(samples)
        self.total_tokens = int(lengths.sum())
        self.trained_tokens = int(samples.trained_per_sample().sum())
        self.truncated = samples.flag_count(TRUNCATED)
        self.ends_with_eot = samples.flag_count(ENDS_WITH_EOT)
        self.literal_text = samples.flag_count(LITERAL)
        own = (samples.arrays["flags"][samples.rows] & OWN_TURN) > 0
        self.own_turns = int(own.sum())
        self.own_turn_tokens = int(lengths[own].sum())
        self.reasoning_lost = int(samples.arrays["lost"][samples.rows].sum())

    def to_json(self) -> dict:
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> "DataStats":
        stats = cls(**data)
        stats.records, stats.dropped = Counter(stats.records), Counter(stats.dropped)
        return stats


@dataclass
class TokenizedData:
    train: Samples
    eval: Samples
    conversations: int  # read and kept (after max_samples), before the train/eval split
    stats: DataStats
    encoder: Encoder


SKIPPED_SHOWN = 5


def read_tools(path: str | None) -> list[dict] | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TunelabError(f"tools: cannot read {path!r} ({exc.strerror})") from None
    return parse_tools(text, path)


def read_conversations(specs: str | list[str], dataset_format: str = "auto", columns: dict | None = None,
                       system: str | None = None, hub: str = "hf", max_samples: int | None = None,
                       stats: DataStats | None = None, tools: list[dict] | None = None,
                       skip_bad: bool = False) -> list[Conversation]:
    """Files (or hub datasets) -> conversations: the one read path of training, generate, eval and export.

    Each file's format is detected from its first record unless `dataset_format` names it. A record
    that is not a valid conversation stops the read, or with `skip_bad` is counted and left out.
    """
    stats = stats if stats is not None else DataStats()
    conversations = []
    for spec in [specs] if isinstance(specs, str) else specs:
        records = read_records(spec, hub)
        if max_samples is not None:
            records = records[: max(0, max_samples - len(conversations))]
        if not records:
            continue
        fmt = dataset_format if dataset_format != "auto" else detect_format(records[0], columns)
        for rec in records:
            try:
                conversations.append(to_conversation(rec, fmt, columns, system, tools))
            except TunelabError as exc:
                if not skip_bad:
                    raise
                stats.dropped["bad record (bad_records: skip)"] += 1
                if len(stats.skipped) < SKIPPED_SHOWN:
                    stats.skipped.append(str(exc))
        stats.records[fmt] += len(records)
    return conversations


def config_conversations(cfg: Config, specs: list[str], stats: DataStats | None = None) -> list[Conversation]:
    return read_conversations(specs, cfg.dataset_format, cfg.columns, cfg.system, cfg.model_hub, stats=stats,
                              tools=read_tools(cfg.tools), skip_bad=cfg.bad_records == "skip")


def held_out(n: int, val_size: float, seed: int) -> np.ndarray:
    """Which of n items are held out for evaluation; deterministic by seed. `val_size` below 1 is a fraction,
    otherwise a count."""
    held = np.zeros(n, dtype=bool)
    if not val_size or n < 2:
        return held
    n_val = int(round(val_size * n)) if val_size < 1 else int(val_size)
    n_val = max(1, min(n_val, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held[order[:n_val]] = True
    return held


def split(items: list, val_size: float, seed: int) -> tuple[list, list]:
    held = held_out(len(items), val_size, seed)
    return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]


def _chunks(cfg: Config, specs: list[str], wheres: list, groups: list, group: int):
    """(chunk, format) pairs of every spec; the format is detected once per spec, from its first record."""
    for spec in specs:
        fmt = None
        for chunk in record_chunks(spec, cfg.model_hub):
            if fmt is None:
                records = chunk.read()
                if not records:
                    continue
                fmt = cfg.dataset_format if cfg.dataset_format != "auto" else detect_format(records[0], cfg.columns)
            wheres.append(chunk.where)
            groups.append((group, fmt))
            yield chunk, fmt


def _bar(cfg: Config):
    counts = [count_lines(s) for s in cfg.datasets + cfg.eval_datasets]
    total = None if None in counts else sum(counts)
    return tqdm(total=total, desc="encode", unit="record", leave=False, mininterval=1,
                disable=total is not None and total <= 2 * CHUNK_RECORDS)


def encode_all(cfg: Config, encoder: Encoder) -> tuple[Samples, Samples, int, DataStats]:
    """Every record read, converted and encoded (on `preprocessing_num_workers` processes), then split."""
    job = Job(encoder, cfg.columns, cfg.system, read_tools(cfg.tools), cfg.bad_records == "skip")
    workers = cfg.preprocessing_num_workers or default_workers()
    wheres: list = []
    groups: list = []  # per chunk: (0 = training data, 1 = eval_datasets; format)
    chunks = chain(_chunks(cfg, cfg.datasets, wheres, groups, 0), _chunks(cfg, cfg.eval_datasets, wheres, groups, 1))
    stats = DataStats()
    parts, dropped, n_train = [], [], 0
    base = 0  # conversations before this chunk
    with _bar(cfg) as bar:
        for k, part in enumerate(run_chunks(job, chunks, workers)):
            group, fmt = groups[k]
            if group == 0:
                stats.records[fmt] += part.records
                stats.dropped["bad record (bad_records: skip)"] += len(part.skipped)
                stats.skipped += part.skipped[: max(0, SKIPPED_SHOWN - len(stats.skipped))]
                n_train += part.conversations
            dropped += [(base + c, why) for c, why in part.dropped]
            base += part.conversations
            parts.append(part)
            bar.update(part.records)
    stats.dropped = +stats.dropped  # no zero counts
    if not n_train:
        raise TunelabError(f"{', '.join(cfg.datasets)}: the dataset is empty")
    storage = Samples(concat(parts, list(range(len(parts)))), wheres)
    del parts
    conv = storage.arrays["conv"]
    limit = min(n_train, cfg.max_samples or n_train)
    if cfg.eval_datasets:
        train_convs, eval_convs = np.arange(base) < limit, np.arange(base) >= n_train
    else:
        held = np.concatenate([held_out(limit, cfg.val_size, cfg.seed), np.zeros(base - limit, dtype=bool)])
        train_convs, eval_convs = (np.arange(base) < limit) & ~held, held
    for c, why in dropped:
        if train_convs[c]:
            stats.dropped[why] += 1
    train, eval_samples = storage.select(train_convs[conv]), storage.select(eval_convs[conv])
    if not train:
        reasons = ", ".join(f"{n} {why}" for why, n in stats.dropped.items())
        raise TunelabError(f"every training sample was dropped ({reasons}); raise cutoff_len (now {cfg.cutoff_len})")
    stats.count(train)
    return train, eval_samples, limit, stats


def build_datasets(cfg: Config, tokenizer) -> TokenizedData:
    """Tokenized train/eval samples; the data is read only when the cache cannot answer.

    With the cache on, the samples are written to it and read back memory-mapped, so what training
    holds is pages of one file that later runs and other ranks share.
    """
    encoder = Encoder(tokenizer, cfg.train_on, cfg.cutoff_len, cfg.reasoning, cfg.expand_turns)
    key = cache.cache_key(cfg, tokenizer) if cache.enabled() else None
    if not key:
        return _fresh(cfg, encoder)
    with cache.building(key):
        hit = cache.load(key)
        if hit is None:
            data = _fresh(cfg, encoder)
            cache.save(key, {**data.train.arrays, "train_rows": data.train.rows, "eval_rows": data.eval.rows},
                       {"where": data.train.where, "conversations": data.conversations,
                        "stats": data.stats.to_json()})
            hit = cache.load(key)
            if hit is None:  # not writable: keep what is in memory
                return data
        else:
            log.info("data: tokenized samples from the cache (%s)", cache.entry(key))
    arrays, meta = hit
    where = [tuple(w) for w in meta["where"]]
    train_rows, eval_rows = np.asarray(arrays.pop("train_rows")), np.asarray(arrays.pop("eval_rows"))
    return TokenizedData(Samples(arrays, where, train_rows), Samples(arrays, where, eval_rows),
                         meta["conversations"], DataStats.from_json(meta["stats"]), encoder)


def _fresh(cfg: Config, encoder: Encoder) -> TokenizedData:
    train, eval_samples, conversations, stats = encode_all(cfg, encoder)
    return TokenizedData(train, eval_samples, conversations, stats, encoder)


class SampleDataset(torch.utils.data.Dataset):
    """The tokenized samples; index None is a filler: one pad token, nothing trained (see WholeGlobalBatches)."""

    def __init__(self, samples: Samples, pad_token_id: int = 0):
        self.samples = samples
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample, for length-grouped sampling without reading every sample."""
        return self.samples.lengths.tolist()

    def __getitem__(self, i: int | None) -> dict:
        if i is None:
            return {"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX]}
        ids, trained = self.samples.tokens(i)
        return {"input_ids": ids.tolist(), "labels": np.where(trained, ids, IGNORE_INDEX).tolist()}


class PadCollator:
    """Right-pads a batch; labels pad with -100 so padding is never trained."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, LOSS_POSITIONS: loss_positions(labels)}
