"""Encoded samples as flat arrays: about five bytes a token, however many samples there are.

As Python lists a token costs about 36 bytes (a pointer and an int object) twice, ids and labels;
here it is an int32 id and one byte saying whether it trains. A label is rebuilt on demand: the id
where the token trains, the ignore index elsewhere (the encoder never labels a token otherwise).
The arrays can be memory-mapped from the tokenization cache, so every rank of a run and every run of
a sweep read one copy through the page cache. A `Samples` is a set of rows over those arrays: the
train and eval sets are two of them over one storage, never copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from ..constants import IGNORE_INDEX
from .encode import Encoded

TRUNCATED, LITERAL, OWN_TURN, ENDS_WITH_EOT = 1, 2, 4, 8

# per token: ids, trained; per sample: the rest (offsets has one more entry than there are samples)
COLUMNS = {"ids": np.int32, "trained": np.uint8, "offsets": np.int64, "flags": np.uint8, "lost": np.int32,
           "conv": np.int64, "file": np.int32, "pos": np.int64, "turn": np.int32}


@dataclass
class Part:
    """One chunk's samples, as a worker sends them back: arrays plus what was left out and why."""
    arrays: dict
    conversations: int = 0
    records: int = 0
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (conversation in this chunk, reason)
    skipped: list[str] = field(default_factory=list)  # bad records left out under bad_records: skip


def part_of(samples: list[Encoded], conv: list[int], pos: list[int], eot_ids: set[int], records: int,
            conversations: int, skipped: list[str]) -> Part:
    """Keeps the samples with a trained token; `conv`/`pos` give each sample's conversation and record position."""
    kept, dropped = [], []
    for k, s in enumerate(samples):
        trained = [x for x in s.labels if x != IGNORE_INDEX]
        if not trained:
            reason = "no trainable token left after cutoff_len" if s.truncated else "no trainable token"
            dropped.append((conv[k], reason))
            continue
        flags = (TRUNCATED * s.truncated | LITERAL * s.literal_text | OWN_TURN * s.own_turn
                 | ENDS_WITH_EOT * (trained[-1] in eot_ids))
        kept.append((s, flags, conv[k], pos[k]))
    lengths = np.fromiter((len(s.input_ids) for s, *_ in kept), dtype=np.int64, count=len(kept))
    total = int(lengths.sum())
    labels = np.fromiter(chain.from_iterable(s.labels for s, *_ in kept), dtype=np.int64, count=total)
    arrays = {
        "ids": np.fromiter(chain.from_iterable(s.input_ids for s, *_ in kept), dtype=np.int32, count=total),
        "trained": (labels != IGNORE_INDEX).astype(np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "flags": np.array([f for _, f, *_ in kept], dtype=np.uint8),
        "lost": np.array([s.reasoning_lost for s, *_ in kept], dtype=np.int32),
        "conv": np.array([c for *_, c, _ in kept], dtype=np.int64),
        "file": np.zeros(len(kept), dtype=np.int32),
        "pos": np.array([p for *_, p in kept], dtype=np.int64),
        "turn": np.array([s.turn for s, *_ in kept], dtype=np.int32),
    }
    return Part(arrays, conversations, records, dropped, skipped)


def concat(parts: list[Part], files: list[int]) -> dict:
    """One storage from the chunks' parts, in order: offsets and conversation numbers run on."""
    if not parts:
        return {name: np.zeros(1 if name == "offsets" else 0, dtype=dtype) for name, dtype in COLUMNS.items()}
    token_base = np.cumsum([0] + [len(p.arrays["ids"]) for p in parts])
    conv_base = np.cumsum([0] + [p.conversations for p in parts])
    out = {}
    for name, dtype in COLUMNS.items():
        if name == "offsets":
            pieces = [p.arrays["offsets"][1:] + token_base[k] for k, p in enumerate(parts)]
            out[name] = np.concatenate([np.zeros(1, dtype=np.int64)] + pieces).astype(dtype)
        elif name == "conv":
            out[name] = np.concatenate([p.arrays["conv"] + conv_base[k] for k, p in enumerate(parts)]).astype(dtype)
        elif name == "file":
            out[name] = np.concatenate([np.full(len(p.arrays["flags"]), files[k], dtype=dtype)
                                        for k, p in enumerate(parts)])
        else:
            out[name] = np.concatenate([p.arrays[name] for p in parts]).astype(dtype, copy=False)
    return out


class Samples:
    """Rows of a flat storage, read as `Encoded` samples one at a time (lists made only for that sample)."""

    def __init__(self, arrays: dict, where: list[tuple[str, str]], rows: np.ndarray | None = None):
        self.arrays = arrays
        self.where = where  # per file: a record's source is where[0] + position + where[1]
        self.rows = np.arange(len(arrays["flags"]), dtype=np.int64) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return len(self.rows) > 0

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        r = int(self.rows[i])
        ids, trained = self.tokens(i)
        flags = int(self.arrays["flags"][r])
        return Encoded(ids.tolist(), np.where(trained, ids, IGNORE_INDEX).tolist(), bool(flags & TRUNCATED),
                       self.source(i), bool(flags & LITERAL), bool(flags & OWN_TURN), int(self.arrays["lost"][r]),
                       int(self.arrays["turn"][r]))

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained) of sample i: views into the storage, nothing copied."""
        r = int(self.rows[i])
        a, b = int(self.arrays["offsets"][r]), int(self.arrays["offsets"][r + 1])
        return self.arrays["ids"][a:b], self.arrays["trained"][a:b]

    def source(self, i: int) -> str:
        r = int(self.rows[i])
        before, after = self.where[int(self.arrays["file"][r])]
        turn = int(self.arrays["turn"][r])
        return f"{before}{int(self.arrays['pos'][r])}{after}" + (f" turn {turn}" if turn >= 0 else "")

    @property
    def lengths(self) -> np.ndarray:
        offsets = self.arrays["offsets"]
        return offsets[self.rows + 1] - offsets[self.rows]

    def trained_per_sample(self) -> np.ndarray:
        offsets = self.arrays["offsets"]
        if not len(self.arrays["ids"]):
            return np.zeros(len(self.rows), dtype=np.int64)
        per_row = np.add.reduceat(self.arrays["trained"], offsets[:-1], dtype=np.int64)
        return per_row[self.rows]

    def flag_count(self, flag: int) -> int:
        return int(np.count_nonzero(self.arrays["flags"][self.rows] & flag))

    def select(self, keep: np.ndarray) -> "Samples":
        """The rows where `keep` (one bool per storage row) holds, in storage order."""
        return Samples(self.arrays, self.where, np.flatnonzero(keep).astype(np.int64))
