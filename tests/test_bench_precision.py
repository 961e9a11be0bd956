"""bench/: the precision policy every arm shares (fp32, or bf16 under CPU autocast) and its checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str, file: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


arms = _load("arms", "arms.py")
bench = _load("tunelab_bench_main", "bench.py")


def test_parse_precisions():
    assert bench.parse_precisions("fp32,bf16") == ["fp32", "bf16"]
    assert bench.parse_precisions(" BF16 , bf16") == ["bf16"]
    with pytest.raises(SystemExit):
        bench.parse_precisions("fp16")
    with pytest.raises(SystemExit):
        bench.parse_precisions(",")
    assert bench.parse_args([]).precision == "fp32,bf16"


def test_spec_precision_sets_every_arms_policy():
    assert arms.compute_dtype({}) == torch.float32
    assert arms.compute_dtype({"precision": "bf16"}) == torch.bfloat16
    with pytest.raises(ValueError):
        arms.compute_dtype({"precision": "fp16"})
    assert (
        arms.training_arguments({"precision": "bf16", "output_dir": "x", "learning_rate": 1e-3, "seed": 0}, 2)["bf16"]
        is True
    )
    assert (
        arms.training_arguments({"precision": "fp32", "output_dir": "x", "learning_rate": 1e-3, "seed": 0}, 2)["bf16"]
        is False
    )


def _seen(precision: str) -> dict:
    want = bench.EXPECTED[precision]
    ran = {"autocast": want["autocast"], "output_dtype": want["output_dtype"]}
    return {
        "base_weight_dtype": want["base_weight_dtype"],
        "adapter_weight_dtype": want["adapter_weight_dtype"],
        "train_matmul": dict(ran),
        "eval_matmul": dict(ran),
    }


def test_check_precision_stops_an_arm_that_ran_otherwise():
    bench.check_precision(_seen("bf16"), "bf16", "x")
    bench.check_precision(_seen("fp32"), "fp32", "x")
    with pytest.raises(SystemExit, match="did not run at bf16"):
        bench.check_precision(_seen("fp32"), "bf16", "x")
    no_autocast_in_eval = _seen("bf16")
    no_autocast_in_eval["eval_matmul"]["autocast"] = None
    with pytest.raises(SystemExit, match="eval: autocast"):
        bench.check_precision(no_autocast_in_eval, "bf16", "x")
    with pytest.raises(SystemExit, match="asked bf16"):
        bench.check_tunelab_dtype({"run_summary": {"dtype": "float32"}}, "bf16", "x")


def test_heldout_loss_under_autocast_matches_fp32(qwen2_dir):
    """bf16 base + fp32 LoRA, evaluated under CPU autocast: the hook sees autocast, the loss is fp32's within 2%."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    samples = [
        {
            "ids": [int(t) for t in torch.randint(3, 500, (40,))],
            "labels": [-100] * 10 + [int(t) for t in torch.randint(3, 500, (30,))],
        }
        for _ in range(3)
    ]
    losses, seen = {}, {}
    for precision in ("fp32", "bf16"):
        spec = {"precision": precision, "pad_id": 0, "eval_samples": samples, "eval_fractions": [1.0]}
        model = AutoModelForCausalLM.from_pretrained(
            qwen2_dir, dtype=arms.compute_dtype(spec), attn_implementation="sdpa"
        )
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=arms.LORA_TARGETS, r=4))
        meter = arms.Meter(spec)
        meter.watch_precision(model)
        meter.evaluate(model, 0)
        losses[precision], seen[precision] = meter.evals[-1]["loss"], meter.precision_seen
    assert seen["bf16"]["base_weight_dtype"] == "bfloat16" and seen["bf16"]["adapter_weight_dtype"] == "float32"
    assert seen["bf16"]["eval_matmul"] == {
        "autocast": "bfloat16",
        "input_dtype": "bfloat16",
        "output_dtype": "bfloat16",
    }
    assert seen["fp32"]["eval_matmul"]["autocast"] is None
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.02
    # the old call, without a dtype, is the fp32 loss
    assert arms.heldout_loss(model, samples) == pytest.approx(losses["bf16"], rel=0.02)


def test_cross_precision_ratios():
    def arm(tps, loss):
        return {"trainable_tps": tps, "final_eval_loss": loss, "peak_rss_bytes": 2**30}

    fp32 = {"arms": {a: arm(100.0, 2.0) for a in bench.ARMS}}
    bf16 = {"arms": {a: arm(250.0, 2.01) for a in bench.ARMS}}
    cross = bench.cross_precision(fp32, bf16)
    assert cross["c"]["bf16_over_fp32_trainable_tps"] == pytest.approx(2.5)
    assert cross["c"]["eval_loss_rel_diff_bf16_vs_fp32"] == pytest.approx(0.005)
    assert "| c: tunelab default" in bench.cross_table(cross)
