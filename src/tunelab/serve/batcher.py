"""Concurrent requests share forward passes: a worker thread batches what is waiting and generates once.

Requests for the same model (base or adapter) with the same sampling settings go in one left-padded
`generate` call; every new token is routed to its request as it comes (a stream, or the whole answer
at the end). Each row stops on its own: on a stop id, at its own `max_tokens`, or when its client has
gone, so a finished or abandoned row costs nothing more than the batch's remaining steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..infer.load import InferenceModel, Variant

log = logging.getLogger("tunelab")


@dataclass
class GenerationJob:
    """One completion (a request with n > 1 is n jobs) and where its text goes."""

    variant: Variant
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # (index, "text", str) pieces, then (index, "end", finish_reason, completion_tokens)
    stop: list[str] = field(default_factory=list)
    index: int = 0  # the choice it fills
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever comes (benchmarks, tests)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False

    @property
    def key(self) -> tuple:
        sampling = (self.temperature, self.top_p, self.seed) if self.temperature > 0 else ()
        return (self.variant.label, self.ignore_eos, *sampling)

    def emit(self, *item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (self.index, *item))


def _hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become a stop string: they wait for the next token."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class _Rows(BaseStreamer, StoppingCriteria):
    """Routes each step's new tokens to their jobs, and tells `generate` which rows are finished."""

    def __init__(self, jobs: list[GenerationJob], tokenizer, stop_ids: set[int]):
        self.jobs, self.tokenizer, self.stop_ids = jobs, tokenizer, stop_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call is the prompt
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if job.done:
                continue
            if token in self.stop_ids and not job.ignore_eos:
                self._finish(job, "stop")
                continue
            job.tokens.append(token)
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
            hit = min((text.find(s) for s in job.stop if s in text), default=-1)
            if hit >= 0:
                self._send(job, text[:hit])
                self._finish(job, "stop")
            elif len(job.tokens) >= job.max_tokens:
                self._send(job, text)
                self._finish(job, "length")
            elif not text.endswith("\ufffd"):  # half of a multi-byte character waits for the rest
                self._send(job, text[: len(text) - _hold_back(text, job.stop)])

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                self._send(job, self.tokenizer.decode(job.tokens, skip_special_tokens=True))
                self._finish(job, "length")

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([job.done or job.cancelled for job in self.jobs], device=input_ids.device)

    @staticmethod
    def _send(job: GenerationJob, text: str) -> None:
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit("text", text[len(job.sent) :])
            job.sent = text

    @staticmethod
    def _finish(job: GenerationJob, reason: str) -> None:
        job.done = True
        job.emit("end", reason, len(job.tokens))


class Batcher:
    """The one thread that runs the model; `submit` from any thread, results arrive on each job's queue."""

    def __init__(self, im: InferenceModel, max_batch: int = 32, window_s: float = 0.005):
        self.im = im
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue[GenerationJob] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tunelab-batcher", daemon=True)
        self._thread.start()
        self.batches = 0  # how many generate calls ran, for the logs and the tests
        self.abandoned = 0  # rows stopped because their client left

    def submit(self, job: GenerationJob) -> None:
        self._queue.put(job)

    def _take(self) -> list[GenerationJob]:
        jobs = [self._queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return jobs

    def _run(self) -> None:
        while True:
            taken = self._take()
            jobs = [j for j in taken if not j.cancelled]
            self.abandoned += len(taken) - len(jobs)
            groups: dict[tuple, list[GenerationJob]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                try:
                    self._generate(group)
                except Exception as exc:  # one bad batch must not stop the server
                    log.exception("generation failed")
                    for job in group:
                        if not job.done:
                            job.done = True
                            job.emit("error", str(exc))

    def _generate(self, jobs: list[GenerationJob]) -> None:
        variant = jobs[0].variant
        tok = variant.tokenizer
        stops = set(variant.stop_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (variant.stop_ids or [0])[0]
        first = jobs[0]
        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[row, width - len(job.prompt) :] = 1
        rows = _Rows(jobs, tok, stops)
        kwargs = dict(
            max_new_tokens=max(j.max_tokens for j in jobs),
            eos_token_id=None if first.ignore_eos else list(stops) or None,
            pad_token_id=pad,
            streamer=rows,
            stopping_criteria=StoppingCriteriaList([rows]),
        )
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=None)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        self.batches += 1
        with self.im.use(variant) as model, torch.no_grad():
            model.generate(input_ids=ids.to(self.im.device), attention_mask=mask.to(self.im.device), **kwargs)
        self.abandoned += sum(j.cancelled and len(j.tokens) < j.max_tokens for j in jobs)
