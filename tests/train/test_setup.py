"""The run folder decisions made before a rank trains, on synthesised run folders (no training): a finished run
is not clobbered, `auto` resumes from the latest complete checkpoint, a resume under a changed config is refused
naming each change; and a run folder's config reads back whatever tunelab wrote it."""

from __future__ import annotations

import pytest
import yaml

from tunelab import run_folder
from tunelab.errors import TunelabError
from tunelab.train.checkpoints import LAST_WRITTEN
from tunelab.train.setup import check_resume_config, plan_output_dir

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


@pytest.fixture()
def folder(tmp_path, run_config):
    """folder(summary=False, weights=False, checkpoints=(), partial=(), **keys) -> (run folder, its config)."""

    def make(summary=False, weights=False, checkpoints=(), partial=(), **keys):
        cfg = run_config(model="m", output_dir=str(tmp_path / "run"), **keys)
        out = tmp_path / "run"
        out.mkdir(exist_ok=True)
        run_folder.write_config(cfg, out)
        if summary:
            (out / run_folder.SUMMARY).write_text("{}")
        if weights:
            (out / run_folder.ADAPTER_WEIGHTS).write_bytes(b"x")
        for step in checkpoints:
            (out / f"checkpoint-{step}").mkdir()
            (out / f"checkpoint-{step}" / LAST_WRITTEN).write_text("{}")
        for step in partial:  # cut off while it was being saved: no trainer state yet
            (out / f"checkpoint-{step}").mkdir()
        return out, cfg

    return make


def test_a_finished_run_is_refused_unless_overwritten(folder, run_config):
    out, cfg = folder(summary=True)
    with pytest.raises(TunelabError, match="holds a finished run; set overwrite_output_dir=true"):
        plan_output_dir(cfg)
    assert plan_output_dir(run_config(model="m", output_dir=str(out), overwrite_output_dir=True)) is None


def test_weights_without_checkpoints_are_a_finished_run_and_with_them_a_killed_one(folder, run_config):
    out, cfg = folder(weights=True)
    with pytest.raises(TunelabError, match="finished run"):
        plan_output_dir(cfg)
    out, _ = folder(weights=True, checkpoints=(3,))
    assert plan_output_dir(run_config(model="m", output_dir=str(out), resume_from_checkpoint="auto")) == str(
        out / "checkpoint-3"
    )


def test_auto_resumes_from_the_latest_complete_checkpoint_and_starts_fresh_without_one(folder, run_config):
    out, _ = folder(checkpoints=(3, 6), partial=(9,))
    auto = run_config(model="m", output_dir=str(out), resume_from_checkpoint="auto")
    assert plan_output_dir(auto) == str(out / "checkpoint-6")
    assert (
        plan_output_dir(run_config(model="m", output_dir=str(out.parent / "new"), resume_from_checkpoint="auto"))
        is None
    )
    with pytest.raises(TunelabError, match="is not a checkpoint folder"):
        plan_output_dir(run_config(model="m", output_dir=str(out), resume_from_checkpoint=str(out / "nope")))


def test_a_resume_under_a_changed_config_is_refused_naming_each_change(folder, run_config):
    out, _ = folder(checkpoints=(3,), lora_r=8, seed=42)
    keys = dict(model="m", output_dir=str(out), resume_from_checkpoint="auto")
    changed = run_config(**keys, lora_r=16, seed=1)
    with pytest.raises(TunelabError) as caught:
        check_resume_config(changed, plan_output_dir(changed))
    message = str(caught.value)
    assert "lora_r was 8 in the run being resumed, now 16" in message and "seed was 42" in message
    # what only steers logging, saving and run length may change
    steering = run_config(**keys, lora_r=8, seed=42, logging_steps=1, save_total_limit=1, max_steps=9)
    check_resume_config(steering, plan_output_dir(steering))


def test_an_old_run_folder_reads_with_todays_defaults_and_a_newer_ones_keys_are_named(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / run_folder.CONFIG).write_text(
        yaml.safe_dump({"model": "m", "dataset": "d.jsonl", "output_dir": "o", "system": "Be brief."})
    )
    cfg = run_folder.saved_config(old)
    assert cfg.system == "Be brief." and cfg.reasoning == "keep" and cfg.lora_r == 8  # today's defaults
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / run_folder.CONFIG).write_text(
        yaml.safe_dump({"model": "m", "dataset": "d", "output_dir": "o", "rope_magic": 2, "zeta": True})
    )
    with pytest.raises(TunelabError, match=r"keys this tunelab does not know \(rope_magic, zeta\).*newer tunelab"):
        run_folder.saved_config(newer)
    assert run_folder.saved_config(tmp_path) is None  # a plain model folder: no run
