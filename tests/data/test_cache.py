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
    assert len(list(fresh_cache.glob("*.npz"))) == 1
    _forbid_tokenizing(monkeypatch)
    again = build_datasets(run_config(model="m", output_dir="o", val_size=0.25), tokenizer)
    assert [(s.input_ids, s.labels, s.source) for s in again.train] == \
        [(s.input_ids, s.labels, s.source) for s in first.train]
    assert [s.input_ids for s in again.eval] == [s.input_ids for s in first.eval]
    assert again.stats.trained_tokens == first.stats.trained_tokens and again.stats.records == first.stats.records


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
    entry = next(fresh_cache.glob("*.npz"))
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
