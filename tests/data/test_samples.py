"""The flat sample storage reads back exactly what the encoder produced, in a few bytes a token.

The oracle is the encoder's own output as Python objects (the representation before flat arrays),
with the counts of the data report computed from it the obvious way.
"""

from __future__ import annotations

import json

import numpy as np

from tunelab.constants import IGNORE_INDEX
from tunelab.data.dataset import DataStats, SampleDataset, build_datasets, read_conversations
from tunelab.data.encode import Encoder


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 5 == 0:  # multi-turn
            msgs = [
                {"role": "user", "content": f"Hello {i}."},
                {"role": "assistant", "content": f"Hi {i}."},
                {"role": "user", "content": f"And {i} times two?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        elif i % 7 == 0:  # holds special-token text, kept as plain text
            msgs = [{"role": "user", "content": f"Write <|im_end|> {i}"}, {"role": "assistant", "content": "Done."}]
        else:
            msgs = [
                {"role": "user", "content": f"What is {i} squared? " * (1 + i % 9)},
                {"role": "assistant", "content": f"It is {i * i}. " * (1 + i % 4)},
            ]
        out.append({"messages": msgs})
    return out


def test_each_stored_sample_reads_back_as_the_encoder_made_it(run_config, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", "off")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(300)))
    cfg = run_config(model="m", dataset=str(path), cutoff_len=48, val_size=0.1, seed=3)
    data = build_datasets(cfg, tokenizer)

    encoder = Encoder(tokenizer, cutoff_len=48)
    expected = [s for s in encoder.encode_many(read_conversations(str(path))) if s.n_trained]
    by_source = {s.source: s for s in expected}
    assert len(data.train) + len(data.eval) == len(expected)
    for sample in list(data.train) + list(data.eval):
        assert sample == by_source[sample.source]  # every field: ids, labels, truncated, flags, source

    train = [by_source[s.source] for s in data.train]
    assert data.stats.trained_tokens == sum(s.n_trained for s in train)
    assert data.stats.total_tokens == sum(len(s.input_ids) for s in train)
    assert data.stats.truncated == sum(s.truncated for s in train) > 0
    assert data.stats.literal_text == sum(s.literal_text for s in train) > 0
    assert data.stats.ends_with_eot == sum(encoder.ends_with_eot(s) for s in train)
    assert data.stats.kept == len(train)
    assert list(data.train.lengths) == [len(s.input_ids) for s in train]


def test_a_token_costs_five_bytes_and_a_sample_a_few_more(run_config, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", "off")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(400)))
    data = build_datasets(run_config(model="m", dataset=str(path), cutoff_len=512), tokenizer)
    arrays = data.train.arrays
    tokens, samples = len(arrays["ids"]), len(arrays["flags"])
    assert arrays["ids"].nbytes + arrays["trained"].nbytes == 5 * tokens
    per_sample = sum(a.nbytes for name, a in arrays.items() if name not in ("ids", "trained")) / samples
    assert per_sample <= 50, per_sample


def test_the_training_dataset_serves_ids_and_labels_and_knows_every_length(
    run_config, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("TUNELAB_CACHE", "off")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(50)))
    data = build_datasets(run_config(model="m", dataset=str(path)), tokenizer)
    served = SampleDataset(data.train, tokenizer.pad_token_id)
    for i in range(len(served)):
        item = served[i]
        assert item == {"input_ids": data.train[i].input_ids, "labels": data.train[i].labels}
        assert any(x == IGNORE_INDEX for x in item["labels"]) and len(item["input_ids"]) == served.lengths[i]
    assert served[None] == {"input_ids": [tokenizer.pad_token_id], "labels": [IGNORE_INDEX]}


def test_the_counts_survive_the_cache(run_config, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(60)))
    cfg = run_config(model="m", dataset=str(path), cutoff_len=40, val_size=0.2)
    first, again = build_datasets(cfg, tokenizer), build_datasets(cfg, tokenizer)
    assert isinstance(again.stats, DataStats) and again.stats == first.stats
    assert np.array_equal(again.train.rows, first.train.rows) and again.conversations == first.conversations == 60
