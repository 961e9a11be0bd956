"""GPU training benchmark: tunelab vs the usual recipe vs TRL's SFTTrainer on Qwen2.5-0.5B/7B shapes.

    python bench/gpu.py [--models 7b,0.5b] [--shared DIR] [--steps N] [--seq-len 2048] [--out FILE]
    python bench/gpu.py --smoke            # tiny shapes, CPU is fine, under a minute: keeps this script working
    make bench-gpu BENCH_GPU_ARGS="--shared .gpu_shared"

Each shape is a Qwen2 config with random weights (initialised on the GPU in bf16, saved once under
bench/.work/gpu/) and the real Qwen2.5 vocabulary. Three arms train it with the same LoRA (r 16,
alpha 32, q/k/v/o/gate/up/down), the same samples per step, learning rate and steps, each arm in its
own process so its peak GPU memory is its own:

  c  tunelab: `tunelab.train.run.train(cfg)`, its defaults for packing and loss
  a  the usual recipe: Trainer + DataCollatorForSeq2Seq(padding=True) + the model's own loss
  b  TRL SFTTrainer at its best settings: bfd packing (padding-free), completion-only loss, fused LM head,
     Liger's layer kernels when liger_kernel imports

Data: the shared huanhuan (short Chinese dialogue turns) and alpaca_en_demo (longer English answers)
sets mixed and shuffled, so steps see their real length spread; without them (the GPU machine gets
the repository alone) pass `--shared DIR` with a copy, or the script generates records with a
long-tailed length spread and trains a byte-level BPE (the model keeps the Qwen2.5 vocabulary size).

Reported per arm: trainable (labelled) tokens/s, real tokens/s, MFU on necessary FLOPs, peak GPU
memory, and the held-out loss after training, computed by the same code for every arm. A full
fine-tuning check trains the 0.5B shape through tunelab in bf16 and in fp16.

Necessary FLOPs (what one training step must compute, whatever the implementation does), counted
per sample from its own length s (a packed row's samples never attend to each other) and summed:

  N_body  = matmul weights of the decoder layers (q, k, v, o, gate, up, down): no embedding, no head,
            no norms or biases (element-wise work is not counted)
  N_lora  = weights of the LoRA adapters (A and B of every adapted layer)
  attn(s) = layers * 6 * n_heads * head_dim * s(s+1)
            forward: Q K^T over the s(s+1)/2 causal (query, key) pairs, 2*head_dim FLOPs each, and the same
            again for P V: 2 * n_heads * head_dim * s(s+1) per layer; backward: dQ, dK, dV, dP are four
            products of the same size, twice the forward; so 3x the forward in all
  LoRA:    4 * N_body * s  +  6 * N_lora * s  +  attn(s)  +  4 * hidden * vocab * t
           frozen weights need the forward (2N) and the gradient to their input (2N), no weight
           gradient; adapters need all three (6 per weight); the head runs only at the t positions
           whose next token is trained: forward and gradient to the hidden state, 4 * hidden * vocab
  full FT: 6 * N_body * s  +  attn(s)  +  6 * hidden * vocab * t

MFU = necessary FLOPs of the timed steps / (their wall time * the GPU's dense bf16 peak). Work an
arm does beyond that (the head over prompts and padding, padded positions, recomputation) is
not counted, which is the point: it is the cost of doing more than the job needs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work" / "gpu"  # bench/.gitignore ignores bench/.work/
SEED = 42
IGNORE_INDEX = -100
ARMS = ("c", "a", "b")  # tunelab first: if the time budget runs out, the peers are what is missing
ARM_NAMES = {
    "c": "tunelab (train(cfg))",
    "a": "usual recipe (Trainer + Seq2Seq padding + model loss)",
    "b": "TRL SFTTrainer (bfd packing, completion-only, fused head)",
}
LORA = {"r": 16, "alpha": 32}

# The shapes. qwen2.5-0.5b and qwen2.5-7b are the published configs (head_dim = hidden / heads).
SHAPES = {
    "0.5b": {
        "hidden": 896,
        "layers": 24,
        "heads": 14,
        "kv_heads": 2,
        "intermediate": 4864,
        "vocab": 151_936,
        "tied": True,
    },
    "7b": {
        "hidden": 3584,
        "layers": 28,
        "heads": 28,
        "kv_heads": 4,
        "intermediate": 18_944,
        "vocab": 152_064,
        "tied": False,
    },
    "smoke": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": None, "tied": False},
}

# Per shape: samples per optimizer step (the same for every arm), steps, micro-batch of the usual recipe
# (it pads each micro-batch to its longest sample and builds full logits, so it accumulates gradients
# over micro-batches as its tutorials do), a cap on each arm's training seconds, and the seconds an arm
# needs besides training (start, imports, loading, data, evaluation) before it is worth starting.
PLANS = {
    "0.5b": {"samples_per_step": 128, "steps": 20, "usual_micro_batch": 16, "cap_seconds": 40, "overhead": 35},
    "7b": {"samples_per_step": 96, "steps": 20, "usual_micro_batch": 8, "cap_seconds": 75, "overhead": 60},
    "smoke": {"samples_per_step": 4, "steps": 3, "usual_micro_batch": 2, "cap_seconds": 60, "overhead": 20},
}
# The full fine-tuning check: a few steps of tunelab's full fine-tuning per precision (fp32 master weights).
FULL_FT = {
    "0.5b": {"samples_per_step": 32, "steps": 8, "learning_rate": 1e-4, "cap_seconds": 30},
    "smoke": {"samples_per_step": 4, "steps": 3, "learning_rate": 1e-3, "cap_seconds": 60},
}

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), matched against the device name.
PEAK_BF16 = [
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H200.*NVL", 835e12),
    (r"\bH200\b", 989e12),
    (r"\bH100\b", 989e12),
    (r"\bH800\b", 989e12),
    (r"\bH20\b", 148e12),
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bA10\b", 125e12),
    (r"\bL4\b", 121e12),
]


# ---------------------------------------------------------------- FLOPs

FLOP_FORMULA = {
    "lora": "4*N_body*s + 6*N_lora*s + attn(s) + 4*hidden*vocab*t per sample",
    "full": "6*N_body*s + attn(s) + 6*hidden*vocab*t per sample",
    "attn": "attn(s) = layers * 6 * n_heads * head_dim * s*(s+1)  (causal; forward QK^T + PV, backward 2x forward)",
    "terms": "s = the sample's real tokens (its own length, also inside a packed row); t = its positions whose next "
    "token is trained; N_body = matmul weights of q,k,v,o,gate,up,down in all layers (no embedding, head, "
    "norms, biases); N_lora = LoRA A and B weights",
}


def shape_counts(shape: dict, vocab: int, lora_r: int | None = LORA["r"]) -> dict:
    """Parameter counts the FLOP formula needs, from a shape (see SHAPES) and the model's vocabulary."""
    d, layers, inter = shape["hidden"], shape["layers"], shape["intermediate"]
    head_dim = shape.get("head_dim") or d // shape["heads"]
    n_q, n_kv = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
    per_layer = d * n_q + 2 * d * n_kv + n_q * d + 3 * d * inter
    # (in + out) of each adapted layer: q, k, v, o, gate, up, down
    lora_per_layer = (d + n_q) + 2 * (d + n_kv) + (n_q + d) + 2 * (d + inter) + (inter + d)
    return {
        "hidden": d,
        "layers": layers,
        "attn_width": n_q,
        "vocab": vocab,
        "n_body": layers * per_layer,
        "n_lora": layers * lora_per_layer * lora_r if lora_r else 0,
    }


