"""`tunelab serve --ui`: one page on the same server: chat side by side, runs, and training.

The page (`ui.html`, no asset from the network) talks to the OpenAI routes for chat and to these
routes for the rest: the runs under `--runs` (loss plot, config, summary, eval table, data report),
and training runs started from a YAML, followed live and stopped as Ctrl-C stops them (they save).

Everything here but the page itself needs the key, and anyone holding it can start work on this
machine: so training is off unless `--allow-training`, a posted config is checked before anything is
written (no remote code, pickles, DeepSpeed files, hub downloads or network loggers, a fresh run folder
inside the runs folder), and nothing is read through a symlink out of the runs folder.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

import yaml
from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from pydantic import BaseModel

from .. import run_folder
from ..config import Config, _resolve_relative_paths, dump_config, from_dict
from ..errors import TunelabError
from .jobs import UiJobs, finite, read_metrics
from .protocol import ApiError

DEFAULT_RUN = "ui-run"
JOB_CONFIG = "ui_train.yaml"  # not run_folder.CONFIG: the folder counts as a run once training writes that
RETRY_AFTER_S = 30
REFUSED_IF_SET = {
    "trust_remote_code": "runs the model's own Python code on this machine",
    "allow_pickle": "loads pickled weights, which can run code",
    "overwrite_output_dir": "would replace a run; the page trains into a fresh folder",
}
LOCAL_LOGGERS = ("none", "tensorboard", "swanlab")  # swanlab: offline, as a job never gets SWANLAB_MODE
HUB_KEYS = ("model", "dataset", "eval_dataset")
DATA_KEYS = ("dataset", "eval_dataset", "tools")


@dataclass
class UiOptions:
    allow_training: bool = False
    allow_hub: bool = False  # lets a posted config (or a run's data report) name hub ids, downloaded here
    max_jobs: int = 1
    served: list[str] = field(default_factory=list)  # the served model ids
    base_path: str | None = None  # the served base model's folder, the default YAML's model


class TrainRequest(BaseModel):
    yaml: str


def _plain(path: Path) -> bool:
    """No symlink on the way from the (resolved) runs folder: what is read stays inside it."""
    try:
        return path.resolve() == path
    except OSError:
        return False


def _runs(root: Path) -> dict[str, Path]:
    marks = list(root.glob(f"*/{run_folder.CONFIG}")) + list(root.glob(f"*/*/{run_folder.CONFIG}"))
    found = sorted(p.parent for p in marks if _plain(p))
    return {p.relative_to(root).as_posix(): p for p in found}


def _file(folder: Path, name: str) -> Path | None:
    path = folder / name
    return path if path.is_file() and _plain(path) else None


def _text(folder: Path, name: str) -> str | None:
    path = _file(folder, name)
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path else None
    except OSError:
        return None


def _run_row(name: str, folder: Path) -> dict:
    """A run as the list shows it; a summary being written, or a cut-off metrics line, shows it unfinished."""
    try:
        facts = json.loads(_text(folder, run_folder.SUMMARY) or "null")
    except ValueError:
        facts = None
    metrics = _file(folder, run_folder.METRICS)
    rows = read_metrics(metrics) if metrics else []
    finished = isinstance(facts, dict)
    return {
        "name": name,
        "finished": finished,
        "last_loss": next((finite(r["loss"]) for r in reversed(rows) if "loss" in r), None),
        "steps": facts.get("global_step") if finished else None,
    }


def _dataset_here(root: Path) -> str | None:
    for pattern in ("*.jsonl", "*.json", "data/*.jsonl", "data/*.json"):
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found[0].relative_to(root).as_posix()
    return None


def default_yaml(root: Path, base_path: str | None) -> str:
    """A short LoRA run of the served base on data found in the runs folder: it runs as is when there is data."""

    def line(key: str, value) -> str:
        return yaml.safe_dump({key: value}, default_flow_style=False, allow_unicode=True, width=1 << 20).strip()

    dataset = _dataset_here(root)
    lines = [
        line("model", base_path) if base_path else "model: path/to/model  # a local model folder",
        line("dataset", dataset) if dataset else "dataset: data/train.jsonl  # put a .jsonl of conversations here",
        f"output_dir: {DEFAULT_RUN}  # a new folder in the runs folder",
        "finetuning_type: lora",
        "max_steps: 20",
        "learning_rate: 1.0e-4",
        "per_device_train_batch_size: 4",
        "logging_steps: 1",
    ]
    return "\n".join(lines) + "\n"


def _refused(key: str, why: str) -> ApiError:
    return ApiError(
        400, f"{key}: {why}; not allowed from the web page (run `tunelab train` yourself)", key, "not_allowed"
    )


def _data_outside(data: dict, root: Path) -> str | None:
    """The first data key naming an existing file outside the runs folder: a key holder could otherwise train
    on, and read back through the data report, any file the server can read."""
    for key in DATA_KEYS:
        value = data.get(key)
        for spec in value if isinstance(value, list) else [value]:
            if isinstance(spec, str) and Path(spec).exists() and not Path(spec).resolve().is_relative_to(root):
                return key
    return None


def _remote(cfg: Config) -> tuple[str, str] | None:
    """(key, value) of the first model or data that is not an existing absolute path (a hub id), or None."""
    for key in HUB_KEYS:
        value = getattr(cfg, key)
        for spec in value if isinstance(value, list) else [] if value is None else [value]:
            if not isinstance(spec, str) or not (Path(spec).is_absolute() and Path(spec).exists()):
                return key, str(spec)
    return None


def _run_name(posted, root: Path) -> tuple[str, list[str]]:
    """The posted output_dir's last part as a plain folder name in the runs folder, not yet taken."""
    text = posted if isinstance(posted, str) and posted.strip() else DEFAULT_RUN
    last = PurePosixPath(text.replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9._-]", "-", last).lstrip(".-")[:80] or DEFAULT_RUN
    notes = []
    if name != text:
        notes.append(
            f"output_dir: {text!r} is not a plain folder name; this run trains into {name!r} in the runs folder"
        )
    taken, n = name, 1
    while os.path.lexists(root / name):
        n += 1
        name = f"{taken}-{n}"
    if name != taken:
        notes.append(f"output_dir: {taken!r} exists in the runs folder; this run is {name!r}")
    return name, notes


