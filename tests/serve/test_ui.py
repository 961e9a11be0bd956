"""The web page in a real browser (Debian's Chromium driven by Playwright): two adapters answer side by side
as the API answers; a run's plot, config and data report show; a 3-step training run started from the page
finishes, and a long one stopped from it saves a checkpoint. Screenshots are kept under test-artifacts/ (or
$TUNELAB_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip) drives the browser")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("TUNELAB_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def ui(memorised, llama_dir, tmp_path_factory, serve_app):
    from tunelab.serve.app import create_app
    from tunelab.serve.run import build_server

    runs = tmp_path_factory.mktemp("ui-runs")
    shutil.copytree(memorised / "lora", runs / "lora")
    (runs / "qa.jsonl").write_text((memorised / "qa.jsonl").read_text())
    served = build_server(str(memorised / "full"), [f"lora={memorised / 'lora'}", f"copy={runs / 'lora'}"])
    with serve_app(create_app(served, str(runs))) as url:
        yield url, runs, llama_dir


@pytest.fixture(scope="module")
def page():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


def test_two_adapters_answer_side_by_side_as_the_api_does(ui, page, pairs):
    from tunelab.infer.chat import ChatSession

    url, runs, _ = ui
    page.goto(url)
    page.wait_for_selector("#models input[value=lora]")
    page.check("#models input[value=lora]")
    page.check("#models input[value=copy]")
    question, answer = pairs[2]
    page.fill("#prompt", question)
    page.click("#send")
    for model in ("lora", "copy"):
        page.wait_for_selector(f".column[data-model={model}][data-done='2']", timeout=60_000)
    answers = page.locator(".column .answer").all_inner_texts()
    expected = ChatSession.load(str(runs / "lora")).ask(question, max_new_tokens=256)
    assert answers == [expected, expected]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-chat.png"))


def test_a_run_shows_its_plot_config_and_data_and_a_training_started_here_finishes_or_stops(ui, page):
    url, runs, llama_dir = ui
    page.goto(url)
    page.click("#tab-runs")
    import json as _json

    logged = [_json.loads(line) for line in (runs / "lora" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next(r["loss"] for r in reversed(logged) if "loss" in r)  # the last logged loss, not the run's mean
    assert page.locator("#runs-list li >> text=lora").first.inner_text().endswith(f"last loss {last:.3f})")
    page.click("#runs-list li >> text=lora")
    page.wait_for_function("document.getElementById('run-config').textContent.includes('finetuning_type')")
    page.wait_for_function("document.getElementById('loss').naturalWidth > 0")
    page.click("#data-report")
    page.wait_for_function(
        "document.getElementById('run-data').textContent.includes('records read: 3')", timeout=60_000
    )
    page.click("#tab-train")
    page.fill(
        "#yaml",
        "\n".join(
            f"{k}: {json.dumps(v)}"
            for k, v in {
                "model": llama_dir,
                "dataset": str(runs / "qa.jsonl"),
                "output_dir": str(runs / "from-ui"),
                "max_steps": 3,
                "per_device_train_batch_size": 3,
                "logging_steps": 1,
                "save_steps": 1000,
            }.items()
        ),
    )
    page.click("#start")
    page.wait_for_function(
        "document.getElementById('train-status').textContent.startsWith('finished')", timeout=180_000
    )
    assert (runs / "from-ui" / "run_summary.json").is_file()
    assert page.locator("#curve polyline").count() == 1  # the live loss curve was drawn
    page.screenshot(path=str(ARTIFACTS / "ui-train.png"))

    # a long run, stopped from the page: it saves a checkpoint and says how to resume, as Ctrl-C does
    page.fill(
        "#yaml",
        "\n".join(
            f"{k}: {json.dumps(v)}"
            for k, v in {
                "model": llama_dir,
                "dataset": str(runs / "qa.jsonl"),
                "output_dir": str(runs / "stopped"),
                "max_steps": 100000,
                "per_device_train_batch_size": 3,
                "logging_steps": 1,
                "save_steps": 100000,
            }.items()
        ),
    )
    page.click("#start")
    page.wait_for_function(
        "/^running, step [0-9]+/.test(document.getElementById('train-status').textContent)", timeout=120_000
    )
    page.click("#stop")
    page.wait_for_function("document.getElementById('train-status').textContent.startsWith('stopped')", timeout=120_000)
    assert list((runs / "stopped").glob("checkpoint-*")), "stopping saved no checkpoint"
    assert "resume_from_checkpoint=auto" in page.inner_text("#train-log")
