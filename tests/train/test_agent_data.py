"""Tool-call and reasoning data from ../shared/datasets train end to end on a tiny model with Qwen3's real
tokenizer and template: read, reported (rule, expanded samples), one optimizer step, a usable run folder."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from tunelab.data.report import data_report
from tunelab.train.run import train

_spec = importlib.util.spec_from_file_location(
    "real_tokenizers", Path(__file__).resolve().parents[1] / "data" / "real_tokenizers.py")
real_tokenizers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_tokenizers)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "llama-factory"


@pytest.fixture(scope="module")
def qwen3_tiny(tmp_path_factory):
    if not real_tokenizers.available("qwen3"):
        pytest.skip("../shared/tokenizers/qwen3 not present")
    from tunelab.demo.build import build_tiny_model

    root = tmp_path_factory.mktemp("qwen3-tiny")
    tok = real_tokenizers.load("qwen3", root)
    # a 151k vocabulary: a narrow tied embedding keeps the model small
    return str(build_tiny_model(root / "model", tok, "qwen3", hidden=16, heads=2, tie_word_embeddings=True))


@pytest.mark.parametrize("name, reasoning, own", [
    ("reason_tool_use_demo_50.jsonl", "keep", True),
    ("glaive_toolcall_zh_demo.json", "last", False),
])
def test_shared_agent_data_reports_and_trains_a_step(qwen3_tiny, run_config, tmp_path, name, reasoning, own):
    if not (SHARED / name).exists():
        pytest.skip(f"../shared/datasets/llama-factory/{name} not present")
    cfg = run_config(model=qwen3_tiny, dataset=str(SHARED / name), reasoning=reasoning, bad_records="skip",
                     max_samples=12, cutoff_len=2048, max_steps=1, per_device_train_batch_size=2,
                     output_dir=tmp_path / "run")
    report = data_report(cfg, n_samples=1)
    assert f"reasoning: {reasoning} (the template shows reasoning: native)" in report
    expanded = int(report.split("cut at that turn): ")[1].split(" samples")[0])
    assert (expanded > 0) == own, report
    result = train(cfg)
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)
    assert (result.output_dir / "adapter_model.safetensors").exists()
