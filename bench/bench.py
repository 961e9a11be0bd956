"""Training throughput benchmark: the usual recipe (a), TRL's SFTTrainer (b) and tunelab's default (c).

    python bench/bench.py [--quick] [--steps N] [--precision fp32,bf16] [--out bench/results.json]

Every arm trains the same saved tiny Qwen2 model (same weights, same LoRA r16 on all linear layers,
AdamW at one constant learning rate, sdpa) on the same samples for one epoch, each in its own
process, arms interleaved, at each precision asked (every arm at the same precision):

- fp32: weights and compute in fp32.
- bf16: mixed precision as tunelab's `bf16: true` runs it on a CPU with bf16 (AVX512-BF16 / AMX):
  the frozen base loaded in bf16, LoRA adapters in fp32 (peft's default), the forward under
  `torch.autocast("cpu", bfloat16)` (Trainer `bf16=True`). The held-out loss runs under the same
  autocast. Every arm's run records what its projections actually ran in, and the bench checks it.

Two models: the real Qwen2.5 vocabulary (151,665 rows in the head) and a small vocabulary, which
leaves the decoder body as the main cost. Prints a table per model and precision, the ratios against
the targets and, with both precisions, bf16 against fp32 per arm; writes them to --out (the headline
precision, fp32 when run, at the top level as before; the others under "precisions"). Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2.5-instruct"
ALPACA = SHARED / "datasets" / "llama-factory" / "alpaca_en_demo.json"
WORK = HERE / ".work"
ARMS = ("a", "b", "c")
ARM_NAMES = {
    "a": "usual recipe (Trainer + Seq2Seq padding + model loss)",
    "b": "TRL SFTTrainer (bfd packing, completion-only, nll)",
    "c": "tunelab default (train(cfg))",
}
PRECISIONS = ("fp32", "bf16")
PRECISION_POLICY = {
    "fp32": "fp32 weights and compute",
    "bf16": "frozen base weights bf16, LoRA adapters fp32, forward under torch.autocast('cpu', bfloat16) "
    "(Trainer bf16=True; tunelab bf16: true)",
}
QWEN_VOCAB = 151_665
SMALL_VOCAB = 4096
SEED = 42

TARGETS = {  # key: (description, target, higher is better)
    "c_over_a_trainable_tps": ("trainable tokens/s, c / a", 3.0, True),
    "c_over_b_trainable_tps": ("trainable tokens/s, c / b", 1.5, True),
    "c_over_a_peak_mem": ("peak RSS, c / a", 0.5, False),
    "tokenization_speedup_c_over_a": ("tokenization speed, c / a (cold, all records)", 5.0, True),
    "eval_loss_rel_diff_c_vs_a": ("held-out loss, relative difference c vs a at equal trained tokens", 0.01, False),
}
CROSS_TARGETS = {  # bf16 against fp32, same arm; target None = for information
    "c_bf16_over_fp32_trainable_tps": ("trainable tokens/s of c, bf16 / fp32", None, True),
    "eval_loss_rel_diff_c_bf16_vs_fp32": ("held-out loss of c, relative difference bf16 vs fp32", 0.01, False),
}


# ---------------------------------------------------------------- data


def synthetic_records(n: int, seed: int) -> list[dict]:
    """Alpaca-shaped records with long-tailed lengths, for machines without ../shared."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vi", "dor", "pa", "ne", "qu", "is", "ta", "be", "gro", "shi"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]

    def text(n_words: int) -> str:
        out = []
        for i in range(n_words):
            w = rng.choice(words)
            out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
            if rng.random() < 0.08:
                out[-1] += "."
        return " ".join(out) + "."

    records = []
    for _ in range(n):
        instruction = text(max(3, int(rng.lognormvariate(2.6, 0.5))))
        context = text(int(rng.lognormvariate(3.0, 0.7))) if rng.random() < 0.35 else ""
        output = text(max(2, min(600, int(rng.lognormvariate(4.2, 0.9)))))
        records.append({"instruction": instruction, "input": context, "output": output})
    return records


def load_records(n_train: int, n_eval: int) -> tuple[list[dict], list[dict], list[dict], str]:
    if ALPACA.is_file():
        records, source = json.loads(ALPACA.read_text(encoding="utf-8")), str(ALPACA)
    else:
        records, source = synthetic_records(1000, SEED), "generated (alpaca_en_demo.json not found)"
    records = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in records]
    random.Random(SEED).shuffle(records)
    if n_train + n_eval > len(records):
        raise SystemExit(f"{n_train} train + {n_eval} held-out samples asked, the data has {len(records)}")
    return records[n_eval : n_eval + n_train], records[:n_eval], records, source


# ---------------------------------------------------------------- models


def qwen_template() -> str:
    from tunelab.data.templates import CHATML

    config = QWEN_TOKENIZER / "tokenizer_config.json"
    return json.loads(config.read_text())["chat_template"] if config.is_file() else CHATML


