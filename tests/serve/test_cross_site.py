"""Another web site open in the user's browser cannot drive the server: in headless Chromium, a page served
from a second port tries a form post, a `no-cors` fetch with a body that names no content type, and the
body-less stop request; none of them reaches a route, even with no key at all, while the page's own
requests do. What reaches the app is counted behind the guard, so the proof does not depend on a reply."""

from __future__ import annotations

import http.server
import shutil
import threading

import pytest

uvicorn = pytest.importorskip("uvicorn")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip) drives the browser")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium)")

ATTACK = """<!doctype html><html><body>
<form id="f" action="{target}/ui/train" method="post" enctype="text/plain" target="sink">
<input name='{{"yaml": "model: x\\ndataset: y\\noutput_dir: evil", "pad": "' value='"}}'></form>
<iframe name="sink"></iframe>
<script>
async function attack() {{
  document.getElementById("f").submit();
  const yaml = JSON.stringify({{yaml: "model: x\\ndataset: y\\noutput_dir: evil"}});
  const tries = [
    fetch("{target}/ui/train", {{method: "POST", mode: "no-cors", body: new Blob([yaml])}}),
    fetch("{target}/ui/train/train-1/stop", {{method: "POST", mode: "no-cors"}}),
    fetch("{target}/v1/chat/completions", {{method: "POST", mode: "no-cors", body: new Blob(["{{}}"])}}),
  ];
  await Promise.allSettled(tries);
  await new Promise((r) => setTimeout(r, 500));
  document.title = "done";
}}
attack();
</script></body></html>"""


class Counted:
    """The app behind the guard, recording each (method, path) that gets through."""

    def __init__(self, app):
        self.app, self.seen = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def guarded(memorised, tmp_path_factory, serve_app):
    from tunelab.serve.app import create_app
    from tunelab.serve.run import build_server
    from tunelab.serve.ui import UiOptions

    runs = tmp_path_factory.mktemp("cross-site-runs")
    server = build_server(str(memorised / "full"), served_model_name="m")  # no key: the guard alone must hold
    guard = create_app(server, str(runs), UiOptions(allow_training=True, served=["m"]))
    counted = guard.app = Counted(guard.app)
    with serve_app(guard) as url:
        yield url, counted, runs


@pytest.fixture(scope="module")
def attacker(guarded):
    url = guarded[0]
    page = ATTACK.format(target=url).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}/"
    site.shutdown()


def test_another_site_can_neither_start_nor_stop_training_nor_chat(guarded, attacker, browser):
    url, counted, runs = guarded
    page = browser.new_page()
    page.goto(attacker)
    page.wait_for_function("document.title === 'done'", timeout=30_000)
    posts = [seen for seen in counted.seen if seen[0] == "POST"]
    assert posts == [], posts
    assert not list(runs.iterdir())  # nothing written

    # the page's own origin gets through the same guard (the control: the attack was not merely malformed)
    page.goto(url)
    status = page.evaluate(
        """async () => (await fetch("/v1/chat/completions", {method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({model: "m", messages: [{role: "user", content: "hi"}], max_tokens: 2})})).status"""
    )
    assert status == 200 and ("POST", "/v1/chat/completions") in counted.seen
    page.close()
