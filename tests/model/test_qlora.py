"""QLoRA: a 4-bit NF4 (or 8-bit) frozen base under LoRA trains, and its adapter merges into the full base.

bitsandbytes runs its 4/8-bit layers on CPU, so this runs here; on GPU the same path computes in bf16.
"""

from __future__ import annotations

import math

import pytest

from tunelab.config import from_dict
from tunelab.errors import TunelabError

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_trains_lora_on_all_linear_and_exports_merged(bits, run_config, tmp_path):
    from safetensors import safe_open

    from tunelab.export.merge import export_merged
    from tunelab.train.run import train

    result = train(
        run_config(
            **{f"load_in_{bits}bit": True},
            max_steps=4,
            learning_rate=5e-3,
            lr_scheduler_type="constant",
            output_dir=str(tmp_path / "run"),
        )
    )
    base = result.model.get_base_model()
    kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    quantized = [n for n, m in base.named_modules() if type(m).__name__ == kind]
    assert quantized and all(".layers." in n for n in quantized), "the decoder's linears are quantized"
    assert not any(n.endswith("lm_head") for n in quantized), "the head stays in full precision"
    with safe_open(str(tmp_path / "run" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in k for k in keys), f"all-linear reached the quantized {proj}"
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert any(f"{bits}-bit base" in q for q in result.summary["quirks"])

    report = export_merged(str(tmp_path / "run"), None, str(tmp_path / "merged"), "fp32")
    assert report.verified, report.problems  # merged into the full-precision base, proofs and all


@pytest.mark.parametrize(
    "keys, message",
    [
        (dict(load_in_4bit=True, load_in_8bit=True), "both true"),
        (dict(load_in_4bit=True, finetuning_type="full"), "cannot train a quantized base"),
    ],
)
def test_quantization_that_cannot_train_is_refused_at_load(keys, message):
    with pytest.raises(TunelabError, match=message):
        from_dict(dict(model="m", dataset="d", output_dir="o", **keys))