def local_tokenizer(texts: list[str], vocab_size: int):
    from tunelab.demo.build import train_tokenizer

    tok = train_tokenizer(texts, vocab_size=vocab_size)
    tok.chat_template = qwen_template()
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def build_model(name: str, texts: list[str]) -> tuple[Path, dict]:
    """The saved model folder of `name` ('real' or 'small'), built once and reused while its recipe holds.

    'real': Qwen2.5's tokenizer from ../shared when present, else a byte-level BPE trained here; the
    model's vocabulary is Qwen2.5's 151,665 rows either way. 'small': a 4,096-token BPE trained here.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunelab.demo.build import tiny_config

    shared_tok = name == "real" and (QWEN_TOKENIZER / "vocab.json").is_file()
    local_size = 8000 if name == "real" else SMALL_VOCAB
    recipe = {
        "name": name,
        "arch": "qwen2",
        "hidden": 256,
        "layers": 4,
        "heads": 4,
        "seed": 0,
        "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16],
        "tokenizer": str(QWEN_TOKENIZER) if shared_tok else f"byte-level BPE of {local_size} tokens trained here",
        "template": qwen_template(),
    }
    out = WORK / "models" / name
    stamp = out / "bench_recipe.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == recipe and (out / "model.safetensors").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(QWEN_TOKENIZER) if shared_tok else local_tokenizer(texts, local_size)
        vocab = QWEN_VOCAB if name == "real" else len(tok)
        config = tiny_config("qwen2", vocab_size=vocab, hidden=256, layers=4, heads=4, max_position_embeddings=4096)
        config.eos_token_id, config.pad_token_id, config.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
        torch.manual_seed(recipe["seed"])
        model = AutoModelForCausalLM.from_config(config)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        stamp.write_text(json.dumps(recipe))
    return out, {**recipe, "vocab": AutoConfig.from_pretrained(out).vocab_size}


def encode(tokenizer, record: dict, cutoff: int) -> dict:
    """Prompt rendered by the chat template, response + end-of-turn trained: what every arm trains on."""
    user = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"ids": (p + r)[:cutoff], "labels": ([-100] * len(p) + r)[:cutoff]}


# ---------------------------------------------------------------- running arms


def machine_busy(seconds: float = 2.0) -> float | None:
    """Share of the machine's CPUs in use over `seconds` while this process sleeps (other processes)."""
    from arms import busy_cpu_seconds

    before = busy_cpu_seconds()
    time.sleep(seconds)
    after = busy_cpu_seconds()
    return None if before is None else (after - before) / (seconds * os.cpu_count())


def wait_until_quiet(limit: float) -> float | None:
    """Wait up to `limit` seconds for other processes to leave the CPUs alone; return the last reading."""
    deadline = time.perf_counter() + limit
    busy = machine_busy()
    if busy is not None and busy > 0.15 and limit > 0:
        print(f"  other processes use {100 * busy:.0f}% of the CPUs; waiting up to {limit:.0f}s", flush=True)
        while busy > 0.15 and time.perf_counter() < deadline:
            busy = machine_busy(5.0)
    return busy


def run_arm(spec: dict, env: dict, log_dir: Path, quiet_wait: float = 0.0) -> dict:
    tag = f"{spec['model_name']}-{spec['precision']}-{spec['arm']}" + (
        f"-{spec['profile_arm']}"
        if spec["arm"] == "profile"
        else f"-tok-{spec['prep_label']}"
        if spec["prep_only"]
        else f"-r{spec['round']}"
    )
    spec_path, out_path, log_path = log_dir / f"{tag}.spec.json", log_dir / f"{tag}.result.json", log_dir / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    busy_before = wait_until_quiet(quiet_wait)
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(HERE / "arms.py"), str(spec_path), str(out_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"arm {tag} failed (exit {proc.returncode}); last lines of {log_path}:\n" + "\n".join(tail))
    result = json.loads(out_path.read_text())
    if spec["arm"] == "c":
        check_labelled_loss(result, tag)
        if not spec["prep_only"]:
            check_tunelab_dtype(result, spec["precision"], tag)
    if "precision_seen" in result:
        check_precision(result["precision_seen"], spec["precision"], tag)
    result["log"] = str(log_path.relative_to(ROOT))
    result["machine_busy_before"] = busy_before
    if "profile" in result:
        for arm, p in result["profile"]["arms"].items():
            print(
                f"  {tag:<19} {p['positions']:>5} positions, step {p['step_seconds']:.2f}s = body "
                f"{p['body_seconds']:.2f}s + head and loss {p['head_and_loss_seconds']:.2f}s "
                f"(kernel {p['sys_seconds_per_step']:.2f}s)",
                flush=True,
            )
    elif spec["prep_only"]:
        print(
            f"  {tag:<19} data prep {result['tokenize_seconds']:.2f}s  ({time.perf_counter() - started:.0f}s)",
            flush=True,
        )
    else:
        print(
            f"  {tag:<19} {result['steps']:>3} steps  {result['trainable_tps']:8.1f} trainable tok/s  "
            f"pad {100 * result['padding_share']:4.1f}%  cpu {100 * result['cpu_utilization']:3.0f}%  "
            f"others {fmt(result.get('others_cpu_share'), '.0f', 100, '%')}  "
            f"peak {result['peak_rss_bytes'] / 2**30:5.2f} GiB  "
            f"eval loss {result['final_eval_loss']:.4f}  ({time.perf_counter() - started:.0f}s)",
            flush=True,
        )
    return result


