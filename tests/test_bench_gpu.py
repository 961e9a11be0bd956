"""bench/gpu.py, the GPU benchmark: its FLOP count by hand, and a smoke run on the CPU so the script cannot rot.

The benchmark itself needs a GPU and minutes; `--smoke` runs every arm and the full fine-tuning check
on a tiny model in a subprocess, the way the real run does, in well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SHARED = ROOT.parent / "shared"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # gpu_arms imports gpu as the arm processes do
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


gpu = _load("gpu")

TINY = {"hidden": 8, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 16}


def test_parameter_counts_by_hand():
    counts = gpu.shape_counts(TINY, vocab=10, lora_r=2)
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate/up/down 3*8*16 = 64+32+32+64+384 = 576
    assert counts["n_body"] == 2 * 576
    # per layer, r * (in+out): q 16, k 12, v 12, o 16, gate 24, up 24, down 24 -> 2 * 128
    assert counts["n_lora"] == 2 * 256
    assert counts["attn_width"] == 8


def test_necessary_flops_by_hand():
    counts = gpu.shape_counts(TINY, vocab=10, lora_r=2)
    lengths, trained = [3, 5], 4  # two samples, 8 real tokens, 4 positions whose next token is trained
    body, adapters = 4 * 1152 * 8, 6 * 512 * 8  # 36,864 and 24,576
    attention = 2 * 6 * 8 * (3 * 4 + 5 * 6)  # layers * 6 * n_heads*head_dim * sum s(s+1) = 4,032
    head = 4 * 8 * 10 * 4  # 4 * hidden * vocab * trained = 1,280
    assert gpu.necessary_flops(lengths, trained, counts, "lora") == body + adapters + attention + head == 66_752
    full = 6 * 1152 * 8 + attention + 6 * 8 * 10 * 4  # 55,296 + 4,032 + 1,920
    assert gpu.necessary_flops(lengths, trained, counts, "full") == full == 61_248
    # attention by each sample's own length: one sample of 8 tokens costs more than 3 + 5 packed in a row
    assert gpu.necessary_flops([8], trained, counts) > gpu.necessary_flops(lengths, trained, counts)


def test_counts_match_a_real_qwen2_and_its_lora():
    """The formula's N_body and N_lora are what transformers and peft actually build."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 48}
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    counts = gpu.shape_counts(shape, vocab=64, lora_r=4)
    assert counts["n_body"] == linear
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert counts["n_lora"] == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_peak_flops_by_device_name():
    assert gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA H20") == 148e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops("Some New Accelerator") is None
    assert gpu.peak_flops("NVIDIA H200", override_tflops=500) == 500e12


def test_batch_lengths_of_each_layout():
    import torch

    arms = _load("gpu_arms")
    pad = 0
    # tunelab's packed rows: samples of 3 and 2 tokens, then the row tail's pad block (positions restart)
    packed = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0, 0]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])}
    assert arms.batch_lengths(packed, pad) == [3, 2]
    # TRL's padding-free row: everything real
    assert arms.batch_lengths(
        {"input_ids": torch.tensor([[5, 6, 7, 8]]), "position_ids": torch.tensor([[0, 1, 0, 1]])}, pad
    ) == [2, 2]
    padded = {"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    assert arms.batch_lengths(padded, pad) == [3, 1]


def test_generated_records_have_a_long_tail():
    """Without ../shared the bench still trains on a spread of lengths, not one size."""
    records = gpu.synthetic_records(2000, seed=1)
    lengths = sorted(len(r["instruction"]) + len(r["input"]) + len(r["output"]) for r in records)
    assert lengths[int(0.99 * len(lengths))] > 8 * lengths[len(lengths) // 2]
    assert {r["source"] for r in records} == {"synthetic-short", "synthetic-long"}


@pytest.mark.skipif(not (SHARED / "datasets").is_dir(), reason="../shared is absent")
def test_shared_sets_are_found_and_mixed():
    files = gpu.shared_files(SHARED)
    records, source = gpu.load_records(files)
    assert {r["source"] for r in records} == {"huanhuan", "alpaca"}
    assert "huanhuan" in source and "alpaca" in source


@pytest.mark.slow
def test_smoke_run_trains_every_arm_and_the_full_ft_check(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu.py"),
            "--smoke",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())

    assert set(results["flop_formula"]) >= {"lora", "full", "attn", "terms"}
    arms = results["models"]["smoke"]["arms"]
    trl = importlib.util.find_spec("trl") is not None
    assert set(arms) == {"a", "b", "c"}
    for name, arm in arms.items():
        if name == "b" and not trl:
            assert arm["status"] == "skipped"
            continue
        assert arm["status"] == "ok", arm
        assert arm["trainable_tps"] > 0 and arm["real_tps"] > 0
        assert arm["necessary_flops"] > 0 and arm["achieved_flops"] > 0
        assert math.isfinite(arm["eval_loss_start"]) and math.isfinite(arm["eval_loss_end"])
        assert arm["steps"] == 3 and arm["lora"]["modules"] == 14  # 7 adapted layers x 2 layers
    # the usual recipe and tunelab see the same batches: same trained tokens, same held-out loss
    assert arms["a"]["trained_tokens"] == arms["c"]["trained_tokens"]
    assert results["models"]["smoke"]["ratios"]["eval_loss_rel_diff_c_vs_a"] < 1e-3

    full = results["full_ft"]
    assert full["status"] == "ok"
    assert [r["precision"] for r in full["runs"]] == ["bf16", "fp16"]
    assert all(r["ok"] and r["masters_fp32"] for r in full["runs"]), full["runs"]
    assert "### full fine-tuning" in results["report_md"] and "4*N_body*s" in results["report_md"]


def test_the_engines_benchmark_runs_on_cpu_and_compares_fsdp2_with_plain_training(tmp_path):
    """bench/gpu_engines.py, whose GPU run compares plain training, FSDP2 and ZeRO-2/3: on CPU, LoRA and FSDP2
    over 2 processes (gloo) against one plain process, each adapter reloaded whole."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_engines.py"), "--smoke", "--steps", "3", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "engines.json").read_text())
    assert set(record["results"]) == {"lora/plain", "lora/fsdp2"}
    fsdp = record["results"]["lora/fsdp2"]
    assert fsdp["engine"] == "fsdp2" and fsdp["ok"] and fsdp["reloads_whole"] and len(fsdp["losses"]) == 3
    assert fsdp["max_loss_diff"] <= 1e-4 and fsdp["predicted_bytes"] > 0
