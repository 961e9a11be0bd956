"""Guards around a long run: a bad loss stops (or skips, or warns) at once, and Ctrl-C / SIGTERM save first.

A NaN noticed at the end of a run has cost the whole run; a kill signal from a scheduler or a
Ctrl-C should cost at most the current step. Both leave the run folder resumable with
`resume_from_checkpoint=auto`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

from ..errors import TunelabError
from .checkpoints import latest_checkpoint

log = logging.getLogger("tunelab")


class LossGuard:
    """Judges each micro-step's loss: 'ok', or what `policy` says to do with a NaN/inf or a spike.

    Its running mean is saved in every checkpoint (`STATE_FILE`), so a resumed run judges spikes as
    the uninterrupted run would have.
    """

    STATE_FILE = "tunelab_loss_guard.json"

    def __init__(self, policy: str = "stop", spike_factor: float | None = None, warmup: int = 10):
        self.policy = policy
        self.spike_factor = spike_factor
        self.warmup = warmup
        self.mean: float | None = None
        self.seen = 0

    def save(self, checkpoint: str | os.PathLike) -> None:
        state = {"mean": self.mean, "seen": self.seen}
        (Path(checkpoint) / self.STATE_FILE).write_text(json.dumps(state))

    def restore(self, checkpoint: str | os.PathLike) -> None:
        path = Path(checkpoint) / self.STATE_FILE
        if path.is_file():  # checkpoints from before this file existed start the mean afresh
            state = json.loads(path.read_text())
            self.mean, self.seen = state["mean"], state["seen"]

    def check(self, loss: float, step: int, output_dir: str) -> str:
        problem = None
        if not math.isfinite(loss):
            problem = f"the loss is {loss}"
        elif (
            self.spike_factor
            and self.mean is not None
            and self.seen >= self.warmup
            and loss > self.spike_factor * self.mean
        ):
            problem = f"the loss jumped to {loss:.4g}, over {self.spike_factor:g}x its running mean {self.mean:.4g}"
        if problem is None:
            self.seen += 1
            self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss
            return "ok"
        where = latest_checkpoint(output_dir)
        message = f"step {step}: {problem}; last good checkpoint: {where or 'none yet'}" + (
            " (resume_from_checkpoint=auto continues from it)" if where else ""
        )
        if self.policy == "stop":
            raise TunelabError(message + "; on_bad_loss: skip or warn to go on")
        log.warning("%s; %s", message, "this step is skipped" if self.policy == "skip" else "going on")
        return self.policy


class SignalCheckpoint(TrainerCallback):
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, stop. A second one exits at once.

    With several processes all ranks must stop after the same step (one alone would leave the others
    waiting in a collective): `agreed` is set, for every rank at once, when any rank has received one
    (the trainer adds that flag to the loss check it shares once per step).
    """

    def __init__(self, together: bool = False):
        self.received: int | None = None
        self.together = together
        self.agreed = False
        self.stopped = False
        self._previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        log.warning(
            "%s received: finishing this step and saving a checkpoint (send it again to quit at once)",
            signal.Signals(signum).name,
        )

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal to another rank"

    def on_step_end(self, args, state, control, **kwargs):
        # alone, a signal counts at once; together, only once every rank has seen the flag
        stop = self.agreed if self.together else self.received is not None
        if stop:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control