def check_labelled_loss(result: dict, tag: str) -> None:
    """Arm c must have trained with tunelab's labelled-position loss (`labelled_loss` of its run summary)."""
    if "labelled_loss" not in result:
        raise KeyError(
            f"arm {tag}: no 'labelled_loss' in its result (read from tunelab's run_summary.json): "
            "tunelab's run summary changed, update bench/arms.py"
        )
    if result["labelled_loss"] is not True:
        raise SystemExit(
            f"arm {tag}: tunelab trained without its labelled-position loss (labelled_loss = "
            f"{result['labelled_loss']!r} in its run summary): arm c does not measure tunelab's default"
        )


EXPECTED = {  # precision -> what the hooked projection must show (see Meter.watch_precision in arms.py)
    "fp32": {
        "base_weight_dtype": "float32",
        "adapter_weight_dtype": "float32",
        "autocast": None,
        "output_dtype": "float32",
    },
    "bf16": {
        "base_weight_dtype": "bfloat16",
        "adapter_weight_dtype": "float32",
        "autocast": "bfloat16",
        "output_dtype": "bfloat16",
    },
}


def check_precision(seen: dict, precision: str, tag: str) -> None:
    """Fail the bench when an arm did not run at `precision`: weights, autocast and matmul dtype, in
    training and in the held-out evaluation."""
    want = EXPECTED[precision]
    problems = [
        f"{k} {seen.get(k)!r}, expected {want[k]!r}"
        for k in ("base_weight_dtype", "adapter_weight_dtype")
        if seen.get(k) != want[k]
    ]
    for phase in ("train", "eval"):
        ran = seen.get(f"{phase}_matmul")
        if ran is None:
            problems.append(f"no {phase} forward seen")
            continue
        problems += [
            f"{phase}: {k} {ran.get(k)!r}, expected {want[k]!r}"
            for k in ("autocast", "output_dtype")
            if ran.get(k) != want[k]
        ]
    if problems:
        raise SystemExit(
            f"arm {tag} did not run at {precision} ({PRECISION_POLICY[precision]}): " + "; ".join(problems)
        )


def check_tunelab_dtype(result: dict, precision: str, tag: str) -> None:
    """tunelab's own record of its compute dtype (`dtype` of its run summary) must be the bench's precision."""
    dtype = result.get("run_summary", {}).get("dtype")
    want = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    if dtype != want:
        raise SystemExit(f"arm {tag}: tunelab trained in {dtype!r} (run summary), the bench asked {precision}")


def time_to_loss(curve: list[dict], target: float) -> float | None:
    """Training-clock seconds at which the held-out loss first reaches `target` (linear between evaluations)."""
    for prev, cur in zip([None] + curve[:-1], curve):
        if cur["loss"] <= target + 1e-12:
            if prev is None or prev["loss"] == cur["loss"]:
                return cur["clock"]
            frac = (prev["loss"] - target) / (prev["loss"] - cur["loss"])
            return prev["clock"] + frac * (cur["clock"] - prev["clock"])
    return None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(runs: list[dict], target_loss: float) -> dict:
    first = runs[0]
    for r in runs:
        r["time_to_target_loss"] = time_to_loss(r["eval_curve"], target_loss)
    keys = (
        "trainable_tps",
        "total_tps",
        "padding_share",
        "peak_rss_bytes",
        "train_peak_rss_bytes",
        "final_eval_loss",
        "time_to_target_loss",
        "train_seconds",
        "cpu_utilization",
        "others_cpu_share",
    )
    out = {k: median([r.get(k) for r in runs]) for k in keys}
    out.update(
        {
            k: first[k]
            for k in (
                "steps",
                "trained_tokens",
                "real_tokens",
                "positions",
                "rows",
                "trained_tokens_per_step",
                "first_batch",
                "lora",
            )
        }
    )
    out["tokenize_seconds"] = first.get("tokenize_seconds")  # the first run of the arm: a cold one
    out["tokenizer"] = first.get("tokenizer")
    out["rounds"] = len(runs)
    out["trainable_tps_rounds"] = [r["trainable_tps"] for r in runs]
    for extra in ("labelled_loss", "run_summary", "precision", "precision_seen"):
        if extra in first:
            out[extra] = first[extra]
    return out


