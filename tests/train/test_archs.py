"""LoRA with all-linear trains real architectures: a MoE without touching experts or routers, Phi-3 with
its fused projections, Gemma-3's multimodal wrapper on its language model only."""

import pytest
from safetensors import safe_open

from tunelab.config import from_dict
from tunelab.demo.build import build_tiny_model
from tunelab.train.run import train


def _train(model_dir, data, out):
    cfg = from_dict(
        dict(
            model=model_dir,
            dataset=data,
            output_dir=str(out),
            max_steps=8,
            learning_rate=1e-2,
            per_device_train_batch_size=8,
            logging_steps=2,
            lr_scheduler_type="constant",
        )
    )
    result = train(cfg)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    return result, keys


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_trains_without_touching_experts(arch, tokenizer, chat_file, tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer, arch)
    result, keys = _train(str(model_dir), chat_file, tmp_path / "run")
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.3, losses  # a stated margin: noise alone never drops it this far
    assert keys and not any(".experts." in k or ".gate.lora" in k or "shared_expert_gate" in k for k in keys)
    assert any("self_attn.q_proj" in k for k in keys)
    # loaded back as chat loads it, peft's MoE target rewriting must still find only the trained modules
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "run"))
    config = loaded.peft_config["default"]
    assert not (config.target_parameters or [])
    wrapped = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert wrapped and not any("experts" in n or n.endswith(".gate") or "shared_expert_gate" in n for n in wrapped)


def test_a_lora_that_peft_places_beyond_the_chosen_modules_is_refused(tokenizer, tmp_path):
    """Short names on a MoE are what peft >= 0.22 turns into expert parameters; whatever peft does with them,
    tunelab's check compares what was wrapped with what was chosen."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.errors import TunelabError
    from tunelab.model.adapters import check_wrapped, peft_target_modules, resolve_targets

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m", tokenizer, "qwen2_moe"))
    chosen = resolve_targets(model, "all-linear")
    assert peft_target_modules(model, chosen) == chosen  # full names: the only form peft's MoE rewrite keeps
    wide = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.0, target_modules=["q_proj", "shared_expert_gate"]))
    with pytest.raises(TunelabError, match="peft wrapped more than lora_target chose.*shared_expert_gate"):
        check_wrapped(wide, [n for n in chosen if n.endswith("q_proj")])


def test_phi3_fused_projections_get_lora(tokenizer, chat_file, tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer, "phi3")
    _, keys = _train(str(model_dir), chat_file, tmp_path / "run")
    assert any("qkv_proj.lora_A" in k for k in keys) and any("gate_up_proj.lora_A" in k for k in keys)


def test_gemma3_multimodal_wrapper_trains_its_language_model(tokenizer, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM, Gemma3Config

    from tunelab.demo.build import tiny_config

    text = tiny_config("gemma3_text", len(tokenizer)).to_dict()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    model = AutoModelForCausalLM.from_config(
        Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    )
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    cfg = from_dict(
        dict(
            model=str(tmp_path / "m"),
            dataset=chat_file,
            output_dir=str(tmp_path / "run"),
            max_steps=6,
            learning_rate=1e-2,
            per_device_train_batch_size=8,
            logging_steps=2,
            lr_scheduler_type="constant",
            lora_target="q_proj,k_proj,v_proj,o_proj",
        )
    )
    result = train(cfg)
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.3, losses  # a stated margin: noise alone never drops it this far
    with safe_open(str(tmp_path / "run" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("language_model" in k for k in keys)
