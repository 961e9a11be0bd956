"""Every examples/*.yaml is valid as shipped and trains end to end once its model is swapped for a tiny one.

New example files are picked up by the glob. The training test keeps each file's data, template, LoRA
targets, finetuning type and eval set, and overrides only what a hub model, a GPU or time would need.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from tunelab.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FILES = sorted(EXAMPLES.glob("*.yaml"))
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# What each shipped recipe promises; example files added later get the generic checks only.
EXPECTED = {
    "qwen2.5-7b-instruct-lora.yaml": dict(
        model="Qwen/Qwen2.5-7B-Instruct",
        finetuning_type="lora",
        template="auto",
        lora_target="all-linear",
        lora_r=8,
        lora_alpha=32,
    ),
    "phi-4-lora.yaml": dict(model="microsoft/phi-4", finetuning_type="lora", lora_target="all-linear", lora_r=16),
    "gemma-3-4b-it-lora.yaml": dict(
        model="google/gemma-3-4b-it", finetuning_type="lora", template="auto", lora_target="q_proj,k_proj,v_proj,o_proj"
    ),
    "step-3.5-flash-lora.yaml": dict(
        model="stepfun-ai/Step-3.5-Flash",
        finetuning_type="lora",
        template="dolly",
        trust_remote_code=True,
        lora_target="q_proj,k_proj",
        lora_r=16,
        lora_alpha=32,
    ),
    "qwen2.5-7b-instruct-qlora.yaml": dict(
        model="Qwen/Qwen2.5-7B-Instruct",
        finetuning_type="lora",
        load_in_4bit=True,
        lora_target="all-linear",
        template="auto",
    ),
    "qwen2.5-3b-full-sft.yaml": dict(
        model="Qwen/Qwen2.5-3B", finetuning_type="full", template="chatml", save_total_limit=2
    ),
    "qwen2.5-7b-instruct-tools.yaml": dict(model="Qwen/Qwen2.5-7B-Instruct", template="auto"),
    "qwen3-8b-reasoning.yaml": dict(model="Qwen/Qwen3-8B", template="auto", reasoning="keep"),
    "qwen2.5-7b-instruct-streaming.yaml": dict(model="Qwen/Qwen2.5-7B-Instruct", streaming=True, max_steps=2000),
    "qwen2.5-7b-instruct-dpo.yaml": dict(
        model="Qwen/Qwen2.5-7B-Instruct", stage="dpo", pref_loss="sigmoid", finetuning_type="lora", template="auto"
    ),
}
# Recipes whose data needs a template with tools and thinking: trained on a tiny Qwen3 with Qwen3's own tokenizer.
NEEDS_QWEN3 = {"qwen2.5-7b-instruct-tools.yaml", "qwen3-8b-reasoning.yaml"}

# Small and fast on a CPU; everything else comes from the file (all records are still read and encoded).
OVERRIDES = dict(
    max_steps=1,
    save_steps=1000,
    logging_steps=1,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=2,
    gradient_accumulation_steps=1,
    bf16=False,
    fp16=False,
    trust_remote_code=False,
)

ids = [p.stem for p in FILES]


def test_there_are_examples():
    assert len(FILES) >= 5, FILES
    assert set(EXPECTED) <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=ids)
def test_example_is_valid_as_shipped(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), "an example opens with a comment naming its recipe"
    raw = yaml.safe_load(text)
    assert all(not isinstance(v, dict) or k == "columns" for k, v in raw.items()), "keys are flat"

    cfg = load_config(path)  # no overrides: the file as a user would run it
    assert HUB_ID.match(cfg.model) and not Path(cfg.model).exists(), f"model should be a hub id: {cfg.model!r}"
    assert cfg.finetuning_type in ("lora", "full")
    for data in cfg.datasets + cfg.eval_datasets + ([cfg.tools] if cfg.tools else []):
        assert Path(data).is_file(), f"{data} does not resolve to a file next to the example"
    # the run folder is relative to the example, and lands in the checkout's outputs/, where the README looks
    assert Path(cfg.output_dir).resolve().parent == path.resolve().parents[1] / "outputs"
    for key, value in raw.items():
        if key in ("dataset", "eval_dataset", "tools", "output_dir"):
            continue
        got = getattr(cfg, key)
        assert got == (float(value) if isinstance(got, float) else value), key
    for key, value in EXPECTED.get(path.name, {}).items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("path", FILES, ids=ids)
def test_example_trains_on_a_tiny_model(path, request, tmp_path):
    from tunelab.train.run import train

    model = request.getfixturevalue("qwen3_tiny" if path.name in NEEDS_QWEN3 else "llama_dir")
    cfg = load_config(path, dict(OVERRIDES, model=model, output_dir=str(tmp_path / "run")))
    shipped = load_config(path)
    for key in (
        "dataset",
        "eval_dataset",
        "template",
        "finetuning_type",
        "lora_target",
        "lora_r",
        "cutoff_len",
        "gradient_checkpointing",
        "load_in_4bit",
        "load_in_8bit",
    ):
        assert getattr(cfg, key) == getattr(shipped, key), key

    result = train(cfg)

    out = result.output_dir
    weights = "adapter_model.safetensors" if cfg.finetuning_type == "lora" else "model.safetensors"
    for name in (weights, "tokenizer_config.json", "generation_config.json", "tunelab_config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses), rows
    assert result.summary["global_step"] == 1
    if cfg.stage != "sft":  # a preference recipe logs what its loss moves
        assert any("rewards/margins" in r for r in rows), rows
    if cfg.eval_dataset:
        assert result.summary["eval_samples"] > 0
        assert math.isfinite(result.summary["final_eval_loss"])
