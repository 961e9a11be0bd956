"""A training run in its own process, for tests that kill it: `python child_run.py CONFIG_JSON`.

STEP_PAUSE (seconds before each micro-step) spreads the run out so that kills land where a test
wants them; KILL_DURING_SAVE_AT=N makes the process SIGKILL itself in the middle of saving
checkpoint N (its weights are on disk, its optimizer state is not); CHUNK_RECORDS sets the records per
data chunk (small, so a short streamed run spans many chunks).
"""

import json
import os
import signal
import sys
import time

from transformers import Trainer

from tunelab.config import from_dict
from tunelab.data import readers
from tunelab.errors import Interrupted
from tunelab.train import run, trainer

pause = float(os.environ.get("STEP_PAUSE", "0"))
step = trainer.TunelabTrainer.training_step


def slowed(self, *args, **kwargs):
    time.sleep(pause)
    return step(self, *args, **kwargs)


die_at = int(os.environ.get("KILL_DURING_SAVE_AT", "0"))
save_rest = Trainer._save_optimizer_and_scheduler


def dying(self, output_dir):
    if self.state.global_step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rest(self, output_dir)


readers.CHUNK_RECORDS = int(os.environ.get("CHUNK_RECORDS", readers.CHUNK_RECORDS))
trainer.TunelabTrainer.training_step = slowed
Trainer._save_optimizer_and_scheduler = dying
try:
    run.train(from_dict(json.loads(sys.argv[1])))
except Interrupted as exc:
    print(exc, file=sys.stderr)
    sys.exit(130)
