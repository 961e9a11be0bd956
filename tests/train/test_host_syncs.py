"""A training micro-step never makes the host wait for the GPU in tunelab's own code.

Why: CUDA kernels run queued behind the host. Reading a value back (`.item()`, `float(loss)`,
`int(count)`) or indexing with a boolean mask (its length is known only after `nonzero` runs on the
GPU) blocks the host until the queue drains, so the next kernels start late; once per micro-step
that costs a few percent on small models and more with many micro-steps. The loss guard reads the
step's losses once per optimizer step, and token counts are read when a log line is written.

How, on CPU: a dispatch mode, active only inside `training_step` (forward and backward of one
micro-step), records every ATen op that forces such a wait on CUDA, with the innermost Python frame
outside torch that issued it. Ops issued from tunelab's source fail the test, naming the line.
Libraries' own syncs (transformers' mask checks) are theirs to fix and are not counted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tunelab
from tunelab.train import trainer as trainer_module
from tunelab.train.run import train

aten = torch.ops.aten
PACKAGE = str(Path(tunelab.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).resolve().parent)
READS_BACK = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.is_nonzero,
    aten.masked_scatter,
    aten.repeat_interleave,
    aten._unique2,
    aten.unique_consecutive,
}


def _boolean_index(func, args) -> bool:
    if func.overloadpacket not in (aten.index, aten.index_put, aten.index_put_):
        return False
    indices = args[1] if len(args) > 1 else []
    return any(t is not None and t.dtype == torch.bool for t in indices)


def _issuer() -> str | None:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return None
    path = str(Path(frame.f_code.co_filename).resolve())
    return f"{Path(path).relative_to(PACKAGE)}:{frame.f_lineno}" if path.startswith(PACKAGE) else None


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in READS_BACK or _boolean_index(func, args):
            where = _issuer()
            if where:
                self.found.append(f"{func} at {where}")
        return func(*args, **(kwargs or {}))


@pytest.fixture()
def recorded(monkeypatch):
    syncs = HostSyncs()
    steps = []
    inner = trainer_module.TunelabTrainer.training_step

    def watched(self, *args, **kwargs):
        steps.append(1)
        with syncs:
            return inner(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.TunelabTrainer, "training_step", watched)
    return syncs, steps


def test_the_recorder_sees_what_a_sync_looks_like():
    syncs = HostSyncs()
    x = torch.arange(6.0)
    with syncs:
        float(x.sum()), x[x > 2]  # called from this test file: not tunelab's, so not recorded
    assert syncs.found == []
    from tunelab.model import loss

    with syncs:
        loss.loss_positions(torch.tensor([[1, -100, 2, 3]]))
    assert [f for f in syncs.found if "nonzero" in f], syncs.found


@pytest.mark.parametrize("packing", [True, False])
def test_micro_steps_read_nothing_back(packing, recorded, run_config):
    syncs, steps = recorded
    cfg = run_config(
        max_steps=2,
        gradient_accumulation_steps=3,
        per_device_train_batch_size=2,
        packing=packing,
        on_bad_loss="skip",
        loss_spike_factor=5.0,
        logging_steps=1,
    )
    result = train(cfg)
    assert len(steps) == 6 and result.summary["labelled_loss"]
    assert syncs.found == []
    assert all(m["trained_tokens_per_s"] > 0 for m in result.metrics if "loss" in m)


def test_the_plain_loss_path_reads_nothing_back_either(recorded, run_config, monkeypatch):
    syncs, steps = recorded
    monkeypatch.setattr(trainer_module, "supports_labelled_loss", lambda model: False)
    train(run_config(max_steps=1, gradient_accumulation_steps=2, per_device_train_batch_size=2, packing=False))
    assert len(steps) == 2 and syncs.found == []
