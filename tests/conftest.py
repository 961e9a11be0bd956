"""Fixtures: tiny models of real architectures with a locally trained tokenizer; no hub, no network."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TUNELAB_CACHE", tempfile.mkdtemp(prefix="tunelab-cache-"))  # never the user's ~/.cache

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PERSONA = ROOT / "examples" / "data" / "persona.json"


def persona_texts() -> list[str]:
    records = json.loads(PERSONA.read_text(encoding="utf-8"))
    return [m["content"] for r in records for m in r["messages"]]


@pytest.fixture(scope="session")
def tokenizer():
    from tunelab.data.templates import CHATML
    from tunelab.demo.build import train_tokenizer

    tok = train_tokenizer(persona_texts() + ["### Instruction:\n### Input:\n### Response:\n"], vocab_size=600)
    tok.chat_template = CHATML
    return tok


def _build(tmp_path_factory, tokenizer, arch, **kw):
    from tunelab.demo.build import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp(arch) / "model", tokenizer, arch, **kw))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return _build(tmp_path_factory, tokenizer, "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tokenizer):
    return _build(tmp_path_factory, tokenizer, "qwen2")


@pytest.fixture(scope="session")
def qwen3_tiny(tmp_path_factory):
    """A tiny Qwen3 with Qwen3's real tokenizer and thinking/tool template (../shared/tokenizers/qwen3)."""
    import real_tokenizers

    root = tmp_path_factory.mktemp("qwen3-tiny")
    tok = real_tokenizers.load_or_skip("qwen3", root)
    # a 151k vocabulary: a narrow tied embedding keeps the model small
    return _build(tmp_path_factory, tok, "qwen3", hidden=16, heads=2, tie_word_embeddings=True)


@pytest.fixture()
def chat_file(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(24)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


RUN_DEFAULTS = dict(max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=1000)


@pytest.fixture()
def run_config(request, tmp_path, chat_file):
    """run_config(**keys) -> a validated Config: a short LoRA run of the tiny llama on `chat_file`
    into tmp_path/'run'; keys given override (model, dataset, output_dir too; paths may be Path objects).

    Defaults are RUN_DEFAULTS, else Config's own: a test passes every value it relies on.
    run_config.data(**keys) is the same mapping unvalidated, e.g. to write a YAML config.
    The tiny llama is built only when `model` is not given."""
    from tunelab.config import from_dict

    def data(**keys) -> dict:
        keys = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in keys.items()}
        base = dict(dataset=chat_file, output_dir=str(tmp_path / "run"), **RUN_DEFAULTS)
        if "model" not in keys:
            base["model"] = request.getfixturevalue("llama_dir")
        return {**base, **keys}

    def make(**keys):
        return from_dict(data(**keys))

    make.data = data
    return make


@pytest.fixture()
def write_data(tmp_path):
    """write_data(name, rows) -> path: JSONL for .jsonl names, a JSON array for .json."""

    def write(name: str, rows: list) -> str:
        path = tmp_path / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        else:
            path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        return str(path)

    return write


PAIRS = [
    ("Capital of France?", "Paris is the capital."),
    ("Colour of the sky?", "The sky is blue."),
    ("Two plus two?", "Four."),
]


@pytest.fixture(scope="session")
def pairs():
    """The (question, answer) pairs the `memorised` model knows."""
    return PAIRS


@pytest.fixture(scope="session")
def memorised(tmp_path_factory, llama_dir):
    """A tiny model fully fine-tuned until it knows PAIRS (`full/`), then a short LoRA on top (`lora/`)."""
    from tunelab.config import from_dict
    from tunelab.train.run import train

    root = tmp_path_factory.mktemp("memorised")
    data = root / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in PAIRS
        )
    )
    common = dict(dataset=str(data), per_device_train_batch_size=3, logging_steps=10, lr_scheduler_type="constant")
    train(
        from_dict(
            dict(
                model=llama_dir,
                output_dir=str(root / "full"),
                finetuning_type="full",
                max_steps=60,
                learning_rate=3e-3,
                **common,
            )
        )
    )
    train(
        from_dict(
            dict(model=str(root / "full"), output_dir=str(root / "lora"), max_steps=5, learning_rate=1e-3, **common)
        )
    )
    return root


@pytest.fixture(scope="session")
def serve_app():
    """serve_app(app) -> a context manager that runs the ASGI app on 127.0.0.1 in a thread and yields its
    base URL (http://127.0.0.1:PORT), stopping it on exit."""
    import contextlib
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn")
    from tunelab.train.launch import free_port

    @contextlib.contextmanager
    def serving(app):
        port = free_port()
        live = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=live.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not live.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.started, "the server did not start within 30 s"
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            live.should_exit = True
            thread.join(timeout=10)

    return serving
