"""The same config on one process or several: DDP and FSDP2 over gloo on CPU, as they run over NCCL on GPUs.

- `nproc_per_node: 2` starts two processes through torchrun's launcher; with the same global batch
  (2 x 4 against 1 x 8) they train the same losses as one process (fp32, within 1e-4), see every
  sample exactly once per epoch between them (also when the last step cannot be split evenly,
  where accelerate alone would train some samples twice), and leave one run folder whose adapter or full model
  reloads in plain peft/transformers with the trained model's logits.
- `torchrun -m tunelab train` and two "nodes" on localhost (`nnodes: 2`, the same command with its own
  `node_rank`) train and save once.
- A rank killed mid-run ends the whole job quickly, and the error names the rank; resuming from the
  last checkpoint ends with the weights of an uninterrupted run (1e-6).
- Ctrl-C stops every rank after the same step, with one checkpoint saved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.train.launch import free_port
from tunelab.train.run import train

ROOT = Path(__file__).resolve().parents[2]
COMMON = dict(
    num_train_epochs=1,
    max_steps=-1,
    logging_steps=1,
    learning_rate=1e-2,
    lr_scheduler_type="constant",
    lora_dropout=0.0,
    group_by_length=False,
    save_steps=1000,
    seed=7,
)


def _env() -> dict:
    src = str(ROOT / "src")
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )


def _losses(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics if "loss" in m]


def _logits(model, tokenizer_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok("What is 5 plus 5? It is 10.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


# LoRA on DDP and full weights sharded by FSDP2 (the harder save); LoRA on FSDP2 against one process is
# bench/gpu_engines.py's CPU run (tests/test_bench_gpu.py), full weights on DDP differ from LoRA on DDP only
# in what the optimizer holds
@pytest.mark.parametrize("finetuning_type,engine", [("lora", "ddp"), ("full", "fsdp2")])
def test_two_processes_train_like_one_with_the_same_global_batch(finetuning_type, engine, run_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # 22 training samples: the last step has 6, which two ranks of 4 cannot split evenly (fillers complete it)
    keys = dict(
        COMMON,
        finetuning_type=finetuning_type,
        learning_rate=1e-2 if finetuning_type == "lora" else 1e-3,
        max_samples=27,
        val_size=5,
    )
    one = train(
        run_config(
            output_dir=tmp_path / "one",
            nproc_per_node=1,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            **keys,
        )
    )
    two = train(
        run_config(
            output_dir=tmp_path / "two",
            nproc_per_node=2,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=2,
            distributed=engine,
            **keys,
        )
    )

    assert two.summary["processes"] == 2 and one.summary["processes"] == 1 and two.summary["engine"] == engine
    # DDP: each rank loads the model; FSDP2: rank 0 alone reads the weights and sends the others their shards
    assert two.summary["ranks_reading_weights"] == (1 if engine == "fsdp2" else 2)
    assert len(_losses(two.metrics)) == len(_losses(one.metrics)) == 3, "22 samples, 8 per step: 3 steps each"
    assert _losses(two.metrics) == pytest.approx(_losses(one.metrics), abs=1e-4)
    for run in (one, two):  # each sample once per epoch: all ranks' trained tokens add up to the data's
        assert run.summary["tokens_trained_seen"] == run.summary["trained_tokens"]
    # 5 held-out samples over 2 ranks x 2 per batch: every token counted once, whatever the batching
    evals = [[m for m in run.metrics if "eval_loss" in m][-1] for run in (one, two)]
    assert evals[0]["eval_tokens"] == evals[1]["eval_tokens"] > 0
    assert evals[1]["eval_loss"] == pytest.approx(evals[0]["eval_loss"], abs=1e-5)

    if finetuning_type == "lora":
        base = AutoModelForCausalLM.from_pretrained(run_config().model, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "two"))
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two"), dtype=torch.float32)
    torch.testing.assert_close(
        _logits(reloaded, tmp_path / "two"), _logits(one.model, tmp_path / "one"), atol=1e-4, rtol=1e-4
    )
    assert not list((tmp_path / "two").glob("rng_state*")) and (tmp_path / "two" / "run_summary.json").is_file()


def _write_config(run_config, path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(run_config.data(**{**COMMON, **keys})))
    return path


def test_torchrun_and_two_nodes_on_localhost_train_and_save_once(run_config, tmp_path):
    torchrun = _write_config(
        run_config, tmp_path / "torchrun.yaml", output_dir=str(tmp_path / "torchrun"), per_device_train_batch_size=4
    )
    port = free_port()
    nodes = _write_config(
        run_config,
        tmp_path / "nodes.yaml",
        output_dir=str(tmp_path / "nodes"),
        per_device_train_batch_size=4,
        nnodes=2,
        nproc_per_node=1,
        master_port=port,
    )
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                "-m",
                "tunelab",
                "train",
                str(torchrun),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    ]
    jobs += [
        subprocess.Popen(
            [sys.executable, "-m", "tunelab", "train", str(nodes), f"node_rank={rank}"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], "\n---\n".join(outputs)
    for folder in ("torchrun", "nodes"):
        summary = json.loads((tmp_path / folder / "run_summary.json").read_text())
        assert summary["processes"] == 2 and summary["global_step"] == 3
        rows = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3], "one writer: rank 0"
    assert "global batch: 4 per device x 1 accumulation x 2 processes = 8 samples per step" in outputs[1]


def _worker_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the training processes under `launcher`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        rank = next((e[5:] for e in environ if e.startswith(b"RANK=")), None)
        if ppid == launcher and rank is not None:
            found[int(rank)] = int(proc.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc")
def test_a_killed_rank_ends_the_job_quickly_naming_the_rank_and_the_run_resumes_exactly(run_config, tmp_path):
    from safetensors.torch import load_file

    keys = dict(nproc_per_node=2, per_device_train_batch_size=2, ddp_timeout=30, save_steps=3)
    config = _write_config(
        run_config, tmp_path / "run.yaml", output_dir=str(tmp_path / "run"), num_train_epochs=200, **keys
    )
    job = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(config)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not list((tmp_path / "run").glob("checkpoint-*")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _worker_pids(job.pid)
    assert set(workers) == {0, 1}, job.communicate(timeout=5)[0] if job.poll() is not None else workers
    killed = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    output = job.communicate(timeout=120)[0]
    assert job.returncode != 0
    assert time.monotonic() - killed < 60
    assert "rank 1 of the training job failed" in output and "signal 9" in output.lower(), output[-2000:]
    assert "Traceback" not in output.split("rank 1 of the training job failed")[-1]

    last = max(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    end = last + 3
    resumed = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(config), "resume_from_checkpoint=auto", f"max_steps={end}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0 and f"resuming from {tmp_path / 'run'}" in resumed.stderr, resumed.stderr[-3000:]
    reference = train(run_config(**{**COMMON, **keys, "output_dir": tmp_path / "reference", "max_steps": end}))
    assert reference.summary["global_step"] == end
    got = load_file(tmp_path / "run" / "adapter_model.safetensors")
    want = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    logged = {
        run: [
            (m["step"], m["loss"])
            for m in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
            if "loss" in m
        ]
        for run in ("run", "reference")
    }
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}\nresumed from step {last}: {logged}"
        )


def test_ctrl_c_stops_every_rank_after_the_same_step_saves_once_and_resumes(run_config, tmp_path):
    config = _write_config(
        run_config,
        tmp_path / "run.yaml",
        output_dir=str(tmp_path / "run"),
        nproc_per_node=2,
        per_device_train_batch_size=2,
        num_train_epochs=200,
        ddp_timeout=60,
    )
    # a terminal's Ctrl-C: SIGINT to the launcher and every rank (one process group)
    job = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(config)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not (tmp_path / "run" / "metrics.jsonl").is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(job.pid, signal.SIGINT)
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 130, output[-3000:]
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1, output[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert "resume_from_checkpoint=auto" in output and "Traceback" not in output, output[-3000:]
    assert sorted(p.name for p in checkpoints[0].glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    # the same YAML under a launcher with another number of processes: refused, naming both
    other = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            str(free_port()),
            "-m",
            "tunelab",
            "train",
            str(config),
            "resume_from_checkpoint=auto",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode != 0
    assert "was written by 2 processes, this run has 1" in other.stderr, other.stderr[-3000:]

    resumed = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(config), "resume_from_checkpoint=auto", f"max_steps={step + 2}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["global_step"] == step + 2 and summary["processes"] == 2


def test_the_error_names_the_rank_that_started_it_not_those_that_lost_their_peer():
    from types import SimpleNamespace as Failure

    from tunelab.train.launch import _root_cause

    lost_peer = Failure(
        exitcode=-signal.SIGTERM,
        timestamp=1,
        message={"message": "RuntimeError: [gloo] Read error: Connection reset by peer"},
    )
    killed = Failure(exitcode=-signal.SIGKILL, timestamp=2, message="<N/A>")
    assert _root_cause({0: lost_peer, 1: killed})[0] == 1, "the killed rank, though the launcher saw it second"
    raised = Failure(exitcode=1, timestamp=5, message={"message": "ValueError: bad batch"})
    stopped = Failure(exitcode=-signal.SIGTERM, timestamp=4, message="<N/A>")
    assert _root_cause({0: stopped, 3: raised})[0] == 3
    first, second = (Failure(exitcode=1, timestamp=t, message={"message": "OSError: disk full"}) for t in (7, 6))
    assert _root_cause({0: first, 1: second})[0] == 1, "otherwise the earliest"
