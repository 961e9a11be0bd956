"""LoRA with all-linear trains real architectures: a MoE without touching experts or routers, Phi-3 with
its fused projections, Gemma-3's multimodal wrapper on its language model only."""

import pytest
from safetensors import safe_open

from tunelab.config import from_dict
from tunelab.demo.build import build_tiny_model
from tunelab.train.run import train


def _train(model_dir, data, out):
    cfg = from_dict(dict(model=model_dir, dataset=data, output_dir=str(out), max_steps=8, learning_rate=1e-2,
                         per_device_train_batch_size=8, logging_steps=2, lr_scheduler_type="constant"))
    result = train(cfg)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    return result, keys


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_trains_without_touching_experts(arch, tokenizer, chat_file, tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer, arch)
    result, keys = _train(str(model_dir), chat_file, tmp_path / "run")
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0]
    assert keys and not any(".experts." in k or ".gate.lora" in k or "shared_expert_gate" in k for k in keys)
    assert any("self_attn.q_proj" in k for k in keys)


def test_phi3_fused_projections_get_lora(tokenizer, chat_file, tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer, "phi3")
    _, keys = _train(str(model_dir), chat_file, tmp_path / "run")
    assert any("qkv_proj.lora_A" in k for k in keys) and any("gate_up_proj.lora_A" in k for k in keys)
