"""`tunelab serve` through the official `openai` client: a tiny base and two adapters trained here, one
server on 127.0.0.1, answers equal to in-process greedy generation, streams that reassemble, concurrent
requests that share forward passes, and every bad request a 4xx in OpenAI's error shape."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from tunelab.infer.chat import ChatSession  # noqa: E402
from tunelab.serve.app import create_app  # noqa: E402
from tunelab.serve.run import build_server  # noqa: E402

KEY = "test-key"


def post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    """A raw POST (no client library between the test and the server's answer)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(
        "POST", parts.path, body=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    reply = conn.getresponse()
    status, text = reply.status, reply.read()
    conn.close()
    return status, json.loads(text)


@pytest.fixture(scope="module")
def adapters(memorised, tmp_path_factory):
    """`a`: the memorised LoRA; `b`: a LoRA taught other answers to the same questions."""
    from tunelab.config import from_dict
    from tunelab.train.run import train

    root = tmp_path_factory.mktemp("serve")
    data = root / "other.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": "I would rather not say."},
                    ]
                }
            )
            + "\n"
            for q in ("Capital of France?", "Colour of the sky?", "Two plus two?")
        )
    )
    train(
        from_dict(
            dict(
                model=str(memorised / "full"),
                output_dir=str(root / "b"),
                dataset=str(data),
                max_steps=30,
                learning_rate=5e-3,
                per_device_train_batch_size=3,
                logging_steps=10,
                lr_scheduler_type="constant",
            )
        )
    )
    return {"a": str(memorised / "lora"), "b": str(root / "b")}


@pytest.fixture(scope="module")
def server(memorised, adapters, serve_app):
    """(base URL, the Server) of a live server with the base and adapters a and b, keyed."""
    served = build_server(str(memorised / "full"), [f"{n}={d}" for n, d in adapters.items()], api_key=KEY)
    with serve_app(create_app(served)) as url:
        yield url, served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)


def ask(client, model, question, **kw):
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=20, **kw
    )
    return out.choices[0].message.content


def test_each_model_answers_as_in_process_greedy_generation(client, server, memorised, adapters, pairs):
    base = str(memorised / "full")
    assert sorted(m.id for m in client.models.list().data) == sorted([base, "a", "b"])
    question = pairs[0][0]
    answers = {m: ask(client, m, question) for m in (base, "a", "b")}
    assert answers[base] == ChatSession.load(base).ask(question, max_new_tokens=20) == pairs[0][1]
    for name, folder in adapters.items():
        assert answers[name] == ChatSession.load(base, adapter=folder).ask(question, max_new_tokens=20)
    assert answers["b"] != answers[base]


def test_a_stream_reassembles_to_the_same_text_and_reports_usage(client, server, memorised, pairs):
    base = str(memorised / "full")
    whole = client.chat.completions.create(
        model="b", messages=[{"role": "user", "content": pairs[1][0]}], temperature=0, max_tokens=20
    )
    parts, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model="b",
        messages=[{"role": "user", "content": pairs[1][0]}],
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason == "stop"
    assert usage.completion_tokens == whole.usage.completion_tokens > 0
    assert whole.usage.prompt_tokens == len(
        ChatSession.load(base).prompt_ids([{"role": "user", "content": pairs[1][0]}])
    )


def test_completions_n_stop_and_max_tokens_are_honoured(client, server, memorised):
    out = client.completions.create(
        model="a",
        prompt="<|im_start|>user\nTwo plus two?<|im_end|>\n<|im_start|>assistant\n",
        max_tokens=3,
        temperature=0,
        n=2,
    )
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text == out.choices[1].text
    assert out.usage.completion_tokens <= 6 and out.choices[0].finish_reason in ("length", "stop")
    cut = client.chat.completions.create(
        model=str(memorised / "full"),
        temperature=0,
        max_tokens=20,
        stop=["capital"],
        messages=[{"role": "user", "content": "Capital of France?"}],
    )
    assert cut.choices[0].message.content == "Paris is the " and cut.choices[0].finish_reason == "stop"
    sampled = [ask(client, "b", "Colour of the sky?", seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_share_forward_passes_and_beat_sequential_ones(client, server, pairs):
    questions = [pairs[i % len(pairs)][0] for i in range(32)]
    started = time.perf_counter()
    sequential = [ask(client, "a", q) for q in questions]
    one_by_one = time.perf_counter() - started
    batches_before = server[1].batcher.batches
    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda q: ask(client, "a", q), questions))
    together = time.perf_counter() - started
    assert concurrent == sequential
    assert server[1].batcher.batches - batches_before < 32
    assert together < one_by_one, (together, one_by_one)


