"""From the config's data keys to tokenized train/eval samples plus the counts a data report shows."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..errors import TunelabError
from . import cache
from .conversation import Conversation
from ..constants import IGNORE_INDEX, LOSS_POSITIONS, loss_positions
from .encode import Encoded, Encoder
from .formats import detect_format, to_conversation
from .readers import read_records
from .tools import parse_tools

log = logging.getLogger("tunelab")
CHUNK = 4096  # conversations per batched encode; garbage collection is paused only within one


@dataclass
class DataStats:
    records: Counter = field(default_factory=Counter)  # per format
    dropped: Counter = field(default_factory=Counter)  # per reason
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)
    trained_tokens: int = 0
    total_tokens: int = 0
    ends_with_eot: int = 0
    literal_text: int = 0  # records whose messages hold special-token text, kept as plain text
    kept: int = 0
    own_turns: int = 0  # samples of one turn each (see data.turns)
    own_turn_tokens: int = 0
    reasoning_lost: int = 0  # turns whose reasoning the template cannot show
    skipped: list[str] = field(default_factory=list)  # the first records skipped under bad_records: skip


@dataclass
class TokenizedData:
    train: list[Encoded]
    eval: list[Encoded]
    conversations: list[Conversation]
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


def split(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """Deterministic by seed; `val_size` below 1 is a fraction, otherwise a count."""
    if not val_size or len(items) < 2:
        return items, []
    n_val = int(round(val_size * len(items))) if val_size < 1 else int(val_size)
    n_val = max(1, min(n_val, len(items) - 1))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _encoded(conversations: list[Conversation], encoder: Encoder):
    """Samples in chunks: each is one batched tokenizer call, and a bar shows progress on large data."""
    with tqdm(total=len(conversations), desc="tokenize", unit="sample", disable=len(conversations) <= CHUNK,
              leave=False) as bar:
        for start in range(0, len(conversations), CHUNK):
            chunk = conversations[start:start + CHUNK]
            yield from encoder.encode_many(chunk)
            bar.update(len(chunk))


def encode_all(conversations: list[Conversation], encoder: Encoder, stats: DataStats) -> list[Encoded]:
    kept = []
    for sample in _encoded(conversations, encoder):
        if sample.n_trained == 0:
            stats.dropped["no trainable token left after cutoff_len" if sample.truncated else "no trainable token"] += 1
            continue
        stats.truncated += sample.truncated
        stats.lengths.append(len(sample.input_ids))
        stats.trained_tokens += sample.n_trained
        stats.total_tokens += len(sample.input_ids)
        stats.ends_with_eot += encoder.ends_with_eot(sample)
        stats.literal_text += sample.literal_text
        stats.own_turns += sample.own_turn
        stats.own_turn_tokens += len(sample.input_ids) if sample.own_turn else 0
        stats.reasoning_lost += sample.reasoning_lost
        kept.append(sample)
    stats.kept += len(kept)
    return kept


def build_datasets(cfg: Config, tokenizer) -> TokenizedData:
    """Tokenized train/eval samples; the conversations are read only when the cache cannot answer."""
    encoder = Encoder(tokenizer, cfg.train_on, cfg.cutoff_len, cfg.reasoning, cfg.expand_turns)
    key = cache.cache_key(cfg, tokenizer) if cache.enabled() else None
    hit = cache.load(key, DataStats) if key else None
    if hit:
        log.info("data: tokenized samples from the cache (%s)", cache.cache_dir() / f"{key}.npz")
        return TokenizedData(hit[0], hit[1], [], hit[2], encoder)
    stats = DataStats()
    conversations = config_conversations(cfg, cfg.datasets, stats)
    if not conversations:
        raise TunelabError(f"{', '.join(cfg.datasets)}: the dataset is empty")
    if cfg.max_samples:
        conversations = conversations[: cfg.max_samples]
    if cfg.eval_datasets:
        train_convs, eval_convs = conversations, config_conversations(cfg, cfg.eval_datasets)
    else:
        train_convs, eval_convs = split(conversations, cfg.val_size, cfg.seed)
    train = encode_all(train_convs, encoder, stats)
    if not train:
        reasons = ", ".join(f"{n} {why}" for why, n in stats.dropped.items())
        raise TunelabError(f"every training sample was dropped ({reasons}); raise cutoff_len (now {cfg.cutoff_len})")
    eval_samples = encode_all(eval_convs, encoder, DataStats())
    if key:
        cache.save(key, train, eval_samples, stats)
    return TokenizedData(train, eval_samples, conversations, stats, encoder)


class SampleDataset(torch.utils.data.Dataset):
    """The tokenized samples; index None is a filler: one pad token, nothing trained (see WholeGlobalBatches)."""

    def __init__(self, samples: list[Encoded], pad_token_id: int = 0):
        self.samples = samples
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int | None) -> dict:
        if i is None:
            return {"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX]}
        s = self.samples[i]
        return {"input_ids": s.input_ids, "labels": s.labels}


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
