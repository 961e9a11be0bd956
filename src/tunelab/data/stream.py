"""`streaming: true`: records read, encoded and trained as they come, for data larger than memory.

The stream is the training files in order, pass after pass, never held whole: chunks are read lazily
and encoded by the same `Job` and worker pool as the cached path, so a streamed sample is its cached
twin. A position is (pass, chunk, sample within the chunk); chunk boundaries depend only on the files
and the chunk size, so a resumed run skips the chunks already trained without encoding them and
encodes just the one it stopped in.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import Config
from ..errors import TunelabError
from . import readers
from .dataset import DataStats, TokenizedData, build_datasets, read_tools
from .encode import Encoder
from .formats import detect_format
from .pool import Job, default_workers, run_chunks
from .readers import Chunk, record_chunks
from .samples import Builder, Samples

STATE_FILE = "tunelab_data_position.json"
REMEMBERED = 1 << 16  # positions of recently served samples; a checkpoint asks for one just behind the loader


@dataclass(frozen=True)
class Position:
    passes: int = 0  # whole passes over the data before this one
    chunk: int = 0  # chunks of this pass before this one
    sample: int = 0  # samples of this chunk already served
    chunk_records: int = 0  # the chunk size the numbers above count in
    served: int = 0  # samples trained before this position, from the run's start

    def save(self, checkpoint: str | Path) -> None:
        (Path(checkpoint) / STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, checkpoint: str | Path) -> "Position | None":
        path = Path(checkpoint) / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


class StreamingSamples(torch.utils.data.IterableDataset):
    """Training items ({input_ids, labels}) in file order, pass after pass, from `start` on."""

    def __init__(self, cfg: Config, job: Job, workers: int, start: Position | None = None):
        self.cfg, self.job, self.workers = cfg, job, workers
        self.start = start or Position(chunk_records=readers.CHUNK_RECORDS)
        self._served: deque = deque(maxlen=REMEMBERED)  # (serial number, position) of served samples
        self._serial = 0  # samples served since `start`

    def resume_from(self, position: Position | None) -> None:
        if position is not None:
            self.start = position

    def position_after(self, consumed: int) -> Position:
        """Where the stream stands once `consumed` samples (counted from `start`) have been trained."""
        k = consumed - self.start.served  # samples served by this iteration
        if k == 0:
            return self.start
        for serial, (passes, chunk, sample) in reversed(self._served):
            if serial == k - 1:
                return Position(passes, chunk, sample + 1, self.start.chunk_records, consumed)
        raise TunelabError(f"streaming: no record of sample {consumed} (the loader ran more than {REMEMBERED} "
                           "samples ahead of training)")

    def save_position(self, checkpoint: str | Path, consumed: int) -> None:
        self.position_after(consumed).save(checkpoint)

    def __iter__(self) -> Iterator[dict]:
        self._served.clear()
        self._serial = 0
        position = self.start
        while True:
            served = False
            for chunk_no, part in self._parts(position):
                skip = position.sample if (chunk_no == position.chunk) else 0
                samples = Samples(part.arrays, [("", "")])
                for i in range(skip, len(samples)):
                    ids, trained = samples.tokens(i)
                    self._served.append((self._serial, (position.passes, chunk_no, i)))
                    self._serial += 1
                    served = True
                    yield {"input_ids": ids.tolist(), "labels": np.where(trained, ids, -100).tolist()}
            if not served and (position.chunk, position.sample) == (0, 0):
                raise TunelabError(f"{', '.join(self.cfg.datasets)}: the stream holds no trainable sample")
            position = Position(position.passes + 1, 0, 0, position.chunk_records)

    def _parts(self, position: Position):
        """(chunk number, part) of one pass from `position.chunk` on; the chunks before it are skipped unread
        by the encoder (JSONL lines are only split, never parsed)."""
        chunks = stream_chunks(self.cfg, position.chunk_records)
        conversations = 0
        limit = self.cfg.max_samples
        numbered = islice(enumerate(chunks), position.chunk, None)
        order: list[int] = []

        def pairs():
            for n, item in numbered:
                order.append(n)
                yield item
        for k, part in enumerate(run_chunks(self.job, pairs(), self.workers)):
            if limit is not None:
                if conversations >= limit:
                    return
                keep = part.arrays["conv"] < limit - conversations
                part.arrays = _rows(part.arrays, keep)
            conversations += part.conversations
            yield order[k], part


def _rows(arrays: dict, keep: np.ndarray) -> dict:
    """The kept rows of one part's arrays, tokens included (parts are small: one chunk)."""
    if keep.all():
        return arrays
    offsets = arrays["offsets"]
    take = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in np.flatnonzero(keep)] or
                          [np.zeros(0, dtype=np.int64)])
    lengths = (offsets[1:] - offsets[:-1])[keep]
    out = {name: a[keep] for name, a in arrays.items() if name not in ("ids", "trained", "offsets")}
    out.update(ids=arrays["ids"][take], trained=arrays["trained"][take],
               offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return out


def stream_data(cfg: Config, tokenizer) -> TokenizedData:
    """Training data as a stream; eval_dataset, small by nature, encoded whole as usual."""
    encoder = Encoder(tokenizer, cfg.train_on, cfg.cutoff_len, cfg.reasoning, cfg.expand_turns)
    job = Job(encoder, cfg.columns, cfg.system, read_tools(cfg.tools), cfg.bad_records == "skip")
    train = StreamingSamples(cfg, job, cfg.preprocessing_num_workers or default_workers())
    if cfg.eval_datasets:
        held = replace(cfg, dataset=cfg.eval_dataset, eval_dataset=None, max_samples=None, streaming=False)
        eval_samples = build_datasets(held, tokenizer).train
    else:
        eval_samples = Samples(Builder().finish(), [])
    return TokenizedData(train, eval_samples, 0, DataStats(), encoder)


def stream_chunks(cfg: Config, size: int) -> Iterator[tuple[Chunk, str]]:
    """(chunk, format) of every training file in order; each file's format from its first record."""
    for spec in cfg.datasets:
        fmt = None
        for chunk in record_chunks(spec, cfg.model_hub, size, stream=True):
            if fmt is None:
                first = chunk.first_record()
                if first is None:
                    continue
                fmt = cfg.dataset_format if cfg.dataset_format != "auto" else detect_format(first, cfg.columns)
            yield chunk, fmt
