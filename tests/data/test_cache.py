"""Re-running a config reads tokenized samples from the cache; any change to what they depend on misses."""

import pytest

from tunelab.data import cache, dataset
from tunelab.data.dataset import build_datasets


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


def _forbid_tokenizing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dataset, "encode_all", boom)


def test_second_run_reads_the_cache_and_gets_the_same_samples(fresh_cache, run_config, tokenizer, monkeypatch):
    first = build_datasets(run_config(model="m", output_dir="o", val_size=0.25), tokenizer)
    assert len(list(fresh_cache.glob("*.samples"))) == 1
    _forbid_tokenizing(monkeypatch)
    again = build_datasets(run_config(model="m", output_dir="o", val_size=0.25), tokenizer)
    assert [(s.input_ids, s.labels, s.source) for s in again.train] == [
        (s.input_ids, s.labels, s.source) for s in first.train
    ]
    assert [s.input_ids for s in again.eval] == [s.input_ids for s in first.eval]
    assert again.stats.trained_tokens == first.stats.trained_tokens and again.stats.records == first.stats.records


def test_cached_samples_are_the_encoders_own_output(fresh_cache, run_config, tokenizer, monkeypatch):
    """The oracle is the encoder, not another cached read: every sample read back from the cache (train and eval)
    is, field for field, what `Encoder.samples` makes of the conversations the config reads."""
    cfg = run_config(model="m", output_dir="o", val_size=0.25, system="Answer briefly.")
    build_datasets(cfg, tokenizer)
    _forbid_tokenizing(monkeypatch)
    cached = build_datasets(cfg, tokenizer)
    encoder = dataset.config_encoder(cfg, tokenizer)
    expected = [s for conv in dataset.config_conversations(cfg, cfg.datasets) for s in encoder.samples(conv)]

    def fields(samples):
        return sorted((s.input_ids, s.labels, s.source, s.truncated, s.own_turn) for s in samples)

    assert fields(list(cached.train) + list(cached.eval)) == fields(expected)
    assert len(cached.eval) == 6 and cached.stats.trained_tokens == sum(s.n_trained for s in cached.train)


@pytest.mark.parametrize("change", ["data", "cutoff_len", "train_on", "template", "tokenizer", "seed"])
def test_anything_the_samples_depend_on_changes_the_key(change, fresh_cache, run_config, tokenizer, tmp_path):
    import copy

    cfg, tok = run_config(model="m", output_dir="o", val_size=0.25), tokenizer
    before = cache.cache_key(cfg, tok)
    if change == "data":
        path = tmp_path / "chat.jsonl"
        path.write_text(path.read_text().replace("It is 0.", "It is zero."))
    elif change == "tokenizer":
        tok = copy.deepcopy(tokenizer)
        tok.add_tokens(["<brand-new>"])
    else:
        value = {"cutoff_len": 64, "train_on": "all", "template": "llama3", "seed": 7}[change]
        cfg = run_config(model="m", output_dir="o", val_size=0.25, **{change: value})
    assert cache.cache_key(cfg, tok) != before


def test_cache_can_be_switched_off(tmp_path, run_config, tokenizer, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", "off")
    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path / "never")
    build_datasets(run_config(model="m", output_dir="o", val_size=0.25), tokenizer)
    assert not (tmp_path / "never").exists()


def test_an_unreadable_entry_is_re_tokenized(fresh_cache, run_config, tokenizer):
    first = build_datasets(run_config(model="m", output_dir="o", val_size=0.25), tokenizer)
    entry = next(fresh_cache.glob("*.samples"))
    entry.unlink()  # a new file, as a writer's os.replace makes: the first run's arrays still map the old one
    entry.write_bytes(b"garbage")
    again = build_datasets(run_config(model="m", output_dir="o", val_size=0.25), tokenizer)
    assert [s.input_ids for s in again.train] == [s.input_ids for s in first.train]


def test_a_tokenizer_loaded_from_a_folder_is_keyed_on_its_files_and_its_changes_in_memory(tokenizer, tmp_path):
    import json

    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    one, two = AutoTokenizer.from_pretrained(tmp_path / "tok"), AutoTokenizer.from_pretrained(tmp_path / "tok")
    before = cache._tokenizer_digest(one)
    assert cache._tokenizer_digest(two) == before
    two.add_tokens(["<added-in-memory>"])
    assert cache._tokenizer_digest(two) != before

    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # same vocabulary, one merge fewer
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    edited = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert cache._tokenizer_digest(edited) != before


def test_a_cached_run_maps_the_entry_instead_of_reading_it_into_memory(fresh_cache, run_config, tokenizer):
    import numpy as np

    build_datasets(run_config(model="m", output_dir="o", val_size=0.25), tokenizer)
    again = build_datasets(run_config(model="m", output_dir="o", val_size=0.25), tokenizer)
    for name in ("ids", "trained", "offsets"):
        assert isinstance(again.train.arrays[name], np.memmap), name
        assert again.train.arrays[name] is again.eval.arrays[name], "train and eval are rows of one storage"
    assert not again.train.arrays["ids"].flags.writeable


RACE = """
import hashlib, logging, sys, time
from tunelab.config import from_dict
from tunelab.data import cache
from tunelab.data.dataset import build_datasets
from transformers import AutoTokenizer

cfg = from_dict(dict(model="m", dataset=sys.argv[1], output_dir="o", val_size=0.25, preprocessing_num_workers=1))
tok = AutoTokenizer.from_pretrained(sys.argv[2])
logging.basicConfig(level=logging.INFO)
while time.time() < float(sys.argv[3]):  # both start building at the same moment
    time.sleep(0.001)
data = build_datasets(cfg, tok)
digest = hashlib.sha256()
for sample in data.train:
    digest.update(repr((sample.input_ids, sample.labels, sample.source)).encode())
print(digest.hexdigest(), len(data.train), flush=True)
"""


def test_two_processes_building_one_entry_leave_one_valid_entry_and_agree(fresh_cache, tokenizer, tmp_path):
    import json
    import os
    import subprocess
    import sys
    import time

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question number {i}?" * (1 + i % 7)},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(3000)
    ]
    data = tmp_path / "race.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer.save_pretrained(tmp_path / "tok")
    start = time.time() + 3
    env = dict(os.environ, TUNELAB_CACHE=str(fresh_cache.parent))
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(data), str(tmp_path / "tok"), str(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outs]
    answers = [out.split() for out, _ in outs]
    assert answers[0] == answers[1] and int(answers[0][1]) == 2250
    assert [p.suffix for p in fresh_cache.iterdir() if p.suffix != ".lock"] == [".samples"], "one entry, no parts"
    from_cache = ["tokenized samples from the cache" in err for _, err in outs]
    assert sorted(from_cache) == [False, True], "one process built the entry, the other waited and read it"


def test_what_a_killed_build_left_behind_is_cleared_by_the_next_build(fresh_cache, run_config, tokenizer):
    cfg = run_config(model="m", output_dir="o", val_size=0.25)
    key = cache.cache_key(cfg, tokenizer)
    fresh_cache.mkdir(parents=True)
    (fresh_cache / f"{key}.building-abc").mkdir()
    (fresh_cache / f"{key}.building-abc" / "ids.bin").write_bytes(b"\0" * 4096)
    (fresh_cache / f"{key}.xyz.part").write_bytes(b"half an entry")
    (fresh_cache / "another-key.building-1").mkdir()  # another key's build may be running: left alone
    build_datasets(cfg, tokenizer)
    assert sorted(p.name for p in fresh_cache.iterdir()) == sorted(
        [f"{key}.samples", f"{key}.lock", "another-key.building-1"]
    )