def check_posted(text: str, root: Path, allow_hub: bool) -> tuple[Config, list[str]]:
    """The posted YAML as a validated `Config` training into a fresh folder of the runs folder, or an ApiError
    naming the key. Paths resolve as `tunelab train` resolves them for a YAML file in the runs folder."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}: {getattr(exc, 'problem', '')})" if mark else ""
        raise ApiError(400, f"the YAML does not parse{where}", "yaml", "invalid_yaml") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "the YAML must be a mapping of config keys to values", "yaml", "invalid_yaml")
    for key, why in REFUSED_IF_SET.items():
        if raw.get(key):
            raise _refused(key, why)
    if raw.get("deepspeed") is not None:
        raise _refused("deepspeed", "names a DeepSpeed file of your own")
    if raw.get("report_to") not in (None, *LOCAL_LOGGERS):
        raise _refused(
            "report_to", f"{raw['report_to']!r} sends metrics over the network (allowed: {', '.join(LOCAL_LOGGERS)})"
        )
    if raw.get("nnodes", 1) != 1:
        raise _refused("nnodes", "a job across machines connects to other hosts")
    data = _resolve_relative_paths(raw, root)
    outside = _data_outside(data, root)
    if outside:
        raise _refused(outside, "reads a file outside the runs folder (put the data there)")
    name, notes = _run_name(raw.get("output_dir"), root)
    data["output_dir"] = str(root / name)
    resume = data.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume != "auto":
        path = (root / resume).resolve()
        if not path.is_relative_to(root):
            raise _refused("resume_from_checkpoint", "points outside the runs folder")
        data["resume_from_checkpoint"] = str(path)
    try:
        cfg = from_dict(data, source="the YAML")
    except TunelabError as exc:
        raise ApiError(400, str(exc).replace(f"{root}{os.sep}", ""), "yaml", "invalid_config") from None
    remote = None if allow_hub else _remote(cfg)
    if remote:
        key, spec = remote
        raise _refused(
            key,
            f"{spec!r} is no file or folder here (paths are relative to the runs folder); hub ids "
            "need the server's --allow-hub",
        )
    return cfg, notes


def _page() -> tuple[str, dict[str, str]]:
    """The page and its headers: only its own inline script runs (by hash), and no other site may frame it."""
    html = resources.files("tunelab.serve").joinpath("ui.html").read_text(encoding="utf-8")
    script = html[html.index("<script>") + len("<script>") : html.index("</script>")]
    digest = hashlib.sha256(script.encode()).digest()
    policy = (
        f"default-src 'none'; script-src 'sha256-{base64.b64encode(digest).decode()}'; style-src 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    return html, {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def add_ui(app: FastAPI, authorized, runs_root: str, options: UiOptions) -> UiJobs:
    """The page at `/` (no key: it asks for one) and its routes under `/ui` (the key); returns the jobs, for
    the app to `close()` at shutdown."""
    root = Path(runs_root).resolve()
    jobs = UiJobs(options.max_jobs)
    html, page_headers = _page()
    keyed = [Depends(authorized)]

    def run(name: str) -> Path:
        found = _runs(root).get(name)
        if found is None:
            raise ApiError(404, f"no run {name!r} in the runs folder", "name", "run_not_found")
        return found

    def job(job_id: str):
        found = jobs.get(job_id)
        if found is None:
            raise ApiError(404, "no such training job (the server may have restarted)", "job_id", "not_found")
        return found

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(html, headers=page_headers)

    @app.get("/ui/info", dependencies=keyed)
    async def info():
        return {
            "training": options.allow_training,
            "models": list(options.served),
            "default_yaml": default_yaml(root, options.base_path),
        }

    @app.get("/ui/runs", dependencies=keyed)
    def runs():
        return [_run_row(name, folder) for name, folder in _runs(root).items()]

    @app.get("/ui/runs/{name:path}/loss.png", dependencies=keyed)
    async def loss_plot(name: str):
        path = _file(run(name), run_folder.LOSS_PLOT)
        if path is None:
            raise ApiError(404, f"{name} has no loss plot yet", "name", "not_found")
        return FileResponse(path, media_type="image/png")

    @app.get("/ui/runs/{name:path}/files", dependencies=keyed)
    def files(name: str):
        folder = run(name)
        return {
            "config": _text(folder, run_folder.CONFIG),
            "summary": _text(folder, run_folder.SUMMARY),
            "eval": _text(folder, "eval.md") or _text(folder, "sweep.md"),
        }

    @app.get("/ui/runs/{name:path}/data", response_class=PlainTextResponse, dependencies=keyed)
    def data(name: str):
        """Sync: FastAPI runs it in its thread pool, off the event loop, as it reads and tokenizes the data."""
        from ..data.report import data_report

        def refused(message: str, code: str) -> ApiError:
            return ApiError(400, message.replace(f"{root}{os.sep}", ""), "name", code)

        try:
            cfg = run_folder.saved_config(run(name))
        except TunelabError as exc:
            raise refused(str(exc), "invalid_run") from None
        if cfg.trust_remote_code:
            raise refused(
                f"{name} was trained with trust_remote_code: true, and its report would run the model's own code "
                f"inside this server; run `tunelab data {name}/{run_folder.CONFIG}` in the runs folder instead",
                "remote_code",
            )
        remote = None if options.allow_hub else _remote(cfg)
        if remote:
            raise refused(
                f"{name}: its {remote[0]} {remote[1]!r} is no file or folder here, and hub ids need the server's "
                "--allow-hub",
                "hub_not_allowed",
            )
        with tempfile.TemporaryDirectory(prefix="tunelab-ui-") as scratch:
            cfg = dataclasses.replace(cfg, trust_remote_code=False, allow_pickle=False, output_dir=scratch)
            try:
                return data_report(cfg, n_samples=2)
            except TunelabError as exc:
                raise refused(str(exc), "invalid_run") from None

    @app.get("/ui/train", dependencies=keyed)
    async def train_list():
        return {"jobs": [j.state() for j in jobs.jobs.values()]}

    @app.post("/ui/train", dependencies=keyed)
    async def train(req: TrainRequest):
        """Async on purpose: the child is started on the event loop's thread, which lives as long as the server
        (see `jobs._die_with_parent`); checking the YAML is quick."""
        if not options.allow_training:
            raise ApiError(
                403,
                "training from the web page is off; start the server with --allow-training to allow it",
                None,
                "training_disabled",
            )
        cfg, notes = check_posted(req.yaml, root, options.allow_hub)
        if jobs.full():
            raise ApiError(
                429,
                f"{len(jobs.running())} training run(s) already running (at most {options.max_jobs} at a time); "
                "stop one or wait",
                None,
                "too_many_jobs",
                retry_after=RETRY_AFTER_S,
            )
        root.mkdir(parents=True, exist_ok=True)
        name = Path(cfg.output_dir).name
        while True:
            try:
                (root / name).mkdir()
                break
            except FileExistsError:  # taken since it was checked
                name, more = _run_name(name, root)
                notes += more
        cfg = dataclasses.replace(cfg, output_dir=str(root / name))
        config = root / name / JOB_CONFIG
        dump_config(cfg, config)
        started = jobs.start([sys.executable, "-m", "tunelab", "train", str(config)], root / name, name, notes)
        return started.state()

    @app.get("/ui/train/{job_id}", dependencies=keyed)
    async def train_state(job_id: str):
        return job(job_id).state()

    @app.post("/ui/train/{job_id}/stop", dependencies=keyed)
    async def train_stop(job_id: str):
        found = job(job_id)
        if found.running:
            found.signal_group(signal.SIGINT)  # as Ctrl-C: the step finishes, a checkpoint is saved
        return found.state()

    return jobs
