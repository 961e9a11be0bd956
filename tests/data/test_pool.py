"""Encoding on several processes gives the samples of one process, byte for byte and in the same order.

Chunks are made small here (a few records) so that even the shared demo sets spread over many chunks
and both workers; the comparison is of the whole flat storage (ids, trained mask, offsets, flags,
conversation and record numbers) and of the train/eval rows and the data report's counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunelab.data import dataset, pool, readers
from tunelab.data.encode import Encoder
from tunelab.data.samples import Samples
from tunelab.errors import TunelabError

_spec = importlib.util.spec_from_file_location("fuzz_agents", Path(__file__).with_name("test_fuzz_agents.py"))
_agents = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_agents)
fuzz, records, real_tokenizers = _agents.fuzz, _agents._fuzz.records, _agents.real_tokenizers

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_RECORDS", 5)


@pytest.fixture()
def worker_pids(monkeypatch, tmp_path):
    """The pids that ran a chunk: a file each worker appends to (fork carries the patch into the workers)."""
    log = tmp_path / "pids"
    run = pool.EncodeJob.run

    def logged(self, chunk, fmt):
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return run(self, chunk, fmt)

    monkeypatch.setattr(pool.EncodeJob, "run", logged)

    def pids() -> set[int]:
        found = {int(p) for p in log.read_text().split()} if log.exists() else set()
        log.unlink(missing_ok=True)
        return found

    return pids


def encode(cfg, tokenizer, workers: int):
    cfg.preprocessing_num_workers = workers
    encoder = Encoder(tokenizer, cfg.train_on, cfg.cutoff_len, cfg.reasoning, cfg.expand_turns)
    return dataset.encode_all(cfg, encoder)


def outcome(cfg, tokenizer, workers: int):
    """The encoded data, or the error's text (every record bad, every sample dropped)."""
    try:
        return encode(cfg, tokenizer, workers)
    except TunelabError as exc:
        return str(exc)


def assert_same(one, many) -> None:
    if isinstance(one, str) or isinstance(many, str):
        assert one == many
        return
    assert set(one.arrays) == set(many.arrays)
    for name in one.arrays:
        assert one.arrays[name].dtype == many.arrays[name].dtype, name
        assert one.arrays[name].tobytes() == many.arrays[name].tobytes(), name
    assert np.array_equal(one.train_rows, many.train_rows) and np.array_equal(one.eval_rows, many.eval_rows)
    assert one.where == many.where and one.conversations == many.conversations and one.stats == many.stats


SETS = [
    ("llama-factory/alpaca_en_demo.json", "qwen2.5-instruct", {}),
    ("llama-factory/glaive_toolcall_en_demo.json", "qwen3", {"max_samples": 60}),
    ("llama-factory/reason_tool_use_demo_50.jsonl", "qwen3", {"reasoning": "keep", "cutoff_len": 4096}),
    ("fastchat/dummy_conversation.json", "llama-3.2-3b-instruct", {"max_samples": 120, "cutoff_len": 512}),
]


@pytest.mark.parametrize("name,family,keys", SETS, ids=[s[0].split("/")[1] for s in SETS])
def test_two_workers_give_one_workers_samples_on_the_shared_sets(
    name, family, keys, small_chunks, worker_pids, run_config, tmp_path
):
    if not (SHARED / name).exists() or not real_tokenizers.available(family):
        pytest.skip(f"../shared has no {name} or no {family} tokenizer")
    tok = real_tokenizers.load(family, tmp_path / "tok")
    cfg = run_config(
        model="m", dataset=str(SHARED / name), val_size=0.1, bad_records="skip", **{"cutoff_len": 256, **keys}
    )
    one = encode(cfg, tok, 1)
    assert worker_pids() == {os.getpid()}
    many = encode(cfg, tok, 2)
    assert len(worker_pids() - {os.getpid()}) == 2, "both workers encoded chunks"
    assert_same(one, many)
    assert len(one.train_rows) > 20 and len(one.eval_rows), "a train and an eval set, over many chunks"
    # and against the encoder itself, not only one worker against two
    encoder = Encoder(tok, cfg.train_on, cfg.cutoff_len, cfg.reasoning, cfg.expand_turns)
    expected = [s for conv in dataset.config_conversations(cfg, cfg.datasets) for s in encoder.samples(conv)]
    stored = Counter((tuple(s.input_ids), tuple(s.labels)) for s in Samples(many.arrays, many.where))
    made = Counter((tuple(s.input_ids), tuple(s.labels)) for s in expected)
    assert stored and not stored - made, "every stored sample is, ids and labels, one the encoder makes"


def test_fuzzed_records_bad_ones_included_encode_the_same_on_two_workers(small_chunks, run_config, tokenizer, tmp_path):
    good = st.builds(
        lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        _agents._fuzz.plain_text,
        _agents._fuzz.plain_text,
    )
    compared = []

    @fuzz(6)
    @given(rows=st.lists(st.one_of(records, good), min_size=12, max_size=40))
    def check(rows):
        path = tmp_path / "fuzz.jsonl"
        path.write_text("".join(json.dumps(r, default=repr) + "\n" for r in rows), encoding="utf-8")
        cfg = run_config(
            model="m", dataset=str(path), dataset_format="messages", bad_records="skip", cutoff_len=40, val_size=0
        )
        outcomes = [outcome(cfg, tokenizer, workers) for workers in (1, 2)]
        assert_same(*outcomes)
        if not isinstance(outcomes[0], str):
            compared.append(len(outcomes[0].train_rows))

    check()
    assert len(compared) >= 3, compared


