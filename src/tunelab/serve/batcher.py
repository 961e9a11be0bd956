"""Concurrent requests share forward passes one decoding step at a time (iteration-level batching).

One thread runs the model. Between every two decoding steps it admits what is waiting: prefilled
together per model (base or one adapter; left padding, position ids from the mask as `generate` makes
them), then merged into a running batch of that model where the cache layout allows it. Every live
batch then takes one step per turn with its adapter switched in (a few in a row where variants take
turns: peft's switch walks every module), so a short request behind long ones ends after about its own
number of steps, not after theirs. A row that ends (a stop id, a stop string,
its own `max_tokens`, its client gone) leaves its batch's cache at once and costs nothing more.

Rows sample on their own: greedy at temperature 0, else temperature and top-p with the row's own
generator seeded from its request, so a seeded answer is the same whatever shares its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..infer.load import InferenceModel, Variant
from . import kvcache
from .textstream import IncrementalText, StopScan, special_ids

log = logging.getLogger("tunelab")
SWITCH_SHARE = 0.2  # where variants take turns, about the most of their time that switching them may take
MAX_RUN = 64  # the most steps one batch takes in a row while another variant waits


class BatcherBusy(Exception):
    """More completions would be waiting or running than `max_queue`: the request is refused whole (a 429)."""


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

    def emit(self, *item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (self.index, *item))
        except RuntimeError:  # its event loop has closed: nobody reads this job any more
            self.cancelled = True


@dataclass
class _Row:
    job: GenerationJob
    text: IncrementalText
    stops: StopScan
    hold: int = 0
    generator: torch.Generator | None = None


class _Batch:
    """Rows of one variant stepped together: their cache, the mask over its columns, the next input."""

    def __init__(self, variant: Variant, rows: list[_Row]):
        self.variant, self.rows = variant, rows
        self.cache = self.mask = self.ids = self.pos = None
        self.padded = False
        self.step_s = 0.0  # how long one of its steps takes, switching aside


class Batcher:
    """The one thread that runs the model; `submit_all` from any thread, results arrive on each job's queue."""

    def __init__(self, im: InferenceModel, max_batch: int = 32, max_queue: int = 256, window_s: float = 0.005):
        self.im = im
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.window_s = window_s
        self.batches = 0  # how many batches were prefilled, for the logs and the tests
        self.abandoned = 0  # rows stopped because their client left
        self._movable = not kvcache.chunked(im.model.config)
        self._cond = threading.Condition()
        self._waiting: deque[GenerationJob] = deque()
        self._load = 0  # jobs waiting or running
        self._live: list[_Batch] = []
        self._special: dict[int, set[int]] = {}  # by tokenizer
        self._held = contextlib.ExitStack()  # the variant switched in, kept while busy: see `_use`
        self._in_use: Variant | None = None
        self._switch_s = self._switched_s = 0.0  # a switch's usual time, the last step's
        self._thread = threading.Thread(target=self._run, name="tunelab-batcher", daemon=True)
        self._thread.start()

    def submit_all(self, jobs: list[GenerationJob]) -> None:
        """Queue all of a request's jobs, or none: BatcherBusy when that would pass `max_queue`."""
        with self._cond:
            if self._load + len(jobs) > self.max_queue:
                raise BatcherBusy(f"{self._load} completions waiting or running; at most {self.max_queue}")
            self._load += len(jobs)
            self._waiting.extend(jobs)
            self._cond.notify()

    def submit(self, job: GenerationJob) -> None:
        self.submit_all([job])

    def _take(self) -> list[GenerationJob]:
        with self._cond:
            idle = not self._live and not self._waiting
        if idle:
            self._let_go()
        with self._cond:
            if not self._live:  # idle: sleep until a job comes, then give a burst a moment to gather
                while not self._waiting:
                    self._cond.wait()
                deadline = time.monotonic() + self.window_s
                while len(self._waiting) < self.max_batch and time.monotonic() < deadline:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
            jobs = list(self._waiting)
            self._waiting.clear()
        return jobs

    def _release(self, n: int = 1) -> None:
        with self._cond:
            self._load -= n

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                try:
                    self._admit(self._take())
                    self._merge()
                    for batch in list(self._live):
                        for _ in range(self._run_length(batch)):
                            if batch in self._live:
                                self._guarded(self._step, batch)
                except Exception:  # the loop must outlive any bug: jobs not in a batch would hang
                    log.exception("batcher turn failed")

    def _guarded(self, action, batch: _Batch) -> None:
        """One bad batch must not stop the server: its rows end with an error, the others go on."""
        try:
            action(batch)
        except Exception as exc:
            log.exception("generation failed")
            self._fail(batch, exc)

    def _fail(self, batch: _Batch, exc: Exception) -> None:
        if batch in self._live:
            self._live.remove(batch)
        for row in batch.rows:
            if not row.job.done:
                row.job.done = True
                self._release()
                row.job.emit("error", str(exc) or type(exc).__name__)
        batch.rows = []

    def _admit(self, jobs: list[GenerationJob]) -> None:
        live = [j for j in jobs if not j.cancelled]
        self.abandoned += len(jobs) - len(live)
        self._release(len(jobs) - len(live))
        groups: dict[str, list[GenerationJob]] = {}
        for job in live:
            groups.setdefault(job.variant.label, []).append(job)
        for group in groups.values():
            for start in range(0, len(group), self.max_batch):
                rows = [self._row(j) for j in group[start : start + self.max_batch]]
                batch = _Batch(group[0].variant, rows)
                self._live.append(batch)
                self._guarded(self._prefill, batch)

    def _row(self, job: GenerationJob) -> _Row:
        tok = job.variant.tokenizer
        if id(tok) not in self._special:
            self._special[id(tok)] = special_ids(tok)
        return _Row(job, IncrementalText(tok, job.tokens, self._special[id(tok)]), StopScan(job.stop))

    def _prefill(self, batch: _Batch) -> None:
        self.batches += 1
        tok, prompts = batch.variant.tokenizer, [r.job.prompt for r in batch.rows]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (batch.variant.stop_ids or [0])[0]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, batch.mask = ids.to(self.im.device), mask.to(self.im.device)
        batch.padded = any(len(p) < width for p in prompts)
        pos = (batch.mask.cumsum(-1) - 1).masked_fill(batch.mask == 0, 0)
        batch.pos = pos
        logits = self._forward(batch, ids, first=True)
        batch.pos = pos[:, -1:] + 1
        self._route(batch, logits)

    def _run_length(self, batch: _Batch) -> int:
        """Steps `batch` takes in a row: one, or where another variant is live (its own is then switched in
        every turn) enough that the switch takes about SWITCH_SHARE of the turn at most."""
        if not batch.step_s or all(b.variant is batch.variant for b in self._live):
            return 1
        wanted = self._switch_s * (1 - SWITCH_SHARE) / (SWITCH_SHARE * batch.step_s)
        return max(1, min(MAX_RUN, math.ceil(wanted)))

    def _step(self, batch: _Batch) -> None:
        started, self._switched_s = time.perf_counter(), 0.0
        self._decode(batch)
        took = time.perf_counter() - started - self._switched_s
        batch.step_s = 0.7 * batch.step_s + 0.3 * took if batch.step_s else took

    def _decode(self, batch: _Batch) -> None:
        stay = [i for i, r in enumerate(batch.rows) if not r.job.cancelled]
        if len(stay) < len(batch.rows):
            self.abandoned += len(batch.rows) - len(stay)
            self._release(len(batch.rows) - len(stay))
            self._drop(batch, stay)
            if not stay:
                return
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        logits = self._forward(batch, batch.ids, first=False)
        batch.pos = batch.pos + 1
        self._route(batch, logits)

    def _use(self, variant: Variant):
        """The model with `variant` switched in, left so until another variant or idleness: peft's switch walks
        every module (and, for the base, checks every layer's status), too slow to do at every step."""
        if self._in_use is not variant:
            started = time.perf_counter()
            self._let_go()
            self._model = self._held.enter_context(self.im.use(variant))
            self._in_use = variant
            self._switched_s = time.perf_counter() - started
            self._switch_s = 0.7 * self._switch_s + 0.3 * self._switched_s if self._switch_s else self._switched_s
        return self._model

    def _let_go(self) -> None:
        self._in_use = None
        self._held.close()

    def _forward(self, batch: _Batch, ids: torch.Tensor, first: bool) -> torch.Tensor:
        """The last position's logits, the model called as `generate` calls it (no mask where none is padded)."""
        model = self._use(batch.variant)
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        if batch.cache is None and core._supports_default_dynamic_cache():
            batch.cache = DynamicCache(config=core.config)
        kwargs = dict(cache=batch.cache, position_ids=batch.pos, use_cache=True)
        if core._supports_logits_to_keep():
            kwargs["logits_to_keep"] = 1
        mask = batch.mask if batch.padded else None
        inputs = core.prepare_inputs_for_generation(ids, attention_mask=mask, is_first_iteration=first, **kwargs)
        out = core(**inputs, return_dict=True)
        if getattr(out, "cache", None) is not None:
            batch.cache = out.cache
        return out.logits[:, -1].to(dtype=torch.float32)

    def _penalised(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """The model's own `repetition_penalty` (its generation_config), as `generate` and `tunelab chat` apply
        it: every token of the prompt and the answer so far scored down."""
        penalty = getattr(self.im.model.generation_config, "repetition_penalty", None) or 1.0
        if penalty == 1.0:
            return logits
        for i, row in enumerate(rows):
            seen = torch.tensor(row.job.prompt + row.job.tokens, device=logits.device)
            scores = logits[i].gather(0, seen)
            logits[i].scatter_(0, seen, torch.where(scores < 0, scores * penalty, scores / penalty))
        return logits

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Each row's next token: argmax, or a draw from its own generator after temperature and top-p."""
        picks = logits.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if r.job.temperature > 0]
        if not sampled:
            return picks
        at = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([rows[i].job.temperature for i in sampled], device=logits.device)
        top_p = torch.tensor([rows[i].job.top_p for i in sampled], device=logits.device)
        scores = logits[at] / temperature[:, None]
        ordered, order = scores.sort(dim=-1)  # as transformers' TopPLogitsWarper
        drop = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)[:, None]
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = scores.softmax(-1)
        for k, i in enumerate(sampled):
            row = rows[i]
            if row.generator is None:
                row.generator = torch.Generator(device=logits.device)
                if row.job.seed is None:
                    row.generator.seed()
                else:  # the choices of one seeded request differ from each other, each the same every time
                    row.generator.manual_seed((row.job.seed + row.job.index * 0x9E3779B97F4A7C15) % 2**64)
            picks[i] = torch.multinomial(probs[k], 1, generator=row.generator)[0]
        return picks

    def _route(self, batch: _Batch, logits: torch.Tensor) -> None:
        picks = self._pick(self._penalised(logits, batch.rows), batch.rows)
        batch.ids = picks[:, None]
        stop_ids = set(batch.variant.stop_ids)
        keep = [i for i, token in enumerate(picks.tolist()) if not self._advance(batch.rows[i], token, stop_ids)]
        if len(keep) < len(batch.rows):
            self._drop(batch, keep)

    def _advance(self, row: _Row, token: int, stop_ids: set[int]) -> bool:
        """Route one token to its job; True when the job has ended."""
        job = row.job
        if token in stop_ids and not job.ignore_eos:
            return self._end(row, "stop")
        new = row.text.add(token)
        if new:
            hit, row.hold = row.stops.feed(new)
            if hit is not None:
                return self._end(row, "stop", row.text.text[:hit])
        if len(job.tokens) >= job.max_tokens:
            return self._end(row, "length")
        if new:
            self._send(job, row.text.text[: len(row.text.text) - row.hold])
        return False

    def _end(self, row: _Row, reason: str, text: str | None = None) -> bool:
        if text is None:  # the whole decode, exact even where the incremental one were not
            text, seen = row.text.whole(), row.text.text
            if text.startswith(seen):
                hit = row.stops.feed(text[len(seen) :])[0]
            else:
                hit = min((text.find(s) for s in row.stops.stops if s in text), default=None)
            if hit is not None:
                text, reason = text[:hit], "stop"
        self._send(row.job, text)
        row.job.done = True
        self._release()  # before the end goes out: its client may submit again at once
        row.job.emit("end", reason, len(row.job.tokens))
        return True

    @staticmethod
    def _send(job: GenerationJob, text: str) -> None:
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit("text", text[len(job.sent) :])
            job.sent = text

    def _movable_cache(self, batch: _Batch) -> bool:
        return self._movable and kvcache.movable(batch.cache)

    def _drop(self, batch: _Batch, keep: list[int]) -> None:
        """Only the rows in `keep` stay; the cache columns no remaining row reads go too."""
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            self._live.remove(batch)
            return
        at = torch.tensor(keep)  # on the CPU: it indexes tensors on any device
        batch.cache.batch_select_indices(at)
        batch.mask, batch.ids, batch.pos = batch.mask[at], batch.ids[at], batch.pos[at]
        if self._movable_cache(batch) and (unread := kvcache.unread(batch.mask)):
            batch.mask = kvcache.resize(batch.cache, batch.mask, batch.mask.shape[1] - unread)
        batch.padded = bool((batch.mask == 0).any())

    def _merge(self) -> None:
        """Batches of one variant become one where their rows fit: requests that arrive one by one still share
        forward passes. The shorter timeline is left-padded with masked columns."""
        kept: list[_Batch] = []
        for batch in list(self._live):
            into = next(
                (
                    k
                    for k in kept
                    if k.variant is batch.variant
                    and len(k.rows) + len(batch.rows) <= self.max_batch
                    and self._movable_cache(k)
                    and self._movable_cache(batch)
                ),
                None,
            )
            if into is None:
                kept.append(batch)
                continue
            self._live.remove(batch)
            try:
                self._join(into, batch)
            except Exception as exc:  # half joined: neither is whole any more
                log.exception("merging batches failed")
                self._fail(into, exc)
                self._fail(batch, exc)
                kept.remove(into)

    @staticmethod
    def _join(a: _Batch, b: _Batch) -> None:
        length = max(a.mask.shape[1], b.mask.shape[1])
        a.padded = a.padded or b.padded or a.mask.shape[1] != b.mask.shape[1]
        a.mask, b.mask = kvcache.resize(a.cache, a.mask, length), kvcache.resize(b.cache, b.mask, length)
        kvcache.join(a.cache, b.cache)
        a.mask, a.ids, a.pos = torch.cat([a.mask, b.mask]), torch.cat([a.ids, b.ids]), torch.cat([a.pos, b.pos])
        a.rows = a.rows + b.rows
