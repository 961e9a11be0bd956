"""`estimate_memory`: exact parameter counts from config.json alone, and a peak-memory estimate that is
checked against the measured peak of real training runs on CPU (tiny models, 2 steps each).

How the peak is measured, in a driver process started from this file (see `_driver`):
- tunelab's own recipe trains each config (prepare_model, TunelabTrainer, PadCollator, its loss);
  measured = peak RSS (VmHWM) minus RSS before the model was built;
- the driver imports everything, then forks one child per config, which first trains a micro model
  (first-use imports, code pages and allocator arenas are process overhead, like a CUDA context),
  so every run starts from the same state; file-backed pages (library code) are not counted;
- MALLOC_MMAP_THRESHOLD_=65536: with glibc's default, freed activation memory stays in the heap and
  RSS reads up to 2x the memory in use; the estimate is of memory in use, as on a GPU;
- weights are copied into anonymous memory: on CPU from_pretrained maps the safetensors file, and
  embedding rows that are never read would not count, while a GPU holds them all;
- one thread (OMP_NUM_THREADS=1): steady timing on a shared 2-core machine.
Data: text samples of distinct lengths, one of them cutoff_len long, so every batch is padded and
cutoff_len wide: the worst case the estimate describes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MiB = 2**20
MICRO = dict(arch="llama", vocab=600, hidden=32, layers=1, heads=2)
MODELS = {
    "llama-v600": dict(arch="llama", vocab=600, hidden=256, layers=4, heads=4),
    "llama-v32000": dict(arch="llama", vocab=32000, hidden=256, layers=4, heads=4),
    "qwen2-v8000": dict(arch="qwen2", vocab=8000, hidden=384, layers=6, heads=6),
}
# (model, config keys): LoRA and full, checkpointing on and off, small and big vocabulary, long and short rows
CONFIGS = [
    ("llama-v600", dict(finetuning_type="lora", per_device_train_batch_size=4, cutoff_len=512)),
    (
        "llama-v600",
        dict(finetuning_type="lora", per_device_train_batch_size=4, cutoff_len=512, gradient_checkpointing=True),
    ),
    ("llama-v32000", dict(finetuning_type="full", per_device_train_batch_size=2, cutoff_len=128)),
    ("llama-v32000", dict(finetuning_type="lora", per_device_train_batch_size=2, cutoff_len=256)),
    (
        "qwen2-v8000",
        dict(finetuning_type="full", per_device_train_batch_size=4, cutoff_len=256, gradient_checkpointing=True),
    ),
]
COMMON = dict(dataset_format="text", train_on="all", max_steps=2, logging_steps=100, report_to="none")


def _build(out: Path, tokenizer, arch, vocab, **dims) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.demo.build import tiny_config

    config = tiny_config(arch, vocab, **dims)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _rows(tokenizer, cutoff: int, n: int) -> list[str]:
    """n texts of distinct token lengths (eos included): cutoff + 8 (truncated to cutoff), cutoff - 1, ..."""
    words = sorted(
        t.replace("\u0120", " ") for t in tokenizer.get_vocab() if t.startswith("\u0120") and t[1:].isalpha()
    )
    words = [w for w in words if len(tokenizer(w)["input_ids"]) == 1]  # one token each, also in a row
    rows = []
    for j in range(n):
        length = cutoff + 8 if j == 0 else cutoff - j
        rows.append("".join(words[(7 * j + k) % len(words)] for k in range(length - 1)))
    assert [len(tokenizer(r)["input_ids"]) + 1 for r in rows[1:]] == [cutoff - j for j in range(1, n)]
    return rows


def _dataset(folder: Path, tokenizer, cutoff: int, batch: int) -> str:
    path = folder / f"rows_{cutoff}_{batch}.jsonl"
    if not path.exists():  # two batches: both padded, one of them cutoff_len wide
        rows = _rows(tokenizer, cutoff, 2 * batch)
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer) -> dict:
    folder = tmp_path_factory.mktemp("estimate")
    models = {name: _build(folder / name, tokenizer, **spec) for name, spec in {**MODELS, "micro": MICRO}.items()}
    return {"folder": folder, "models": models, "tokenizer": tokenizer}


def _keys(built, model: str, keys: dict) -> dict:
    data = _dataset(built["folder"], built["tokenizer"], keys["cutoff_len"], keys["per_device_train_batch_size"])
    return {**COMMON, **keys, "model": built["models"][model], "dataset": data}


def _config(built, model: str, keys: dict):
    from tunelab.config import from_dict

    return from_dict({**_keys(built, model, keys), "output_dir": str(built["folder"] / "out")})


def test_parameters_are_counted_from_config_json_alone(built, tmp_path):
    import torch

    from tunelab.config import Config
    from tunelab.model.adapters import attach_lora
    from tunelab.model.estimate import estimate_memory
    from tunelab.model.loader import load_model
    from tunelab.model.quirks import count_parameters

    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(Path(built["models"]["qwen2-v8000"]) / "config.json", folder)  # no weights, no tokenizer
    full = estimate_memory(Config(model=str(folder), finetuning_type="full"), device="cpu")
    lora = estimate_memory(Config(model=str(folder), lora_r=4, lora_target="q_proj,v_proj,down_proj"), device="cpu")

    real = load_model(built["models"]["qwen2-v8000"], torch.float32)
    assert full.params == full.trainable == sum(p.numel() for p in real.parameters())
    assert lora.params == full.params
    assert (
        lora.trainable
        == count_parameters(attach_lora(real, Config(lora_r=4, lora_target="q_proj,v_proj,down_proj")))[0]
    )


def test_a_missing_model_folder_is_a_one_line_error(tmp_path):
    from tunelab.config import Config
    from tunelab.errors import TunelabError
    from tunelab.model.estimate import estimate_memory

    with pytest.raises(TunelabError, match="not found") as err:
        estimate_memory(Config(model=str(tmp_path / "nowhere")))
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="config.json"):
        estimate_memory(Config(model=str(tmp_path / "empty")))


def test_a_gpu_run_is_estimated_on_a_laptop_in_bf16_and_smaller_with_a_4bit_base(built):
    from tunelab.model.estimate import estimate_memory, format_estimate

    keys = dict(finetuning_type="lora", per_device_train_batch_size=2, cutoff_len=256)
    cpu = estimate_memory(_config(built, "llama-v32000", keys), device="cpu")
    gpu = estimate_memory(_config(built, "llama-v32000", keys), device="cuda")
    qlora = estimate_memory(_config(built, "llama-v32000", keys), device="cuda", quant_bits=4)
    assert (cpu.dtype, gpu.dtype) == ("float32", "bfloat16")
    assert gpu.parts["weights"] < cpu.parts["weights"] and "CUDA context" in gpu.parts
    assert qlora.parts["weights"] < gpu.parts["weights"] and qlora.trainable == gpu.trainable
    text = format_estimate(gpu)
    for row in ("weights", "gradients", "optimizer states", "activations", "logits/loss", "peak per device"):
        assert row in text
    assert "MiB" in text and f"{gpu.params:,}" in text


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset and read peak RSS")
def test_estimate_is_within_25_percent_of_the_measured_peak(built):
    from tunelab.model.estimate import estimate_memory

    # what a first run of each kind loads once (modules peft imports on first use among them) is not training memory
    warmup = [
        _keys(
            built,
            "micro",
            dict(finetuning_type=kind, gradient_checkpointing=True, per_device_train_batch_size=2, cutoff_len=16),
        )
        for kind in ("full", "lora")
    ]
    jobs = [_keys(built, model, keys) for model, keys in CONFIGS]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MALLOC_MMAP_THRESHOLD_="65536",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    request = json.dumps({"warmup": warmup, "jobs": jobs, "out": str(built["folder"] / "runs")})
    proc = subprocess.run(
        [sys.executable, __file__], input=request, capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(measured) == len(CONFIGS), proc.stdout + proc.stderr[-3000:]

    rows, errors = [], []
    for (model, keys), got in zip(CONFIGS, measured):
        assert "error" not in got, got
        est = estimate_memory(_config(built, model, keys), device="cpu")
        adapters = est.trainable if keys["finetuning_type"] == "lora" else 0  # peft counts them in its total
        assert (est.trainable, est.params + adapters) == (got["trainable"], got["params"])
        err = (est.total - got["peak"]) / got["peak"]
        label = (
            f"{model} {keys['finetuning_type']}{' +ckpt' if keys.get('gradient_checkpointing') else ''} "
            f"{keys['per_device_train_batch_size']}x{keys['cutoff_len']}"
        )
        rows.append(f"{label:<34}{est.total / MiB:>10.1f}{got['peak'] / MiB:>10.1f}{100 * err:>+9.1f}%")
        errors.append(abs(err))
    print("\n" + f"{'config':<34}{'est MiB':>10}{'meas MiB':>10}{'error':>10}\n" + "\n".join(rows))
    assert max(errors) <= 0.25, "\n".join(rows)


def _driver() -> None:
    """Reads {"warmup", "jobs", "out"} on stdin; prints one JSON line per job: peak bytes and parameter counts."""
    import gc
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    __import__("peft")  # imported before forking, as the rest
    import transformers

    from tunelab.config import from_dict
    from tunelab.data.dataset import PadCollator, SampleDataset, build_datasets
    from tunelab.data.tokenizer import prepare_tokenizer
    from tunelab.train.arguments import training_arguments
    from tunelab.train.setup import prepare_model
    from tunelab.train.trainer import TunelabTrainer

    transformers.logging.set_verbosity_error()

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    class Peak(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.peak = status("VmHWM")  # before the end-of-training checkpoint, which is not training memory
            control.should_save = False

    def run(keys: dict, out: str) -> dict:
        cfg = from_dict({**keys, "output_dir": out})
        tokenizer, path, _ = prepare_tokenizer(cfg)
        data = build_datasets(cfg, tokenizer)
        gc.collect()
        base, file_base = status("VmRSS"), status("RssFile")
        model, dtype, _, (trainable, total) = prepare_model(cfg, tokenizer, data, path)
        for p in model.parameters():
            p.data = p.data.clone()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        peak = Peak()
        trainer = TunelabTrainer(
            model=model,
            args=training_arguments(cfg, dtype, False),
            callbacks=[peak],
            train_dataset=SampleDataset(data.train),
            data_collator=PadCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
        )
        trainer.remove_callback(transformers.ProgressCallback)
        trainer.train()
        faulted_files = status("RssFile") - file_base
        return {"peak": peak.peak - base - faulted_files, "trainable": trainable, "params": total}

    request = json.loads(sys.stdin.read())
    for i, keys in enumerate(request["jobs"]):
        read, write = os.pipe()
        pid = os.fork()  # the parent has only imported modules: nothing has run that forking could break
        if pid == 0:
            os.close(read)
            try:
                for warm in request["warmup"]:
                    run(warm, f"{request['out']}/warmup{i}")
                gc.collect()
                line = json.dumps(run(keys, f"{request['out']}/{i}"))
            except BaseException as exc:  # reported by the test as a failure
                line = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
            os.write(write, (line + "\n").encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            line = f.read()
        os.waitpid(pid, 0)
        print(line.strip(), flush=True)


if __name__ == "__main__":
    _driver()


def test_pure_bf16_holds_two_bytes_per_trained_weight_gradient_and_moment(built):
    from tunelab.model.estimate import estimate_memory

    keys = dict(finetuning_type="full", per_device_train_batch_size=2, cutoff_len=256, bf16=True)
    mixed = estimate_memory(_config(built, "llama-v32000", keys), device="cuda")
    pure = estimate_memory(_config(built, "llama-v32000", {**keys, "pure_bf16": True}), device="cuda")
    n = pure.params
    assert mixed.parts["weights"] == 6 * n, "fp32 masters plus their bf16 copies under autocast"
    assert (pure.parts["weights"], pure.parts["gradients"], pure.parts["optimizer states"]) == (2 * n, 2 * n, 4 * n)
    assert pure.total < mixed.total - 2 * n
    assert any("pure_bf16" in note for note in pure.notes)


QWEN25_3B = {  # the public config.json of Qwen2.5-3B (shape only: nothing is loaded)
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}


def test_each_engine_splits_what_it_shards_and_estimate_says_what_fits_a_gpu(tmp_path, capsys):
    import json

    import yaml

    from tunelab.cli import main
    from tunelab.config import Config
    from tunelab.model.estimate import estimate_memory

    folder = tmp_path / "qwen2.5-3b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN25_3B))
    keys = dict(
        model=str(folder),
        finetuning_type="full",
        bf16=True,
        gradient_checkpointing=True,
        per_device_train_batch_size=2,
        cutoff_len=1024,
    )
    cfg = Config(**keys)

    def peak(engine, world=8, offload="none"):
        return estimate_memory(cfg, device="cuda", engine=engine, world=world, offload=offload)

    one, ddp, fsdp, z2, z3 = peak("single", 1), peak("ddp"), peak("fsdp2"), peak("zero2"), peak("zero3")
    assert ddp.total > one.total, "DDP adds its gradient buckets"
    assert fsdp.parts["weights"] == one.parts["weights"] // 8
    assert fsdp.parts["optimizer states"] == one.parts["optimizer states"] // 8
    assert z2.parts["weights"] > z3.parts["weights"], "ZeRO-2 keeps the whole model in bf16 on each GPU"
    assert peak("zero3", offload="params").total < peak("zero3", offload="optimizer").total < z3.total < z2.total
    assert peak("zero3", offload="optimizer").parts["optimizer states"] == 0
    assert z3.total < ddp.total / 3 and fsdp.total < ddp.total / 3
    assert fsdp.parts["gathered layers"] > 0

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**keys, "dataset": "x.jsonl", "output_dir": str(tmp_path / "out")}))
    assert main(["estimate", str(path), "nproc_per_node=8", "--gpu-mem", "40GB", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("  ")[1].strip(): line
        for line in out.splitlines()
        if line.startswith("  ") and "(" in line and "distributed:" in line
    }
    assert "does not fit" in rows["ddp"] and "does not fit" not in rows["fsdp2"]
    assert "auto picks fsdp2: the model with its gradients and optimizer state does not fit one device" in out
    assert main(["estimate", str(path), "nproc_per_node=8", "--gpu-mem", "141GB", "--device", "cuda"]) == 0
    assert "auto picks ddp" in capsys.readouterr().out


def test_a_preference_stage_counts_two_sequences_per_pair_and_its_reference(built):
    """Both completions of a pair share one forward: a dpo batch of b pairs holds the activations of 2b sequences.
    The reference of a LoRA run is the base itself; of a full run a frozen copy, unless precompute_ref."""
    import dataclasses

    from tunelab.model.estimate import estimate_memory

    keys = dict(finetuning_type="lora", per_device_train_batch_size=2, cutoff_len=128)
    sft = _config(built, "llama-v600", keys)
    dpo = dataclasses.replace(sft, stage="dpo")
    doubled = dataclasses.replace(sft, per_device_train_batch_size=4)
    est, twice = estimate_memory(dpo, device="cpu"), estimate_memory(doubled, device="cpu")
    assert (
        est.parts["activations"] == twice.parts["activations"] > estimate_memory(sft, device="cpu").parts["activations"]
    )
    assert "reference model" not in est.parts and any("adapters off" in n for n in est.notes)

    full = dataclasses.replace(dpo, finetuning_type="full")
    with_copy = estimate_memory(full, device="cpu")
    assert with_copy.parts["reference model"] == with_copy.params * 4  # fp32, as the trained weights start
    precomputed = estimate_memory(dataclasses.replace(full, precompute_ref=True), device="cpu")
    assert "reference model" not in precomputed.parts
    assert with_copy.total - precomputed.total == with_copy.params * 4
    free = estimate_memory(dataclasses.replace(full, pref_loss="simpo"), device="cpu")
    assert "reference model" not in free.parts
