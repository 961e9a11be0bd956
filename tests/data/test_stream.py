"""`streaming: true`: the stream reads lazily, serves the cached path's samples in file order, pass
after pass, and knows where it stands, so a checkpoint can say where the next step's data starts."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.config import from_dict
from tunelab.data import readers
from tunelab.data.dataset import SampleDataset, build_datasets
from tunelab.data.report import data_report
from tunelab.data.stream import Position, stream_data
from tunelab.errors import TunelabError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}? " * (1 + i % 5)},
                {"role": "assistant", "content": f"It is {2 * i}." * (1 + i % 3)},
            ]
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_RECORDS", 7)


def items(stream, n: int) -> list[dict]:
    return list(islice(iter(stream), n))


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "shared"])
def test_a_stream_serves_the_cached_paths_samples_in_file_order(
    kind, small_chunks, run_config, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("TUNELAB_CACHE", "off")
    if kind == "shared":
        path = SHARED / "self-llm" / "huanhuan.jsonl"
        if not path.exists():
            pytest.skip("../shared/datasets is absent")
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(
            pa.Table.from_pylist([{"instruction": f"Say {i}.", "output": f"{i}!"} for i in range(60)]),
            path,
            row_group_size=9,
        )
    else:
        path = write_jsonl(tmp_path / "d.jsonl", chat_rows(60))
    keys = dict(model="m", dataset=str(path), cutoff_len=64, max_samples=60, preprocessing_num_workers=2)
    whole = SampleDataset(build_datasets(run_config(**keys), tokenizer).train)
    stream = stream_data(run_config(**keys, streaming=True, max_steps=5), tokenizer).train
    served = items(stream, 2 * len(whole))
    expected = [whole[i] for i in range(len(whole))]
    assert served == expected + expected, "one pass is the data in file order; the next pass starts over"


def test_the_stream_reads_lazily_a_bad_line_far_ahead_is_not_read_yet(small_chunks, run_config, tokenizer, tmp_path):
    rows = chat_rows(200)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    path.write_text(path.read_text() + "{not json\n")
    stream = stream_data(
        run_config(model="m", dataset=str(path), streaming=True, max_steps=5, preprocessing_num_workers=1), tokenizer
    ).train
    assert len(items(stream, 20)) == 20
    with pytest.raises(TunelabError, match=rf"{path}:201: malformed JSON"):
        items(stream, 1000)


def test_positions_count_served_samples_so_a_restart_serves_what_follows(small_chunks, run_config, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(30))
    cfg = run_config(
        model="m", dataset=str(path), streaming=True, max_steps=5, cutoff_len=64, preprocessing_num_workers=1
    )
    stream = stream_data(cfg, tokenizer).train
    reference = items(stream, 75)  # two and a half passes
    for consumed in (0, 6, 7, 13, 29, 30, 31, 44):
        stream = stream_data(cfg, tokenizer).train
        items(stream, consumed + 3)  # the loader runs a little ahead of training
        position = stream.position_after(consumed)
        assert position.served == consumed and position.chunk_records == 7
        again = stream_data(cfg, tokenizer).train
        again.resume_from(position)
        assert items(again, 75 - consumed) == reference[consumed:], f"restart after {consumed} samples"


def test_a_saved_position_reads_back(tmp_path):
    Position(2, 5, 3, 1024, 777).save(tmp_path)
    assert Position.load(tmp_path) == Position(2, 5, 3, 1024, 777)
    assert Position.load(tmp_path / "elsewhere") is None


def test_max_samples_cuts_every_pass_of_the_stream(small_chunks, run_config, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))
    keys = dict(model="m", dataset=str(path), max_samples=10, preprocessing_num_workers=1)
    whole = SampleDataset(build_datasets(run_config(**keys), tokenizer).train)
    stream = stream_data(run_config(**keys, streaming=True, max_steps=3), tokenizer).train
    assert len(whole) == 10 and items(stream, 20) == [whole[i] for i in range(10)] * 2


def test_the_report_of_a_stream_reads_its_first_records_and_says_so(run_config, tmp_path, monkeypatch):
    from tunelab.data import dataset

    monkeypatch.setattr(dataset, "STREAM_REPORT_RECORDS", 25)
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(100))
    path.write_text(path.read_text() + "{not json\n")  # far beyond the report's records: never read
    text = data_report(run_config(dataset=str(path), streaming=True, max_steps=3))
    assert "records read: 25 (messages: 25)" in text
    assert "streaming: this report reads the first 25 records only" in text


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"max_steps": -1}, "streaming: true needs max_steps"),
        ({"max_steps": 5, "val_size": 0.1}, "val_size: 0.1 holds records out of the whole data"),
        ({"max_steps": 5, "group_by_length": True}, "group_by_length: true sorts the whole data"),
        ({"max_steps": 5, "nproc_per_node": 2}, "streaming: true trains in one process for now"),
        ({"max_steps": 5, "nnodes": 2}, "streaming: true trains in one process for now"),
    ],
)
def test_what_a_stream_cannot_do_is_refused_naming_the_key(keys, message, chat_file):
    with pytest.raises(TunelabError, match=message):
        from_dict(dict(model="m", dataset=str(chat_file), output_dir="o", streaming=True, **keys))


def test_a_stream_on_every_gpu_of_a_machine_is_refused_before_anything_starts(run_config, monkeypatch):
    import torch

    from tunelab.train.run import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # nproc_per_node null: one process per GPU
    with pytest.raises(TunelabError, match="streaming: true trains in one process for now, and this run has 4"):
        train(run_config(streaming=True, max_steps=3))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by torchrun
    with pytest.raises(TunelabError, match="and this run has 2"):
        train(run_config(streaming=True, max_steps=3))
