"""Data preparation at scale: tunelab against `datasets.map` and TRL's dataset preparation, same cores, same data.

    python bench/data_scale.py [--records 20000,200000] [--cores 1,2] [--tokenizer DIR] [--out bench/data_scale.json]

Generates chat records (log-normal lengths, one in five multi-turn, some with a system prompt), then
times each path in a fresh process, cold (empty cache) and warm (its cache from the cold run):
- tunelab data: `tunelab data` (the report included), cache on;
- tunelab train-prep: what training does before the model: tokenizer, samples, the training dataset,
  the length-grouped sampler's lengths, and one read of every sample (an epoch's worth of data access);
- datasets.map: `load_dataset("json")` + batched `map(num_proc=cores)` rendering the chat template,
  tokenizing prompt and prompt+answer apart and masking the prompt (the common recipe; last turn only);
- trl: `SFTTrainer`'s own dataset preparation with `assistant_only_loss` (TRL's generation-marked
  template), `dataset_num_proc=cores`.
Reported per run: wall seconds, records/s, peak resident memory of the main process and the peak
proportional set size (PSS) of the whole process tree (workers included, shared pages split fairly),
and bytes per token (tunelab: its storage; the peers: their Arrow cache on disk).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen2.5-instruct"
WORDS = (
    "the a of to and in is it that for on with as was at by be this from or have an they which one you were "
    "all we when your can said there use each she how their if will up other about out many then them these so "
    "some her would make like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part over new sound take "
    "only little work know place year live me back give most very after thing our just name good sentence man "
    "think say great where help through much before line right too mean old any same tell boy follow came want "
    "show also around form three small set put end does another well large must big even such because turn "
    "here why ask went men read need land different home us move try kind hand picture again change off play "
    "river stone light garden engine letter market winter paper bridge window forest signal doctor"
).split()


def _text(rng: random.Random, mean_words: float) -> str:
    n = max(1, min(2000, int(rng.lognormvariate(math.log(mean_words), 0.8))))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def generate(n: int, path: Path, seed: int = 0) -> Path:
    """n chat records in JSONL: log-normal lengths, 20% with 2-4 turns, 10% with a system prompt."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": _text(rng, 8)}] if rng.random() < 0.1 else []
            for _ in range(rng.randint(2, 4) if rng.random() < 0.2 else 1):
                messages += [
                    {"role": "user", "content": _text(rng, 25)},
                    {"role": "assistant", "content": _text(rng, 60)},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


# ---------------------------------------------------------------- one measured run (in its own process)


def _tunelab(kind: str, data: Path, tokenizer: str, cores: int, cache: Path) -> dict:
    os.environ["TUNELAB_CACHE"] = str(cache)
    from tunelab.config import from_dict

    cfg = from_dict(
        dict(
            model=tokenizer,
            dataset=str(data),
            output_dir=str(cache / "out"),
            cutoff_len=2048,
            preprocessing_num_workers=cores,
        )
    )
    if kind == "tunelab-data":
        from tunelab.data.report import data_report

        data_report(cfg, n_samples=3)
        from tunelab.data.report import load  # the report's numbers come from here; read them again for tokens

        built = load(cfg)[0]
    else:
        from tunelab.data.dataset import SampleDataset, build_datasets
        from tunelab.data.tokenizer import prepare_tokenizer

        tok = prepare_tokenizer(cfg)[0]
        before = _status("VmRSS")
        built = build_datasets(cfg, tok)
        served = SampleDataset(built.train, tok.pad_token_id)
        lengths = served.lengths
        assert len(lengths) == len(served)
        for i in range(len(served)):  # every sample read once, as an epoch reads them
            served[i]
        resident = (_status("VmRSS") - before) * 2**20  # what the data adds to a training process, all read
    arrays = built.train.arrays
    tokens = int(len(arrays["ids"]))
    storage = sum(a.nbytes for a in arrays.values())
    out = {
        "tokens": tokens,
        "samples": len(built.train),
        "bytes_per_token": round(storage / tokens, 2),
        "rss_anon_mb": _status("RssAnon"),
        "rss_file_mb": _status("RssFile"),
    }
    if kind != "tunelab-data":
        out["resident_bytes_per_token"] = round(resident / tokens, 2)
    return out


def _peer(kind: str, data: Path, tokenizer: str, cores: int, cache: Path) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    if kind == "datasets-map":

        def tokenize(batch):
            ids, labels = [], []
            for messages in batch["messages"]:
                prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                full = tok.apply_chat_template(messages, tokenize=False)
                p, f = (
                    tok(prompt, add_special_tokens=False)["input_ids"],
                    tok(full, add_special_tokens=False)["input_ids"],
                )
                ids.append(f[:2048])
                labels.append(([-100] * len(p) + f[len(p) :])[:2048])
            return {"input_ids": ids, "labels": labels}

        out = ds.map(tokenize, batched=True, num_proc=cores if cores > 1 else None, remove_columns=ds.column_names)
    else:
        from types import SimpleNamespace

        from trl import SFTConfig, SFTTrainer

        template = Path(__import__("trl").__file__).parent / "chat_templates" / "qwen2_5_training.jinja"
        args = SFTConfig(
            output_dir=str(cache / "out"),
            assistant_only_loss=True,
            max_length=2048,
            dataset_num_proc=cores if cores > 1 else None,
            report_to=[],
            bf16=False,
            use_cpu=True,
        )
        owner = SimpleNamespace(_tokenizer=tok, chat_template=template.read_text(), completion_only_loss=False)
        out = SFTTrainer._prepare_dataset(owner, ds, tok, args, False, None, "train")
    tokens = sum(len(x) for x in out["input_ids"])
    disk = sum(f.stat().st_size for f in cache.rglob("*.arrow"))
    return {
        "tokens": tokens,
        "samples": len(out),
        "bytes_per_token": round(disk / max(tokens, 1), 2),
        "rss_anon_mb": _status("RssAnon"),
        "rss_file_mb": _status("RssFile"),
    }


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def one(kind: str, data: Path, tokenizer: str, cores: int, cache: Path) -> dict:
    started = time.perf_counter()
    result = (_tunelab if kind.startswith("tunelab") else _peer)(kind, data, tokenizer, cores, cache)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["peak_rss_main_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


# ---------------------------------------------------------------- the driver


def _tree_pss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def measure(kind: str, data: Path, tokenizer: str, cores: int, cache: Path, records: int) -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        kind,
        "--data",
        str(data),
        "--tokenizer",
        tokenizer,
        "--cores",
        str(cores),
        "--cache",
        str(cache),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(
        kind=kind,
        records=records,
        cores=cores,
        records_per_s=round(records / result["seconds"], 1),
        peak_pss_tree_mb=round(peak[0] / 2**20, 1),
    )
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", default="20000,200000")
    p.add_argument("--cores", default="1,2")
    p.add_argument("--kinds", default="tunelab-data,tunelab-train-prep,datasets-map,trl")
    p.add_argument("--tokenizer", default=str(TOKENIZER))
    p.add_argument("--work", default=str(HERE / ".work" / "data_scale"))
    p.add_argument("--out", default=str(HERE / "data_scale.json"))
    p.add_argument("--table", action="store_true", help="print the table of --out's results and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, Path(args.data), args.tokenizer, int(args.cores), Path(args.cache))))
        return
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(x) for x in args.records.split(",")]:
        data = work / f"chat_{n}.jsonl"
        if not data.exists():
            generate(n, data)
        for cores in [os.cpu_count() if c == "all" else int(c) for c in args.cores.split(",")]:
            for kind in args.kinds.split(","):
                cache = Path(tempfile.mkdtemp(dir=work, prefix=f"{kind}-"))
                try:
                    for state in ("cold", "warm"):
                        row = measure(kind, data, args.tokenizer, cores, cache, n)
                        row["state"] = state
                        results.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def table(results: list[dict]) -> str:
    lines = [
        "| records | cores | path | state | seconds | records/s | vs datasets.map | peak RSS main (MB) | "
        "peak PSS all (MB) | stored bytes/token | resident bytes/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["records"], r["cores"], r["state"]): r for r in results if r["kind"] == "datasets-map"}
    for r in results:
        ref = base.get((r["records"], r["cores"], r["state"]))
        ratio = f"{r['records_per_s'] / ref['records_per_s']:.2f}x" if ref else "-"
        lines.append(
            f"| {r['records']:,} | {r['cores']} | {r['kind']} | {r['state']} | {r['seconds']} | "
            f"{r['records_per_s']:,.0f} | {ratio} | {r['peak_rss_main_mb']:,.0f} | {r['peak_pss_tree_mb']:,.0f} | "
            f"{r['bytes_per_token']} | {r.get('resident_bytes_per_token', '-')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
