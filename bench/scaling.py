"""Training throughput of 1 process against 2 (DDP over gloo) on this machine's cores, same global batch.

    python bench/scaling.py [--steps 12] [--out bench/scaling.json]

Trains the benchmark's real-vocabulary model (built by bench/bench.py under bench/.work/models/real;
run that first) on the first 10 x steps records of its data file (bench/.work/data/all.json) with tunelab,
once with `nproc_per_node: 1` (2 threads) and once
with 2 processes (1 thread each), 10 samples per step either way, and reports trainable tokens/s
(summed over ranks, from metrics.jsonl without the first step), the wall time and the final loss of
each, side by side, with their ratio. On a 2-core CPU this measures what DDP costs over threads; on
GPUs the same command shows scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"


def run(processes: int, steps: int, out: Path) -> dict:
    config = {
        "model": str(WORK / "models" / "real"),
        "dataset": str(WORK / "data" / "all.json"),
        "max_samples": 10 * steps,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "max_steps": steps,
        "per_device_train_batch_size": 10 // processes,
        "nproc_per_node": processes,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "save_steps": 10_000,
        "cutoff_len": 1024,
        "lora_r": 16,
        "lora_alpha": 32,
        "group_by_length": False,
        "seed": 42,
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    if processes == 1:
        env["OMP_NUM_THREADS"] = str(os.cpu_count())
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(path)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{processes} process(es) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["trained_tokens_per_s"] for r in rows if "trained_tokens_per_s" in r][1:]
    summary = json.loads((out / "run_summary.json").read_text())
    return {
        "processes": processes,
        "trainable_tps": statistics.median(rates),
        "wall_seconds": round(wall, 1),
        "final_loss": [r["loss"] for r in rows if "loss" in r][-1],
        "steps": summary["global_step"],
        "tokens_trained_seen": summary["tokens_trained_seen"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default=str(HERE / "scaling.json"))
    args = p.parse_args(argv)
    if not (WORK / "models" / "real" / "config.json").is_file() or not (WORK / "data" / "all.json").is_file():
        raise SystemExit("bench/.work/models/real is missing: run bench/bench.py once first")
    one, two = (run(n, args.steps, WORK / "runs" / f"scaling-{n}") for n in (1, 2))
    result = {
        "command": " ".join(["python bench/scaling.py", *(sys.argv[1:] if argv is None else argv)]),
        "cpus": os.cpu_count(),
        "runs": [one, two],
        "two_over_one_trainable_tps": two["trainable_tps"] / one["trainable_tps"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| processes | trainable tok/s | wall s | final loss | trained tokens |\n|---|---|---|---|---|")
    for r in (one, two):
        print(
            f"| {r['processes']} | {r['trainable_tps']:.1f} | {r['wall_seconds']} | {r['final_loss']:.4f} "
            f"| {r['tokens_trained_seen']:,} |"
        )
    print(f"\n2 processes / 1: {result['two_over_one_trainable_tps']:.2f}x trainable tokens/s; wrote {args.out}")


if __name__ == "__main__":
    main()
