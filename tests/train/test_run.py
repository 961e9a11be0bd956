"""End to end on a tiny Llama: LoRA and full training lower the loss and leave a usable run folder."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.train.run import train


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_training_lowers_loss_and_saves_everything(run_config, tmp_path, kind):
    result = train(
        run_config(
            output_dir=tmp_path / kind,
            finetuning_type=kind,
            max_steps=30,
            learning_rate=5e-3 if kind == "lora" else 1e-3,
            lr_scheduler_type="constant",
            per_device_train_batch_size=8,
            logging_steps=5,
        )
    )
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.5, losses
    out = result.output_dir
    weights = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    for name in (
        weights,
        "tokenizer_config.json",
        "generation_config.json",
        "tunelab_config.yaml",
        "metrics.jsonl",
        "loss.png",
    ):
        assert (out / name).exists(), name
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = result.summary["stop_ids"][0]
    assert im_end in gen["eos_token_id"]
    assert all("trained_tokens_per_s" in m for m in result.metrics if "loss" in m)


def test_lora_reloads_with_peft_and_gives_the_same_logits_as_in_memory(llama_dir, run_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(
        run_config(
            model=llama_dir,
            max_steps=10,
            learning_rate=5e-3,
            lr_scheduler_type="constant",
            per_device_train_batch_size=8,
            logging_steps=5,
        )
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(result.output_dir))
    with torch.no_grad():
        in_memory = result.model.eval()(input_ids=ids).logits
        again = reloaded.eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=ids).logits
    assert torch.allclose(in_memory, again, atol=1e-5)
    assert not torch.allclose(plain, again, atol=1e-4), "the adapter changed nothing"


def test_builtin_template_is_saved_with_the_tokenizer(run_config, write_data):
    from transformers import AutoTokenizer

    from tunelab.data.templates import DOLLY

    data = write_data("d.jsonl", [{"instruction": f"Say {i}.", "context": "", "response": f"{i}."} for i in range(8)])
    result = train(
        run_config(
            dataset=data,
            template="dolly",
            max_steps=2,
            learning_rate=5e-3,
            lr_scheduler_type="constant",
            per_device_train_batch_size=8,
            logging_steps=5,
        )
    )
    assert AutoTokenizer.from_pretrained(result.output_dir).chat_template == DOLLY


DEPRECATION_MARKS = ("deprecated", "Deprecat", "FutureWarning", "activation_checkpointing")


def test_a_plain_run_from_the_console_script_prints_no_deprecation_warnings(run_config, tmp_path):
    """The installed `tunelab` command with PYTHONWARNINGS unset: no deprecation text reaches the user.
    (cli.setup_logging ignores FutureWarning and UserWarning, so those show up here only without that filter;
    the in-process test below sees them.)"""
    exe = Path(sys.executable).with_name("tunelab")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config.data(finetuning_type="lora", max_steps=2, gradient_checkpointing=True)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([str(exe), "train", str(config)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    nags = [line for line in done.stderr.splitlines() if any(mark in line for mark in DEPRECATION_MARKS)]
    assert not nags, "\n".join(nags)
    assert "Setting accelerator to CPU" not in done.stderr  # DeepSpeed, imported by accelerate, in a run without it
    assert "publisher trust" not in done.stderr  # bitsandbytes' kernel lookup, imported by peft, offline
    folder = str(Path(run_config.data()["output_dir"]).resolve())
    assert f"run folder: {folder}" in done.stderr and f"saved to {folder} (" in done.stderr
    assert "saved to" not in done.stdout, "the run folder is said once at the start and once at the end"


def test_train_in_process_raises_no_deprecation_warnings(run_config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(run_config(finetuning_type="lora", max_steps=2, gradient_checkpointing=True))
    nags = [
        f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "deprecat" in str(w.message).lower()
    ]
    assert not nags, "\n".join(nags)
