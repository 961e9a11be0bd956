"""Serving throughput and latency: 1 client against 32 concurrent ones, on one `tunelab serve` process.

    python bench/serve.py [--requests 64] [--max-tokens 32] [--out bench/serve.json]

A tiny Qwen2 (the tests' shape: hidden 64, 2 layers) with a base and two LoRA adapters behind the
real server on 127.0.0.1; every request asks for exactly `--max-tokens` new tokens (`ignore_eos`), so
both runs generate the same work. Reported side by side: requests/s, new tokens/s, p50 and p95
latency per request, the forward-pass batches the server ran, and the ratios. One client at a time
is what a server without batching gives any number of clients; the 32-client run spreads over the
base and both adapters, so batching per model is measured, not one model's best case.
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


def run(url: str, models: list[str], n: int, clients: int, max_tokens: int) -> dict:
    def one(i: int) -> float:
        body = {
            "model": models[i % len(models)],
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
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
