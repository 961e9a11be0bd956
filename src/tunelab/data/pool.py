"""Encoding on every core: chunks of records go to forked workers and come back, in order, as flat arrays.

Each worker parses, converts and encodes whole chunks with the parent's encoder (inherited by fork,
never pickled), so the samples are those of one process, in the same order; only raw JSONL lines
travel out and compact arrays travel back. At most two chunks per worker are in flight, so a file
larger than memory is never held whole by the parent.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections import deque
from dataclasses import dataclass
from itertools import chain, islice
from typing import Iterable, Iterator

from .encode import Encoder
from .formats import to_conversations
from .readers import Chunk
from .samples import Part, part_of

MAX_WORKERS = 32  # past this the parent's reading and merging, not encoding, sets the pace


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


@dataclass
class EncodeJob:
    """What turns one chunk of records into one Part; the same object runs in the parent and in workers."""

    encoder: Encoder
    columns: dict | None = None
    system: str | None = None
    tools: list[dict] | None = None
    skip_bad: bool = False

    def run(self, chunk: Chunk, fmt: str) -> Part:
        records = chunk.read()
        convs, kept, skipped = to_conversations(records, fmt, self.columns, self.system, self.tools, self.skip_bad)
        samples = self.encoder.encode_many(convs)
        conv, k = [], -1
        for s in samples:  # a conversation's whole sample comes first, then its own-turn samples
            k += not s.own_turn
            conv.append(k)
        pos = [chunk.at[kept[k]] for k in conv]
        return part_of(samples, conv, pos, set(self.encoder.eot_ids), len(records), len(convs), skipped)


_JOB: EncodeJob | None = None  # the job a forked worker inherits


def _run(args: tuple[Chunk, str]) -> Part:
    assert _JOB is not None  # set by run_chunks before the workers fork
    return _JOB.run(*args)


def run_chunks(job: EncodeJob, chunks: Iterable[tuple[Chunk, str]], workers: int) -> Iterator[Part]:
    """job.run over (chunk, format) pairs, in order; forked workers when there are several chunks and cores."""
    chunks = iter(chunks)
    head = list(islice(chunks, 2))
    if workers <= 1 or len(head) < 2 or not sys.platform.startswith("linux"):  # fork is safe on Linux only
        for item in chain(head, chunks):
            yield job.run(*item)
        return
    global _JOB
    _JOB = job
    try:
        with _quiet_tokenizers(), multiprocessing.get_context("fork").Pool(workers, _worker_signals) as pool:
            pending: deque = deque()
            for item in chain(head, chunks):
                pending.append(pool.apply_async(_run, (item,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _JOB = None


def _worker_signals() -> None:
    """A forked worker inherits the trainer's SIGTERM/SIGINT handlers (which save a checkpoint and carry on); with
    them, the pool's terminate() cannot end a worker waiting for its next chunk, and closing the pool hangs.
    Workers die on SIGTERM and leave Ctrl-C to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _quiet_tokenizers():
    """A forked worker would otherwise warn that the Rust tokenizer's threads were given up; one thread each is
    the point."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
