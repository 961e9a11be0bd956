"""The web page's routes without a browser: a posted config is checked before anything is written or started
(no remote code, pickles, DeepSpeed files, hub ids, network loggers; a fresh run folder inside the runs
folder), one job at a time, no server secret in a job's environment, jobs that end with the server (at
shutdown and when it is killed), a data report that runs no model code and leaves no temp folder, and runs
that are half written or linked out of the runs folder neither break the list nor leak a file.

The routes are mounted on a small app with the same key check and error shape as `create_app`, so these
tests need no model unless they train or read data."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402

from tunelab import run_folder  # noqa: E402
from tunelab.serve import jobs as jobs_module  # noqa: E402
from tunelab.serve.app import api_error_response  # noqa: E402
from tunelab.serve.jobs import UiJobs, child_env  # noqa: E402
from tunelab.serve.protocol import ApiError  # noqa: E402
from tunelab.serve.ui import JOB_CONFIG, UiOptions, add_ui, check_posted, default_yaml  # noqa: E402

KEY = "ui-route-key"
SLEEPER = "import time; time.sleep(120)"


def call(url: str, path: str, body: dict | None = None, key: str = KEY) -> tuple[int, dict, object]:
    """(status, headers, parsed body) of a GET, or a JSON POST when `body` is given."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = {"Authorization": f"Bearer {key}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request("GET" if body is None else "POST", path, None if body is None else json.dumps(body), headers)
    reply = conn.getresponse()
    status, got, text = reply.status, dict(reply.getheaders()), reply.read()
    conn.close()
    return status, got, json.loads(text) if "json" in got.get("content-type", "") else text.decode()


def small_app(runs: Path, options: UiOptions):
    app = FastAPI()

    app.exception_handler(ApiError)(api_error_response)

    async def authorized(request: Request) -> None:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            raise ApiError(401, "a valid API key is needed", None, "invalid_api_key")

    return app, add_ui(app, authorized, str(runs), options)


