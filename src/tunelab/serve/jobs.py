"""Training runs the web page starts: child processes that cannot outlive the server or read its secrets.

A job is `tunelab train` in its own process group (so Stop reaches every process it started, as Ctrl-C
would), with an environment made from a short list of names rather than the server's own (which may
hold the API key), and, on Linux, a parent-death signal so that a server killed outright still ends it.
"""

from __future__ import annotations

import collections
import ctypes
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import run_folder

# What a training child needs to run, find its caches and devices, and read the hub offline; nothing else.
PASSED_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "TMPDIR",
    "PYTHONPATH",
    "CUDA_VISIBLE_DEVICES",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TUNELAB_CACHE",
    "XDG_CACHE_HOME",
)
KEEP_FINISHED = 20
LOG_LINES = 400
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a job gets: the names above and the locale, never the server's key or tokens."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k in PASSED_ENV or k.startswith("LC_")}
    env.update(TQDM_DISABLE="1", SWANLAB_MODE="offline")
    return env


def _die_with_parent():
    """A `preexec_fn` (Linux) asking the kernel to SIGTERM the child when its parent thread ends; None elsewhere.

    The kernel watches the thread that forked, not the process: jobs are started on the event loop's
    thread, which lives as long as the server, never on a pool thread that may be retired when idle."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line being written, or not JSON, is skipped rather than failing the page."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def finite(value) -> float | None:
    """A number JSON can carry: NaN and infinities become null (a NaN in a reply makes Starlette fail)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def losses(rows: list[dict]) -> list[list]:
    return [[r["step"], finite(r["loss"])] for r in rows if "loss" in r and isinstance(r.get("step"), (int, float))]


@dataclass
class TrainingJob:
    id: str
    name: str  # the run folder, relative to the runs folder
    folder: Path
    process: subprocess.Popen
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def state(self) -> dict:
        code = self.process.poll()
        try:
            points = losses(read_metrics(self.folder / run_folder.METRICS))
        except Exception as exc:  # the job's id must reach the page even when its metrics cannot be read
            points = []
            self.log.append(f"(could not read the metrics: {type(exc).__name__})")
        stopped = code in (130, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGTERM)
        status = "running" if code is None else "finished" if code == 0 else "stopped" if stopped else "failed"
        return {
            "id": self.id,
            "name": self.name,
            "status": status,
            "returncode": code,
            "output_dir": str(self.folder),
            "losses": points,
            "log": list(self.log)[-15:],
        }

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class UiJobs:
    """The page's training jobs: at most `max_jobs` running, the last few finished kept for their state."""

    def __init__(self, max_jobs: int = 1):
        self.max_jobs = max_jobs
        self.jobs: dict[str, TrainingJob] = {}
        self.lock = threading.Lock()
        self.closed = False

    def running(self) -> list[TrainingJob]:
        return [j for j in self.jobs.values() if j.running]

    def full(self) -> bool:
        return self.closed or len(self.running()) >= self.max_jobs

    def get(self, job_id: str) -> TrainingJob | None:
        return self.jobs.get(job_id)

    def start(self, argv: list[str], folder: Path, name: str, notes: list[str] = ()) -> TrainingJob:
        """Start `argv` in `folder`; call from the event loop's thread (see `_die_with_parent`)."""
        process = subprocess.Popen(
            argv,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=child_env(),
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        job = TrainingJob(secrets.token_urlsafe(16), name, folder, process)
        job.log.extend(notes)
        threading.Thread(target=self._follow, args=(job,), daemon=True).start()
        with self.lock:
            self.jobs[job.id] = job
            self._forget_old()
        return job

    def _follow(self, job: TrainingJob) -> None:
        for line in job.process.stdout:
            job.log.append(line.rstrip()[:2000])
        job.process.wait()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if not j.running]
        for job in sorted(finished, key=lambda j: j.started)[:-KEEP_FINISHED]:
            del self.jobs[job.id]

    def close(self, grace: float = STOP_GRACE_S) -> None:
        """End every running job's process group: SIGTERM (the trainer saves and stops), then SIGKILL."""
        self.closed = True
        alive = self.running()
        for job in alive:
            job.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for job in alive:
            try:
                job.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for job in alive:
            job.signal_group(signal.SIGKILL)  # what is left of the group, the leader too if it ignored SIGTERM
            try:
                job.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
