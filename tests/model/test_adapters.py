"""`lora_target` resolution: all-linear skips lm_head, routers and experts, keeps fused projections,
stays inside the language model of a multimodal wrapper; a target that matches nothing is an error."""

import pytest
from transformers import AutoModelForCausalLM, Gemma3Config

from tunelab.demo.build import tiny_config
from tunelab.errors import TunelabError
from tunelab.model.adapters import peft_target_modules, resolve_targets


def tiny(arch, **kw):
    return AutoModelForCausalLM.from_config(tiny_config(arch, 300, **kw))


def leaf_names(chosen):
    return sorted({n.split(".layers.")[1].split(".", 1)[1] for n in chosen})


def test_all_linear_on_a_dense_model_takes_every_projection_but_not_lm_head():
    chosen = resolve_targets(tiny("qwen2"), "all-linear")
    assert leaf_names(chosen) == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    assert not any("lm_head" in n for n in chosen)


def test_all_linear_on_moe_skips_router_experts_and_shared_expert_gate():
    model = tiny("qwen2_moe")
    chosen = resolve_targets(model, "all-linear")
    assert not any(".experts." in n or n.endswith((".gate", "shared_expert_gate")) for n in chosen)
    assert "mlp.shared_expert.gate_proj" in leaf_names(chosen)
    assert any(n.endswith("shared_expert_gate") for n, _ in model.named_modules()), "the model has a gate to skip"


def test_mixtral_experts_are_left_alone():
    chosen = resolve_targets(tiny("mixtral"), "all-linear")
    assert leaf_names(chosen) == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]


def test_fused_phi3_projections_are_targeted():
    chosen = resolve_targets(tiny("phi3"), "all-linear")
    assert {"self_attn.qkv_proj", "mlp.gate_up_proj"} <= set(leaf_names(chosen))


def _gemma3_multimodal():
    text = tiny_config("gemma3_text", 300).to_dict()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    return AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))


def test_multimodal_wrapper_targets_the_language_model_only():
    model = _gemma3_multimodal()
    for target in ("all-linear", "q_proj,k_proj,v_proj,o_proj"):
        chosen = resolve_targets(model, target)
        assert chosen and all("language_model" in n for n in chosen), target
    assert any("vision" in n and n.endswith("q_proj") for n, _ in model.named_modules())


def test_peft_targets_are_short_names_when_exact_else_a_regex():
    import re

    dense = tiny("llama")
    assert peft_target_modules(dense, resolve_targets(dense, "all-linear")) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    mm = _gemma3_multimodal()
    chosen = resolve_targets(mm, "all-linear")
    regex = peft_target_modules(mm, chosen)
    assert isinstance(regex, str)
    assert {n for n, _ in mm.named_modules() if re.fullmatch(regex, n)} == set(chosen)


def test_names_and_regexes_select_what_they_say():
    model = tiny("llama", layers=3)
    assert len(resolve_targets(model, "q_proj,v_proj")) == 6
    assert len(resolve_targets(model, ["q_proj"])) == 3
    assert resolve_targets(model, r"model\.layers\.0\.self_attn\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]


def test_target_matching_nothing_lists_the_linear_modules():
    with pytest.raises(TunelabError) as err:
        resolve_targets(tiny("phi3"), "q_proj,v_proj")
    msg = str(err.value)
    assert "'q_proj', 'v_proj'" in msg and "model.layers.*.self_attn.qkv_proj" in msg


def test_weights_that_are_not_whole_are_refused_before_anything_is_written(run_config, tmp_path):
    """What a ZeRO-3 / FSDP save without gathering would write: an empty, a 1-D or a missing adapter tensor,
    in the model itself or in the state dict an engine gathered for the save."""
    import torch
    from transformers import TrainingArguments

    from tunelab.errors import TunelabError
    from tunelab.train.run import train
    from tunelab.train.trainer import TunelabTrainer

    result = train(run_config(max_steps=1))
    model = result.model
    trainer = TunelabTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to=[])
    )
    name, whole = next((n, p) for n, p in model.named_parameters() if "q_proj.lora_A" in n)
    gathered = {n: p.detach() for n, p in model.named_parameters()}
    for broken in (torch.empty(0), whole.detach().flatten()[: whole.numel() // 2], None):
        out = tmp_path / f"saved-{'missing' if broken is None else broken.numel()}"
        state = {n: t for n, t in gathered.items() if n != name} | ({} if broken is None else {name: broken})
        with pytest.raises(TunelabError, match=rf"not whole.*{name} (has shape|is empty|is missing)"):
            trainer._save(str(out), state_dict=state)
        assert not out.exists()
    module = next(m for n, m in model.named_modules() if hasattr(m, "lora_A") and "q_proj" in n)
    module.lora_A["default"].weight = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(TunelabError, match="not whole.*q_proj.lora_A.default.weight is empty"):
        trainer._save(str(tmp_path / "from-params"))
    assert not (tmp_path / "from-params").exists()
    module.lora_A["default"].weight = whole
    trainer._save(str(tmp_path / "saved"), state_dict=gathered)
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()


def _tokenizer_of(result):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(result.output_dir)
