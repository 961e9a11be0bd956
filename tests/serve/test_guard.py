"""A server on this machine is closed to other sites and other users: a key (never only on the command
line), a trusted Host (no DNS rebinding), no foreign Origin, JSON-only state changes (no form or `no-cors`
post), a body limit checked before parsing, and every route but the page and `/health` behind the key."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from tunelab.errors import TunelabError  # noqa: E402
from tunelab.serve.guard import KEY_ENV, key_matches, resolve_api_key, trusted_hosts  # noqa: E402

KEY = "guard-key"


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, parsed body) of one raw request: headers exactly as given, nothing added."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    sent = {"Host": parts.netloc, **(headers or {})}
    if body is not None:
        sent.setdefault("Content-Length", str(len(body)))
    for k, v in sent.items():
        if v is not None:
            conn.putheader(k, v)
    conn.endheaders(body)
    reply = conn.getresponse()
    status, got, text = reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    conn.close()
    try:
        return status, got, json.loads(text)
    except ValueError:
        return status, got, text


def chat_body(**kw) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "Two plus two?"}], "max_tokens": 3, **kw}
    ).encode()


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def in_background(url: str, body: bytes) -> tuple[threading.Thread, dict]:
    """A chat request sent from a thread: (the thread, then its status and seconds once it has ended)."""
    result: dict = {}

    def send():
        started = time.perf_counter()
        result["status"] = request(url, "POST", "/v1/chat/completions", body, AUTH)[0]
        result["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=send)
    thread.start()
    return thread, result


@pytest.fixture(scope="module")
def live(memorised, serve_app):
    from tunelab.serve.app import create_app
    from tunelab.serve.run import build_server

    server = build_server(str(memorised / "full"), api_key=KEY, served_model_name="m", max_tokens=400)
    with serve_app(create_app(server)) as url:
        yield url, server


@pytest.mark.fast
def test_the_key_is_bearer_in_any_case_and_nothing_else():
    assert key_matches(f"Bearer {KEY}", KEY) and key_matches(f"bearer {KEY}", KEY) and key_matches(f"BEARER {KEY}", KEY)
    for header in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer ", f"Bearer{KEY}"):
        assert not key_matches(header, KEY), header


@pytest.mark.fast
def test_the_key_comes_from_a_file_or_the_environment_and_the_flag_is_warned_about(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert resolve_api_key(None, None, need_one=False) == (None, False)
    generated, fresh = resolve_api_key(None, None, need_one=True)
    assert fresh and len(generated) >= 24 and generated != resolve_api_key(None, None, need_one=True)[0]
    (tmp_path / "key").write_text("from-file\n")
    assert resolve_api_key(None, str(tmp_path / "key"), need_one=True) == ("from-file", False)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TunelabError, match="empty"):
        resolve_api_key(None, str(tmp_path / "empty"), need_one=True)
    monkeypatch.setenv(KEY_ENV, "from-env")
    assert resolve_api_key(None, None, need_one=True) == ("from-env", False)
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        assert resolve_api_key("on-the-line", None, need_one=True) == ("on-the-line", False)
    assert "visible to every user" in caplog.text


@pytest.mark.fast
def test_trusted_hosts_are_the_bound_address_loopback_and_what_was_allowed():
    assert trusted_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert "box.lan" in trusted_hosts("127.0.0.1", ["box.lan"]) and "10.0.0.5" in trusted_hosts("10.0.0.5")
    assert "attacker.example" not in trusted_hosts("0.0.0.0")


def test_a_rebinding_host_is_refused_and_loopback_names_are_answered(live):
    url, _ = live
    port = urlsplit(url).port
    assert request(url, "GET", "/health", headers={"Host": None})[0] == 400  # HTTP/1.1 needs one (uvicorn)
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "[::2]:80"):
        status, _, body = request(url, "GET", "/health", headers={"Host": host})
        assert status == 421 and body["error"]["code"] == "untrusted_host", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert request(url, "GET", "/health", headers={"Host": host})[0] == 200, host


def test_a_foreign_origin_is_refused_and_the_page_own_origin_is_answered(live):
    url, _ = live
    for origin in ("http://attacker.example", "null", f"http://localhost:{urlsplit(url).port + 1}"):
        status, _, body = request(url, "POST", "/v1/chat/completions", chat_body(), {**AUTH, "Origin": origin})
        assert status == 403 and body["error"]["code"] == "cross_origin", origin
    status, _, body = request(url, "POST", "/v1/chat/completions", chat_body(), {**AUTH, "Origin": url})
    assert status == 200, body


def test_a_post_that_is_not_json_is_refused_before_anything_runs(live):
    url, _ = live
    for kind in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, body = request(url, "POST", "/v1/chat/completions", chat_body(), {**AUTH, "Content-Type": kind})
        assert status == 415 and body["error"]["code"] == "unsupported_media", kind
    assert (
        request(
            url,
            "POST",
            "/v1/chat/completions",
            chat_body(),
            {**AUTH, "Content-Type": "application/json; charset=utf-8"},
        )[0]
        == 200
    )


def test_every_route_but_the_page_and_health_needs_the_key(live):
    url, server = live
    from tunelab.serve.app import create_app

    routes = [r for r in create_app(server, "unused-runs").app.routes if getattr(r, "methods", None)]
    open_routes = {("GET", "/"), ("GET", "/health")}
    checked = 0
    for route in routes:
        for method in route.methods - {"HEAD"}:
            path = route.path.replace("{name:path}", "run").replace("{job_id}", "job")
            if (method, route.path) in open_routes:
                continue
            for auth in (None, "Bearer wrong", f"Basic {KEY}"):
                headers = {"Content-Type": "application/json", "Authorization": auth}
                with_ui = create_app(server, "unused-runs")
                status = _asgi_status(with_ui, method, path, headers)
                assert status == 401, (method, path, auth, status)
            checked += 1
    assert checked >= 8  # the API's and the page's data routes
    assert request(url, "GET", "/health")[2] == {"status": "ok"}  # no model ids (they are file paths)
    assert request(url, "GET", "/openapi.json")[0] == 404
    status, _, body = request(url, "GET", "/")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def _asgi_status(app, method: str, path: str, headers: dict) -> int:
    from starlette.testclient import TestClient

    with TestClient(app, base_url="http://127.0.0.1") as client:
        return client.request(method, path, headers={k: v for k, v in headers.items() if v}, content=b"{}").status_code


def test_a_10_mb_body_is_refused_at_once_and_small_requests_go_on_meanwhile(live):
    url, _ = live
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (10 * 1024 * 1024) + b'"}]}'
    thread, result = in_background(url, big)
    started = time.perf_counter()
    assert request(url, "POST", "/v1/chat/completions", chat_body(), AUTH)[0] == 200
    small = time.perf_counter() - started
    thread.join()
    assert result["status"] == 413 and result["seconds"] < 5, result
    assert small < 5, small
    chunked = {**AUTH, "Transfer-Encoding": "chunked"}
    payload = big[: 5 * 1024 * 1024]
    body = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    assert request(url, "POST", "/v1/chat/completions", body, {**chunked, "Content-Length": None})[0] == 413


BAD_NOW_4XX = [
    ("a seed past 64 bits", chat_body(seed=2**70), 400),
    (
        "a text part that is not a string",
        chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        400,
    ),
    (
        "an integer reasoning_content",
        chat_body(
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "x", "reasoning_content": 5},
                {"role": "user", "content": "hi"},
            ]
        ),
        400,
    ),
    ("max_tokens over the server's cap", chat_body(max_tokens=401), 400),
    ("n times prompts over the cap", json.dumps({"model": "m", "prompt": ["a"] * 9, "n": 8}).encode(), 400),
    ("an empty completion prompt", json.dumps({"model": "m", "prompt": ""}).encode(), 400),
]


@pytest.mark.parametrize("what, body, status", BAD_NOW_4XX, ids=[b[0] for b in BAD_NOW_4XX])
def test_what_once_was_a_500_is_a_4xx_and_the_next_request_is_served(live, what, body, status):
    url, _ = live
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    got, _, reply = request(url, "POST", path, body, AUTH)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert request(url, "POST", "/v1/chat/completions", chat_body(), AUTH)[0] == 200


def test_an_empty_stop_string_is_ignored_rather_than_ending_every_answer(live):
    from tunelab.serve.protocol import ChatRequest

    for stop in ("", [""], ["", "x"]):
        assert "" not in ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], stop=stop).stops
    url, _ = live
    _, _, with_empty = request(url, "POST", "/v1/chat/completions", chat_body(stop="", temperature=0), AUTH)
    _, _, without = request(url, "POST", "/v1/chat/completions", chat_body(temperature=0), AUTH)
    assert with_empty["choices"][0]["message"]["content"] == without["choices"][0]["message"]["content"] != ""


def test_a_client_that_leaves_a_non_streamed_request_frees_its_rows(live):
    url, server = live
    before = server.batcher.abandoned
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = chat_body(max_tokens=400, ignore_eos=True, n=2, temperature=0)
    conn.request("POST", "/v1/chat/completions", body=body, headers=AUTH)
    time.sleep(0.5)
    started = time.perf_counter()
    conn.sock.close()  # gone before the answer
    conn.close()
    deadline = time.monotonic() + 20
    while server.batcher.abandoned < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.batcher.abandoned == before + 2, time.perf_counter() - started
    assert request(url, "POST", "/v1/chat/completions", chat_body(), AUTH)[0] == 200


def test_a_full_queue_answers_429_with_retry_after(live, monkeypatch):
    url, server = live
    from tunelab.serve.batcher import BatcherBusy

    def busy(jobs):
        raise BatcherBusy()

    monkeypatch.setattr(server.batcher, "submit_all", busy)
    status, headers, body = request(url, "POST", "/v1/chat/completions", chat_body(), AUTH)
    assert status == 429 and body["error"]["code"] == "server_busy" and int(headers["retry-after"]) > 0


def test_the_page_always_has_a_key_generated_and_printed_once_when_none_is_given(
    memorised, monkeypatch, capsys, tmp_path
):
    import re

    import uvicorn as server_lib
    from starlette.testclient import TestClient

    from tunelab.serve.run import ServeOptions, serve

    started = {}
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setattr(server_lib, "run", lambda app, **kw: started.update(app=app, **kw))
    serve(str(memorised / "full"), None, ServeOptions(port=8123, ui_runs=str(tmp_path), served_model_name="m"))
    out = capsys.readouterr().out
    key = re.search(r"API key \(this run only, not saved\): (\S+)", out).group(1)
    assert f"http://127.0.0.1:8123/#key={key}" in out and out.count(key) == 2
    with TestClient(started["app"], base_url="http://127.0.0.1:8123") as client:
        assert client.get("/").status_code == 200  # the page itself carries no data
        assert client.get("/v1/models").status_code == 401
        assert client.get("/ui/info").status_code == 401
        keyed = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert keyed.status_code == 200 and [m["id"] for m in keyed.json()["data"]] == ["m"]


@pytest.mark.fast
def test_no_key_is_allowed_only_for_the_plain_api_on_a_loopback_host():
    from tunelab.serve.run import ServeOptions, serve

    with pytest.raises(TunelabError, match="loopback"):
        serve("m", None, ServeOptions(host="0.0.0.0", no_api_key=True))
    with pytest.raises(TunelabError, match="always has a key"):
        serve("m", None, ServeOptions(no_api_key=True, ui_runs="."))


def test_a_huge_prompt_is_tokenized_off_the_event_loop_while_others_are_answered(live):
    url, _ = live
    huge = chat_body(messages=[{"role": "user", "content": "word " * 700_000}])  # 3.5 MB: under the body limit
    thread, result = in_background(url, huge)
    time.sleep(0.3)  # it is being read and rendered now
    waits = []
    while thread.is_alive():
        started = time.perf_counter()
        assert request(url, "GET", "/health")[0] == 200
        waits.append(time.perf_counter() - started)
        time.sleep(0.1)
    thread.join()
    assert result["status"] == 400, result  # longer than the context
    assert waits and max(waits) < 1.0, (waits, result)


def test_the_command_line_opens_what_its_flags_name_and_nothing_else(memorised, monkeypatch, tmp_path, capsys):
    import uvicorn as server_lib
    from starlette.testclient import TestClient

    from tunelab.cli import main

    started = {}
    monkeypatch.setattr(server_lib, "run", lambda app, **kw: started.update(app=app, **kw))
    (tmp_path / "key").write_text("file-key\n")
    base = ["serve", "--model", str(memorised / "full"), "--served-model-name", "m", "--api-key-file"]
    flags = ["--ui", "--runs", str(tmp_path), "--allow-training", "--allowed-host", "box.lan", "--port", "8124"]
    assert main([*base, str(tmp_path / "key"), *flags]) == 0
    assert "file-key" not in capsys.readouterr().out  # a key the user gave is never printed
    keyed = {"Authorization": "Bearer file-key"}
    with TestClient(started["app"], base_url="http://box.lan:8124") as client:
        assert client.get("/ui/info", headers=keyed).json()["training"] is True
        assert client.get("/openapi.json", headers=keyed).status_code == 404
    with TestClient(started["app"], base_url="http://other.lan:8124") as client:
        assert client.get("/health").status_code == 421
    assert started["host"] == "127.0.0.1" and started["port"] == 8124

    assert main([*base, str(tmp_path / "key"), "--ui", "--runs", str(tmp_path), "--docs"]) == 0
    with TestClient(started["app"], base_url="http://127.0.0.1:8000") as client:
        assert client.get("/ui/info", headers=keyed).json()["training"] is False  # training stays off unless asked
        assert client.get("/openapi.json").status_code == 200