def ratio(x, y):
    return x / y if x is not None and y else None


# ---------------------------------------------------------------- report


def fmt(value, spec=".1f", scale=1.0, suffix=""):
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def table(model: dict) -> str:
    arms = model["arms"]
    target = model["target_eval_loss"]
    head = (
        "| arm | steps | trained tokens (per step) | trainable tok/s | total tok/s | padding | CPU busy | peak RSS "
        f"| tokenization (train set, cold) | final eval loss | time to eval loss {target:.4f} |"
    )
    lines = [head, "|" + "---|" * 11]
    for arm, m in arms.items():
        lines.append(
            f"| {arm}: {ARM_NAMES[arm]} | {m['steps']} | {m['trained_tokens']:,} ({m['trained_tokens_per_step']:.0f}) "
            f"| {fmt(m['trainable_tps'])} | {fmt(m['total_tps'])} | {fmt(m['padding_share'], '.1f', 100, '%')} "
            f"| {fmt(m['cpu_utilization'], '.0f', 100, '%')} "
            f"| {fmt(m['peak_rss_bytes'], '.2f', 2**-30, ' GiB')} "
            f"| {fmt(m['tokenize_seconds'], '.2f', 1, ' s')} "
            f"| {fmt(m['final_eval_loss'], '.4f')} | {fmt(m['time_to_target_loss'], '.1f', 1, ' s')} |"
        )
    return "\n".join(lines)


def ratios_table(results: dict, targets: dict | None = None, tokenization: bool = True) -> str:
    """The ratios of `targets` (TARGETS by default) found in `results`, against their targets; keys that
    need the data-preparation runs are left out when `tokenization` is false (precisions other than the
    headline's, which do not repeat them)."""
    lines = ["| metric | value | target | met |", "|---|---|---|---|"]
    for key, (desc, target, higher) in (targets or TARGETS).items():
        if not tokenization and key.startswith("tokenization"):
            continue
        value = results.get(key)
        op = ">=" if higher else "<="
        if target is None:
            lines.append(f"| {desc} (`{key}`) | {fmt(value, '.2f')} | (info) | |")
            continue
        met = None if value is None else (value >= target if higher else value <= target)
        lines.append(
            f"| {desc} (`{key}`) | {fmt(value, '.3f' if key.startswith('eval') else '.2f')} "
            f"| {op} {target} | {'n/a' if met is None else 'yes' if met else 'NO'} |"
        )
    if not tokenization:
        return "\n".join(lines)
    warm = results.get("tokenization_warm_c_seconds")
    lines.append(
        f"| tokenization, warm re-run of c, seconds (`tokenization_warm_c_seconds`) | {fmt(warm, '.3f')} "
        f"| near 0 | {'n/a' if warm is None else 'yes' if warm < 0.5 else 'NO'} |"
    )
    lines.append(
        f"| tokenization speed, c / a (warm re-run) (`tokenization_warm_speedup_c_over_a`) "
        f"| {fmt(results.get('tokenization_warm_speedup_c_over_a'), '.2f')} | (info) | |"
    )
    return "\n".join(lines)


TOKENIZATION_WHAT = {
    "a": "pandas.read_json + Dataset.from_pandas + map(per-example prompt/response tokenization)",
    "b": "Dataset.from_list + SFTTrainer._prepare_dataset (template, tokenization, labels, bfd packing)",
    "c": "tunelab data_seconds of run_summary.json (read, template, tokenization, label masks; tokenization cache)",
}


def tokenization_table(tok: dict) -> str:
    lines = [
        f"{tok['records']} records of {tok['source']}, each arm in a fresh process, best of "
        f"{len(next(iter(tok['arms'].values())).get('cold_runs', [0]))}; cold = empty caches, "
        "warm = the same command again\n",
        "| arm | what is timed | cold | warm re-run | speed c vs this arm, cold / warm |",
        "|---|---|---|---|---|",
    ]
    c = tok["arms"]["c"]
    for arm, t in tok["arms"].items():
        lines.append(
            f"| {arm} | {TOKENIZATION_WHAT[arm]} | {t['cold']:.2f} s | {t['warm']:.2f} s "
            f"| {fmt(ratio(t['cold'], c['cold']), '.1f', 1, 'x')} "
            f"/ {fmt(ratio(t['warm'], c['warm']), '.1f', 1, 'x')} |"
        )
    return "\n".join(lines)


