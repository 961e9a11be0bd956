"""A bad loss stops (or skips, or warns) at once; a signal saves first; the disk is checked up front."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.errors import TunelabError
from tunelab.train import trainer as trainer_module
from tunelab.train.run import train


@pytest.fixture()
def poison(monkeypatch):
    """poison(step, value): the loss of that training step becomes `value` (NaN, inf, a spike)."""

    def arm(step, value):
        real = trainer_module.TunelabTrainer.compute_loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = real(self, model, inputs, return_outputs, num_items_in_batch)
            if not return_outputs and model.training and self.state.global_step + 1 == step:
                return out * 0 + value
            return out

        monkeypatch.setattr(trainer_module.TunelabTrainer, "compute_loss", compute_loss)

    return arm


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_the_step_and_the_last_checkpoint(value, poison, run_config):
    poison(5, value)
    with pytest.raises(TunelabError) as err:
        train(run_config(max_steps=6, save_steps=2, learning_rate=1e-3))
    message = str(err.value)
    assert message.startswith("step 5:") and "checkpoint-4" in message and "resume_from_checkpoint=auto" in message


def test_skip_leaves_the_weights_untouched_by_the_bad_step(poison, run_config, monkeypatch):
    snapshots = {}
    real_step = trainer_module.TunelabTrainer.training_step

    def spy(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(trainer_module.TunelabTrainer, "training_step", spy)
    poison(3, float("nan"))
    result = train(run_config(max_steps=6, save_steps=2, learning_rate=1e-3, on_bad_loss="skip"))
    assert result.summary["global_step"] == 6
    for name, before in snapshots[2].items():  # step 3 ran from the weights after step 2 ...
        assert torch.equal(before, snapshots[3][name]), name  # ... and left them as they were
    assert any(not torch.equal(snapshots[3][n], snapshots[4][n]) for n in snapshots[3])  # step 4 trained
    assert all(torch.isfinite(p).all() for p in snapshots[5].values())


def test_warn_goes_on(poison, run_config, caplog):
    poison(2, float("nan"))
    result = train(run_config(max_steps=6, save_steps=2, learning_rate=1e-3, on_bad_loss="warn"))
    assert result.summary["global_step"] == 6
    assert any("step 2: the loss is nan" in r.getMessage() for r in caplog.records)


def test_a_spike_beyond_the_factor_stops(poison, run_config):
    poison(14, 1000.0)
    with pytest.raises(TunelabError, match=r"step 14: the loss jumped to 1000"):
        train(run_config(max_steps=16, save_steps=100, learning_rate=1e-3, loss_spike_factor=3.0))


def test_first_sigint_saves_a_checkpoint_and_the_run_resumes(tmp_path, llama_dir, chat_file):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            dict(
                model=llama_dir,
                dataset=chat_file,
                output_dir=str(tmp_path / "run"),
                max_steps=400,
                save_steps=1000,
                per_device_train_batch_size=4,
                logging_steps=1,
                learning_rate=1e-3,
            )
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "resume_from_checkpoint=auto" in err
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped_at < 400
    assert not (tmp_path / "run" / "run_summary.json").exists()  # not mistaken for a finished run

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelab",
            "train",
            str(config),
            "resume_from_checkpoint=auto",
            "max_steps=" + str(stopped_at + 2),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["global_step"] == stopped_at + 2


def test_a_run_that_will_not_fit_on_disk_is_refused_before_writing(tmp_path, run_config, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TunelabError, match=r"output_dir: .* GiB free, but this run writes about"):
        train(
            run_config(output_dir=tmp_path / "run", max_steps=6, save_steps=2, learning_rate=1e-3, save_total_limit=2)
        )
    assert not (tmp_path / "run").exists()


def test_a_second_sigint_exits_at_once_without_waiting_for_the_step(tmp_path, llama_dir, chat_file):
    out = tmp_path / "run"
    cfg = dict(
        model=llama_dir,
        dataset=chat_file,
        output_dir=str(out),
        max_steps=50,
        save_steps=1000,
        per_device_train_batch_size=4,
        logging_steps=1,
    )
    pause = 6.0  # each micro-step first sleeps this long
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("child_run.py")), json.dumps(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "STEP_PAUSE": str(pause)},
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # now inside step 2's pause: the first signal alone would wait it out
    time.sleep(0.5)
    second = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert time.time() - second < pause / 2, "the second signal waited for the step"
    assert not list(out.glob("checkpoint-*")) and not (out / "run_summary.json").exists()


def test_a_skipped_step_leaves_the_fp16_grad_scaler_able_to_step():
    """Under fp16 the GradScaler unscales and checks every gradient before the (skipped) step; gradients
    set to None would make it refuse ("No inf checks were recorded"). CPU GradScaler as the proxy."""
    from tunelab.train.trainer import discard_gradients

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # tunelab skips the update itself; here: no raise
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.full((3, 4), float("nan"))).sum()
    scaler.scale(loss).backward()
    discard_gradients(model)  # what on_bad_loss: skip does after a NaN loss
    scaler.unscale_(optimizer)  # gradient clipping unscales first
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
