"""A tokenization cache, so re-running a config (a sweep point, a resume) does not re-tokenize.

The key covers everything the samples depend on: the bytes of every data file, the tokenizer
(vocabulary, merges, added tokens), the chat template, every data option of the config and the
tunelab version. An entry is flat arrays and a JSON header in one file, never pickles, read back
memory-mapped: a sweep, a resumed run and every rank share the pages of one entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import DATA_KEYS
from .encode import ENCODING_VERSION
from .samples import Spilled

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


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
)


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
        h.update(
            backend.to_str().encode()
            if backend is not None and hasattr(backend, "to_str")
            else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
        )
    added = sorted(
        (i, str(t), bool(getattr(t, "special", False)))
        for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
    )
    h.update(
        json.dumps(
            [type(tokenizer).__name__, len(tokenizer), added, sorted(str(t) for t in tokenizer.all_special_tokens)]
        ).encode()
    )
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def cache_key(cfg, tokenizer) -> str | None:
    """None when a data source is a hub dataset (its content cannot be fingerprinted offline)."""
    digests = [_file_digest(s) for s in cfg.datasets + cfg.eval_datasets + ([cfg.tools] if cfg.tools else [])]
    if any(d.startswith("hub:") for d in digests):
        return None
    options = {k: getattr(cfg, k) for k in DATA_KEYS}
    blob = json.dumps(
        {
            "v": __version__,
            "encoding": ENCODING_VERSION,
            "files": digests,
            "tok": _tokenizer_digest(tokenizer),
            "opts": options,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


MAGIC = b"TLSAMP01"
ALIGN = 64


def entry(key: str) -> Path:
    return cache_dir() / f"{key}.samples"


@contextlib.contextmanager
def building(key: str):
    """Held while an entry is built: a second process building the same key waits, then reads the first's entry."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / f"{key}.lock", "a+b")
    except OSError:
        yield
        return
    with handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no advisory locks here: both build, os.replace keeps one whole entry
            pass
        else:  # nobody else builds this key now: what a killed builder left of it goes
            for stale in [*folder.glob(f"{key}.building-*"), *folder.glob(f"{key}.*.part")]:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def spill_dir(key: str):
    """A scratch folder beside the entry for token columns written while encoding; removed after."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=folder, prefix=f"{key}.building-"))
    except OSError:
        yield None
        return
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save(key: str, arrays: dict, meta: dict) -> None:
    """Arrays laid end to end (64-byte aligned, so each maps as it is), then a JSON header, then its offset."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{key}.", suffix=".part")
        layout = {}
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            for name, array in arrays.items():
                f.write(b"\0" * (-f.tell() % ALIGN))
                layout[name] = [np.dtype(array.dtype).str, [len(array)], f.tell()]
                if isinstance(array, Spilled):  # copied in blocks: never whole in memory
                    with array.path.open("rb") as src:
                        shutil.copyfileobj(src, f, 1 << 24)
                else:
                    f.write(np.ascontiguousarray(array).tobytes())
            header = f.tell()
            f.write(json.dumps({"arrays": layout, "meta": meta}).encode())
            f.write(struct.pack("<Q", header) + MAGIC)
        os.replace(tmp, entry(key))  # readers never see a half-written entry
    except OSError as exc:
        log.info("tokenization cache not written (%s)", exc)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def load(key: str) -> tuple[dict, dict] | None:
    """(arrays memory-mapped read-only, meta), or None when there is no readable entry."""
    path = entry(key)
    if not path.exists():
        return None
    try:
        with path.open("rb") as f:
            f.seek(-16, os.SEEK_END)
            header, magic = struct.unpack("<Q8s", f.read(16))
            if magic != MAGIC:
                raise ValueError("not a samples file")
            f.seek(header)
            head = json.loads(f.read(path.stat().st_size - 16 - header))
        arrays = {}
        for name, (dtype, shape, offset) in head["arrays"].items():
            arrays[name] = (
                np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape))
                if np.prod(shape)
                else np.zeros(shape, dtype=np.dtype(dtype))
            )
    except (OSError, ValueError, KeyError, struct.error) as exc:
        log.info("tokenization cache entry unreadable, re-tokenizing (%s)", exc)
        return None
    return arrays, head["meta"]