def cross_precision(fp32: dict, bf16: dict) -> dict:
    """bf16 against fp32 for each arm of one model (the aggregated medians of each precision)."""
    out = {}
    for arm in ARMS:
        f, b = fp32["arms"][arm], bf16["arms"][arm]
        out[arm] = {
            "fp32_trainable_tps": f["trainable_tps"],
            "bf16_trainable_tps": b["trainable_tps"],
            "bf16_over_fp32_trainable_tps": ratio(b["trainable_tps"], f["trainable_tps"]),
            "fp32_final_eval_loss": f["final_eval_loss"],
            "bf16_final_eval_loss": b["final_eval_loss"],
            "eval_loss_rel_diff_bf16_vs_fp32": abs(b["final_eval_loss"] - f["final_eval_loss"]) / f["final_eval_loss"],
            "fp32_peak_rss_bytes": f["peak_rss_bytes"],
            "bf16_peak_rss_bytes": b["peak_rss_bytes"],
            "bf16_over_fp32_peak_mem": ratio(b["peak_rss_bytes"], f["peak_rss_bytes"]),
        }
    return out


def cross_table(cross: dict) -> str:
    lines = [
        "| arm | trainable tok/s fp32 | trainable tok/s bf16 | bf16 / fp32 | final eval loss fp32 "
        "| final eval loss bf16 | relative difference | peak RSS fp32 / bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, x in cross.items():
        lines.append(
            f"| {arm}: {ARM_NAMES[arm]} | {fmt(x['fp32_trainable_tps'])} | {fmt(x['bf16_trainable_tps'])} "
            f"| {fmt(x['bf16_over_fp32_trainable_tps'], '.2f', 1, 'x')} "
            f"| {fmt(x['fp32_final_eval_loss'], '.4f')} | {fmt(x['bf16_final_eval_loss'], '.4f')} "
            f"| {fmt(x['eval_loss_rel_diff_bf16_vs_fp32'], '.2f', 100, '%')} "
            f"| {fmt(x['fp32_peak_rss_bytes'], '.2f', 2**-30)} / "
            f"{fmt(x['bf16_peak_rss_bytes'], '.2f', 2**-30, ' GiB')} |"
        )
    return "\n".join(lines)


def profile_table(profile: dict) -> str:
    lines = [
        f"{profile['samples']} samples (c: {profile['packed_rows']} packed rows); best of 2 after a warm-up\n",
        "| arm | positions (real, trained) | step s | body s | head + loss s | head + loss ms per head row "
        "| kernel CPU s (page faults) | page faults |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, p in profile["arms"].items():
        head_positions = p["trained_tokens"] if arm == "c" else p["positions"]
        lines.append(
            f"| {arm} | {p['positions']:,} ({p['real_tokens']:,}, {p['trained_tokens']:,}) "
            f"| {p['step_seconds']:.2f} "
            f"| {p['body_seconds']:.2f} | {p['head_and_loss_seconds']:.2f} "
            f"| {1000 * p['head_and_loss_seconds'] / max(head_positions, 1):.2f} "
            f"| {p['sys_seconds_per_step']:.2f} | {p['page_faults_per_step']:,.0f} |"
        )
    if profile.get("matmul_gflops"):
        mm = ", ".join(f"{k}: {v:.0f} GFLOP/s" for k, v in profile["matmul_gflops"].items())
        lines.append(f"\nmatmul on this machine (plain tensors of that dtype): {mm}.")
    return "\n".join(lines)


def machine() -> dict:
    import importlib.metadata as md

    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor()
    )
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "datasets", "tokenizers", "accelerate", "tunelab"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "tunelab_commit": git("rev-parse", "--short", "HEAD"),
        "tunelab_src_modified": bool(git("status", "--porcelain", "--", "src")),
    }


# ---------------------------------------------------------------- main

HELDOUT_NOTE = (
    "Held-out loss: bench/arms.py `heldout_loss`, the same code for every arm, the mean cross-entropy "
    "over the labelled tokens of the held-out samples, one sample at a time, run under the autocast of "
    "training at that precision (bf16: torch.autocast('cpu', bfloat16) over body and head, logits cast "
    "to fp32 before the cross-entropy; fp32: no autocast)."
)


