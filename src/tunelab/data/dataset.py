"""From the config's data keys to tokenized train/eval samples plus the counts a data report shows."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field, fields
from itertools import chain
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config
from ..constants import IGNORE_INDEX, LOSS_POSITIONS, loss_positions
from ..errors import TunelabError
from . import cache
from .conversation import Conversation
from .encode import Encoder
from .formats import detect_format, to_conversations
from .pool import EncodeJob, default_workers, run_chunks
from .readers import CHUNK_RECORDS, count_lines, read_records, record_chunks
from .samples import ENDS_WITH_EOT, LITERAL, OWN_TURN, TRUNCATED, Builder, Samples, Spilled
from .tools import parse_tools

log = logging.getLogger("tunelab")

TrainT = TypeVar("TrainT")  # Samples, or data.stream's StreamingSamples when training streams


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

    def count_skipped(self, errors: list[str]) -> None:
        """Records left out under bad_records: skip; the first few are named in the report."""
        if errors:
            self.dropped["bad record (bad_records: skip)"] += len(errors)
            self.skipped += errors[: max(0, SKIPPED_SHOWN - len(self.skipped))]

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
class TokenizedData(Generic[TrainT]):
    train: TrainT
    eval: Samples
    conversations: int  # read and kept (after max_samples), before the train/eval split
    stats: DataStats
    encoder: Encoder


SKIPPED_SHOWN = 5
STREAM_REPORT_RECORDS = 10_000  # what `tunelab data` reads of a streaming config


def read_tools(path: str | None) -> list[dict] | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TunelabError(f"tools: cannot read {path!r} ({exc.strerror})") from None
    return parse_tools(text, path)


def read_conversations(
    specs: str | list[str],
    dataset_format: str = "auto",
    columns: dict | None = None,
    system: str | None = None,
    hub: str = "hf",
    max_samples: int | None = None,
    stats: DataStats | None = None,
    tools: list[dict] | None = None,
    skip_bad: bool = False,
) -> list[Conversation]:
    """Files (or hub datasets) -> conversations: the one read path of training, generate, eval and export.

    Each file's format is detected from its first record unless `dataset_format` names it. A record
    that is not a valid conversation stops the read, or with `skip_bad` is counted and left out.
    """
    stats = stats if stats is not None else DataStats()
    conversations: list[Conversation] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        records = read_records(spec, hub)
        if max_samples is not None:
            records = records[: max(0, max_samples - len(conversations))]
        if not records:
            continue
        fmt = dataset_format if dataset_format != "auto" else detect_format(records[0], columns)
        convs, _, skipped = to_conversations(records, fmt, columns, system, tools, skip_bad)
        conversations += convs
        stats.count_skipped(skipped)
        stats.records[fmt] += len(records)
    return conversations


def config_conversations(cfg: Config, specs: list[str], stats: DataStats | None = None) -> list[Conversation]:
    return read_conversations(
        specs,
        cfg.dataset_format,
        cfg.columns,
        cfg.system,
        cfg.model_hub,
        stats=stats,
        tools=read_tools(cfg.tools),
        skip_bad=cfg.bad_records == "skip",
    )


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


def spec_chunks(cfg: Config, specs: list[str], size: int | None = None, stream: bool = False):
    """(chunk, format) pairs of every spec in order; each spec's format is detected from its first record,
    parsed alone (a worker parses the rest)."""
    for spec in specs:
        fmt = None
        for chunk in record_chunks(spec, cfg.model_hub, size, stream):
            if fmt is None:
                first = chunk.first_record()
                if first is None:
                    continue
                fmt = cfg.dataset_format if cfg.dataset_format != "auto" else detect_format(first, cfg.columns)
            yield chunk, fmt


def config_encoder(cfg: Config | None, tokenizer) -> Encoder:
    """The encoder a run renders with, in training and in every later command (a run's saved config read
    back by `run_folder.saved_config`); None, a model no tunelab run made: its template as it is."""
    if cfg is None:
        return Encoder(tokenizer)
    return Encoder(
        tokenizer, cfg.train_on, cfg.cutoff_len, cfg.reasoning, cfg.expand_turns, cfg.system, read_tools(cfg.tools)
    )


def config_job(cfg: Config, encoder: Encoder) -> EncodeJob:
    return EncodeJob(encoder, cfg.columns, encoder.system, encoder.tools, cfg.bad_records == "skip")


def _chunks(cfg: Config, specs: list[str], wheres: list, groups: list, group: int, max_records: int | None = None):
    """spec_chunks, noting each chunk's source and group. With `max_records`, reading stops at that many
    records (the rest is never read)."""
    read = 0
    for chunk, fmt in spec_chunks(cfg, specs, stream=max_records is not None):
        if max_records is not None:
            if read >= max_records:
                return
            chunk = chunk.head(max_records - read)
            read += len(chunk)
        wheres.append(chunk.where)
        groups.append((group, fmt))
        yield chunk, fmt


def _bar(cfg: Config):
    counts = [count_lines(s) for s in cfg.datasets + cfg.eval_datasets]
    known = [n for n in counts if n is not None]
    total = sum(known) if len(known) == len(counts) else None
    return tqdm(
        total=total,
        desc="encode",
        unit="record",
        leave=False,
        mininterval=1,
        delay=2,  # shown only for work that takes a while: no empty bar before a quick read or an error
        disable=total is not None and total <= 2 * CHUNK_RECORDS,
    )


@dataclass
class Encoding:
    """What encoding produced, before it is mapped: one storage (token columns maybe spilled to files),
    the train and eval rows over it, and the counts."""

    arrays: dict
    where: list
    train_rows: np.ndarray
    eval_rows: np.ndarray
    conversations: int
    stats: DataStats


def encode_all(cfg: Config, encoder: Encoder, spill: Path | None = None, max_records: int | None = None) -> Encoding:
    """Every record read, converted and encoded (on `preprocessing_num_workers` processes), then split.

    With `spill`, token ids go to files there as chunks come back, so the data is never whole in memory;
    with `max_records`, only about that many records of the training data are read (a streaming report)."""
    job = config_job(cfg, encoder)
    workers = cfg.preprocessing_num_workers or default_workers()
    wheres: list = []
    groups: list = []  # per chunk: (0 = training data, 1 = eval_datasets; format)
    chunks = chain(
        _chunks(cfg, cfg.datasets, wheres, groups, 0, max_records), _chunks(cfg, cfg.eval_datasets, wheres, groups, 1)
    )
    stats = DataStats()
    builder = Builder(spill)
    dropped, n_train = [], 0
    with _bar(cfg) as bar:
        for k, part in enumerate(run_chunks(job, chunks, workers)):
            group, fmt = groups[k]
            if group == 0:
                stats.records[fmt] += part.records
                stats.count_skipped(part.skipped)
                n_train += part.conversations
            dropped += [(builder.n_conversations + c, why) for c, why in part.dropped]
            builder.add(part, k)
            bar.update(part.records)
    if not n_train:
        raise TunelabError(f"{', '.join(cfg.datasets)}: the dataset is empty")
    total = builder.n_conversations
    arrays = builder.finish()
    conv = arrays["conv"]
    limit = min(n_train, cfg.max_samples or n_train)
    if cfg.eval_datasets:
        train_convs, eval_convs = np.arange(total) < limit, np.arange(total) >= n_train
    else:
        held = np.concatenate([held_out(limit, cfg.val_size, cfg.seed), np.zeros(total - limit, dtype=bool)])
        train_convs, eval_convs = (np.arange(total) < limit) & ~held, held
    for c, why in dropped:
        if train_convs[c]:
            stats.dropped[why] += 1
    train_rows, eval_rows = np.flatnonzero(train_convs[conv]), np.flatnonzero(eval_convs[conv])
    if not len(train_rows):
        reasons = ", ".join(f"{n} {why}" for why, n in stats.dropped.items())
        raise TunelabError(f"every training sample was dropped ({reasons}); raise cutoff_len (now {cfg.cutoff_len})")
    stats.count(Samples(arrays, wheres, train_rows))  # per-sample columns only: spilled tokens stay on disk
    return Encoding(arrays, wheres, train_rows, eval_rows, limit, stats)


def build_datasets(cfg: Config, tokenizer) -> TokenizedData[Samples]:
    """Tokenized train/eval samples; the data is read only when the cache cannot answer.

    With the cache on, token ids go straight to it while encoding and the samples are read back
    memory-mapped, so what a run holds is pages of one file that later runs and other ranks share.
    """
    encoder = config_encoder(cfg, tokenizer)
    key = cache.cache_key(cfg, tokenizer) if cache.enabled() and not cfg.streaming else None
    if cfg.streaming:  # a look at the stream's start; training reads it all as it goes (data.stream)
        return _in_memory(encode_all(cfg, encoder, max_records=STREAM_REPORT_RECORDS), encoder)
    if not key:
        return _in_memory(encode_all(cfg, encoder), encoder)
    with cache.building(key):
        hit = cache.load(key)
        if hit is not None:
            log.info("data: tokenized samples from the cache (%s)", cache.entry(key))
        else:
            with cache.spill_dir(key) as spill:
                encoding = encode_all(cfg, encoder, spill)
                cache.save(
                    key,
                    {**encoding.arrays, "train_rows": encoding.train_rows, "eval_rows": encoding.eval_rows},
                    {
                        "where": encoding.where,
                        "conversations": encoding.conversations,
                        "stats": encoding.stats.to_json(),
                    },
                )
                hit = cache.load(key)
                if hit is None:  # not writable: keep it in memory
                    return _in_memory(encoding, encoder)
    arrays, meta = hit
    where = [tuple(w) for w in meta["where"]]
    train_rows, eval_rows = np.asarray(arrays.pop("train_rows")), np.asarray(arrays.pop("eval_rows"))
    return TokenizedData(
        Samples(arrays, where, train_rows),
        Samples(arrays, where, eval_rows),
        meta["conversations"],
        DataStats.from_json(meta["stats"]),
        encoder,
    )


def _in_memory(encoding: Encoding, encoder: Encoder) -> TokenizedData[Samples]:
    arrays = {k: v.read() if isinstance(v, Spilled) else v for k, v in encoding.arrays.items()}
    return TokenizedData(
        Samples(arrays, encoding.where, encoding.train_rows),
        Samples(arrays, encoding.where, encoding.eval_rows),
        encoding.conversations,
        encoding.stats,
        encoder,
    )


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
        return self.samples.item(i)


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