def test_fuzzed_tool_and_reasoning_records_encode_the_same_on_two_workers(small_chunks, run_config, tmp_path):
    if not real_tokenizers.available("qwen3"):
        pytest.skip("../shared/tokenizers/qwen3 not present")
    tok = real_tokenizers.load("qwen3", tmp_path / "tok")

    @fuzz(3)
    @given(rows=st.lists(_agents.agent_records(), min_size=15, max_size=30))
    def check(rows):
        path = tmp_path / "agents.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        cfg = run_config(model="m", dataset=str(path), bad_records="skip", val_size=3)
        assert_same(outcome(cfg, tok, 1), outcome(cfg, tok, 2))

    check()


def test_a_bad_record_in_a_late_chunk_stops_with_the_error_one_worker_gives(
    small_chunks, run_config, tokenizer, tmp_path
):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(40)
    ]
    rows[33] = {
        "messages": [{"role": "assistant", "content": "an answer to nothing"}, {"role": "user", "content": "?"}]
    }
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_config(model="m", dataset=str(path))
    errors = []
    for workers in (1, 2):
        with pytest.raises(TunelabError) as caught:
            encode(cfg, tokenizer, workers)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and errors[0].startswith(f"{path}:34:")


def test_the_progress_bar_counts_records_across_workers(small_chunks, run_config, tokenizer, tmp_path, monkeypatch):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(57)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is no record
    seen = {}

    class Bar:
        def __init__(self, total=None, **kw):
            seen["total"], seen["counted"] = total, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            seen["counted"] += n

    monkeypatch.setattr(dataset, "tqdm", Bar)
    encode(run_config(model="m", dataset=str(path)), tokenizer, 2)
    assert seen["counted"] == 57 and seen["total"] >= 57


def test_the_default_is_every_core_up_to_a_cap(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(6)), raising=False)
    assert pool.default_workers() == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(200)), raising=False)
    assert pool.default_workers() == pool.MAX_WORKERS


def test_many_small_chunks_give_the_samples_and_split_of_one_chunk(run_config, tokenizer, tmp_path, monkeypatch):
    """Chunking is invisible: conversation numbers run on across chunks, so the train/eval split, max_samples
    and every sample (its source included) are those of the data read in one piece."""
    from tunelab.data.samples import Samples

    rows = [
        {"messages": [{"role": "user", "content": f"q{i} " * (1 + i % 6)}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(90)
    ]
    rows[17] = {"messages": [{"role": "assistant", "content": "no question"}]}  # skipped: numbers shift after it
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_config(model="m", dataset=str(path), val_size=0.2, max_samples=70, bad_records="skip", seed=5)
    views = []
    for size in (readers.CHUNK_RECORDS, 4):
        monkeypatch.setattr(readers, "CHUNK_RECORDS", size)
        got = encode(cfg, tokenizer, 2)
        views.append(
            [[s for s in Samples(got.arrays, got.where, r)] for r in (got.train_rows, got.eval_rows)]
            + [got.stats, got.conversations]
        )
    assert views[0] == views[1]
    assert len(views[0][0]) == 56 and len(views[0][1]) == 14 and views[0][3] == 70


def test_where_fork_is_unsafe_one_process_encodes(
    small_chunks, worker_pids, run_config, tokenizer, tmp_path, monkeypatch
):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_config(model="m", dataset=str(path))
    linux = encode(cfg, tokenizer, 2)
    assert os.getpid() not in worker_pids()
    monkeypatch.setattr(pool.sys, "platform", "darwin")
    assert_same(encode(cfg, tokenizer, 2), linux)
    assert worker_pids() == {os.getpid()}


class _SignalProbe:
    """A job whose result says, from the process that ran it, whether SIGTERM would end that process."""

    def run(self, chunk, fmt):
        import signal

        return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, os.getpid()


def test_workers_end_on_sigterm_whatever_handler_the_trainer_installed():
    """Training installs a SIGTERM handler that saves and carries on; a forked worker that kept it could not be
    ended by the pool, so a stream closed mid-way (a checkpoint, a kill) hung on the pool's exit."""
    import signal
    import threading

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        results = list(pool.run_chunks(_SignalProbe(), [(i, "x") for i in range(6)], 2))
        assert all(ends for ends, _ in results) and any(pid != os.getpid() for _, pid in results)
        chunks = pool.run_chunks(_SignalProbe(), [(i, "x") for i in range(50)], 2)
        next(chunks)
        closing = threading.Thread(target=chunks.close, daemon=True)  # abandoned mid-way, as a stopped stream is
        closing.start()
        closing.join(timeout=60)
        assert not closing.is_alive(), "closing the pool hung on a worker that ignores SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, previous)
