"""bench/serve.py runs end to end and reports both client counts side by side, and short requests behind long."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


def test_the_serving_benchmark_reports_one_and_32_clients(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = ["--long-requests", "3", "--long-tokens", "40", "--short-requests", "2", "--short-tokens", "4"]
    assert bench.main(["--requests", "8", "--max-tokens", "4", *small, "--out", str(tmp_path / "serve.json")]) == 0
    record = json.loads((tmp_path / "serve.json").read_text())
    one, many = record["runs"]
    assert (one["clients"], many["clients"]) == (1, 32) and one["batches"] == 8
    assert many["batches"] < 8 and record["ratios"]["requests_per_s_32_vs_1"] > 0
    behind = record["short_behind_long"]
    assert (behind["long_requests"], behind["short_requests"]) == (3, 2) and behind["batches"] >= 2
    assert 0 < behind["short_latency_p50_s"] <= behind["short_latency_p95_s"] and behind["long_wall_s"] > 0
