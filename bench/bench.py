"""Training throughput benchmark: the usual recipe (a), TRL's SFTTrainer (b) and tunelab's default (c).

    python bench/bench.py [--quick] [--steps N] [--out bench/results.json]

Every arm trains the same saved tiny Qwen2 model (same weights, same LoRA r16 on all linear layers,
AdamW at one constant learning rate, fp32, sdpa) on the same samples for one epoch, each in its own
process, arms interleaved. Two models: the real Qwen2.5 vocabulary (151,665 rows in the head) and a
small vocabulary, which leaves the decoder body as the main cost. Prints a table per model and the
ratios against the targets, and writes them to --out. Not part of the test suite.
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
ARM_NAMES = {"a": "usual recipe (Trainer + Seq2Seq padding + model loss)",
             "b": "TRL SFTTrainer (bfd packing, completion-only, nll)",
             "c": "tunelab default (train(cfg))"}
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
    records = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
               for r in records]
    random.Random(SEED).shuffle(records)
    if n_train + n_eval > len(records):
        raise SystemExit(f"{n_train} train + {n_eval} held-out samples asked, the data has {len(records)}")
    return records[n_eval:n_eval + n_train], records[:n_eval], records, source


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
    recipe = {"name": name, "arch": "qwen2", "hidden": 256, "layers": 4, "heads": 4, "seed": 0,
              "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16],
              "tokenizer": str(QWEN_TOKENIZER) if shared_tok else f"byte-level BPE of {local_size} tokens trained here",
              "template": qwen_template()}
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
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
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
    tag = f"{spec['model_name']}-{spec['arm']}" + (f"-{spec['profile_arm']}" if spec["arm"] == "profile" else
                                                   f"-tok-{spec['prep_label']}" if spec["prep_only"] else
                                                   f"-r{spec['round']}")
    spec_path, out_path, log_path = log_dir / f"{tag}.spec.json", log_dir / f"{tag}.result.json", log_dir / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    busy_before = wait_until_quiet(quiet_wait)
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(HERE / "arms.py"), str(spec_path), str(out_path)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"arm {tag} failed (exit {proc.returncode}); last lines of {log_path}:\n" + "\n".join(tail))
    result = json.loads(out_path.read_text())
    if spec["arm"] == "c":
        check_labelled_loss(result, tag)
    result["log"] = str(log_path.relative_to(ROOT))
    result["machine_busy_before"] = busy_before
    if "profile" in result:
        for arm, p in result["profile"]["arms"].items():
            print(f"  {tag:<14} {p['positions']:>5} positions, step {p['step_seconds']:.2f}s = body "
                  f"{p['body_seconds']:.2f}s + head and loss {p['head_and_loss_seconds']:.2f}s "
                  f"(kernel {p['sys_seconds_per_step']:.2f}s)", flush=True)
    elif spec["prep_only"]:
        print(f"  {tag:<14} data prep {result['tokenize_seconds']:.2f}s  ({time.perf_counter() - started:.0f}s)",
              flush=True)
    else:
        print(f"  {tag:<14} {result['steps']:>3} steps  {result['trainable_tps']:8.1f} trainable tok/s  "
              f"pad {100 * result['padding_share']:4.1f}%  cpu {100 * result['cpu_utilization']:3.0f}%  "
              f"others {fmt(result.get('others_cpu_share'), '.0f', 100, '%')}  "
              f"peak {result['peak_rss_bytes'] / 2**30:5.2f} GiB  "
              f"eval loss {result['final_eval_loss']:.4f}  ({time.perf_counter() - started:.0f}s)", flush=True)
    return result


def check_labelled_loss(result: dict, tag: str) -> None:
    """Arm c must have trained with tunelab's labelled-position loss (`labelled_loss` of its run summary)."""
    if "labelled_loss" not in result:
        raise KeyError(f"arm {tag}: no 'labelled_loss' in its result (read from tunelab's run_summary.json): "
                       "tunelab's run summary changed, update bench/arms.py")
    if result["labelled_loss"] is not True:
        raise SystemExit(f"arm {tag}: tunelab trained without its labelled-position loss (labelled_loss = "
                         f"{result['labelled_loss']!r} in its run summary): arm c does not measure tunelab's default")


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
    keys = ("trainable_tps", "total_tps", "padding_share", "peak_rss_bytes", "train_peak_rss_bytes",
            "final_eval_loss", "time_to_target_loss", "train_seconds", "cpu_utilization", "others_cpu_share")
    out = {k: median([r.get(k) for r in runs]) for k in keys}
    out.update({k: first[k] for k in ("steps", "trained_tokens", "real_tokens", "positions", "rows",
                                      "trained_tokens_per_step", "first_batch", "lora")})
    out["tokenize_seconds"] = first.get("tokenize_seconds")  # the first run of the arm: a cold one
    out["tokenizer"] = first.get("tokenizer")
    out["rounds"] = len(runs)
    out["trainable_tps_rounds"] = [r["trainable_tps"] for r in runs]
    for extra in ("labelled_loss", "run_summary"):
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
    head = ("| arm | steps | trained tokens (per step) | trainable tok/s | total tok/s | padding | CPU busy | peak RSS "
            f"| tokenization (train set, cold) | final eval loss | time to eval loss {target:.4f} |")
    lines = [head, "|" + "---|" * 11]
    for arm, m in arms.items():
        lines.append(
            f"| {arm}: {ARM_NAMES[arm]} | {m['steps']} | {m['trained_tokens']:,} ({m['trained_tokens_per_step']:.0f}) "
            f"| {fmt(m['trainable_tps'])} | {fmt(m['total_tps'])} | {fmt(m['padding_share'], '.1f', 100, '%')} "
            f"| {fmt(m['cpu_utilization'], '.0f', 100, '%')} "
            f"| {fmt(m['peak_rss_bytes'], '.2f', 2**-30, ' GiB')} "
            f"| {fmt(m['tokenize_seconds'], '.2f', 1, ' s')} "
            f"| {fmt(m['final_eval_loss'], '.4f')} | {fmt(m['time_to_target_loss'], '.1f', 1, ' s')} |")
    return "\n".join(lines)