BAD = [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "invalid_value"),
    ({"model": "a", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ({"model": "a", "messages": []}, 400, "invalid_value"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "invalid_value"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400, "invalid_value"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "invalid_value"),
    ({"model": "a", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context_length_exceeded"),
    (
        {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
        400,
        "context_length_exceeded",
    ),
    (
        {
            "model": "a",
            "messages": [{"role": "user", "content": "hi"}],  # this run's template has no tools
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        },
        400,
        "invalid_value",
    ),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": [{"nameless": 1}]}, 400, "invalid_value"),
]


@pytest.mark.parametrize("body, status, code", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_a_bad_request_gets_its_4xx_in_openai_shape_and_the_server_goes_on(server, client, body, status, code):
    got, reply = post(f"{server[0]}/v1/chat/completions", json.dumps(body).encode())
    assert got == status, reply
    error = reply["error"]
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "param", "code"}
    assert ask(client, "a", "Two plus two?")


def test_malformed_json_and_a_missing_key_are_refused(server, client):
    status, reply = post(f"{server[0]}/v1/chat/completions", b"{not json")
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    keyless = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.models.list()
    with pytest.raises(openai.NotFoundError):
        ask(client, "nope", "hi")
    assert ask(client, "a", "Two plus two?")


def test_a_client_that_leaves_mid_stream_frees_its_row(server, client):
    body = {
        "model": "a",
        "messages": [{"role": "user", "content": "Two plus two?"}],
        "max_tokens": 500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    before = server[1].batcher.abandoned
    parts = urlsplit(server[0])
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    reply = conn.getresponse()
    assert reply.status == 200
    events = 0
    while events < 4:  # the role chunk, then some text: the row is generating
        events += reply.readline().startswith(b"data: ")
    conn.close()  # gone mid-stream
    deadline = time.monotonic() + 20
    while server[1].batcher.abandoned == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server[1].batcher.abandoned == before + 1  # its row stopped before its 500 tokens
    assert ask(client, "a", "Two plus two?")  # and the server serves on


def test_serve_check_passes_on_the_training_data_and_fails_when_the_served_template_changed(
    server, memorised, adapters, capsys
):
    import copy

    from tunelab.cli import main
    from tunelab.data.encode import Encoder

    data = str(memorised / "qa.jsonl")
    args = ["serve", "--check", data, "--url", f"{server[0]}/v1", "--api-key", KEY, "--model", str(memorised / "full")]
    assert main(args + ["--adapter", f"b={adapters['b']}"]) == 0
    assert "3 records: prompt tokens equal to training's: 3; stopped on a stop id: 3" in capsys.readouterr().out
    served = server[1].models["b"]
    original = served.encoder
    changed = copy.deepcopy(served.variant.tokenizer)
    changed.chat_template = changed.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    served.encoder = Encoder(changed)
    try:
        assert main(args + ["--adapter", f"b={adapters['b']}"]) == 1
    finally:
        served.encoder = original
    out = capsys.readouterr().out
    assert "check FAILED: 3 of 3 records" in out and "prompt tokens equal to training's: 0" in out


def test_the_vllm_hand_off_names_the_same_adapters_template_and_stop_ids(memorised, adapters, capsys):
    import shlex

    from tunelab.cli import main

    base = str(memorised / "full")
    assert (
        main(
            [
                "serve",
                "--model",
                base,
                "--adapter",
                f"a={adapters['a']}",
                "--adapter",
                f"b={adapters['b']}",
                "--print-vllm",
                "--api-key",
                KEY,
            ]
        )
        == 0
    )
    cmd = shlex.split(capsys.readouterr().out.replace("\\\n", " "))
    assert cmd[:3] == ["vllm", "serve", base]
    flags = {cmd[i]: cmd[i + 1] for i in range(3, len(cmd) - 1) if cmd[i].startswith("--")}
    assert flags["--served-model-name"] == base and flags["--api-key"] == KEY and flags["--max-loras"] == "2"
    assert flags["--max-lora-rank"] == "8"  # r 8 trained; vLLM takes 8, 16, 32 ...
    at = cmd.index("--lora-modules")
    assert cmd[at + 1 : at + 3] == [f"a={Path(adapters['a']).resolve()}", f"b={Path(adapters['b']).resolve()}"]
    template = Path(flags["--chat-template"])
    assert template.read_text() == (Path(adapters["a"]) / "chat_template.jinja").read_text()
    stops = json.loads((Path(flags["--generation-config"]) / "generation_config.json").read_text())["eos_token_id"]
    assert ChatSession.load(base, adapter=adapters["a"]).tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
