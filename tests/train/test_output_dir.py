"""The run folder: a finished run is never clobbered by accident, `auto` resumes, logging backends write."""

import json

import pytest

from tunelab.config import from_dict
from tunelab.errors import TunelabError
from tunelab.train.run import train


def cfg(model, data, out, **kw):
    base = dict(model=model, dataset=data, output_dir=str(out), max_steps=6, learning_rate=5e-3,
                per_device_train_batch_size=8, logging_steps=2, save_steps=3, lr_scheduler_type="constant")
    base.update(kw)
    return from_dict(base)


def test_finished_run_is_refused_then_replaced_with_overwrite(llama_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out))
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TunelabError, match="finished run"):
        train(cfg(llama_dir, chat_file, out))
    assert (out / "adapter_model.safetensors").read_bytes() == before
    result = train(cfg(llama_dir, chat_file, out, overwrite_output_dir=True, seed=7))
    assert result.summary["global_step"] == 6
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_failed_validation_leaves_the_folder_untouched(llama_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out))
    listing = sorted(p.name for p in out.iterdir())
    with pytest.raises(TunelabError, match="lora_target"):
        train(cfg(llama_dir, chat_file, out, overwrite_output_dir=True, lora_target="no_such_proj"))
    assert sorted(p.name for p in out.iterdir()) == listing


def test_resume_auto_continues_from_the_latest_checkpoint(llama_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out, max_steps=3, save_steps=3))
    (out / "run_summary.json").unlink()  # as if the run had died right after checkpoint-3
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    result = train(cfg(llama_dir, chat_file, out, max_steps=6, resume_from_checkpoint="auto"))
    assert result.summary["global_step"] == 6
    steps = [m["step"] for m in result.metrics if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_resume_under_a_changed_config_is_refused_naming_each_change(llama_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out, max_steps=3, save_steps=3))
    (out / "run_summary.json").unlink()
    listing = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(TunelabError) as caught:
        train(cfg(llama_dir, chat_file, out, max_steps=6, resume_from_checkpoint="auto", lora_r=16, seed=1))
    message = str(caught.value)
    assert message.startswith("resume_from_checkpoint:")
    assert "lora_r was 8 in the run being resumed, now 16" in message and "seed was 42" in message
    assert "max_steps" in message.split("only ")[1], "the message lists what may change"
    assert sorted(p.name for p in out.rglob("*")) == listing, "a refused resume writes nothing"
    # what only steers logging, saving and run length may change
    result = train(cfg(llama_dir, chat_file, out, max_steps=6, resume_from_checkpoint="auto", logging_steps=1,
                       save_total_limit=1))
    assert result.summary["global_step"] == 6


def test_resume_auto_without_checkpoints_starts_fresh(llama_dir, chat_file, tmp_path):
    result = train(cfg(llama_dir, chat_file, tmp_path / "new", resume_from_checkpoint="auto"))
    assert result.summary["global_step"] == 6


def test_checkpoints_respect_save_total_limit(llama_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out, max_steps=8, save_steps=2, save_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


def test_eval_loss_is_logged_and_plotted(llama_dir, chat_file, tmp_path):
    result = train(cfg(llama_dir, chat_file, tmp_path / "run", val_size=0.25, eval_steps=3))
    evals = [m for m in result.metrics if "eval_loss" in m]
    assert evals and result.summary["eval_samples"] == 6
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_tensorboard_writes_event_files(llama_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    train(cfg(llama_dir, chat_file, tmp_path / "run", report_to="tensorboard"))
    assert list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))


def test_swanlab_logs_offline(llama_dir, chat_file, tmp_path, monkeypatch):
    pytest.importorskip("swanlab")
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    train(cfg(llama_dir, chat_file, tmp_path / "run", report_to="swanlab"))
    assert any((tmp_path / "run" / "swanlog").rglob("*"))


def test_resolved_config_is_saved_and_loads_back(llama_dir, chat_file, tmp_path):
    from tunelab.config import load_config

    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out, lora_r=4))
    again = load_config(out / "tunelab_config.yaml")
    assert again.lora_r == 4 and again.model == llama_dir
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["trainable_params"] < summary["total_params"]
