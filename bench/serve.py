"""Serving throughput and latency: 1 client against 32 concurrent ones, and short requests behind long ones.

    python bench/serve.py [--requests 64] [--max-tokens 32] [--long-requests 20] [--long-tokens 400]
                          [--short-requests 8] [--short-tokens 8] [--out bench/serve.json]

A tiny Qwen2 (the tests' shape: hidden 64, 2 layers) with a base and two LoRA adapters behind the
real server on 127.0.0.1; every request asks for exactly `--max-tokens` new tokens (`ignore_eos`), so
both runs generate the same work. Reported side by side: requests/s, new tokens/s, p50 and p95
latency per request, the forward-pass batches the server ran, and the ratios. One client at a time
is what a server without batching gives any number of clients; the 32-client run spreads over the
base and both adapters, so batching per model is measured, not one model's best case.

The mixed case: `--long-requests` of `--long-tokens` each (spread over the three models) in flight, then
`--short-requests` of `--short-tokens` sent one after another, a fixed gap apart whether or not the last
has answered: their p50/p95 latency against the long ones' wall time. A server that runs each batch to
its end answers the short ones only after the long ones; one that batches per step answers them in
about their own number of steps. Only the HTTP API and `server.batcher.batches` are used, so the same
file measures an older checkout too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build(work: Path) -> tuple[str, dict[str, str]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.data.templates import CHATML
    from tunelab.demo.build import build_tiny_model, train_tokenizer

    tok = train_tokenizer([f"sample text {i} about rivers, cities and numbers" for i in range(200)], vocab_size=600)
    tok.chat_template = CHATML
    base = build_tiny_model(work / "base", tok, "qwen2")
    adapters = {}
    for k, name in enumerate(("a", "b")):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
        adapters[name] = str(work / name)
    return str(base), adapters


def ask(url: str, model: str, i: int, max_tokens: int) -> float:
    """One chat completion of exactly `max_tokens` new tokens; its latency in seconds."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me about river {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as reply:
        out = json.loads(reply.read())
    assert out["usage"]["completion_tokens"] == max_tokens, out["usage"]
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[int(q * (len(ordered) - 1))], 3)


def run(url: str, models: list[str], n: int, clients: int, max_tokens: int) -> dict:
    def one(i: int) -> float:
        return ask(url, models[i % len(models)], i, max_tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": n,
        "seconds": round(wall, 3),
        "requests_per_s": round(n / wall, 2),
        "new_tokens_per_s": round(n * max_tokens / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": percentile(latencies, 0.95),
    }


def mixed(url: str, models: list[str], server, args) -> dict:
    """Short requests sent while long ones run: how long each short one waits, against the long ones' time."""
    before = server.batcher.batches
    with ThreadPoolExecutor(args.long_requests + args.short_requests) as pool:
        started = time.perf_counter()
        long = [pool.submit(ask, url, models[i % len(models)], i, args.long_tokens) for i in range(args.long_requests)]
        while server.batcher.batches == before:  # the long ones are generating
            time.sleep(0.005)
        time.sleep(args.short_gap)
        short = []
        for i in range(args.short_requests):
            short.append(pool.submit(ask, url, models[0], 1000 + i, args.short_tokens))
            time.sleep(args.short_gap)
        short_s = [f.result() for f in short]
        for f in long:
            f.result()
        long_wall = time.perf_counter() - started
    return {
        "long_requests": args.long_requests,
        "long_tokens": args.long_tokens,
        "short_requests": args.short_requests,
        "short_tokens": args.short_tokens,
        "short_gap_s": args.short_gap,
        "long_wall_s": round(long_wall, 3),
        "short_latency_p50_s": percentile(short_s, 0.5),
        "short_latency_p95_s": percentile(short_s, 0.95),
        "short_p50_vs_long_wall": round(percentile(short_s, 0.5) / long_wall, 3),
        "batches": server.batcher.batches - before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--long-requests", type=int, default=20)
    parser.add_argument("--long-tokens", type=int, default=400)
    parser.add_argument("--short-requests", type=int, default=8)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--short-gap", type=float, default=0.05, help="seconds between two short requests")
    parser.add_argument("--out", default=str(ROOT / "bench" / "serve.json"))
    args = parser.parse_args(argv)

    import uvicorn

    from tunelab.serve.app import create_app
    from tunelab.serve.run import build_server
    from tunelab.train.launch import free_port

    work = Path(tempfile.mkdtemp(prefix="tunelab-serve-bench-"))
    base, adapters = build(work)
    server = build_server(base, [f"{k}={v}" for k, v in adapters.items()])
    port = free_port()
    live = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=live.run, daemon=True).start()
    while not live.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    models = list(server.models)
    run(url, models, 4, 1, args.max_tokens)  # warm-up
    results = []
    for clients in (1, 32):
        before = server.batcher.batches
        row = run(url, models, args.requests, clients, args.max_tokens)
        row["batches"] = server.batcher.batches - before
        results.append(row)
    behind = mixed(url, models, server, args)
    live.should_exit = True
    one, many = results
    record = {
        "model": "tiny qwen2 (hidden 64, 2 layers, vocab 600), base + 2 LoRA adapters, CPU",
        "max_tokens": args.max_tokens,
        "runs": results,
        "ratios": {
            "requests_per_s_32_vs_1": round(many["requests_per_s"] / one["requests_per_s"], 2),
            "latency_p50_32_vs_1": round(many["latency_p50_s"] / one["latency_p50_s"], 2),
        },
        "short_behind_long": behind,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print("| clients | requests/s | new tokens/s | p50 latency s | p95 latency s | forward batches |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['requests_per_s']} | {r['new_tokens_per_s']} | {r['latency_p50_s']} | "
            f"{r['latency_p95_s']} | {r['batches']} |"
        )
    print(
        f"32 clients vs 1: {record['ratios']['requests_per_s_32_vs_1']}x requests/s, "
        f"{record['ratios']['latency_p50_32_vs_1']}x p50 latency"
    )
    print(
        f"{behind['short_requests']} requests of {behind['short_tokens']} tokens behind {behind['long_requests']} of "
        f"{behind['long_tokens']}: p50 {behind['short_latency_p50_s']} s, p95 {behind['short_latency_p95_s']} s; "
        f"the long ones took {behind['long_wall_s']} s (p50 / long wall: {behind['short_p50_vs_long_wall']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
