"""End to end on a tiny Llama: LoRA and full training lower the loss and leave a usable run folder."""

import json

import pytest
import torch

from tunelab.config import from_dict
from tunelab.train.run import train


def _cfg(model, data, out, **kw):
    base = dict(model=model, dataset=data, output_dir=str(out), learning_rate=5e-3, max_steps=30,
                per_device_train_batch_size=8, logging_steps=5, save_steps=1000, lr_scheduler_type="constant")
    base.update(kw)
    return from_dict(base)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_training_lowers_loss_and_saves_everything(llama_dir, chat_file, tmp_path, kind):
    result = train(_cfg(llama_dir, chat_file, tmp_path / kind, finetuning_type=kind,
                        learning_rate=5e-3 if kind == "lora" else 1e-3))
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.5, losses
    out = result.output_dir
    weights = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    for name in (weights, "tokenizer_config.json", "generation_config.json", "tunelab_config.yaml",
                 "metrics.jsonl", "loss.png"):
        assert (out / name).exists(), name
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = result.summary["stop_ids"][0]
    assert im_end in gen["eos_token_id"]
    assert all("trained_tokens_per_s" in m for m in result.metrics if "loss" in m)


def test_lora_reloads_with_peft_and_gives_the_same_logits_as_in_memory(llama_dir, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(_cfg(llama_dir, chat_file, tmp_path / "run", max_steps=10))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(result.output_dir))
    with torch.no_grad():
        in_memory = result.model.eval()(input_ids=ids).logits
        again = reloaded.eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=ids).logits
    assert torch.allclose(in_memory, again, atol=1e-5)
    assert not torch.allclose(plain, again, atol=1e-4), "the adapter changed nothing"


def test_builtin_template_is_saved_with_the_tokenizer(llama_dir, write_data, tmp_path):
    from transformers import AutoTokenizer

    from tunelab.data.templates import DOLLY

    data = write_data("d.jsonl", [{"instruction": f"Say {i}.", "context": "", "response": f"{i}."}
                                  for i in range(8)])
    result = train(_cfg(llama_dir, data, tmp_path / "run", template="dolly", max_steps=2))
    assert AutoTokenizer.from_pretrained(result.output_dir).chat_template == DOLLY
