"""On a machine with an NVIDIA GPU: the GPU paths that `make test` only proxies on CPU, in a few minutes.

    python scripts/gpu_check.py [--out DIR]

Trains a tiny Qwen2-shaped model (random init, local tokenizer) with LoRA and full fine-tuning in bf16
and fp16, checks that trainable weights stay fp32 and the loss falls, and compares FlashAttention-2 on
packed rows with sdpa (same loss within 1e-3) when flash_attn is installed. Prints one line per check
and a JSON summary; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def tiny_data(folder: Path) -> str:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(64)
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_pairs(folder: Path) -> str:
    rows = [
        {
            "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "chosen": f"It is {2 * i}.",
            "rejected": f"It is {2 * i + 1}.",
        }
        for i in range(64)
    ]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_model(folder: Path) -> str:
    from tunelab.data.templates import CHATML
    from tunelab.demo.build import build_tiny_model, train_tokenizer

    texts = [f"What is {i} plus {i}? It is {2 * i}." for i in range(200)]
    tok = train_tokenizer(texts, vocab_size=800)
    tok.chat_template = CHATML
    return str(build_tiny_model(folder / "model", tok, "qwen2", hidden=256, layers=4, heads=8))


def _run(model: str, data: str, out: Path, **keys) -> dict:
    from tunelab.config import from_dict
    from tunelab.train.run import train

    started = time.perf_counter()
    settings = dict(
        model=model,
        dataset=data,
        output_dir=str(out),
        max_steps=20,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_steps=1000,
        lr_scheduler_type="constant",
    )
    cfg = from_dict({**settings, **keys})  # keys may name another dataset (preference pairs)
    result = train(cfg)
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    return {
        "keys": keys,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": time.perf_counter() - started,
        "masters_fp32": all(p.dtype == torch.float32 for p in trainable),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for runs and gpu_check.json (default: a temp folder)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (make test covers the CPU proxies)")
        return 2
    root = Path(args.out or tempfile.mkdtemp(prefix="tunelab-gpu-"))
    root.mkdir(parents=True, exist_ok=True)
    data, pairs, model = tiny_data(root), tiny_pairs(root), tiny_model(root)
    print(f"device: {torch.cuda.get_device_name()} (compute capability {torch.cuda.get_device_capability()})")
    results, failed = [], 0
    for name, keys in [
        ("lora-bf16", dict(bf16=True)),
        ("lora-fp16", dict(fp16=True)),
        ("full-bf16", dict(finetuning_type="full", bf16=True, learning_rate=1e-4)),
        ("full-fp16", dict(finetuning_type="full", fp16=True, learning_rate=1e-4)),
        ("lora-bf16-sdpa", dict(bf16=True, attn_implementation="sdpa")),
        ("lora-bf16-fa2", dict(bf16=True, attn_implementation="flash_attention_2")),
        # preference training: both sides in one forward, the reference as adapters off / precomputed log-probs
        ("dpo-lora-bf16", dict(bf16=True, stage="dpo", dataset=pairs)),
        (
            "dpo-full-bf16-precomputed",
            dict(
                bf16=True, stage="dpo", dataset=pairs, finetuning_type="full", precompute_ref=True, learning_rate=1e-4
            ),
        ),
        ("kto-lora-bf16", dict(bf16=True, stage="kto", dataset=pairs)),
    ]:
        if name.endswith("fa2"):
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                print(f"skip  {name}: flash_attn is not installed")
                continue
        torch.cuda.reset_peak_memory_stats()
        try:
            row = _run(model, data, root / name, **keys)
            ok = row["masters_fp32"] and row["last_loss"] < row["first_loss"]
        except Exception as exc:  # a check that crashes is a failed check, reported with the others
            row, ok = {"keys": keys, "error": f"{type(exc).__name__}: {exc}"}, False
        row["name"], row["ok"] = name, ok
        failed += not ok
        results.append(row)
        print(f"{'ok' if ok else 'FAIL':4}  {name}: {json.dumps({k: v for k, v in row.items() if k != 'keys'})}")
    by_name = {r["name"]: r for r in results}
    if "lora-bf16-fa2" in by_name and "error" not in by_name["lora-bf16-fa2"]:
        gap = abs(by_name["lora-bf16-fa2"]["first_loss"] - by_name["lora-bf16-sdpa"]["first_loss"])
        same = gap <= 1e-3 * max(1.0, by_name["lora-bf16-sdpa"]["first_loss"])
        failed += not same
        print(f"{'ok' if same else 'FAIL':4}  FlashAttention-2 on packed rows vs sdpa: first-step loss gap {gap:.2e}")
    (root / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(f"{len(results) - failed} of {len(results)} checks passed; details in {root / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
