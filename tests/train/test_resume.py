"""A run killed with SIGKILL anywhere, even in the middle of a save, resumes to the very same result.

Each killed run is a real training subprocess; the resumed and the uninterrupted runs train in this
process. The config exercises every piece of state a resume must restore: AdamW moments, a warmup +
cosine schedule, LoRA dropout (the RNG), gradient accumulation and several epochs (the data order).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tunelab.config import from_dict
from tunelab.train import checkpoints
from tunelab.train.guards import LossGuard
from tunelab.train.run import train

STEPS = 12
CHILD = Path(__file__).with_name("child_run.py")


def settings(model, data, out, **kw):
    base = dict(
        model=model,
        dataset=data,
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_ratio=0.2,
        lora_dropout=0.1,
        logging_steps=1,
        save_steps=2,
        save_total_limit=2,
        seed=3,
    )
    base.update(kw)
    return base


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_run(out, reference):
    name = "adapter_model.safetensors" if (reference / "adapter_model.safetensors").exists() else "model.safetensors"
    got, want = load_file(out / name), load_file(reference / name)
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-6, f"final adapter differs from the uninterrupted run by {worst:.3g}"
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    guard = f"checkpoint-{STEPS}/{LossGuard.STATE_FILE}"
    assert json.loads((out / guard).read_text()) == json.loads((reference / guard).read_text()), (
        "the loss guard's running mean carries over the resume"
    )
    for step, loss in losses(reference).items():
        assert losses(out)[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"step {step}"
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama_dir):
    folder = tmp_path_factory.mktemp("reference")
    data = folder / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"It is {2 * i}, and {i} times two is the same."},
                    ]
                }
            )
            + "\n"
            for i in range(24)
        )
    )
    started = time.perf_counter()
    train(from_dict(settings(llama_dir, str(data), folder / "run")))
    return folder / "run", data, time.perf_counter() - started


def child(cfg, **env):
    return subprocess.Popen(
        [sys.executable, str(CHILD), json.dumps(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def test_sigkill_at_random_moments_then_auto_resume_equals_the_uninterrupted_run(reference, llama_dir, tmp_path):
    ref_out, data, _ = reference
    pause = 0.15
    rng = random.Random(20261123)
    resumed_from, worst, mid_save = [], [], 0
    trials = int(os.environ.get("TUNELAB_KILL_TRIALS", "3"))  # more for a longer campaign outside CI
    for trial in range(trials):
        out = tmp_path / f"run{trial}"
        cfg = settings(llama_dir, str(data), out)
        proc = child(cfg, STEP_PAUSE=str(pause))
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        # training has begun: kill at a random moment of the trial's own stretch of the run (early to late)
        stretch = pause * STEPS * 2 * 0.9 / trials
        time.sleep(stretch * (trial + rng.random()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert not (out / "run_summary.json").exists(), "the kill came after the run had finished"
        mid_save += bool(list(out.glob(checkpoints.STAGING + "*")))
        start = checkpoints.latest_checkpoint(out)
        resumed_from.append(int(start.rsplit("-", 1)[1]) if start else 0)
        train(from_dict({**cfg, "resume_from_checkpoint": "auto"}))
        worst.append(assert_same_run(out, ref_out))
        assert not list(out.glob(checkpoints.STAGING + "*"))
        shutil.rmtree(out)
    print(
        f"{trials} killed runs resumed from steps {resumed_from} ({mid_save} killed mid-save); "
        f"largest weight difference {max(worst):.3g}"
    )
    assert len(set(resumed_from)) >= 2, f"the kills all landed at the same point: {resumed_from}"


def test_sigkill_during_a_save_leaves_the_earlier_checkpoints_and_resumes_from_them(reference, llama_dir, tmp_path):
    ref_out, data, _ = reference
    out = tmp_path / "run"
    cfg = settings(llama_dir, str(data), out, save_total_limit=1)
    proc = child(cfg, KILL_DURING_SAVE_AT="6")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-4"], (
        "the previous checkpoint is pruned only after the new one is complete"
    )
    assert not (out / "checkpoint-6").exists()
    staged = list(out.glob(checkpoints.STAGING + "*"))
    assert staged and any(staged[0].rglob("adapter_model.safetensors")), "the kill came mid-save"
    result = train(from_dict({**cfg, "resume_from_checkpoint": "auto"}))
    assert result.summary["global_step"] == STEPS
    assert_same_run(out, ref_out)
    assert not list(out.glob(checkpoints.STAGING + "*"))
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == [f"checkpoint-{STEPS}"]


def test_full_fine_tuning_without_packing_resumes_exactly_after_a_kill_mid_save(reference, llama_dir, tmp_path):
    """Full weights, padded batches and the length-grouped sampler: other state, same promise."""
    _, data, _ = reference
    cfg = settings(llama_dir, str(data), tmp_path / "run", finetuning_type="full", packing=False, learning_rate=1e-4)
    train(from_dict({**cfg, "output_dir": str(tmp_path / "reference")}))
    proc = child(cfg, KILL_DURING_SAVE_AT="8")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert checkpoints.latest_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-6")
    train(from_dict({**cfg, "resume_from_checkpoint": "auto"}))
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_a_cut_off_checkpoint_is_never_picked_and_is_cleared(tmp_path):
    out = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (folder / checkpoints.LAST_WRITTEN).write_text("{}")
    (out / f"{checkpoints.STAGING}8" / "checkpoint-8").mkdir(parents=True)
    assert checkpoints.latest_checkpoint(out) == str(out / "checkpoint-4")
    assert checkpoints.remove_leftovers(out) == [f"{checkpoints.STAGING}8", "checkpoint-6"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoints.prune(out, keep=1) == ["checkpoint-2"]
    assert checkpoints.prune(out, keep=1) == []


def test_publishing_replaces_a_checkpoint_of_the_same_step_whole(tmp_path):
    final = tmp_path / "checkpoint-3"
    final.mkdir()
    (final / "old.bin").write_text("old")
    staged = tmp_path / f"{checkpoints.STAGING}3" / "checkpoint-3"
    staged.mkdir(parents=True)
    (staged / "new.bin").write_text("new")
    checkpoints.publish(staged, final)
    assert [p.name for p in final.iterdir()] == ["new.bin"]
    assert not staged.exists()