def necessary_flops(lengths: list[int], trained: int, counts: dict, finetuning: str = "lora") -> float:
    """Necessary FLOPs of one batch: samples of `lengths` real tokens, `trained` positions in the loss.

    See the module docstring for the derivation. Attention is per sample (sum of s(s+1)), so packing
    samples into one row does not inflate it and padding does not count.
    """
    real = sum(lengths)
    attn = counts["layers"] * 6 * counts["attn_width"] * sum(s * (s + 1) for s in lengths)
    head = counts["hidden"] * counts["vocab"] * trained
    if finetuning == "full":
        return 6.0 * counts["n_body"] * real + attn + 6.0 * head
    return 4.0 * counts["n_body"] * real + 6.0 * counts["n_lora"] * real + attn + 4.0 * head


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: `--peak-tflops` if given, else looked up by name (None if unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    for pattern, value in PEAK_BF16:
        if device_name and re.search(pattern, device_name):
            return value
    return None


# ---------------------------------------------------------------- data


def shared_files(shared: Path | None) -> dict:
    """The shared files this bench can use, each None where `shared` lacks it."""

    def found(rel):
        return shared / rel if shared is not None and (shared / rel).exists() else None

    return {
        "tokenizer": found("tokenizers/qwen2.5-instruct") if found("tokenizers/qwen2.5-instruct/vocab.json") else None,
        "huanhuan": found("datasets/self-llm/huanhuan.json"),
        "alpaca": found("datasets/llama-factory/alpaca_en_demo.json"),
    }


def default_shared() -> Path | None:
    """../shared beside the checkout, else a copy inside it (the GPU machine gets the repository alone)."""
    for candidate in (ROOT.parent / "shared", ROOT / "shared", ROOT / ".gpu_shared", WORK.parent / "shared"):
        if (candidate / "datasets").is_dir() or (candidate / "tokenizers").is_dir():
            return candidate
    return None


def synthetic_records(n: int, seed: int) -> list[dict]:
    """Alpaca-shaped records in two populations like the shared sets: many short dialogue turns
    (huanhuan-like) and fewer long instructions with long-tailed answers (alpaca-like)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vi", "dor", "pa", "ne", "qu", "is", "ta", "be", "gro", "shi"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, n_words))) + "."

    records = []
    for _ in range(n):
        if rng.random() < 0.79:  # huanhuan's share of the two sets
            records.append(
                {
                    "instruction": text(int(rng.lognormvariate(2.3, 0.5))),
                    "input": "",
                    "output": text(int(rng.lognormvariate(2.4, 0.6))),
                    "source": "synthetic-short",
                }
            )
        else:
            context = text(int(rng.lognormvariate(3.0, 0.7))) if rng.random() < 0.35 else ""
            records.append(
                {
                    "instruction": text(int(rng.lognormvariate(2.6, 0.5))),
                    "input": context,
                    "output": text(min(500, int(rng.lognormvariate(4.2, 0.9)))),
                    "source": "synthetic-long",
                }
            )
    return records


def load_records(files: dict) -> tuple[list[dict], str]:
    """Both shared sets mixed, or generated records where neither is there."""
    records, sources = [], []
    for name in ("huanhuan", "alpaca"):
        path = files.get(name)
        if path is None:
            continue
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        records += [
            {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"], "source": name}
            for r in rows
            if r.get("output")
        ]
        sources.append(f"{path} ({len(rows)})")
    if not records:
        return synthetic_records(4700, SEED), "generated (no shared huanhuan/alpaca files found)"
    return records, " + ".join(sources)


def split_records(records: list[dict], n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Shuffled with a fixed seed: the first `n_eval` held out, the next `n_train` trained."""
    records = list(records)
    random.Random(SEED).shuffle(records)
    if n_eval + n_train > len(records):
        raise SystemExit(
            f"{n_train} train + {n_eval} held-out samples asked, the data has {len(records)}; "
            "lower --steps or --samples-per-step"
        )
    return records[n_eval : n_eval + n_train], records[:n_eval]


def encode(tokenizer, record: dict, cutoff: int) -> dict:
    """Prompt by the chat template (masked), answer + end-of-turn trained: the samples every arm trains on."""
    from arms import user_text

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text(record)}], tokenize=False, add_generation_prompt=True
    )
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"ids": (p + r)[:cutoff], "labels": ([IGNORE_INDEX] * len(p) + r)[:cutoff]}


