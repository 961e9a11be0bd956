"""Tool-call and reasoning data from ../shared/datasets train end to end on a tiny model with Qwen3's real
tokenizer and template: read, reported (rule, expanded samples), one optimizer step, a usable run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.data.report import data_report
from tunelab.train.run import train

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "llama-factory"


@pytest.mark.parametrize(
    "name, reasoning, own",
    [
        ("reason_tool_use_demo_50.jsonl", "keep", True),
        ("glaive_toolcall_zh_demo.json", "last", False),
    ],
)
def test_shared_agent_data_reports_and_trains_a_step(qwen3_tiny, run_config, tmp_path, name, reasoning, own):
    if not (SHARED / name).exists():
        pytest.skip(f"../shared/datasets/llama-factory/{name} not present")
    cfg = run_config(
        model=qwen3_tiny,
        dataset=str(SHARED / name),
        reasoning=reasoning,
        bad_records="skip",
        max_samples=12,
        cutoff_len=2048,
        max_steps=1,
        per_device_train_batch_size=2,
        output_dir=tmp_path / "run",
    )
    report = data_report(cfg, n_samples=1)
    assert f"reasoning: {reasoning} (the template shows reasoning: native)" in report
    expanded = int(report.split("cut at that turn): ")[1].split(" samples")[0])
    assert (expanded > 0) == own, report
    result = train(cfg)
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)
    assert (result.output_dir / "adapter_model.safetensors").exists()


def test_chat_and_generate_take_tools_and_the_thinking_switch(qwen3_tiny, run_config, tmp_path, capsys):
    if not (SHARED / "glaive_toolcall_en_demo.json").exists():
        pytest.skip("../shared/datasets/llama-factory not present")
    result = train(
        run_config(
            model=qwen3_tiny,
            dataset=str(SHARED / "glaive_toolcall_en_demo.json"),
            max_samples=8,
            max_steps=1,
            per_device_train_batch_size=2,
            output_dir=tmp_path / "run",
        )
    )
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}]))
    run = str(result.output_dir)
    assert (
        main(
            [
                "chat",
                "--model",
                run,
                "--tools",
                str(tools),
                "--no-think",
                "--prompt",
                "Weather?",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--model",
                run,
                "--dataset",
                str(SHARED / "glaive_toolcall_en_demo.json"),
                "--max-samples",
                "2",
                "--max-new-tokens",
                "4",
                "--think",
                "--output",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("prediction" in r for r in rows)
    capsys.readouterr()
    assert main(["chat", "--model", run, "--tools", str(tmp_path / "missing.json"), "--prompt", "x"]) == 2
    assert "tools: cannot read" in capsys.readouterr().err
