"""The web page in a real browser (Debian's Chromium driven by Playwright): the key taken from the link (or
typed after a refusal) loads everything without a reload; two adapters answer side by side as the API
answers; a model id that is HTML shows as text and runs nothing; a run's plot, config and data report show;
a 3-step training run started from the page finishes, and a long one stopped from it saves a checkpoint.
Screenshots are kept under test-artifacts/ (or $TUNELAB_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip) drives the browser")
expect = playwright.expect
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("TUNELAB_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
KEY = "ui-browser-key"
HTML_NAME = "<img src=x onerror=\"document.title='pwned'\">"  # a folder name, served as the base model's id


@pytest.fixture(scope="module")
def ui(memorised, llama_dir, tmp_path_factory, serve_app):
    """(url, runs, llama_dir, the base's id, url of the same server with training off)."""
    from tunelab.serve.app import create_app
    from tunelab.serve.run import build_server
    from tunelab.serve.ui import UiOptions

    runs = tmp_path_factory.mktemp("ui-runs")
    shutil.copytree(memorised / "lora", runs / "lora")
    shutil.copytree(memorised / "lora", runs / "odd #name?")  # reached only when the page encodes it
    (runs / "qa.jsonl").write_text((memorised / "qa.jsonl").read_text())
    base = shutil.copytree(memorised / "full", tmp_path_factory.mktemp("models") / HTML_NAME)
    served = build_server(str(base), [f"lora={memorised / 'lora'}", f"copy={runs / 'lora'}"], api_key=KEY)
    options = UiOptions(served=list(served.models), base_path=served.im.base_path)
    with serve_app(create_app(served, str(runs), ui=options)) as closed:
        training = create_app(served, str(runs), ui=UiOptions(**{**vars(options), "allow_training": True}))
        with serve_app(training) as url:
            yield url, runs, llama_dir, str(base), closed


@pytest.fixture(scope="module")
def context(browser):
    opened = browser.new_context(viewport={"width": 1280, "height": 900})
    yield opened
    opened.close()


@pytest.fixture()
def page(context):
    opened = context.new_page()
    yield opened
    opened.close()


def test_the_key_comes_from_the_link_and_two_adapters_answer_side_by_side_as_the_api_does(ui, page, pairs):
    from tunelab.infer.chat import ChatSession

    url, runs, _, base, _ = ui
    page.goto(f"{url}/#key={KEY}")
    page.wait_for_selector("#models input[value=lora]")
    assert "#" not in page.url and page.evaluate("localStorage.getItem('tunelab-key')") == KEY
    assert page.locator("#key-box").is_hidden()
    first = page.locator("#models input").first
    assert first.get_attribute("value") == base and first.is_checked()  # the first model is ticked
    first.uncheck()
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


def test_a_model_id_that_is_html_shows_as_text_and_runs_nothing(ui, page):
    url, _, _, base, _ = ui
    page.goto(f"{url}/#key={KEY}")
    page.wait_for_selector(".column h3")
    assert page.locator("#models label").first.inner_text().strip() == base
    assert page.locator(".column h3").first.inner_text() == base
    assert page.locator("#models img, #columns img").count() == 0
    page.wait_for_timeout(300)
    assert page.title() == "tunelab"


def test_without_the_key_the_page_asks_for_it_and_loads_once_given(ui, browser):
    _, _, _, base, closed = ui
    context = browser.new_context()  # nothing stored: no key
    page = context.new_page()
    page.goto(closed)
    page.wait_for_selector("#key-box:not([hidden])")
    assert "key" in page.inner_text("#key-msg") and page.locator("#models input").count() == 0
    page.fill("#key", "wrong")
    page.press("#key", "Enter")
    expect(page.locator("#key-msg")).to_contain_text("refused")
    assert page.locator("#key-box").is_visible()
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    page.wait_for_selector("#models input")
    page.wait_for_selector("#runs-list li", state="attached")
    assert page.locator("#key-box").is_hidden() and page.locator("#models input").first.get_attribute("value") == base
    expect(page.locator("#yaml")).to_have_value(re.compile("dataset: qa.jsonl"))  # /ui/info's default
    page.click("#tab-train")
    assert page.locator("#train-note").is_visible() and "--allow-training" in page.inner_text("#train-note")
    assert page.locator("#start").is_disabled()
    context.close()


def test_a_run_shows_its_plot_config_and_data_and_a_training_started_here_finishes_or_stops(ui, page):
    url, runs, llama_dir, _, _ = ui
    page.goto(f"{url}/#key={KEY}")
    page.click("#tab-runs")
    logged = [json.loads(line) for line in (runs / "lora" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next(r["loss"] for r in reversed(logged) if "loss" in r)  # the last logged loss, not the run's mean
    page.wait_for_selector("#runs-list li >> text=lora")
    assert page.locator("#runs-list li >> text=lora").first.inner_text().endswith(f"last loss {last:.3f})")
    page.click("#runs-list li >> text=odd #name?")
    expect(page.locator("#run-config")).to_contain_text("finetuning_type")
    page.click("#runs-list li >> text=lora")
    expect(page.locator("#run-name")).to_have_text("lora")
    expect(page.locator("#run-config")).to_contain_text("finetuning_type")
    expect(page.locator("#loss")).to_have_attribute("src", re.compile("^blob:"))
    assert page.locator("#loss").evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    page.click("#data-report")
    expect(page.locator("#run-data")).to_contain_text("records read: 3", timeout=60_000)

    def yaml(output_dir: str, max_steps: int) -> str:
        keys = {
            "model": llama_dir,
            "dataset": "qa.jsonl",  # relative to the runs folder
            "output_dir": output_dir,
            "max_steps": max_steps,
            "per_device_train_batch_size": 3,
            "logging_steps": 1,
            "save_steps": max_steps,
        }
        return "\n".join(f"{k}: {json.dumps(v)}" for k, v in keys.items())

    page.click("#tab-train")
    assert page.locator("#train-note").is_hidden() and page.locator("#start").is_enabled()
    page.fill("#yaml", yaml("from-ui", 3))
    page.click("#start")
    expect(page.locator("#train-status")).to_have_text(re.compile("^finished"), timeout=180_000)
    assert (runs / "from-ui" / "run_summary.json").is_file()
    assert str(runs / "from-ui") in page.inner_text("#train-folder")
    assert page.locator("#curve polyline").count() == 1  # the live loss curve was drawn, with its axes
    assert page.locator("#curve text.tick-x").count() >= 2 and page.locator("#curve text.tick-y").count() >= 2
    page.screenshot(path=str(ARTIFACTS / "ui-train.png"))

    # a refused config says why, in the page
    page.fill("#yaml", yaml("x", 3) + "\ntrust_remote_code: true")
    page.click("#start")
    expect(page.locator("#train-error")).to_contain_text("trust_remote_code")

    # a long run, stopped from the page: it saves a checkpoint and says how to resume, as Ctrl-C does
    page.fill("#yaml", yaml("stopped", 100000))
    page.click("#start")
    expect(page.locator("#train-status")).to_have_text(re.compile("^running, step [0-9]+"), timeout=120_000)
    page.click("#stop")
    expect(page.locator("#train-status")).to_have_text(re.compile("^stopped"), timeout=120_000)
    assert list((runs / "stopped").glob("checkpoint-*")), "stopping saved no checkpoint"
    assert "resume_from_checkpoint=auto" in page.inner_text("#train-log")
