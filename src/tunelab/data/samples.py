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
from pathlib import Path

import numpy as np

from ..constants import IGNORE_INDEX
from .encode import Encoded

TRUNCATED, LITERAL, OWN_TURN, ENDS_WITH_EOT = 1, 2, 4, 8

# per token: ids, trained; per sample: the rest (offsets has one more entry than there are samples)
COLUMNS = {
    "ids": np.int32,
    "trained": np.uint8,
    "offsets": np.int64,
    "flags": np.uint8,
    "lost": np.int32,
    "conv": np.int64,
    "file": np.int32,
    "pos": np.int64,
    "turn": np.int32,
    "n_trained": np.int32,
}
TOKEN_COLUMNS = ("ids", "trained")


@dataclass
class Part:
    """One chunk's samples, as a worker sends them back: arrays plus what was left out and why."""

    arrays: dict
    conversations: int = 0
    records: int = 0
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (conversation in this chunk, reason)
    skipped: list[str] = field(default_factory=list)  # bad records left out under bad_records: skip


def part_of(
    samples: list[Encoded],
    conv: list[int],
    pos: list[int],
    eot_ids: set[int],
    records: int,
    conversations: int,
    skipped: list[str],
) -> Part:
    """Keeps the samples with a trained token; `conv`/`pos` give each sample's conversation and record position."""
    kept, dropped = [], []
    for k, s in enumerate(samples):
        trained = [x for x in s.labels if x != IGNORE_INDEX]
        if not trained:
            reason = "no trainable token left after cutoff_len" if s.truncated else "no trainable token"
            dropped.append((conv[k], reason))
            continue
        flags = (
            TRUNCATED * s.truncated
            | LITERAL * s.literal_text
            | OWN_TURN * s.own_turn
            | ENDS_WITH_EOT * (trained[-1] in eot_ids)
        )
        kept.append((s, flags, conv[k], pos[k], len(trained)))
    lengths = np.fromiter((len(s.input_ids) for s, *_ in kept), dtype=np.int64, count=len(kept))
    total = int(lengths.sum())
    labels = np.fromiter(chain.from_iterable(s.labels for s, *_ in kept), dtype=np.int64, count=total)
    arrays = {
        "ids": np.fromiter(chain.from_iterable(s.input_ids for s, *_ in kept), dtype=np.int32, count=total),
        "trained": (labels != IGNORE_INDEX).astype(np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "flags": np.array([f for _, f, *_ in kept], dtype=np.uint8),
        "lost": np.array([s.reasoning_lost for s, *_ in kept], dtype=np.int32),
        "conv": np.array([c for _, _, c, _, _ in kept], dtype=np.int64),
        "file": np.zeros(len(kept), dtype=np.int32),
        "pos": np.array([p for _, _, _, p, _ in kept], dtype=np.int64),
        "turn": np.array([s.turn for s, *_ in kept], dtype=np.int32),
        "n_trained": np.array([n for *_, n in kept], dtype=np.int32),
    }
    return Part(arrays, conversations, records, dropped, skipped)


@dataclass
class Spilled:
    """A token column written to a file while encoding, so that it is never whole in memory."""

    path: Path
    dtype: type
    length: int

    @property
    def nbytes(self) -> int:
        return self.length * np.dtype(self.dtype).itemsize

    def __len__(self) -> int:
        return self.length

    def read(self) -> np.ndarray:
        return np.fromfile(self.path, dtype=self.dtype, count=self.length)


class Builder:
    """One storage from the chunks' parts, in order: offsets and conversation numbers run on.

    With `spill`, token columns go to files in that folder as parts arrive and only the per-sample
    columns (a few dozen bytes a sample) stay in memory."""

    def __init__(self, spill: Path | None = None):
        self.spill = spill
        self.parts: list[dict] = []  # per-sample columns of each part
        self.tokens: dict[str, list] = {name: [] for name in TOKEN_COLUMNS}
        self.n_tokens = 0
        self.n_conversations = 0
        self._files = {name: (spill / f"{name}.bin").open("wb") for name in TOKEN_COLUMNS} if spill else None

    def add(self, part: Part, file: int) -> None:
        arrays = dict(part.arrays)
        for name in TOKEN_COLUMNS:
            column = arrays.pop(name)
            if self._files:
                self._files[name].write(np.ascontiguousarray(column, dtype=COLUMNS[name]).tobytes())
            else:
                self.tokens[name].append(column)
        arrays["offsets"] = arrays["offsets"][1:] + self.n_tokens
        arrays["conv"] = arrays["conv"] + self.n_conversations
        arrays["file"] = np.full(len(arrays["flags"]), file, dtype=np.int32)
        self.parts.append(arrays)
        self.n_tokens += int(part.arrays["offsets"][-1])
        self.n_conversations += part.conversations

    def finish(self) -> dict:
        out: dict[str, np.ndarray | Spilled] = {}
        for name in TOKEN_COLUMNS:
            if self._files:
                self._files[name].close()
                assert self.spill is not None  # files are opened only in the spill folder
                out[name] = Spilled(self.spill / f"{name}.bin", COLUMNS[name], self.n_tokens)
            else:
                out[name] = (
                    np.concatenate(self.tokens[name]).astype(COLUMNS[name], copy=False)
                    if self.tokens[name]
                    else np.zeros(0, dtype=COLUMNS[name])
                )
        for name, dtype in COLUMNS.items():
            if name in TOKEN_COLUMNS:
                continue
            pieces = [p[name] for p in self.parts]
            if name == "offsets":
                pieces = [np.zeros(1, dtype=np.int64)] + pieces
            out[name] = np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.zeros(0, dtype=dtype)
        self.parts, self.tokens = [], {}
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
        return Encoded(
            ids.tolist(),
            np.where(trained, ids, IGNORE_INDEX).tolist(),
            bool(flags & TRUNCATED),
            self.source(i),
            bool(flags & LITERAL),
            bool(flags & OWN_TURN),
            int(self.arrays["lost"][r]),
            int(self.arrays["turn"][r]),
        )

    def item(self, i: int) -> dict:
        """Sample i as training takes it: {input_ids, labels}, unshifted, untrained positions IGNORE_INDEX."""
        ids, trained = self.tokens(i)
        return {"input_ids": ids.tolist(), "labels": np.where(trained, ids, IGNORE_INDEX).tolist()}

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
        return self.arrays["n_trained"][self.rows].astype(np.int64)

    def flag_count(self, flag: int) -> int:
        return int(np.count_nonzero(self.arrays["flags"][self.rows] & flag))

    def select(self, keep: np.ndarray) -> "Samples":
        """The rows where `keep` (one bool per storage row) holds, in storage order."""
        return Samples(self.arrays, self.where, np.flatnonzero(keep).astype(np.int64))
