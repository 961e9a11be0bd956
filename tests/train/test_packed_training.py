"""Packing and the labelled-only loss change the layout and the cost of a step, never its result."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import from_dict
from tunelab.train.run import train


def _run(tmp_path, llama_dir, chat_file, name, **kw):
    cfg = dict(
        model=llama_dir,
        dataset=chat_file,
        output_dir=str(tmp_path / name),
        max_steps=4,
        per_device_train_batch_size=6,
        logging_steps=1,
        learning_rate=5e-3,
        lora_dropout=0.0,
        group_by_length=False,
        **kw,
    )
    return train(from_dict(cfg))


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_packed_run_trains_exactly_like_the_padded_run(finetuning_type, tmp_path, llama_dir, chat_file):
    packed = _run(tmp_path, llama_dir, chat_file, "packed", packing=True, finetuning_type=finetuning_type)
    padded = _run(tmp_path, llama_dir, chat_file, "padded", packing=False, finetuning_type=finetuning_type)
    assert packed.summary["packing"] is True and padded.summary["packing"] is False
    losses = [[m["loss"] for m in r.metrics if "loss" in m] for r in (packed, padded)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    name = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    a, b = load_file(packed.output_dir / name), load_file(padded.output_dir / name)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5), key


def test_packing_is_on_by_default_for_known_architectures(tmp_path, llama_dir, chat_file):
    result = _run(tmp_path, llama_dir, chat_file, "default")
    assert result.summary["packing"] is True
    assert json.loads((result.output_dir / "run_summary.json").read_text())["packing"] is True