def parse_precisions(text: str) -> list[str]:
    found = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in found if p not in PRECISIONS]
    if unknown or not found:
        raise SystemExit(f"--precision {text!r}: expected a comma list of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(found))


def precision_seen_line(arms: dict) -> str:
    """What the arms' hooked decoder projection ran in (the same for every arm, or the bench stopped)."""
    seen = {json.dumps(m.get("precision_seen"), sort_keys=True) for m in arms.values()}
    first = next(iter(arms.values())).get("precision_seen") or {}
    if not first:
        return "n/a"
    train, evaluation = first.get("train_matmul", {}), first.get("eval_matmul", {})
    return (
        f"base weights {first.get('base_weight_dtype')}, LoRA adapters {first.get('adapter_weight_dtype')}, "
        f"autocast {train.get('autocast') or 'off'} in training and {evaluation.get('autocast') or 'off'} "
        f"in the held-out loss, projection outputs {train.get('output_dtype')}"
        + ("" if len(seen) == 1 else " (NOT the same in every arm)")
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, one round, small eval set")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of arm a (default 12; quick 3)")
    p.add_argument("--samples-per-step", type=int, default=None, help="samples per step of arm a (default 10)")
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=None, help="held-out samples (default 24; quick 6)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of a, b, c on the real-vocab model (default 1)")
    p.add_argument("--small-rounds", type=int, default=None, help="rounds on the small-vocab model (default 2)")
    p.add_argument("--models", default="real,small", help="comma list of real, small")
    p.add_argument(
        "--precision",
        default="fp32,bf16",
        help="comma list of fp32, bf16: every arm runs at each (default fp32,bf16, quick too); "
        "bf16 = base weights bf16, LoRA adapters fp32, forward under CPU autocast bf16",
    )
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip timing one step's body and head separately (skipped by --quick)",
    )
    p.add_argument(
        "--prep-repeats",
        type=int,
        default=None,
        help="cold + warm data-preparation runs per arm; the best of each is reported (default 3; quick 1)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each arm, wait up to this many seconds for other processes to leave the CPUs idle",
    )
    p.add_argument("--out", default=str(HERE / "results.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    quick = args.quick
    args.profile = args.profile and not quick
    steps = args.steps or (3 if quick else 12)
    per_step = args.samples_per_step or (4 if quick else 10)
    n_eval = args.eval_samples or (6 if quick else 24)
    args.prep_repeats = args.prep_repeats or (1 if quick else 3)
    rounds = {"real": args.rounds or 1, "small": args.small_rounds or (1 if quick else 2)}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = parse_precisions(args.precision)
    fractions = [1.0] if quick else [0.25, 0.5, 0.75, 1.0]
    started = time.perf_counter()

    from transformers import AutoTokenizer

    from tunelab.data.packing import best_fit

    train, held_out, everything, source = load_records(steps * per_step, n_eval)
    data_dir, log_dir = WORK / "data", WORK / "logs"
    shutil.rmtree(WORK / "cache", ignore_errors=True)  # the first run of every arm is a cold one
    shutil.rmtree(log_dir, ignore_errors=True)
    for d in (data_dir, log_dir):
        d.mkdir(parents=True, exist_ok=True)
    train_file, all_file = data_dir / "train.json", data_dir / "all.json"
    train_file.write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    all_file.write_text(json.dumps(everything, ensure_ascii=False), encoding="utf-8")
    texts = [r[k] for r in everything for k in ("instruction", "input", "output") if r[k]]  # local tokenizers

    env = dict(
        os.environ,
        TUNELAB_CACHE=str(WORK / "cache" / "tunelab"),
        HF_DATASETS_CACHE=str(WORK / "cache" / "datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    print(f"data: {len(train)} train / {len(held_out)} held-out samples from {source}", flush=True)

    plans = {}
    for name in models:
        folder, recipe = build_model(name, texts)
        tok = AutoTokenizer.from_pretrained(folder)
        encoded = [encode(tok, r, args.cutoff_len) for r in train]
        lengths = [min(len(e["ids"]) + 1, args.cutoff_len) for e in encoded]  # + the newline after end-of-turn
        bins = len(best_fit(lengths, args.cutoff_len))
        steps_a = math.ceil(len(train) / per_step)
        plans[name] = {
            "folder": folder,
            "recipe": {k: v for k, v in recipe.items() if k != "template"},
            "eval_samples": [encode(tok, r, args.cutoff_len) for r in held_out],
            "pad_id": tok.pad_token_id,
            "packed_rows": bins,
            "rows_per_step": max(1, round(bins / steps_a)),
            "mean_length": sum(lengths) / len(lengths),
            "profile_samples": encoded[:per_step],
        }
        print(
            f"model {name}: vocab {recipe['vocab']:,}, {folder.relative_to(ROOT)}; samples average "
            f"{plans[name]['mean_length']:.0f} tokens, {bins} packed rows of {args.cutoff_len} -> "
            f"{plans[name]['rows_per_step']} rows per step for b",
            flush=True,
        )

    base = {
        "cutoff_len": args.cutoff_len,
        "samples_per_step": per_step,
        "learning_rate": args.learning_rate,
        "seed": SEED,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "eval_fractions": fractions,
        "train_file": str(train_file),
    }

    def spec(name, arm, round_, precision, prep_label=None):
        p = plans[name]
        return {
            **base,
            "arm": arm,
            "model_name": name,
            "model": str(p["folder"]),
            "round": round_,
            "precision": precision,
            "prep_only": prep_label is not None,
            "prep_label": prep_label,
            "rows_per_step": p["rows_per_step"],
            "pad_id": p["pad_id"],
            "eval_samples": p["eval_samples"],
            "output_dir": str(WORK / "runs" / f"{name}-{precision}-{arm}-{prep_label or round_}"),
        }

    runs = {prec: {name: {arm: [] for arm in ARMS} for name in models} for prec in precisions}
    profiles = {prec: {} for prec in precisions}
    headline = "real" if "real" in models else models[0]
    lead = "fp32" if "fp32" in precisions else precisions[0]  # the precision at the top level of the results
    tokenization = {
        "records": len(everything),
        "source": source,
        "model": headline,
        "precision": lead,
        "arms": {arm: {} for arm in ARMS},
    }
    for name in models:
        print(f"[{name}] training at {', '.join(precisions)}, arms interleaved:", flush=True)
        for r in range(1, rounds[name] + 1):
            for prec in precisions:
                for arm in ARMS:
                    runs[prec][name][arm].append(run_arm(spec(name, arm, r, prec), env, log_dir, args.quiet_wait))
        if name == headline:
            print(
                f"[{name}] data preparation of all {len(everything)} records, cold then warm, "
                f"best of {args.prep_repeats} ({lead}; it does not depend on the precision):",
                flush=True,
            )
            for _ in range(args.prep_repeats):
                shutil.rmtree(WORK / "cache", ignore_errors=True)  # every arm's data caches: cold again
                for label in ("cold", "warm"):
                    for arm in ARMS:
                        run = run_arm(
                            {**spec(name, arm, None, lead, label), "train_file": str(all_file)},
                            env,
                            log_dir,
                            args.quiet_wait,
                        )
                        tokenization["arms"][arm].setdefault(f"{label}_runs", []).append(run["tokenize_seconds"])
            for arm in ARMS:
                t = tokenization["arms"][arm]
                t["cold"], t["warm"] = min(t["cold_runs"]), min(t["warm_runs"])
        if name == "real" and args.profile:
            print(f"[{name}] one step's batch per arm, body vs head + loss, at {', '.join(precisions)}:", flush=True)
            for arm in ARMS:
                for prec in precisions:
                    found = run_arm(
                        {
                            **spec(name, "profile", None, prec),
                            "profile_arm": arm,
                            "profile_samples": plans[name]["profile_samples"],
                            "matmul_gflops": arm == ARMS[0],
                        },
                        env,
                        log_dir,
                        args.quiet_wait,
                    )
                    if name in profiles[prec]:
                        profiles[prec][name]["arms"].update(found["profile"]["arms"])
                    else:
                        profiles[prec][name] = found["profile"]

    def summarise(prec: str) -> dict:
        """The models' tables and ratios at one precision, and its TARGETS at the top."""
        block = {"precision": prec, "precision_policy": PRECISION_POLICY[prec], "models": {}}
        for name in models:
            finals = [runs[prec][name][arm][0]["final_eval_loss"] for arm in ARMS]
            target_loss = max(finals)
            arms = {arm: aggregate(runs[prec][name][arm], target_loss) for arm in ARMS}
            a, b, c = arms["a"], arms["b"], arms["c"]
            block["models"][name] = {
                "recipe": plans[name]["recipe"],
                "rows_per_step": plans[name]["rows_per_step"],
                "packed_rows_planned": plans[name]["packed_rows"],
                "target_eval_loss": target_loss,
                "arms": arms,
                "profile": profiles[prec].get(name),
                "runs": runs[prec][name],
                "ratios": {
                    "c_over_a_trainable_tps": ratio(c["trainable_tps"], a["trainable_tps"]),
                    "c_over_b_trainable_tps": ratio(c["trainable_tps"], b["trainable_tps"]),
                    "c_over_a_total_tps": ratio(c["total_tps"], a["total_tps"]),
                    "c_over_b_total_tps": ratio(c["total_tps"], b["total_tps"]),
                    "c_over_a_peak_mem": ratio(c["peak_rss_bytes"], a["peak_rss_bytes"]),
                    "c_over_b_peak_mem": ratio(c["peak_rss_bytes"], b["peak_rss_bytes"]),
                    "tokenization_speedup_c_over_a_train_set": ratio(a["tokenize_seconds"], c["tokenize_seconds"]),
                    "tokenization_speedup_c_over_b_train_set": ratio(b["tokenize_seconds"], c["tokenize_seconds"]),
                    "eval_loss_rel_diff_c_vs_a": abs(c["final_eval_loss"] - a["final_eval_loss"])
                    / a["final_eval_loss"],
                    "time_to_target_loss_a_over_c": ratio(a["time_to_target_loss"], c["time_to_target_loss"]),
                    "time_to_target_loss_b_over_c": ratio(b["time_to_target_loss"], c["time_to_target_loss"]),
                },
            }
        block.update(
            {k: block["models"][headline]["ratios"].get(k) for k in TARGETS if not k.startswith("tokenization")}
        )  # data preparation: at the top level only
        return block

    blocks = {prec: summarise(prec) for prec in precisions}
    results = {
        "command": " ".join(["python bench/bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "data": source,
        "settings": {
            **{k: v for k, v in base.items() if k != "train_file"},
            "train_samples": len(train),
            "eval_samples": len(held_out),
            "rounds": rounds,
            "quick": quick,
            "optimizer": "adamw_torch, constant lr, no warmup, no weight decay, max_grad_norm 1",
            "precision": lead,
            "precisions": precisions,
            "precision_policy": {p: PRECISION_POLICY[p] for p in precisions},
            "heldout_loss": HELDOUT_NOTE,
            "attention": "sdpa",
            "gradient_checkpointing": False,
            "lora_targets": "q,k,v,o,gate,up,down (all linear layers of the decoder)",
        },
        "models": blocks[lead]["models"],
    }
    results["headline_model"] = headline
    ta, tc = tokenization["arms"]["a"], tokenization["arms"]["c"]
    results["tokenization"] = tokenization
    results["models"][headline]["ratios"].update(
        {
            "tokenization_speedup_c_over_a": ratio(ta["cold"], tc["cold"]),
            "tokenization_warm_speedup_c_over_a": ratio(ta["warm"], tc["warm"]),
        }
    )
    results.update({k: results["models"][headline]["ratios"][k] for k in TARGETS})
    results["tokenization_warm_speedup_c_over_a"] = ratio(ta["warm"], tc["warm"])
    results["tokenization_warm_c_seconds"] = tc["warm"]
    # the other precisions, each with the same shape as the top level's models and TARGETS keys
    results["precisions"] = {prec: block for prec, block in blocks.items() if prec != lead}
    if "fp32" in blocks and "bf16" in blocks:
        cross = {
            name: cross_precision(blocks["fp32"]["models"][name], blocks["bf16"]["models"][name]) for name in models
        }
        results["cross_precision"] = {"models": cross}
        hc = cross[headline]["c"]
        results["cross_precision"].update(
            {
                "c_bf16_over_fp32_trainable_tps": hc["bf16_over_fp32_trainable_tps"],
                "eval_loss_rel_diff_c_bf16_vs_fp32": hc["eval_loss_rel_diff_bf16_vs_fp32"],
            }
        )
        results.update({k: results["cross_precision"][k] for k in CROSS_TARGETS})
    results["wall_seconds"] = time.perf_counter() - started

    report = [f"Every arm at the same precision. {HELDOUT_NOTE}\n"]
    for prec in precisions:
        block = blocks[prec]
        report.append(f"## {prec}: {PRECISION_POLICY[prec]}\n")
        for name, model in block["models"].items():
            r = model["recipe"]
            report.append(f"### {name}: Qwen2, vocab {r['vocab']:,}, hidden 256, 4 layers ({r['tokenizer']}), {prec}\n")
            report.append(table(model) + "\n")
            same_init = len({json.dumps(m["lora"], sort_keys=True) for m in model["arms"].values()}) == 1
            report.append(
                f"Same LoRA modules and initial weights in every arm: {'yes' if same_init else 'NO'}; "
                f"b packs {model['rows_per_step']} rows of {base['cutoff_len']} tokens per step. "
                f"Checked in every arm: {precision_seen_line(model['arms'])}.\n"
            )
            others = {arm: m.get("others_cpu_share") for arm, m in model["arms"].items()}
            if any(v is not None for v in others.values()):
                report.append(
                    "CPU used by other processes while the arms trained: "
                    + ", ".join(f"{arm} {fmt(v, '.0f', 100, '%')}" for arm, v in others.items())
                    + " of the machine.\n"
                )
        if prec == lead:
            report.append(
                f"### data preparation ({headline} vocab model; independent of the precision)\n\n"
                + tokenization_table(tokenization)
                + "\n"
            )
            report.append(f"### ratios ({headline} vocab model, {prec})\n\n" + ratios_table(results) + "\n")
        else:
            report.append(
                f"### ratios ({headline} vocab model, {prec})\n\n" + ratios_table(block, tokenization=False) + "\n"
            )
        if profiles[prec].get("real"):
            report.append(
                f"### one step of the real-vocab model, body vs head + loss, {prec}\n\n"
                + profile_table(profiles[prec]["real"])
                + "\n"
            )
    if "cross_precision" in results:
        report.append("## bf16 against fp32, each arm\n")
        for name, cross in results["cross_precision"]["models"].items():
            report.append(f"### {name} vocab model\n\n" + cross_table(cross) + "\n")
        report.append(
            f"### ratios ({headline} vocab model, bf16 vs fp32)\n\n"
            + ratios_table(results["cross_precision"], CROSS_TARGETS, tokenization=False)
            + "\n"
        )
        if not results["machine"]["cpu_bf16"]:
            report.append(
                "This CPU has no native bf16 (avx512_bf16, amx_bf16): its bf16 matmuls are emulated, "
                "so the bf16 timings say nothing about a CPU that has it.\n"
            )
    results["report_md"] = "\n".join(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print()
    print(results["report_md"])
    print(f"wrote {out} ({results['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
