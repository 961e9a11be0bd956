"""`tunelab serve --ui`: one page on the same server: chat side by side, runs, and training.

The page (`ui.html`, no asset from the network) talks to the OpenAI routes for chat and to these
routes for the rest: the runs under `--runs` (loss plot, config, summary, eval table, data report),
and training runs started from a YAML, followed live and stopped as Ctrl-C stops them (they save).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from pydantic import BaseModel

from .. import run_folder
from .protocol import ApiError


@dataclass
class TrainingJob:
    id: str
    config: Path
    output_dir: Path
    process: subprocess.Popen
    log: list[str] = field(default_factory=list)

    def state(self) -> dict:
        code = self.process.poll()
        rows = []
        metrics = self.output_dir / run_folder.METRICS
        if metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        losses = [[r["step"], r["loss"]] for r in rows if "loss" in r and "step" in r]
        status = "running" if code is None else "finished" if code == 0 else "stopped" if code == 130 else "failed"
        return {
            "id": self.id,
            "status": status,
            "returncode": code,
            "output_dir": str(self.output_dir),
            "losses": losses,
            "log": self.log[-15:],
        }


class TrainRequest(BaseModel):
    yaml: str


def _last_loss(folder: Path) -> float | None:
    """The last training loss logged (the summary's train_loss is the mean over the whole run)."""
    path = folder / run_folder.METRICS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return next((r["loss"] for r in reversed(rows) if "loss" in r), None)


def _runs(root: Path) -> dict[str, Path]:
    marks = list(root.glob(f"*/{run_folder.CONFIG}")) + list(root.glob(f"*/*/{run_folder.CONFIG}"))
    found = sorted(p.parent for p in marks)
    return {str(p.relative_to(root)): p for p in found}


def add_ui(app: FastAPI, authorized, runs_root: str, api_key: bool) -> None:
    root = Path(runs_root).resolve()
    jobs: dict[str, TrainingJob] = {}

    def run(name: str) -> Path:
        found = _runs(root).get(name)
        if found is None:
            raise ApiError(404, f"no run {name!r} under {root}", "name", "run_not_found")
        return found

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("tunelab.serve").joinpath("ui.html").read_text(encoding="utf-8")

    @app.get("/ui/info")
    async def info():
        return {"api_key": api_key, "runs_root": str(root)}

    @app.get("/ui/runs", dependencies=[Depends(authorized)])
    async def runs():
        out = []
        for name, folder in _runs(root).items():
            summary = folder / run_folder.SUMMARY
            facts = json.loads(summary.read_text()) if summary.is_file() else {}
            out.append(
                {
                    "name": name,
                    "finished": summary.is_file(),
                    "last_loss": _last_loss(folder),
                    "steps": facts.get("global_step"),
                }
            )
        return out

    @app.get("/ui/runs/{name:path}/loss.png", dependencies=[Depends(authorized)])
    async def loss_plot(name: str):
        path = run(name) / run_folder.LOSS_PLOT
        if not path.is_file():
            raise ApiError(404, f"{name} has no loss plot yet", "name", "not_found")
        return FileResponse(path, media_type="image/png")

    @app.get("/ui/runs/{name:path}/files", dependencies=[Depends(authorized)])
    async def files(name: str):
        folder = run(name)

        def text(file: str) -> str | None:
            path = folder / file
            return path.read_text(encoding="utf-8") if path.is_file() else None

        return {
            "config": text(run_folder.CONFIG),
            "summary": text(run_folder.SUMMARY),
            "eval": text("eval.md") or text("sweep.md"),
        }

    @app.get("/ui/runs/{name:path}/data", response_class=PlainTextResponse, dependencies=[Depends(authorized)])
    def data(name: str):
        from ..data.report import data_report

        cfg = dataclasses.replace(run_folder.saved_config(run(name)), output_dir=str(tempfile.mkdtemp()))
        return data_report(cfg, n_samples=2)

    @app.post("/ui/train", dependencies=[Depends(authorized)])
    async def train(req: TrainRequest):
        try:
            raw = yaml.safe_load(req.yaml) or {}
        except yaml.YAMLError as exc:
            raise ApiError(400, f"not valid YAML: {exc}", "yaml", "invalid_value") from None
        if not isinstance(raw, dict) or "output_dir" not in raw:
            raise ApiError(400, "the YAML needs at least model, dataset and output_dir", "yaml", "invalid_value")
        job_id = f"train-{len(jobs) + 1}-{int(time.time())}"
        config = root / f".{job_id}.yaml"
        config.write_text(req.yaml, encoding="utf-8")
        output = Path(raw["output_dir"])
        output = output if output.is_absolute() else root / output
        process = subprocess.Popen(
            [sys.executable, "-m", "tunelab", "train", str(config)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=dict(os.environ, TQDM_DISABLE="1"),
        )
        job = jobs[job_id] = TrainingJob(job_id, config, output, process)
        threading.Thread(target=lambda: [job.log.append(line.rstrip()) for line in process.stdout], daemon=True).start()
        return job.state()

    @app.get("/ui/train/{job_id}", dependencies=[Depends(authorized)])
    async def train_state(job_id: str):
        if job_id not in jobs:
            raise ApiError(404, f"no training job {job_id!r}", "job_id", "not_found")
        return jobs[job_id].state()

    @app.post("/ui/train/{job_id}/stop", dependencies=[Depends(authorized)])
    async def train_stop(job_id: str):
        if job_id not in jobs:
            raise ApiError(404, f"no training job {job_id!r}", "job_id", "not_found")
        job = jobs[job_id]
        if job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGINT)  # as Ctrl-C: the step finishes, a checkpoint is saved
        return job.state()
