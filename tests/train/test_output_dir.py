"""The run folder end to end: a finished run is never clobbered by accident, `auto` resumes, logging backends
write. The decisions alone, on synthesised folders, are in test_setup.py."""

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.train.run import train


@pytest.fixture()
def cfg(run_config):
    """cfg(model, data, out, **keys): the shared run config, checkpointing every 3 of 6 steps."""

    def make(model, data, out, **kw):
        base = dict(
            max_steps=6,
            learning_rate=5e-3,
            per_device_train_batch_size=8,
            logging_steps=2,
            save_steps=3,
            lr_scheduler_type="constant",
        )
        return run_config(model=model, dataset=data, output_dir=str(out), **{**base, **kw})

    return make


def test_finished_run_is_refused_then_replaced_with_overwrite(llama_dir, chat_file, tmp_path, cfg):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out))
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TunelabError, match="finished run"):
        train(cfg(llama_dir, chat_file, out))
    assert (out / "adapter_model.safetensors").read_bytes() == before
    result = train(cfg(llama_dir, chat_file, out, overwrite_output_dir=True, seed=7))
    assert result.summary["global_step"] == 6
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_failed_validation_leaves_the_folder_untouched(llama_dir, chat_file, tmp_path, cfg):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out))
    listing = sorted(p.name for p in out.iterdir())
    with pytest.raises(TunelabError, match="lora_target"):
        train(cfg(llama_dir, chat_file, out, overwrite_output_dir=True, lora_target="no_such_proj"))
    assert sorted(p.name for p in out.iterdir()) == listing


def test_resume_auto_continues_from_the_latest_checkpoint(llama_dir, chat_file, tmp_path, cfg):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out, max_steps=3, save_steps=3))
    (out / "run_summary.json").unlink()  # as if the run had died right after checkpoint-3
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    result = train(cfg(llama_dir, chat_file, out, max_steps=6, resume_from_checkpoint="auto"))
    assert result.summary["global_step"] == 6
    steps = [m["step"] for m in result.metrics if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_resume_under_a_changed_config_is_refused_naming_each_change(llama_dir, chat_file, tmp_path, cfg):
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
    result = train(
        cfg(llama_dir, chat_file, out, max_steps=6, resume_from_checkpoint="auto", logging_steps=1, save_total_limit=1)
    )
    assert result.summary["global_step"] == 6


def test_checkpoints_respect_save_total_limit(llama_dir, chat_file, tmp_path, cfg):
    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out, max_steps=8, save_steps=2, save_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


def test_eval_loss_is_logged_and_plotted(llama_dir, chat_file, tmp_path, cfg):
    result = train(cfg(llama_dir, chat_file, tmp_path / "run", val_size=0.25, eval_steps=3))
    evals = [m for m in result.metrics if "eval_loss" in m]
    assert evals and result.summary["eval_samples"] == 6
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def logged_losses(result) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in result.metrics if "loss" in m}


def test_tensorboard_events_hold_the_logged_losses(llama_dir, chat_file, tmp_path, monkeypatch, cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    result = train(cfg(llama_dir, chat_file, tmp_path / "run", report_to="tensorboard", max_steps=4, logging_steps=1))
    [events] = {p.parent for p in (tmp_path / "run" / "runs").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    read = {e.step: e.value for e in acc.Scalars("train/loss")}
    want = logged_losses(result)
    assert len(want) == 4 and read.keys() == want.keys()
    assert all(abs(read[k] - want[k]) <= 1e-5 * max(1.0, abs(want[k])) for k in want), (read, want)


def test_swanlab_offline_run_holds_the_logged_losses(llama_dir, chat_file, tmp_path, monkeypatch, cfg):
    """Read back with SwanLab's own reader: an offline run that is never finished keeps nothing on disk."""
    pytest.importorskip("swanlab")
    try:
        from swanlab.proto.swanlab.record.v1.record_pb2 import Record
        from swanlab.sdk.internal.core_python.store import DataStoreReader
    except ImportError:
        pytest.skip("this swanlab has no DataStoreReader to read its run file back")
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    result = train(cfg(llama_dir, chat_file, tmp_path / "run", report_to="swanlab", max_steps=4, logging_steps=1))
    [run_file] = (tmp_path / "run" / "swanlog").rglob("*.swanlab")
    reader = DataStoreReader()
    reader.open(run_file)
    read = {}
    while (raw := reader.scan()) is not None:
        record = Record()
        record.ParseFromString(raw)
        if record.HasField("scalar") and record.scalar.key == "train/loss":
            read[record.scalar.step] = record.scalar.value.number
    want = logged_losses(result)
    assert len(want) == 4 and read.keys() == want.keys()
    assert all(abs(read[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k])) for k in want), (read, want)


def test_resolved_config_is_saved_and_loads_back(llama_dir, chat_file, tmp_path, cfg):
    from tunelab.config import load_config

    out = tmp_path / "run"
    train(cfg(llama_dir, chat_file, out, lora_r=4))
    again = load_config(out / "tunelab_config.yaml")
    assert again.lora_r == 4 and again.model == llama_dir
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["trainable_params"] < summary["total_params"]
