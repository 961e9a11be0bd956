"""The tokenization cache key covers every data option and every tokenizer and template ingredient.

Why: a cache entry is reused whenever its key matches. A key that misses one thing the tokenized
samples depend on silently trains a changed config on stale samples (e.g. a new `system` prompt or
`columns` mapping that never reaches the data). The options in the key are `DATA_KEYS`, derived
from the config fields marked `data=True`; a field whose mark is lost drops out of the key (and out
of any list built from `DATA_KEYS`) without any error.

How:
- every key of `DATA_KEYS`, parametrized from `DATA_KEYS` itself so a data key added later is
  covered automatically, gets a valid value different from the reference config's (derived from
  its choices and type; a type no rule knows fails, naming the key) and the cache key must change;
- every field of `Config`, marked or not, is changed the same way and the samples are tokenized
  both ways with the cache off: whenever the samples differ (or the changed config is refused), the
  cache key must differ. This is what catches a field that lost its `data=True` mark. The probe data
  has a system-less chat in `messages` and another in a spare column, so `system` and `columns` change it
  (`template` and `model_hub` act before tokenizing, on the tokenizer and on hub ids, so only the first
  check covers them);
- each ingredient of the tokenizer, for a tokenizer built in memory and one loaded from a folder
  (whose files are hashed instead of its serialised form): an added token, an added special token,
  a token given a special role, the chat template, the tokenizer's class and a retrained vocabulary.
Controls: rebuilding the same config, or copying the tokenizer, keeps the key, so a key that merely
varies cannot pass.
"""

from __future__ import annotations

import copy
import dataclasses
import typing

import pytest

from tunelab.config import DATA_KEYS, FIELDS, Config
from tunelab.data import cache
from tunelab.data.dataset import build_datasets
from tunelab.errors import TunelabError


def _chat(i: int, words: str) -> list[dict]:
    """Two exchanges without a system prompt, of lengths around the reference cutoff_len."""
    return [
        {"role": "user", "content": f"Question {i}: {words}?"},
        {"role": "assistant", "content": f"Answer {i}: " + " ".join([words] * (1 + i % 4))},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": f"Then {words}."},
    ]


@pytest.fixture()
def reference(write_data):
    """Config defaults but a held-out share and a cutoff_len that cuts some samples; data whose spare column
    `alternative` holds other chats."""
    data = write_data(
        "probe.jsonl", [{"messages": _chat(i, "blue sky"), "alternative": _chat(i, "red sun")} for i in range(12)]
    )
    return dict(model="m", output_dir="o", dataset=data, val_size=0.25, cutoff_len=96)


def _types(name: str) -> set:
    hint = typing.get_type_hints(Config)[name]
    return set(typing.get_args(hint)) if typing.get_origin(hint) is typing.Union else {hint}


def _changed(name: str, value, write_data):
    """A valid value for config key `name` that differs from `value`."""
    meta, types = FIELDS[name].metadata, _types(name)
    if name in ("dataset", "eval_dataset"):
        return write_data(f"other_{name}.jsonl", [{"messages": _chat(i, "green grass")} for i in range(4)])
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != value)
    if bool in types:
        return not value
    if dict in types:
        return {"messages": "alternative"}
    if float in types:
        return 0.25 if value != 0.25 else 0.5
    if int in types:
        return 7 if value is None else value + 1
    if str in types:
        return "You answer in one word." if value != "You answer in one word." else "Be brief."
    pytest.fail(f"config key {name!r} ({types}): no rule gives it a changed value; add one to _changed")


def _samples(cfg, tokenizer):
    """What training would tokenize (cache off), or the refusal."""
    try:
        data = build_datasets(cfg, tokenizer)
    except TunelabError as exc:
        return f"refused: {exc}"
    return [[(s.input_ids, s.labels) for s in part] for part in (data.train, data.eval)]


def test_data_keys_are_the_fields_marked_data():
    assert set(DATA_KEYS) == {f.name for f in dataclasses.fields(Config) if f.metadata["data"]}


def test_the_same_config_and_tokenizer_give_the_same_key(run_config, reference, tokenizer):
    key = cache.cache_key(run_config(**reference), tokenizer)
    assert key is not None
    assert cache.cache_key(run_config(**reference), copy.deepcopy(tokenizer)) == key


