"""The sharding engines side by side on one machine: plain training, FSDP2 and DeepSpeed ZeRO-2/3.

    python bench/gpu_engines.py [--out DIR] [--steps 12] [--nproc 1]
    python bench/gpu_engines.py --smoke --steps 3   # CPU: LoRA, plain against FSDP2 over 2 processes

On a GPU each engine trains scripts/gpu_check.py's tiny Qwen2-shaped model (random init, local tokenizer), LoRA and
full fine-tuning in bf16, as `--nproc` processes (1 = the engines as one process on one GPU). For each
arm it reports the loss curve's largest difference from plain training (must be within 1e-3), whether
the saved adapter / model reloads whole in peft / transformers with finite logits, the measured peak
GPU memory (rank 0's `torch.cuda.max_memory_allocated`) against what `tunelab estimate` predicts for
that engine, and the wall time. Prints a table and a JSON record; exits non-zero when a check fails.
DeepSpeed arms are skipped (said so) where deepspeed is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_check import tiny_data, tiny_model  # noqa: E402  (the same tiny model and data as the GPU check)

ARMS = {  # name -> config keys
    "plain": {"distributed": "ddp"},
    "fsdp2": {"distributed": "fsdp2"},
    "zero2": {"distributed": "deepspeed", "zero_stage": 2},
    "zero3": {"distributed": "deepspeed", "zero_stage": 3},
}
ESTIMATE_ENGINE = {"plain": "single", "fsdp2": "fsdp2", "zero2": "zero2", "zero3": "zero3"}


def _run(name: str, keys: dict, folder: Path, env: dict) -> dict:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(keys))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(path)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode:
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
            "wall_s": round(wall, 1),
        }
    out = Path(keys["output_dir"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "run_summary.json").read_text())
    return {
        "losses": [r["loss"] for r in rows if "loss" in r],
        "engine": summary.get("engine"),
        "peak_bytes": summary.get("peak_gpu_memory_bytes"),
        "wall_s": round(wall, 1),
        "folder": str(out),
    }


def _reloads_whole(folder: str, base: str, lora: bool) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base if lora else folder, dtype=torch.float32)
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        return bool(torch.isfinite(model(input_ids=ids).logits).all())


def _predicted(keys: dict, arm: str, nproc: int) -> int:
    from tunelab.config import from_dict
    from tunelab.model.estimate import estimate_memory

    engine = ESTIMATE_ENGINE[arm] if nproc > 1 or arm != "plain" else "single"
    return estimate_memory(from_dict(keys), device="cuda", engine=engine, world=nproc).total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=1, help="processes per arm (GPUs)")
    parser.add_argument("--smoke", action="store_true", help="CPU: LoRA, plain and FSDP2 over 2 processes, fp32")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        print("no GPU here: run with --smoke for the CPU check")
        return 2
    folder = Path(args.out or tempfile.mkdtemp(prefix="tunelab-engines-"))
    folder.mkdir(parents=True, exist_ok=True)
    data, model = tiny_data(folder), tiny_model(folder)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
    )
    nproc = 2 if args.smoke else args.nproc
    arms = ["plain", "fsdp2"] if args.smoke else list(ARMS)
    has_ds = importlib.util.find_spec("deepspeed") is not None
    tolerance = 1e-4 if args.smoke else 1e-3
    results, failed = {}, False
    for ft in ("lora",) if args.smoke else ("lora", "full"):
        for arm in arms:
            if arm.startswith("zero") and not has_ds:
                results[f"{ft}/{arm}"] = {"skipped": "deepspeed is not installed"}
                continue
            per_device = 8 // nproc if arm != "plain" else 8
            keys = {
                "model": model,
                "dataset": data,
                "output_dir": str(folder / ft / arm),
                "overwrite_output_dir": True,
                "finetuning_type": ft,
                "max_steps": args.steps,
                "per_device_train_batch_size": per_device,
                "nproc_per_node": 1 if arm == "plain" else nproc,
                "logging_steps": 1,
                "save_steps": 10_000,
                "learning_rate": 1e-3 if ft == "lora" else 1e-4,
                "lr_scheduler_type": "constant",
                "lora_dropout": 0.0,
                "group_by_length": False,
                "seed": 7,
                "cutoff_len": 128,
                "bf16": on_gpu,
                **ARMS[arm],
            }
            got = _run(f"{ft}-{arm}", keys, folder, env)
            if "error" not in got:
                got["predicted_bytes"] = _predicted(keys, arm, keys["nproc_per_node"])
                got["reloads_whole"] = _reloads_whole(got["folder"], model, ft == "lora")
            results[f"{ft}/{arm}"] = got
        plain = results[f"{ft}/plain"].get("losses")
        for arm in arms:
            got = results[f"{ft}/{arm}"]
            if "losses" in got and plain:
                got["max_loss_diff"] = max(abs(a - b) for a, b in zip(got["losses"], plain))
                got["ok"] = (
                    got["max_loss_diff"] <= tolerance and got["reloads_whole"] and len(got["losses"]) == len(plain)
                )
            elif "skipped" not in got:
                got["ok"] = False
            failed |= got.get("ok") is False
    print(
        f"{'arm':<14}{'engine':<10}{'max |loss - plain|':>20}{'whole':>7}{'peak GiB':>10}{'predicted':>11}"
        f"{'wall s':>8}  ok"
    )
    for name, got in results.items():
        if "skipped" in got or "error" in got:
            print(f"{name:<14}{got.get('skipped') or got.get('error')}")
            continue
        peak = got["peak_bytes"] / 2**30 if got.get("peak_bytes") else float("nan")
        print(
            f"{name:<14}{got['engine']:<10}{got.get('max_loss_diff', 0.0):>20.2e}{str(got['reloads_whole']):>7}"
            f"{peak:>10.3f}{got['predicted_bytes'] / 2**30:>11.3f}{got['wall_s']:>8.1f}  {got.get('ok')}"
        )
    record = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "nproc": nproc,
        "steps": args.steps,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "folder"} for k, v in results.items()},
    }
    (folder / "engines.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
