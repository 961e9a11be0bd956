"""Checkpoints that are complete or absent, never half-written.

A checkpoint is written under a hidden staging name, flushed to disk and renamed to `checkpoint-N`
only once every file is in it; old checkpoints are pruned after that rename. A crash or SIGKILL in
the middle of a save therefore leaves the earlier checkpoints as they were, and
`resume_from_checkpoint=auto` never picks one it would fail on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import TunelabError

PREFIX = "checkpoint-"
STAGING = ".partial-checkpoint-"
# transformers writes the trainer state last; a folder without it predates atomic saves and was cut off
LAST_WRITTEN = "trainer_state.json"


def _step(path: Path) -> int | None:
    tail = path.name[len(PREFIX) :]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoints `auto` may resume from, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _step(p) is not None and (p / LAST_WRITTEN).is_file()]
    return sorted(found, key=_step)


def latest_checkpoint(output_dir: str | Path) -> str | None:
    found = complete_checkpoints(output_dir)
    return str(found[-1]) if found else None


def remove_leftovers(output_dir: str | Path) -> list[str]:
    """Staging folders and cut-off checkpoints a killed save left behind; returns their names."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    complete = set(complete_checkpoints(folder))
    gone = [
        p
        for p in folder.iterdir()
        if p.is_dir() and (p.name.startswith(STAGING) or (_step(p) is not None and p not in complete))
    ]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in gone)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic there
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Flush `staged` to disk, then rename it to `final` (replacing an older folder of that name)."""
    for root, _, files in os.walk(staged):
        for name in files:
            _fsync(Path(root) / name)
    _fsync(staged)
    old = None
    if final.exists():  # saved again at the same step, e.g. by an interrupt right after a scheduled save
        old = final.with_name(f"{STAGING}{final.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(output_dir: str | Path, keep: int | None, protect: str | None = None) -> list[str]:
    """Delete the oldest complete checkpoints beyond `keep` (the newest and `protect` always stay)."""
    found = complete_checkpoints(output_dir)
    if not keep or keep <= 0 or len(found) <= keep:
        return []
    candidates = [p for p in found[:-1] if not (protect and p.resolve() == Path(protect).resolve())]
    excess = len(found) - keep
    gone = candidates[:excess]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in gone]


WORLD_FILE = "tunelab_world.json"


def save_world(checkpoint: str | os.PathLike, processes: int) -> None:
    (Path(checkpoint) / WORLD_FILE).write_text(json.dumps({"processes": processes}))


def check_world(checkpoint: str | os.PathLike | None, processes: int) -> None:
    """A resume with another number of processes would change the global batch, so every later step."""
    path = Path(checkpoint) / WORLD_FILE if checkpoint else None
    if path is None or not path.is_file():  # checkpoints from before this file: nothing to compare
        return
    before = json.loads(path.read_text())["processes"]
    if before != processes:
        raise TunelabError(
            f"resume_from_checkpoint: {checkpoint} was written by {before} process{'es' if before > 1 else ''}, "
            f"this run has {processes}; the global batch (per device x accumulation x processes) and with it every "
            f"later step would change. Resume with {before} process{'es' if before > 1 else ''} "
            "(nproc_per_node x nnodes), or start afresh with overwrite_output_dir=true"
        )
