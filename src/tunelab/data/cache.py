"""A tokenization cache, so re-running a config (a sweep point, a resume) does not re-tokenize.

The key covers everything the samples depend on: the bytes of every data file, the tokenizer
(vocabulary, merges, added tokens), the chat template, every data option of the config and the
tunelab version. Entries are plain arrays (npz) plus JSON, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import DATA_KEYS
from .encode import ENCODING_VERSION, Encoded

log = logging.getLogger("tunelab")


def enabled() -> bool:
    return os.environ.get("TUNELAB_CACHE", "").lower() not in ("off", "0", "false", "no")


def cache_dir() -> Path:
    """`$TUNELAB_CACHE` (a folder, or `off`), else ~/.cache/tunelab."""
    root = os.environ.get("TUNELAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunelab"
    return Path(root) / "tokenized"


def _file_digest(spec: str) -> str:
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest() if files else f"hub:{spec}"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model")


def _tokenizer_digest(tokenizer) -> str:
    """The tokenizer's files when it came from a folder (hashing bytes is ~10x faster than
    serialising a 150k vocabulary), else its serialised form; plus what can change in memory."""
    h = hashlib.sha256()
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = [folder / n for n in _TOKENIZER_FILES if (folder / n).is_file()] if folder.is_dir() else []
    if any(f.name in ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model") for f in files):
        for f in files:
            h.update(f.name.encode() + f.read_bytes())
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        h.update(backend.to_str().encode() if hasattr(backend, "to_str") else
                 json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    added = sorted((i, str(t), bool(getattr(t, "special", False)))
                   for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())
    h.update(json.dumps([type(tokenizer).__name__, len(tokenizer), added,
                         sorted(str(t) for t in tokenizer.all_special_tokens)]).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def cache_key(cfg, tokenizer) -> str | None:
    """None when a data source is a hub dataset (its content cannot be fingerprinted offline)."""
    digests = [_file_digest(s) for s in cfg.datasets + cfg.eval_datasets + ([cfg.tools] if cfg.tools else [])]
    if any(d.startswith("hub:") for d in digests):
        return None
    options = {k: getattr(cfg, k) for k in DATA_KEYS}
    blob = json.dumps({"v": __version__, "encoding": ENCODING_VERSION, "files": digests, "tok": _tokenizer_digest(tokenizer), "opts": options},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _pack(prefix: str, samples: list[Encoded]) -> dict:
    return {f"{prefix}_ids": np.array([t for s in samples for t in s.input_ids], dtype=np.int64),
            f"{prefix}_labels": np.array([t for s in samples for t in s.labels], dtype=np.int64),
            f"{prefix}_lens": np.array([len(s.input_ids) for s in samples], dtype=np.int64),
            f"{prefix}_trunc": np.array([s.truncated for s in samples], dtype=bool)}


def _unpack(arrays, prefix: str, sources: list[str]) -> list[Encoded]:
    ids, labels = arrays[f"{prefix}_ids"].tolist(), arrays[f"{prefix}_labels"].tolist()
    out, at = [], 0
    for n, trunc, src in zip(arrays[f"{prefix}_lens"].tolist(), arrays[f"{prefix}_trunc"].tolist(), sources):
        out.append(Encoded(ids[at:at + n], labels[at:at + n], bool(trunc), src))
        at += n
    return out


def save(key: str, train: list[Encoded], eval_samples: list[Encoded], stats) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"train_sources": [s.source for s in train], "eval_sources": [s.source for s in eval_samples],
                "stats": {f.name: (dict(getattr(stats, f.name)) if f.name in ("records", "dropped")
                                   else getattr(stats, f.name)) for f in fields(stats)}}
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                     **_pack("train", train), **_pack("eval", eval_samples))
        os.replace(tmp, folder / f"{key}.npz")  # readers never see a half-written entry
    except OSError as exc:
        log.info("tokenization cache not written (%s)", exc)


def load(key: str, stats_type):
    path = cache_dir() / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(arrays["meta"].tobytes().decode())
            train = _unpack(arrays, "train", meta["train_sources"])
            eval_samples = _unpack(arrays, "eval", meta["eval_sources"])
    except (OSError, ValueError, KeyError) as exc:
        log.info("tokenization cache entry unreadable, re-tokenizing (%s)", exc)
        return None
    stats = stats_type()
    for name, value in meta["stats"].items():
        current = getattr(stats, name)
        setattr(stats, name, type(current)(value) if isinstance(current, dict) else value)
    return train, eval_samples, stats