def ratios_table(results: dict) -> str:
    lines = ["| metric | value | target | met |", "|---|---|---|---|"]
    for key, (desc, target, higher) in TARGETS.items():
        value = results.get(key)
        met = None if value is None else (value >= target if higher else value <= target)
        op = ">=" if higher else "<="
        lines.append(f"| {desc} (`{key}`) | {fmt(value, '.3f' if key.startswith('eval') else '.2f')} "
                     f"| {op} {target} | {'n/a' if met is None else 'yes' if met else 'NO'} |")
    warm = results.get("tokenization_warm_c_seconds")
    lines.append(f"| tokenization, warm re-run of c, seconds (`tokenization_warm_c_seconds`) | {fmt(warm, '.3f')} "
                 f"| near 0 | {'n/a' if warm is None else 'yes' if warm < 0.5 else 'NO'} |")
    lines.append(f"| tokenization speed, c / a (warm re-run) (`tokenization_warm_speedup_c_over_a`) "
                 f"| {fmt(results.get('tokenization_warm_speedup_c_over_a'), '.2f')} | (info) | |")
    return "\n".join(lines)


TOKENIZATION_WHAT = {
    "a": "pandas.read_json + Dataset.from_pandas + map(per-example prompt/response tokenization)",
    "b": "Dataset.from_list + SFTTrainer._prepare_dataset (template, tokenization, labels, bfd packing)",
    "c": "tunelab data_seconds of run_summary.json (read, template, tokenization, label masks; tokenization cache)",
}


def tokenization_table(tok: dict) -> str:
    lines = [f"{tok['records']} records of {tok['source']}, each arm in a fresh process, best of "
             f"{len(next(iter(tok['arms'].values())).get('cold_runs', [0]))}; cold = empty caches, "
             "warm = the same command again\n",
             "| arm | what is timed | cold | warm re-run | speed c vs this arm, cold / warm |", "|---|---|---|---|---|"]
    c = tok["arms"]["c"]
    for arm, t in tok["arms"].items():
        lines.append(f"| {arm} | {TOKENIZATION_WHAT[arm]} | {t['cold']:.2f} s | {t['warm']:.2f} s "
                     f"| {fmt(ratio(t['cold'], c['cold']), '.1f', 1, 'x')} "
                     f"/ {fmt(ratio(t['warm'], c['warm']), '.1f', 1, 'x')} |")
    return "\n".join(lines)


def profile_table(profile: dict) -> str:
    lines = [f"{profile['samples']} samples (c: {profile['packed_rows']} packed rows); best of 2 after a warm-up\n",
             "| arm | positions (real, trained) | step s | body s | head + loss s | head + loss ms per head row "
             "| kernel CPU s (page faults) | page faults |", "|---|---|---|---|---|---|---|---|"]
    for arm, p in profile["arms"].items():
        head_positions = p["trained_tokens"] if arm == "c" else p["positions"]
        lines.append(f"| {arm} | {p['positions']:,} ({p['real_tokens']:,}, {p['trained_tokens']:,}) "
                     f"| {p['step_seconds']:.2f} "
                     f"| {p['body_seconds']:.2f} | {p['head_and_loss_seconds']:.2f} "
                     f"| {1000 * p['head_and_loss_seconds'] / max(head_positions, 1):.2f} "
                     f"| {p['sys_seconds_per_step']:.2f} | {p['page_faults_per_step']:,.0f} |")
    mm = ", ".join(f"{k}: {v:.0f} GFLOP/s" for k, v in profile["matmul_gflops"].items())
    lines.append(f"\nfp32 matmul on this machine: {mm}.")
    return "\n".join(lines)