def length_stats(samples: list[dict]) -> dict:
    lengths = sorted(len(s["ids"]) for s in samples)
    trained = sum(sum(1 for t in s["labels"][1:] if t != IGNORE_INDEX) for s in samples)

    def pct(p):
        return lengths[min(len(lengths) - 1, int(p * (len(lengths) - 1)))]

    return {
        "samples": len(lengths),
        "mean": sum(lengths) / len(lengths),
        "p10": pct(0.1),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": lengths[-1],
        "trained_share": trained / max(sum(lengths), 1),
    }


# ---------------------------------------------------------------- models


def qwen_template(files: dict) -> str:
    from tunelab.data.templates import CHATML

    config = files["tokenizer"] / "tokenizer_config.json" if files["tokenizer"] else None
    return json.loads(config.read_text())["chat_template"] if config and config.is_file() else CHATML


def local_tokenizer(texts: list[str], vocab_size: int, template: str):
    """A byte-level BPE trained here, with Qwen's chat template and special tokens."""
    from tunelab.demo.build import train_tokenizer

    tok = train_tokenizer(texts, vocab_size=vocab_size)
    tok.chat_template = template
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def build_model(name: str, files: dict, texts: list[str], device: str) -> tuple[Path, dict]:
    """The saved model folder of shape `name`, built once and reused while its recipe holds.

    Weights are drawn on `device` in bf16 (seconds for 7B on a GPU, where the CPU would take minutes);
    the tokenizer is the real Qwen2.5 one when `files` has it, else a byte-level BPE trained here, and
    the model's vocabulary is the shape's (Qwen2.5's) either way, except the smoke shape's.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    shape = SHAPES[name]
    template = qwen_template(files)
    real_tok = files["tokenizer"] is not None and name != "smoke"
    local_size = 512 if name == "smoke" else 8000
    recipe = {
        "name": name,
        **shape,
        "seed": 0,
        "dtype": "bfloat16" if name != "smoke" else "float32",
        "tokenizer": str(files["tokenizer"]) if real_tok else f"byte-level BPE of {local_size} trained here",
        "texts": None if real_tok else hash_texts(texts),
        "template": hash_texts([template]),
    }
    out = WORK / "models" / name
    stamp = out / "bench_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return out, recipe
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if real_tok:
        tok = AutoTokenizer.from_pretrained(files["tokenizer"])
    else:
        tok = local_tokenizer(texts, local_size, template)
    config = Qwen2Config(
        vocab_size=shape["vocab"] or len(tok),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=shape["tied"],
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    dtype = getattr(torch, recipe["dtype"])
    torch.manual_seed(recipe["seed"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    stamp.write_text(json.dumps(recipe))
    print(f"  built {name}: {time.perf_counter() - started:.0f}s", flush=True)
    return out, recipe


def hash_texts(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- running the arms


class Budget:
    """The run's wall-clock budget: later arms get what earlier ones left, or are skipped."""

    def __init__(self, seconds: float | None):
        self.deadline = None if not seconds else time.perf_counter() + seconds

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()