@pytest.fixture()
def runs(tmp_path):
    """A runs folder holding one data file, and a (empty) model folder beside it."""
    root = tmp_path / "runs"
    root.mkdir()
    (root / "data.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "secret.jsonl").write_text((root / "data.jsonl").read_text())  # readable, but not the page's
    return root


@pytest.fixture()
def ui(serve_app, runs):
    """ui(**UiOptions keys) -> (url, jobs): the routes served live over `runs`; jobs closed at the end."""
    with contextlib.ExitStack() as stack:

        def start(**options):
            app, jobs = small_app(runs, UiOptions(**options))
            stack.callback(jobs.close, 1.0)
            return stack.enter_context(serve_app(app)), jobs

        yield start


@pytest.fixture()
def fake_trainer(monkeypatch):
    """Jobs run `python -c fake_trainer.code` in place of `tunelab train`, every other Popen argument as given;
    `fake_trainer.argv` records what would have run."""
    real = subprocess.Popen

    def popen(argv, **kw):
        popen.argv.append(argv)
        return real([sys.executable, "-c", popen.code], **kw)

    popen.argv, popen.code = [], "pass"
    monkeypatch.setattr(jobs_module.subprocess, "Popen", popen)
    return popen


def posted(runs: Path, **keys) -> str:
    base = {"model": str(runs.parent / "model"), "dataset": "data.jsonl", "output_dir": "fine", "max_steps": 2}
    return yaml.safe_dump({**base, **keys})


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


FORBIDDEN = [
    ("trust_remote_code", {"trust_remote_code": True}),
    ("allow_pickle", {"allow_pickle": 1}),
    ("deepspeed", {"deepspeed": "ds.json"}),
    ("overwrite_output_dir", {"overwrite_output_dir": True}),
    ("report_to", {"report_to": "wandb"}),
    ("nnodes", {"nnodes": 2}),
    ("model", {"model": "Qwen/Qwen2.5-0.5B-Instruct"}),
    ("dataset", {"dataset": "tatsu-lab/alpaca"}),
    ("eval_dataset", {"eval_dataset": ["data.jsonl", "org/held-out"]}),
    ("dataset", {"dataset": "../secret.jsonl"}),
    ("eval_dataset", {"eval_dataset": ["data.jsonl", "../secret.jsonl"]}),
    ("tools", {"tools": "../secret.jsonl"}),
    ("resume_from_checkpoint", {"resume_from_checkpoint": "../elsewhere/checkpoint-5"}),
    ("resume_from_checkpoint", {"resume_from_checkpoint": "/tmp/checkpoint-5"}),
]


def test_each_forbidden_key_is_a_400_naming_it_before_anything_is_written_or_started(ui, runs, fake_trainer):
    url, _ = ui(allow_training=True)
    before = listing(runs)
    for key, keys in FORBIDDEN:
        status, _, body = call(url, "/ui/train", {"yaml": posted(runs, **keys)})
        assert status == 400 and body["error"]["param"] == key and key in body["error"]["message"], (keys, body)
    status, _, body = call(url, "/ui/train", {"yaml": posted(runs, lora_r=0)})  # the config loader's own check
    assert status == 400 and "lora_r" in body["error"]["message"], body
    assert str(runs) not in body["error"]["message"]
    assert listing(runs) == before and fake_trainer.argv == []
    # the control: the same YAML without them starts
    assert call(url, "/ui/train", {"yaml": posted(runs)})[0] == 200 and len(fake_trainer.argv) == 1


@pytest.mark.fast
def test_hub_ids_pass_only_with_allow_hub(runs):
    text = posted(runs, model="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(ApiError) as refused:
        check_posted(text, runs, allow_hub=False)
    assert refused.value.param == "model"
    cfg, _ = check_posted(text, runs, allow_hub=True)
    assert cfg.model == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.dataset == str(runs / "data.jsonl")
    assert check_posted(posted(runs, report_to="swanlab"), runs, allow_hub=False)[0].report_to == "swanlab"  # offline


def test_an_output_dir_outside_the_runs_folder_trains_inside_it_under_a_fresh_name(ui, runs, fake_trainer):
    url, jobs = ui(allow_training=True, max_jobs=4)
    outside = runs.parent / "outside"
    for given, name in ((str(outside), "outside"), ("../outside", "outside-2"), ("..", "ui-run"), ("a b/../c?", "c-")):
        status, _, state = call(url, "/ui/train", {"yaml": posted(runs, output_dir=given)})
        assert status == 200, state
        assert state["output_dir"] == str(runs / name) and state["name"] == name, (given, state)
        assert any("output_dir" in line for line in state["log"]), state["log"]  # said in the job's log
        config = runs / name / JOB_CONFIG
        assert fake_trainer.argv[-1][-1] == str(config)  # the job runs the YAML written in its own folder
        saved = yaml.safe_load(config.read_text())
        assert saved["output_dir"] == str(runs / name) and saved["dataset"] == str(runs / "data.jsonl")
    assert not outside.exists() and sorted(p.name for p in runs.glob(".*")) == []  # no litter in the runs root


def test_a_second_start_while_one_runs_is_429_with_retry_after(ui, runs, fake_trainer):
    fake_trainer.code = SLEEPER
    url, jobs = ui(allow_training=True)
    status, _, first = call(url, "/ui/train", {"yaml": posted(runs)})
    assert status == 200 and first["status"] == "running"
    status, headers, body = call(url, "/ui/train", {"yaml": posted(runs, output_dir="second")})
    assert status == 429 and int(headers["retry-after"]) > 0 and body["error"]["code"] == "too_many_jobs"
    assert not (runs / "second").exists() and len(fake_trainer.argv) == 1
    assert len(first["id"]) >= 20  # not guessable from the order jobs started in


def test_training_disabled_is_403_and_info_says_so(ui, runs, fake_trainer):
    url, _ = ui(served=["base", "a"], base_path=str(runs.parent / "model"))
    status, _, body = call(url, "/ui/train", {"yaml": posted(runs)})
    assert (
        status == 403
        and body["error"]["code"] == "training_disabled"
        and "--allow-training" in body["error"]["message"]
    )
    assert fake_trainer.argv == [] and listing(runs) == ["data.jsonl"]
    status, _, info = call(url, "/ui/info")
    assert status == 200 and info["training"] is False and info["models"] == ["base", "a"]
    assert set(info) == {"training", "models", "default_yaml"}
    assert call(url, "/ui/info", key="wrong")[0] == 401


@pytest.mark.fast
def test_the_default_yaml_trains_the_served_base_on_data_in_the_runs_folder(runs):
    text = default_yaml(runs, str(runs.parent / "model"))
    cfg, _ = check_posted(text, runs, allow_hub=False)
    assert cfg.model == str(runs.parent / "model") and cfg.dataset == str(runs / "data.jsonl")
    assert cfg.output_dir == str(runs / "ui-run") and cfg.finetuning_type == "lora" and cfg.logging_steps == 1
    (runs / "data.jsonl").unlink()
    assert "dataset: data/train.jsonl  #" in default_yaml(runs, None)


def test_a_half_written_summary_and_broken_metrics_lines_keep_the_list_and_job_state_answering(ui, runs, fake_trainer):
    half = runs / "half"
    half.mkdir()
    (half / run_folder.CONFIG).write_text("model: m\n")
    (half / run_folder.SUMMARY).write_text('{"global_st')
    metrics = '{"step": 1, "loss": 2.5}\nnot json\n{"step": 2, "loss": NaN}\n{"step": 3, "lo'
    (half / run_folder.METRICS).write_text(metrics)
    fake_trainer.code = SLEEPER
    url, _ = ui(allow_training=True)
    status, _, listed = call(url, "/ui/runs")
    assert status == 200 and listed == [{"name": "half", "finished": False, "last_loss": None, "steps": None}]

    status, _, state = call(url, "/ui/train", {"yaml": posted(runs, output_dir="live")})
    assert status == 200
    (runs / "live" / run_folder.METRICS).write_text(metrics)
    status, _, state = call(url, f"/ui/train/{state['id']}")
    assert status == 200 and state["losses"] == [[1, 2.5], [2, None]], state
    assert call(url, "/ui/train/not-a-job")[0] == 404


def test_a_symlink_out_of_the_runs_folder_is_not_served(ui, runs, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the server's secret")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / run_folder.CONFIG).write_text(secret.read_text())
    (runs / "escape").symlink_to(elsewhere, target_is_directory=True)
    inside = runs / "inside"
    inside.mkdir()
    (inside / run_folder.CONFIG).write_text("model: m\n")
    (inside / "eval.md").symlink_to(secret)
    (inside / run_folder.SUMMARY).symlink_to(secret)
    url, _ = ui()
    status, _, listed = call(url, "/ui/runs")
    assert status == 200 and [r["name"] for r in listed] == ["inside"]
    status, _, files = call(url, "/ui/runs/inside/files")
    assert status == 200 and files["config"] == "model: m\n" and files["eval"] is None and files["summary"] is None
    status, _, body = call(url, "/ui/runs/escape/files")
    assert status == 404 and str(runs) not in body["error"]["message"]


@pytest.mark.fast
def test_a_job_environment_is_a_short_list_of_names():
    env = child_env({"PATH": "/bin", "LC_ALL": "C", "TUNELAB_API_KEY": "k", "HF_TOKEN": "t", "AWS_SECRET": "s"})
    assert env == {"PATH": "/bin", "LC_ALL": "C", "TQDM_DISABLE": "1", "SWANLAB_MODE": "offline"}


@pytest.mark.fast
def test_the_job_list_keeps_every_running_job_and_the_last_finished_ones():
    from types import SimpleNamespace

    jobs = UiJobs()
    for i in range(30):
        process = SimpleNamespace(poll=lambda code=None if i == 0 else 0: code)
        jobs.jobs[f"job-{i}"] = jobs_module.TrainingJob(f"job-{i}", "run", Path("."), process, started=i)
    jobs._forget_old()
    assert sorted(jobs.jobs, key=lambda k: int(k[4:])) == ["job-0"] + [f"job-{i}" for i in range(10, 30)]


def test_a_job_gets_no_secret_from_the_server_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_API_KEY", "server-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "other-secret")
    jobs = UiJobs()
    job = jobs.start([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"], tmp_path, "env")
    assert job.process.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while not job.log and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = json.loads(job.log[-1])
    assert "server-secret" not in json.dumps(seen) and "other-secret" not in json.dumps(seen)
    assert seen["TQDM_DISABLE"] == "1" and seen["PATH"] == os.environ["PATH"]


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for whoever adopted it counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return all(_gone(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pgid)


def _pgid(proc: Path) -> int | None:
    try:
        return int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def test_close_ends_a_running_training_jobs_process_group(ui, runs, llama_dir, chat_file):
    url, jobs = ui(allow_training=True)
    shutil.copy(chat_file, runs / "chat.jsonl")  # the page trains on data in the runs folder only
    text = yaml.safe_dump(
        {"model": llama_dir, "dataset": "chat.jsonl", "output_dir": "long", "max_steps": 100000, "logging_steps": 1}
    )
    status, _, state = call(url, "/ui/train", {"yaml": text})
    assert status == 200, state
    deadline = time.monotonic() + 120
    while not state["losses"] and state["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        state = call(url, f"/ui/train/{state['id']}")[2]
    assert state["status"] == "running" and state["losses"], state  # training, not starting up
    pid = jobs.get(state["id"]).process.pid
    jobs.close(grace=10)
    assert jobs.get(state["id"]).process.poll() is not None and _group_gone(pid)
    assert call(url, "/ui/train", {"yaml": text})[0] == 429  # a closed server starts nothing more


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_server_takes_its_job_with_it(tmp_path):
    parent = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from tunelab.serve.jobs import UiJobs
        job = UiJobs().start([sys.executable, "-c", {SLEEPER!r}], Path(sys.argv[1]), "x")
        print(job.process.pid, flush=True)
        time.sleep(120)
        """
    )
    server = subprocess.Popen([sys.executable, "-c", parent, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(server.stdout.readline())
    try:
        assert not _gone(child)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the job outlived its killed server"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signal.SIGKILL)


@pytest.fixture()
def run_copy(memorised, runs):
    """runs/lora: a copy of the memorised LoRA run (its saved config names its base and data by absolute path)."""
    shutil.copytree(memorised / "lora", runs / "lora")
    return runs / "lora"


def test_the_data_report_leaves_no_temp_folder(ui, run_copy, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    url, _ = ui()
    status, _, first = call(url, "/ui/runs/lora/data")  # once before counting: libraries' own lasting temp folders
    assert status == 200 and "records read: 3" in first, first
    before = sorted(scratch.iterdir())
    status, _, text = call(url, "/ui/runs/lora/data")
    assert status == 200 and text == first
    assert sorted(scratch.iterdir()) == before


def test_the_data_report_never_runs_a_runs_own_code(ui, run_copy, memorised, tmp_path):
    marker = tmp_path / "the-model-code-ran"
    model = tmp_path / "remote-model"
    shutil.copytree(memorised / "full", model)
    (model / "marker_tok.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class MarkerTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    tok_config = json.loads((model / run_folder.TOKENIZER_CONFIG).read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["marker_tok.MarkerTokenizer", "marker_tok.MarkerTokenizer"]}
    (model / run_folder.TOKENIZER_CONFIG).write_text(json.dumps(tok_config))
    saved = yaml.safe_load((run_copy / run_folder.CONFIG).read_text())
    saved.update(trust_remote_code=True, model=str(model))
    (run_copy / run_folder.CONFIG).write_text(yaml.safe_dump(saved))
    url, _ = ui()
    status, _, body = call(url, "/ui/runs/lora/data")
    assert status == 400 and body["error"]["code"] == "remote_code" and "tunelab data" in body["error"]["message"]
    assert not marker.exists()