def machine() -> dict:
    import importlib.metadata as md

    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
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

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "tunelab_commit": git("rev-parse", "--short", "HEAD"),
            "tunelab_src_modified": bool(git("status", "--porcelain", "--", "src"))}


# ---------------------------------------------------------------- main

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
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip timing one step's body and head separately (skipped by --quick)")
    p.add_argument("--prep-repeats", type=int, default=None,
                   help="cold + warm data-preparation runs per arm; the best of each is reported (default 3; quick 1)")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each arm, wait up to this many seconds for other processes to leave the CPUs idle")
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

    env = dict(os.environ, TUNELAB_CACHE=str(WORK / "cache" / "tunelab"),
               HF_DATASETS_CACHE=str(WORK / "cache" / "datasets"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
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
            "folder": folder, "recipe": {k: v for k, v in recipe.items() if k != "template"},
            "eval_samples": [encode(tok, r, args.cutoff_len) for r in held_out],
            "pad_id": tok.pad_token_id, "packed_rows": bins, "rows_per_step": max(1, round(bins / steps_a)),
            "mean_length": sum(lengths) / len(lengths), "profile_samples": encoded[:per_step],
        }
        print(f"model {name}: vocab {recipe['vocab']:,}, {folder.relative_to(ROOT)}; samples average "
              f"{plans[name]['mean_length']:.0f} tokens, {bins} packed rows of {args.cutoff_len} -> "
              f"{plans[name]['rows_per_step']} rows per step for b", flush=True)

    base = {"cutoff_len": args.cutoff_len, "samples_per_step": per_step, "learning_rate": args.learning_rate,
            "seed": SEED, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "eval_fractions": fractions,
            "train_file": str(train_file)}

    def spec(name, arm, round_, prep_label=None):
        p = plans[name]
        return {**base, "arm": arm, "model_name": name, "model": str(p["folder"]), "round": round_,
                "prep_only": prep_label is not None, "prep_label": prep_label, "rows_per_step": p["rows_per_step"],
                "pad_id": p["pad_id"], "eval_samples": p["eval_samples"],
                "output_dir": str(WORK / "runs" / f"{name}-{arm}-{prep_label or round_}")}

    runs = {name: {arm: [] for arm in ARMS} for name in models}
    profiles = {}
    headline = "real" if "real" in models else models[0]
    tokenization = {"records": len(everything), "source": source, "model": headline,
                    "arms": {arm: {} for arm in ARMS}}
    for name in models:
        print(f"[{name}] training, arms interleaved:", flush=True)
        for r in range(1, rounds[name] + 1):
            for arm in ARMS:
                runs[name][arm].append(run_arm(spec(name, arm, r), env, log_dir, args.quiet_wait))
        if name == headline:
            print(f"[{name}] data preparation of all {len(everything)} records, cold then warm, "
                  f"best of {args.prep_repeats}:", flush=True)
            for _ in range(args.prep_repeats):
                shutil.rmtree(WORK / "cache", ignore_errors=True)  # every arm's data caches: cold again
                for label in ("cold", "warm"):
                    for arm in ARMS:
                        run = run_arm({**spec(name, arm, None, label), "train_file": str(all_file)}, env, log_dir,
                                      args.quiet_wait)
                        tokenization["arms"][arm].setdefault(f"{label}_runs", []).append(run["tokenize_seconds"])
            for arm in ARMS:
                t = tokenization["arms"][arm]
                t["cold"], t["warm"] = min(t["cold_runs"]), min(t["warm_runs"])
        if name == "real" and args.profile:
            print(f"[{name}] one step's batch per arm, body vs head + loss:", flush=True)
            for arm in ARMS:
                found = run_arm({**spec(name, "profile", None), "profile_arm": arm,
                                 "profile_samples": plans[name]["profile_samples"]}, env, log_dir, args.quiet_wait)
                if name in profiles:
                    profiles[name]["arms"].update(found["profile"]["arms"])
                else:
                    profiles[name] = found["profile"]

    results = {"command": " ".join(["python bench/bench.py", *(sys.argv[1:] if argv is None else argv)]),
               "machine": machine(), "data": source,
               "settings": {**{k: v for k, v in base.items() if k != "train_file"}, "train_samples": len(train),
                            "eval_samples": len(held_out), "rounds": rounds, "quick": quick,
                            "optimizer": "adamw_torch, constant lr, no warmup, no weight decay, max_grad_norm 1",
                            "precision": "fp32", "attention": "sdpa", "gradient_checkpointing": False,
                            "lora_targets": "q,k,v,o,gate,up,down (all linear layers of the decoder)"},
               "models": {}}
    for name in models:
        finals = [runs[name][arm][0]["final_eval_loss"] for arm in ARMS]
        target_loss = max(finals)
        arms = {arm: aggregate(runs[name][arm], target_loss) for arm in ARMS}
        a, b, c = arms["a"], arms["b"], arms["c"]
        results["models"][name] = {
            "recipe": plans[name]["recipe"], "rows_per_step": plans[name]["rows_per_step"],
            "packed_rows_planned": plans[name]["packed_rows"], "target_eval_loss": target_loss, "arms": arms,
            "profile": profiles.get(name), "runs": runs[name],
            "ratios": {
                "c_over_a_trainable_tps": ratio(c["trainable_tps"], a["trainable_tps"]),
                "c_over_b_trainable_tps": ratio(c["trainable_tps"], b["trainable_tps"]),
                "c_over_a_total_tps": ratio(c["total_tps"], a["total_tps"]),
                "c_over_b_total_tps": ratio(c["total_tps"], b["total_tps"]),
                "c_over_a_peak_mem": ratio(c["peak_rss_bytes"], a["peak_rss_bytes"]),
                "c_over_b_peak_mem": ratio(c["peak_rss_bytes"], b["peak_rss_bytes"]),
                "tokenization_speedup_c_over_a_train_set": ratio(a["tokenize_seconds"], c["tokenize_seconds"]),
                "tokenization_speedup_c_over_b_train_set": ratio(b["tokenize_seconds"], c["tokenize_seconds"]),
                "eval_loss_rel_diff_c_vs_a": abs(c["final_eval_loss"] - a["final_eval_loss"]) / a["final_eval_loss"],
                "time_to_target_loss_a_over_c": ratio(a["time_to_target_loss"], c["time_to_target_loss"]),
                "time_to_target_loss_b_over_c": ratio(b["time_to_target_loss"], c["time_to_target_loss"]),
            },
        }
    results["headline_model"] = headline
    ta, tc = tokenization["arms"]["a"], tokenization["arms"]["c"]
    results["tokenization"] = tokenization
    results["models"][headline]["ratios"].update({
        "tokenization_speedup_c_over_a": ratio(ta["cold"], tc["cold"]),
        "tokenization_warm_speedup_c_over_a": ratio(ta["warm"], tc["warm"])})
    results.update({k: results["models"][headline]["ratios"][k] for k in TARGETS})
    results["tokenization_warm_speedup_c_over_a"] = ratio(ta["warm"], tc["warm"])
    results["tokenization_warm_c_seconds"] = tc["warm"]
    results["wall_seconds"] = time.perf_counter() - started

    report = []
    for name, model in results["models"].items():
        r = model["recipe"]
        report.append(f"### {name}: Qwen2, vocab {r['vocab']:,}, hidden 256, 4 layers ({r['tokenizer']})\n")
        report.append(table(model) + "\n")
        same_init = len({json.dumps(m["lora"], sort_keys=True) for m in model["arms"].values()}) == 1
        report.append(f"Same LoRA modules and initial weights in every arm: {'yes' if same_init else 'NO'}; "
                      f"b packs {model['rows_per_step']} rows of {base['cutoff_len']} tokens per step.\n")
        others = {arm: m.get("others_cpu_share") for arm, m in model["arms"].items()}
        if any(v is not None for v in others.values()):
            report.append("CPU used by other processes while the arms trained: " + ", ".join(
                f"{arm} {fmt(v, '.0f', 100, '%')}" for arm, v in others.items()) + " of the machine.\n")
    report.append(f"### data preparation ({headline} vocab model)\n\n" + tokenization_table(tokenization) + "\n")
    report.append(f"### ratios ({headline} vocab model)\n\n" + ratios_table(results) + "\n")
    if profiles.get("real"):
        report.append("### one step of the real-vocab model, body vs head + loss\n\n"
                      + profile_table(profiles["real"]) + "\n")
    results["report_md"] = "\n".join(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print()
    print(results["report_md"])
    print(f"wrote {out} ({results['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
