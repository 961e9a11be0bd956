"""`streaming: true`: records read, encoded and trained as they come, for data larger than memory.

The stream is the training files in order, pass after pass, never held whole: chunks are read lazily
and encoded by the same `EncodeJob` and worker pool as the cached path, so a streamed sample is its cached
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

import torch

from ..config import Config
from ..errors import TunelabError
from . import readers
from .dataset import DataStats, TokenizedData, build_datasets, config_encoder, config_job, spec_chunks
from .pool import EncodeJob, default_workers, run_chunks
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

    def __init__(self, cfg: Config, job: EncodeJob, workers: int, start: Position | None = None):
        self.cfg, self.job, self.workers = cfg, job, workers
        self.start = start or Position(chunk_records=readers.CHUNK_RECORDS)
        self._served: deque = deque(maxlen=REMEMBERED)  # positions of the last samples served, in order
        self._serial = 0  # samples served since `start`

    def resume_from(self, position: Position | None) -> None:
        if position is not None:
            self.start = position

    def position_after(self, consumed: int) -> Position:
        """Where the stream stands once `consumed` samples (counted from the run's start) have been trained."""
        k = consumed - self.start.served  # samples served by this iteration
        if k == 0:
            return self.start
        back = self._serial - k  # how far behind the loader's latest sample the last trained one is
        if not 0 <= back < len(self._served):
            raise TunelabError(
                f"streaming: no record of sample {consumed} (the loader ran more than {REMEMBERED} "
                "samples ahead of training)"
            )
        passes, chunk, sample = self._served[-1 - back]
        return Position(passes, chunk, sample + 1, self.start.chunk_records, consumed)

    def save_position(self, checkpoint: str | Path, consumed: int) -> None:
        self.position_after(consumed).save(checkpoint)

    def __iter__(self) -> Iterator[dict]:
        self._served.clear()
        self._serial = 0
        position = self.start
        while True:
            served = False
            for chunk_no, samples in self._chunks(position):
                skip = position.sample if chunk_no == position.chunk else 0
                for i in range(skip, len(samples)):
                    self._served.append((position.passes, chunk_no, i))
                    self._serial += 1
                    served = True
                    yield samples.item(i)
            if not served and (position.chunk, position.sample) == (0, 0):
                raise TunelabError(f"{', '.join(self.cfg.datasets)}: the stream holds no trainable sample")
            position = Position(position.passes + 1, 0, 0, position.chunk_records)

    def _chunks(self, position: Position) -> Iterator[tuple[int, Samples]]:
        """(chunk number, its samples) of one pass from `position.chunk` on; the chunks before it are skipped
        unread by the encoder (JSONL lines are only split, never parsed). max_samples cuts each pass."""
        chunks = spec_chunks(self.cfg, self.cfg.datasets, position.chunk_records, stream=True)
        parts = run_chunks(self.job, islice(chunks, position.chunk, None), self.workers)
        conversations, limit = 0, self.cfg.max_samples
        for chunk_no, part in enumerate(parts, position.chunk):
            if limit is not None and conversations >= limit:
                return
            samples = Samples(part.arrays, [])
            if limit is not None:
                samples = samples.select(part.arrays["conv"] < limit - conversations)
            conversations += part.conversations
            yield chunk_no, samples


def stream_data(cfg: Config, tokenizer) -> TokenizedData[StreamingSamples]:
    """Training data as a stream; eval_dataset, small by nature, encoded whole as usual."""
    encoder = config_encoder(cfg, tokenizer)
    train = StreamingSamples(cfg, config_job(cfg, encoder), cfg.preprocessing_num_workers or default_workers())
    if cfg.eval_datasets:
        assert cfg.eval_dataset is not None  # eval_datasets is empty without it
        held = replace(cfg, dataset=cfg.eval_dataset, eval_dataset=None, max_samples=None, streaming=False)
        eval_samples = build_datasets(held, tokenizer).train
    else:
        eval_samples = Samples(Builder().finish(), [])
    return TokenizedData(train, eval_samples, 0, DataStats(), encoder)
