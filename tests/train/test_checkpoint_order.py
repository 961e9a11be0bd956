"""A checkpoint's files reach the disk before the checkpoint gets its final name, and the rename after.

Why: a checkpoint is written under a staging name and renamed to `checkpoint-N` once complete, so
`resume_from_checkpoint=auto` never picks a half-written one. On a power loss that only holds if
every file was fsynced BEFORE the rename (else the rename can reach the disk first and leave a
`checkpoint-N` of empty or truncated files) and the parent folder is fsynced AFTER it (else the
rename itself may be lost). Reordering those calls changes nothing visible until a crash.

How: `os.open`/`os.close` (to know which path an fd is), `os.fsync`, `os.replace` and `os.rename` are
wrapped to log the order of the calls, both around `checkpoints.publish` alone (nested files, and
replacing an existing folder of the same name) and around a real training run's checkpoint save.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunelab.config import from_dict
from tunelab.train import checkpoints
from tunelab.train.run import train


@pytest.fixture()
def calls(monkeypatch):
    """The log: ('fsync', path) and ('rename', source, destination) in call order, paths resolved."""
    log, fds = [], {}
    real_open, real_close, real_fsync = os.open, os.close, os.fsync
    real_replace, real_rename = os.replace, os.rename

    def opened(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        fds[fd] = Path(os.fsdecode(path)).resolve() if not isinstance(path, int) else None
        return fd

    def closed(fd):
        fds.pop(fd, None)
        return real_close(fd)

    def fsync(fd):
        log.append(("fsync", fds.get(fd, f"fd {fd}")))
        return real_fsync(fd)

    def renamer(real):
        def rename(src, dst, *a, **k):
            log.append(("rename", Path(os.fsdecode(src)).resolve(), Path(os.fsdecode(dst)).resolve()))
            return real(src, dst, *a, **k)

        return rename

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "close", closed)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    return log


def _check_order(log: list, final: Path, files: list[str]) -> None:
    """`files` (relative to `final`) were fsynced under their staging path before the rename to `final`,
    and `final`'s parent was fsynced after it."""
    final = final.resolve()
    moves = [i for i, e in enumerate(log) if e[0] == "rename" and e[2] == final]
    assert len(moves) == 1, f"expected one rename into {final}: {log}"
    at = moves[0]
    staged = log[at][1]
    synced_before = {e[1] for e in log[:at] if e[0] == "fsync"}
    assert files
    unsynced = [f for f in files if staged / f not in synced_before]
    assert not unsynced, f"not fsynced before the rename into place: {unsynced}"
    assert staged in synced_before, "the staging folder itself is fsynced before the rename"
    assert ("fsync", final.parent) in log[at + 1 :], "the parent folder is fsynced after the rename"


def _stage(folder: Path) -> list[str]:
    files = ["adapter_model.safetensors", "trainer_state.json", "nested/optimizer.pt", "nested/deeper/rng.pth"]
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode() * 100)
    return files


def test_publish_fsyncs_every_file_before_the_rename_and_the_parent_after(calls, tmp_path):
    staged, final = tmp_path / ".partial-checkpoint-3" / "checkpoint-3", tmp_path / "checkpoint-3"
    files = _stage(staged)
    checkpoints.publish(staged, final)
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()) == sorted(files)
    _check_order(calls, final, files)


def test_publish_over_an_existing_checkpoint_keeps_the_order(calls, tmp_path):
    final = tmp_path / "checkpoint-3"
    _stage(final)
    (final / "stale.txt").write_text("from the earlier save")
    staged = tmp_path / ".partial-checkpoint-3" / "checkpoint-3"
    files = _stage(staged)
    calls.clear()
    checkpoints.publish(staged, final)
    assert not (final / "stale.txt").exists()
    _check_order(calls, final, files)


def test_a_training_run_saves_its_checkpoints_in_that_order(calls, tmp_path, llama_dir, chat_file):
    out = tmp_path / "run"
    train(
        from_dict(
            dict(
                model=llama_dir,
                dataset=chat_file,
                output_dir=str(out),
                max_steps=2,
                save_steps=1,
                per_device_train_batch_size=4,
                logging_steps=1,
            )
        )
    )
    for step in (1, 2):
        final = out / f"checkpoint-{step}"
        files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
        assert checkpoints.LAST_WRITTEN in files
        _check_order(calls, final, files)