def run_job(spec: dict, env: dict, budget: Budget, overhead: float) -> dict:
    """Run one arm in its own process; a failure, a timeout or a spent budget is recorded, not raised."""
    tag = spec["tag"]
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = logs / f"{tag}.spec.json", logs / f"{tag}.result.json", logs / f"{tag}.log"
    left = budget.left()
    if left < overhead + 10:
        print(f"  {tag:<12} skipped: {max(left, 0):.0f}s of the time budget left", flush=True)
        return {"arm": spec["arm"], "status": "skipped", "error": f"time budget: {max(left, 0):.0f}s left"}
    spec = {**spec, "cap_seconds": min(spec["cap_seconds"], max(10.0, left - overhead))}
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    started = time.perf_counter()
    timeout = None if math.isinf(left) else max(30.0, left)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "gpu_arms.py"), str(spec_path), str(out_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the arm's own process group, started above
            proc.wait()
            code = "timeout"
    seconds = time.perf_counter() - started
    if code != 0 or not out_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print(
            f"  {tag:<12} FAILED ({code}, {seconds:.0f}s); last lines of {log_path}:\n    " + "\n    ".join(tail),
            flush=True,
        )
        return {
            "arm": spec["arm"],
            "status": "timeout" if code == "timeout" else "failed",
            "exit": code,
            "error": "\n".join(tail[-6:]),
            "log": shown(log_path),
            "wall_seconds": seconds,
        }
    result = json.loads(out_path.read_text())
    result.update(status="ok", log=shown(log_path), wall_seconds=seconds)
    if spec["arm"] == "fullft":
        for r in result["runs"]:
            print(
                f"  {tag:<12} {r['precision']}: {r['steps']} steps, loss {fmt(r.get('first_loss'), '.3f')} -> "
                f"{fmt(r.get('last_loss'), '.3f')}, {fmt(r.get('trainable_tps'), ',.0f')} trainable tok/s, "
                f"MFU {fmt(r.get('mfu'), '.1f', 100, '%')}, "
                f"peak {fmt(r.get('peak_mem_bytes'), '.1f', 2**-30, ' GiB')}"
                f"  {'ok' if r.get('ok') else 'NOT OK: ' + str(r.get('error'))}",
                flush=True,
            )
    else:
        print(
            f"  {tag:<12} {result['steps']:>3} steps{' (capped)' if result.get('capped') else ''}  "
            f"{fmt(result.get('trainable_tps'), ',.0f')} trainable tok/s  {fmt(result.get('real_tps'), ',.0f')} "
            f"real tok/s  MFU {fmt(result.get('mfu'), '.1f', 100, '%')}  peak "
            f"{fmt(result.get('peak_mem_bytes'), '.1f', 2**-30, ' GiB')}  eval loss "
            f"{fmt(result.get('eval_loss_start'), '.4f')} -> {fmt(result.get('eval_loss_end'), '.4f')}  "
            f"({seconds:.0f}s)",
            flush=True,
        )
    return result


# ---------------------------------------------------------------- report


def shown(path: Path) -> str:
    """A path relative to the repository where it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def fmt(value, spec=".1f", scale=1.0, suffix=""):
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def failure(m: dict) -> str:
    """One line on why an arm has no figures (the log has the rest)."""
    code = m.get("exit")
    why = {-9: "killed: out of memory?", "timeout": "killed at the end of the time budget"}.get(code, "")
    last = next(
        (
            line.strip()
            for line in reversed(str(m.get("error") or "").splitlines())
            if line.strip() and "%|" not in line
        ),
        "",
    )
    text = f"{m.get('status')}" + (f" (exit {code}{', ' + why if why else ''})" if code is not None else "")
    return (
        text + (f": {last[-120:]}" if last and not why else "") + (f"; log {m['log']}" if m.get("log") else "")
    ).replace("|", "/")


def ratio(x, y):
    return x / y if x is not None and y else None


def rel_diff(x, y):
    return abs(x - y) / abs(y) if x is not None and y else None


def compare(arms: dict) -> dict:
    """tunelab against each peer: speed, memory, held-out loss (comparable when both trained the same samples)."""
    c = arms.get("c", {})
    out = {}
    for peer in ("a", "b"):
        p = arms.get(peer, {})
        out[f"c_over_{peer}_trainable_tps"] = ratio(c.get("trainable_tps"), p.get("trainable_tps"))
        out[f"c_over_{peer}_real_tps"] = ratio(c.get("real_tps"), p.get("real_tps"))
        out[f"c_over_{peer}_peak_mem"] = ratio(c.get("peak_mem_bytes"), p.get("peak_mem_bytes"))
        out[f"eval_loss_rel_diff_c_vs_{peer}"] = rel_diff(c.get("eval_loss_end"), p.get("eval_loss_end"))
        out[f"trained_tokens_{peer}_over_c"] = ratio(p.get("trained_tokens"), c.get("trained_tokens"))
    return out


def targets(results: dict) -> list[tuple[str, object, str, bool | None]]:
    """The issue's targets: (what, value, target, met); met is None where the figure is missing."""
    rows = []
    big = results["models"].get("7b")
    if big:
        c = big["arms"].get("c", {})
        mfu = c.get("mfu")
        rows.append(
            (
                "7B: tunelab MFU on necessary FLOPs",
                fmt(mfu, ".1f", 100, "%"),
                ">= 50%",
                None if mfu is None else mfu >= 0.5,
            )
        )
        for peer in ("a", "b"):
            r = big["ratios"].get(f"c_over_{peer}_trainable_tps")
            rows.append(
                (
                    f"7B: trainable tokens/s, tunelab / {ARM_NAMES[peer].split(' (')[0]}",
                    fmt(r, ".2f"),
                    "> 1",
                    None if r is None else r > 1,
                )
            )
    for run in (results.get("full_ft") or {}).get("runs", []):
        rows.append(
            (
                f"full fine-tuning of the {results['full_ft']['model']} shape in {run['precision']}",
                "ok" if run.get("ok") else f"NOT OK ({run.get('error') or 'loss'})",
                "runs, loss finite and falling",
                bool(run.get("ok")),
            )
        )
    return rows


def model_table(name: str, model: dict) -> str:
    lines = [
        "| arm | steps | trained tokens | real tokens | padding | trainable tok/s | real tok/s "
        "| necessary TFLOP/s | MFU | peak memory | held-out loss start -> end |",
        "|" + "---|" * 11,
    ]
    for arm in ARMS:
        m = model["arms"].get(arm)
        if m is None:
            continue
        if m.get("status") != "ok":
            lines.append(f"| {arm}: {ARM_NAMES[arm]} | {failure(m)} |" + " |" * 9)
            continue
        capped = (" (capped)" if m.get("capped") else "") + (
            " (warm-up timed)" if m.get("rates_include_warmup") else ""
        )
        lines.append(
            f"| {arm}: {ARM_NAMES[arm]} | {m['steps']}{capped} | {m['trained_tokens']:,} | {m['real_tokens']:,} "
            f"| {fmt(m.get('padding_share'), '.1f', 100, '%')} | {fmt(m.get('trainable_tps'), ',.0f')} "
            f"| {fmt(m.get('real_tps'), ',.0f')} | {fmt(m.get('achieved_flops'), '.1f', 1e-12)} "
            f"| {fmt(m.get('mfu'), '.1f', 100, '%')} | {fmt(m.get('peak_mem_bytes'), '.1f', 2**-30, ' GiB')} "
            f"| {fmt(m.get('eval_loss_start'), '.4f')} -> {fmt(m.get('eval_loss_end'), '.4f')} |"
        )
    r = model["ratios"]
    ok = [m for m in model["arms"].values() if m.get("status") == "ok"]
    same_lora = len({json.dumps(m.get("lora"), sort_keys=True) for m in ok}) == 1
    starts = [m["eval_loss_start"] for m in ok if m.get("eval_loss_start") is not None]
    same_start = bool(starts) and max(starts) - min(starts) <= 1e-3 * abs(min(starts))
    lines.append("")
    if len(ok) > 1:
        lines.append(
            f"Same LoRA modules and initial adapter weights in every arm: {'yes' if same_lora else 'NO'}; "
            f"same held-out loss before training: {'yes' if same_start else 'NO'}."
        )
    lines += [
        f"Peak memory: {ok[0]['peak_mem_kind'] if ok else 'n/a'}; padding: share of the positions computed that "
        "hold no sample (padded rows, tails of packed rows). Tokens/s and MFU leave out the first "
        "steps (warm-up).",
        "",
    ]
    for peer in ("a", "b"):
        if r[f"c_over_{peer}_trainable_tps"] is None:
            continue
        lines.append(
            f"- tunelab / {ARM_NAMES[peer]}: trainable tokens/s "
            f"{fmt(r[f'c_over_{peer}_trainable_tps'], '.2f', suffix='x')}, real tokens/s "
            f"{fmt(r[f'c_over_{peer}_real_tps'], '.2f', suffix='x')}, peak memory "
            f"{fmt(r[f'c_over_{peer}_peak_mem'], '.2f', suffix='x')}; held-out loss differs by "
            f"{fmt(r[f'eval_loss_rel_diff_c_vs_{peer}'], '.2e')} (relative) after "
            f"{fmt(r[f'trained_tokens_{peer}_over_c'], '.3f', suffix='x')} tunelab's trained tokens"
        )
    return "\n".join(lines)


def report(results: dict) -> str:
    s = results["settings"]
    out = [
        f"Command: `{results['command']}`",
        "",
        f"Device: {results['machine']['device']} (peak {fmt(results['machine']['peak_flops'], '.0f', 1e-12)} "
        f"TFLOP/s dense bf16), torch {results['machine']['versions'].get('torch')}, transformers "
        f"{results['machine']['versions'].get('transformers')}, peft {results['machine']['versions'].get('peft')}, "
        f"trl {results['machine']['versions'].get('trl')}, "
        f"liger {results['machine']['versions'].get('liger-kernel')}; "
        f"{results['wall_seconds']:.0f}s in all.",
        "",
        f"Data: {results['data']['source']}.",
        f"Settings: {s['precision']}, attention {s['attention']}, LoRA r {s['lora_r']} alpha {s['lora_alpha']} "
        f"dropout {s['lora_dropout']} on {s['lora_targets']}, lr {s['learning_rate']} constant, {s['optimizer']}, "
        f"sequence length {s['seq_len']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'} "
        f"(all arms).",
        "",
        "Necessary FLOPs: LoRA "
        + FLOP_FORMULA["lora"]
        + "; full FT "
        + FLOP_FORMULA["full"]
        + "; "
        + FLOP_FORMULA["attn"]
        + "; "
        + FLOP_FORMULA["terms"]
        + ".",
        "",
    ]
    for name, model in results["models"].items():
        p = model["plan"]
        st = model["lengths"]
        out += [
            f"### {name}: hidden {model['shape']['hidden']}, {model['shape']['layers']} layers, vocab "
            f"{model['counts']['vocab']:,}, N_body {model['counts']['n_body']:,}, N_lora "
            f"{model['counts']['n_lora']:,}; tokenizer: {model['recipe']['tokenizer']}",
            "",
            f"{p['samples_per_step']} samples per step, {p['steps']} steps (a: micro-batches of "
            f"{p['usual_micro_batch']}, b: {p['rows_per_step']} packed rows of {s['seq_len']} per step); train "
            f"samples {st['samples']}: mean {st['mean']:.0f} tokens, p50/p90/p99/max {st['p50']}/{st['p90']}/"
            f"{st['p99']}/{st['max']}, {100 * st['trained_share']:.0f}% trained.",
            "",
            model_table(name, model),
            "",
        ]
    ft = results.get("full_ft")
    if ft:
        out += [
            f"### full fine-tuning, {ft['model']} shape, through tunelab",
            "",
            "| precision | steps | train loss first -> last | held-out loss before -> after | trainable tok/s "
            "| MFU (6N) | peak memory | result |",
            "|---|---|---|---|---|---|---|---|",
        ]
        if ft.get("status") != "ok":
            out.append(f"| all | {failure(ft)} | | | | | | |")
        for r in ft.get("runs", []):
            out.append(
                f"| {r['precision']} | {r['steps']} | {fmt(r.get('first_loss'), '.3f')} -> "
                f"{fmt(r.get('last_loss'), '.3f')} | {fmt(r.get('eval_loss_start'), '.3f')} -> "
                f"{fmt(r.get('eval_loss_end'), '.3f')} | {fmt(r.get('trainable_tps'), ',.0f')} "
                f"| {fmt(r.get('mfu'), '.1f', 100, '%')} "
                f"| {fmt(r.get('peak_mem_bytes'), '.1f', 2**-30, ' GiB')} "
                f"| {'ok' if r.get('ok') else 'NOT OK: ' + str(r.get('error'))}"
                f"{'' if r.get('masters_fp32') is not False else ' (trained weights not fp32)'} |"
            )
        notes = sorted(
            {q for r in ft.get("runs", []) for q in (r.get("quirks") or []) if "precision" in q or "fp" in q}
        )
        out += [f"\ntunelab's notes: {'; '.join(notes)}" if notes else "", ""]
    rows = targets(results)
    if rows:
        out += ["### targets", "", "| target | value | wanted | met |", "|---|---|---|---|"]
        out += [
            f"| {what} | {value} | {want} | {'n/a' if met is None else 'yes' if met else 'NO'} |"
            for what, value, want, met in rows
        ]
    return "\n".join(out) + "\n"


def machine(device: str, peak: float | None) -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "tokenizers",
        "liger-kernel",
        "flash-attn",
    ):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    info = {
        "device": name,
        "peak_flops": peak,
        "versions": versions,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny Qwen2 (hidden 64, 2 layers, 512-token BPE), 3 steps, on the CPU unless --device cuda",
    )
    p.add_argument("--models", default=None, help="comma list of 7b, 0.5b (default both; smoke: smoke)")
    p.add_argument(
        "--shared",
        default=None,
        help="folder laid out like ../shared (tokenizers/qwen2.5-instruct, datasets/self-llm/huanhuan.json, "
        "datasets/llama-factory/alpaca_en_demo.json); 'none' = generated data and a local tokenizer",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default per shape: 30; smoke 3)")
    p.add_argument("--samples-per-step", type=int, default=None, help="samples per step (default 0.5b 128, 7b 96)")
    p.add_argument("--seq-len", type=int, default=None, help="cutoff / packed row length (default 2048; smoke 256)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--eval-samples", type=int, default=None, help="held-out samples (default 64; smoke 4)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on in every arm (default off)")
    p.add_argument("--cap-seconds", type=float, default=None, help="cap on each arm's training time")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="wall-clock seconds for the whole run; arms that would not fit are skipped (default 420; smoke none)",
    )
    p.add_argument("--no-full-ft", dest="full_ft", action="store_false", help="skip the full fine-tuning check")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of c, a, b")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, when not known")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--work", default=None, help=f"work folder (default {shown(WORK)})")
    p.add_argument(
        "--out",
        default=None,
        help="results JSON (default bench/gpu_results.json; smoke: bench/.work/gpu/smoke_results.json)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    global WORK
    args = parse_args(argv)
    started = time.perf_counter()
    import importlib.util

    if importlib.util.find_spec("tunelab") is None:  # a bare checkout (the GPU machine): use src/ as it is
        sys.path.insert(0, str(ROOT / "src"))
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.work:
        WORK = Path(args.work).resolve()
    WORK.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in (args.models or ("smoke" if args.smoke else "7b,0.5b")).split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(SHAPES)}")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    seq_len = args.seq_len or (256 if args.smoke else 2048)
    n_eval = args.eval_samples or (4 if args.smoke else 64)
    budget = Budget(args.budget if args.budget is not None else (None if args.smoke else 420))
    default_out = WORK / "smoke_results.json" if args.smoke else HERE / "gpu_results.json"
    out_path = Path(args.out) if args.out else default_out
    peak = peak_flops(torch.cuda.get_device_name() if device == "cuda" else None, args.peak_tflops)
    precision = "bf16" if device == "cuda" else "fp32"
    attention = "sdpa"
    if device == "cuda":
        if importlib.util.find_spec("flash_attn") is not None and torch.cuda.get_device_capability() >= (8, 0):
            attention = "flash_attention_2"

    trl_ok = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    if "b" in arms and not trl_ok:
        print("trl (or datasets) is not installed: arm b is skipped; pip install 'tunelab[bench]'", flush=True)
    shared = None if (args.shared or "").lower() == "none" else Path(args.shared) if args.shared else default_shared()
    if shared is not None and not shared.is_dir():
        raise SystemExit(f"--shared {shared}: no such folder")
    files = shared_files(shared)
    records, source = load_records(files)
    print(
        f"device {device} ({precision}, attention {attention}, peak {fmt(peak, '.0f', 1e-12)} TFLOP/s); "
        f"data: {len(records)} records from {source}",
        flush=True,
    )

    env = dict(
        os.environ,
        TUNELAB_CACHE=str(WORK / "cache" / "tunelab"),
        HF_DATASETS_CACHE=str(WORK / "cache" / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in [str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH")] if p),
    )
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.smoke and device == "cpu":
        # a tiny model gains nothing from threads, and OpenMP threads spinning on a busy 2-core machine
        # (tests running beside) make a 1-second step take 20
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    shutil.rmtree(WORK / "runs", ignore_errors=True)

    results = {
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(device, peak),
        "flop_formula": FLOP_FORMULA,
        "models": {},
        "settings": {
            "precision": precision,
            "attention": attention,
            "seq_len": seq_len,
            "learning_rate": args.learning_rate,
            "lora_r": LORA["r"],
            "lora_alpha": LORA["alpha"],
            "lora_dropout": args.lora_dropout,
            "lora_targets": "q,k,v,o,gate,up,down",
            "optimizer": "adamw_torch_fused" if device == "cuda" else "adamw_torch",
            "gradient_checkpointing": args.gradient_checkpointing,
            "eval_samples": n_eval,
            "smoke": args.smoke,
            "device": device,
            "tf32": device == "cuda",
        },
    }
    texts = [r[k] for r in records for k in ("instruction", "input", "output") if r[k]]  # for a local tokenizer

    def prepare(name: str, n_train: int):
        """Model folder, tokenizer, train records (written to a file) and encoded held-out samples of one shape."""
        from transformers import AutoTokenizer

        train, held_out = split_records(records, n_train, n_eval)
        folder, recipe = build_model(name, files, texts, device)
        tok = AutoTokenizer.from_pretrained(folder)
        data_file = WORK / "data" / f"{name}-{n_train}.json"
        data_file.parent.mkdir(parents=True, exist_ok=True)
        rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in train]
        data_file.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        return folder, recipe, tok, train, data_file, [encode(tok, r, seq_len) for r in held_out]

    base = {
        "seed": SEED,
        "seq_len": seq_len,
        "learning_rate": args.learning_rate,
        "lora_r": LORA["r"],
        "lora_alpha": LORA["alpha"],
        "lora_dropout": args.lora_dropout,
        "precision": precision,
        "attention": attention,
        "optim": results["settings"]["optimizer"],
        "device": device,
        "gradient_checkpointing": args.gradient_checkpointing,
        "peak_flops": peak,
        "warmup_steps": 1 if args.smoke else 2,
    }
    failed = False

    full_ft_model = "smoke" if args.smoke else "0.5b"
    if args.full_ft:
        print(f"[full fine-tuning, {full_ft_model} shape, bf16 and fp16]", flush=True)
        plan = FULL_FT[full_ft_model]
        folder, recipe, tok, train, data_file, held_out = prepare(
            full_ft_model, plan["samples_per_step"] * plan["steps"]
        )
        counts = shape_counts(SHAPES[full_ft_model], recipe.get("vocab") or len(tok), lora_r=None)
        spec = {
            **base,
            "arm": "fullft",
            "tag": f"{full_ft_model}-fullft",
            "model": str(folder),
            "train_file": str(data_file),
            "samples_per_step": plan["samples_per_step"],
            "steps": plan["steps"],
            "learning_rate": plan["learning_rate"],
            "cap_seconds": args.cap_seconds or plan["cap_seconds"],
            "counts": counts,
            "pad_id": tok.pad_token_id,
            "eval_samples": held_out,
            "output_dir": str(WORK / "runs" / f"{full_ft_model}-fullft"),
            "precisions": ["bf16", "fp16"],
        }
        ft = run_job(spec, env, budget, PLANS[full_ft_model]["overhead"] * 2)
        ft["model"] = full_ft_model
        results["full_ft"] = ft
        failed |= ft["status"] != "ok" or not all(r.get("ok") for r in ft.get("runs", []))

    for name in models:
        plan = dict(PLANS[name])
        if args.steps:
            plan["steps"] = args.steps
        if args.samples_per_step:
            plan["samples_per_step"] = args.samples_per_step
        plan["usual_micro_batch"] = min(plan["usual_micro_batch"], plan["samples_per_step"])
        if plan["samples_per_step"] % plan["usual_micro_batch"]:
            raise SystemExit(
                f"--samples-per-step {plan['samples_per_step']} must be a multiple of the usual "
                f"recipe's micro-batch, {plan['usual_micro_batch']}"
            )
        print(f"[{name}]", flush=True)
        folder, recipe, tok, train, data_file, held_out = prepare(name, plan["samples_per_step"] * plan["steps"])
        from tunelab.data.packing import best_fit

        encoded = [encode(tok, r, seq_len) for r in train]
        # TRL's completion ends with the newline after the end-of-turn token: one token more per sample
        rows = len(best_fit([min(len(e["ids"]) + 1, seq_len) for e in encoded], seq_len))
        plan["rows_per_step"] = max(1, round(rows / plan["steps"]))
        counts = shape_counts(SHAPES[name], SHAPES[name]["vocab"] or len(tok))
        lengths = length_stats(encoded)
        print(
            f"  {len(train)} train samples, mean {lengths['mean']:.0f} tokens (p99 {lengths['p99']}, max "
            f"{lengths['max']}), {100 * lengths['trained_share']:.0f}% trained; b packs {rows} rows -> "
            f"{plan['rows_per_step']} per step",
            flush=True,
        )
        model = {
            "shape": SHAPES[name],
            "recipe": recipe,
            "plan": plan,
            "counts": counts,
            "lengths": lengths,
            "arms": {},
        }
        results["models"][name] = model
        for arm in arms:
            if arm == "b" and not trl_ok:
                model["arms"][arm] = {"arm": arm, "status": "skipped", "error": "trl is not installed"}
                continue
            spec = {
                **base,
                "arm": arm,
                "tag": f"{name}-{arm}",
                "model": str(folder),
                "train_file": str(data_file),
                "samples_per_step": plan["samples_per_step"],
                "steps": plan["steps"],
                "usual_micro_batch": plan["usual_micro_batch"],
                "rows_per_step": plan["rows_per_step"],
                "cap_seconds": args.cap_seconds or plan["cap_seconds"],
                "counts": counts,
                "pad_id": tok.pad_token_id,
                "eval_samples": held_out,
                "output_dir": str(WORK / "runs" / f"{name}-{arm}"),
            }
            model["arms"][arm] = run_job(spec, env, budget, plan["overhead"])
            failed |= model["arms"][arm]["status"] != "ok"
        model["ratios"] = compare(model["arms"])

    results["data"] = {"source": source, "records": len(records), "shared": str(shared) if shared else None}
    results["wall_seconds"] = time.perf_counter() - started
    results["targets"] = [{"target": w, "value": v, "wanted": t, "met": m} for w, v, t, m in targets(results)]
    results["report_md"] = report(results)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print()
    print(results["report_md"])
    print(f"wrote {out_path} ({results['wall_seconds']:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