@pytest.mark.parametrize("name", DATA_KEYS)
def test_changing_any_data_key_changes_the_cache_key(name, run_config, reference, tokenizer, write_data):
    before = run_config(**reference)
    value = _changed(name, getattr(before, name), write_data)
    after = run_config(**{**reference, name: value})  # validated: a value the config accepts
    assert getattr(after, name) != getattr(before, name)
    assert {k: v for k, v in after.to_dict().items() if k != name} == {
        k: v for k, v in before.to_dict().items() if k != name
    }
    assert cache.cache_key(after, tokenizer) != cache.cache_key(before, tokenizer), (
        f"{name}={value!r} leaves the tokenization cache key unchanged"
    )


# node_rank: with nnodes 1 it has one valid value; streaming never reads or writes the cache (see test_stream.py)
@pytest.mark.parametrize("name", [n for n in FIELDS if n not in ("node_rank", "streaming")])
def test_every_config_key_that_changes_the_samples_changes_the_cache_key(
    name, run_config, reference, tokenizer, write_data, monkeypatch
):
    monkeypatch.setenv("TUNELAB_CACHE", "off")
    before = run_config(**reference)
    after = run_config(**{**reference, name: _changed(name, getattr(before, name), write_data)})
    if _samples(after, tokenizer) != _samples(before, tokenizer):
        assert cache.cache_key(after, tokenizer) != cache.cache_key(before, tokenizer), (
            f"{name} changes the tokenized samples but not the cache key: mark it data=True in config.py"
        )


@pytest.mark.parametrize(
    "name",
    [
        "dataset",
        "eval_dataset",
        "columns",
        "system",
        "cutoff_len",
        "max_samples",
        "val_size",
        "train_on",
        "seed",
        "dataset_format",
    ],
)
def test_the_probe_data_shows_each_data_option_at_work(name, run_config, reference, tokenizer, write_data, monkeypatch):
    """Guards the sweep above: these options do change the samples of the probe data."""
    monkeypatch.setenv("TUNELAB_CACHE", "off")
    before = run_config(**reference)
    after = run_config(**{**reference, name: _changed(name, getattr(before, name), write_data)})
    assert _samples(after, tokenizer) != _samples(before, tokenizer)


@pytest.fixture(params=["in_memory", "from_folder"])
def origin(request, tokenizer, tmp_path):
    """(the tokenizer, how to get a retrained vocabulary of the same size in the same form)."""
    from transformers import AutoTokenizer

    from tunelab.data.templates import CHATML
    from tunelab.demo.build import train_tokenizer

    def retrained():
        texts = [f"record {i}: the quick brown fox {i * 7} jumps over lazy dogs" for i in range(300)]
        tok = train_tokenizer(texts, vocab_size=len(tokenizer))
        tok.chat_template = CHATML
        return tok

    if request.param == "in_memory":
        return copy.deepcopy(tokenizer), retrained
    tokenizer.save_pretrained(tmp_path / "tok")

    def retrained_folder():
        retrained().save_pretrained(tmp_path / "tok2")
        return AutoTokenizer.from_pretrained(tmp_path / "tok2")

    return AutoTokenizer.from_pretrained(tmp_path / "tok"), retrained_folder


def _added_token(tok, _):
    tok.add_tokens(["<brand-new>"])
    return tok


def _added_special_token(tok, _):
    tok.add_tokens(["<|tool|>"], special_tokens=True)
    return tok


def _existing_token_made_pad(tok, _):
    tok.pad_token = "<|im_end|>"  # no new token, a new role
    return tok


def _chat_template(tok, _):
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    return tok


def _tokenizer_class(tok, _):
    tok.__class__ = type("OtherTokenizer", (type(tok),), {})  # same vocabulary, another class
    return tok


def _retrained_vocabulary(tok, retrained):
    other = retrained()
    assert len(other) == len(tok) and other.get_vocab() != tok.get_vocab()
    return other


@pytest.mark.parametrize(
    "ingredient",
    [
        _added_token,
        _added_special_token,
        _existing_token_made_pad,
        _chat_template,
        _tokenizer_class,
        _retrained_vocabulary,
    ],
)
def test_every_tokenizer_ingredient_changes_the_cache_key(ingredient, origin, run_config, reference):
    tok, retrained = origin
    cfg = run_config(**reference)
    before = cache.cache_key(cfg, tok)
    assert cache.cache_key(cfg, copy.deepcopy(tok)) == before
    changed = ingredient(copy.deepcopy(tok), retrained)
    assert cache.cache_key(cfg, changed) != before


def test_the_tools_files_bytes_are_in_the_key(run_config, reference, tokenizer, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text('[{"name": "get_weather"}]')
    before = cache.cache_key(run_config(**reference, tools=tools), tokenizer)
    tools.write_text('[{"name": "get_time"}]')
    assert cache.cache_key(run_config(**reference, tools=tools), tokenizer) != before
