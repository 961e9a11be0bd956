"""A preference run is a run: the same YAML keys plus `stage`, the same run folder, checkpoints, resume and
processes, with the reward metrics every peer logs.

- every loss trains through `train()`: sigmoid, ipo, hinge, robust, orpo, simpo and KTO, each logging its metrics
  in metrics.jsonl and the eval metrics on held-out pairs;
- the reference of a LoRA run is the base (first step's rewards are exactly 0), of a full run a frozen copy or
  log-probs precomputed before training, and the two give the same run;
- packed rows (padding-free) train the same losses as padded rows;
- two processes (DDP over gloo) train the same losses as one with the same global batch.
"""

from __future__ import annotations

import json

import pytest

from tunelab.train.run import train

QUESTIONS = [
    "What is {i} plus {i}?",
    "Name a colour, number {i}.",
    "Say hello to friend {i}.",
    "Count to {i}.",
]


def _pairs(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)].format(i=i)
        rows.append(
            {
                "messages": [{"role": "user", "content": q}],
                "chosen": {"role": "assistant", "content": f"Certainly. The answer for {i} is ready, kind friend."},
                "rejected": {"role": "assistant", "content": f"no {i}"},
            }
        )
    return rows


@pytest.fixture()
def pref_file(write_data):
    return write_data("pairs.jsonl", _pairs())


@pytest.fixture()
def kto_file(write_data):
    rows = []
    for i, pair in enumerate(_pairs(16)):
        side = "chosen" if i % 2 == 0 else "rejected"
        rows.append({"prompt": pair["messages"], "completion": [pair[side]], "label": side == "chosen"})
    return write_data("kto.jsonl", rows)


COMMON = dict(
    stage="dpo",
    max_steps=3,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    logging_steps=1,
    learning_rate=5e-3,
    lora_dropout=0.0,
    val_size=4,
    seed=5,
)


def _rows(result, key):
    return [m for m in result.metrics if key in m]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "orpo", "simpo"])
def test_each_pair_loss_trains_and_logs_the_reward_metrics(loss, run_config, pref_file, tmp_path):
    extra = {"label_smoothing": 0.1} if loss == "robust" else {}
    result = train(run_config(dataset=pref_file, pref_loss=loss, output_dir=tmp_path / loss, **COMMON, **extra))
    steps = _rows(result, "rewards/margins")
    assert [m["step"] for m in steps] == [1, 2, 3]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert all(key in m for m in steps), key
    if loss not in ("orpo", "simpo"):  # a LoRA reference is the base: before the first update, no reward at all
        assert steps[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
        assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert steps[0]["rewards/chosen"] != 0.0
    evals = _rows(result, "eval_rewards/accuracies")
    assert evals and evals[-1]["eval_pairs"] == 4
    assert result.summary["stage"] == "dpo" and result.summary["train_samples"] == 20
    assert (result.output_dir / "loss.png").is_file() and (result.output_dir / "adapter_model.safetensors").is_file()


def test_kto_trains_on_unpaired_answers_and_logs_its_kl(run_config, kto_file, pref_file, tmp_path):
    result = train(run_config(dataset=kto_file, output_dir=tmp_path / "kto", **{**COMMON, "stage": "kto"}))
    steps = _rows(result, "kl")
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start as the base: no drift yet
    assert any("rewards/chosen" in m for m in steps) and any("rewards/rejected" in m for m in steps)
    last = _rows(result, "rewards/margins")[-1]
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"], "desirable answers pulled up, the others down"
    # judged apart from the trainer's own labels: the desirable style now wins more clearly than under the base
    from tunelab.eval.preference import evaluate_preferences, read_pairs
    from tunelab.infer.load import load_inference

    pairs = read_pairs(pref_file)
    im = load_inference(run_config().model, ["none", str(result.output_dir)])
    base, trained = evaluate_preferences(im, pairs, progress=False)
    assert trained["logp_margin"] > base["logp_margin"] + 1.0


def test_dpo_raises_the_chosen_answers_margin(run_config, pref_file, tmp_path):
    result = train(
        run_config(dataset=pref_file, output_dir=tmp_path / "run", **{**COMMON, "max_steps": 8, "val_size": 0})
    )
    margins = [m["rewards/margins"] for m in _rows(result, "rewards/margins")]
    assert margins[-1] > 0.05 and margins[-1] > margins[1]
    losses = [m["loss"] for m in _rows(result, "loss")]
    assert losses[-1] < losses[0]
    from tunelab.infer.chat import ChatSession

    session = ChatSession.load(str(result.output_dir))  # the run folder chats as an SFT run's does
    assert isinstance(session.ask("What is 3 plus 3?", max_new_tokens=4), str)


def test_full_fine_tuning_precomputed_reference_equals_the_frozen_copy(run_config, pref_file, tmp_path):
    keys = dict(COMMON, finetuning_type="full", learning_rate=1e-3, dataset=pref_file)
    live = train(run_config(output_dir=tmp_path / "live", **keys))
    pre = train(run_config(output_dir=tmp_path / "pre", precompute_ref=True, **keys))
    for key in ("loss", "rewards/margins", "rewards/chosen"):
        a, b = [m[key] for m in _rows(live, key)], [m[key] for m in _rows(pre, key)]
        assert a == pytest.approx(b, abs=1e-5), key
    assert _rows(live, "rewards/chosen")[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    saved = [json.loads(p.read_text()) for p in _reference_files()]
    assert any(len(pairs) == 20 and all(len(pair) == 2 and pair[0] < 0 for pair in pairs) for pairs in saved)


def _reference_files():
    from tunelab.data import cache

    return sorted((cache.cache_dir().parent / "reference").glob("reference_logps_train_*.json"))


def test_precomputed_reference_is_reused_and_recomputed_when_the_reference_changes(
    run_config, llama_dir, pref_file, tmp_path, monkeypatch
):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.train import preference

    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    calls = []
    real = preference.precompute_reference
    monkeypatch.setattr(preference, "precompute_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    keys = dict(COMMON, model=base, finetuning_type="full", learning_rate=1e-3, dataset=pref_file, val_size=0)
    keys.update(precompute_ref=True, max_steps=1)
    first = train(run_config(output_dir=tmp_path / "a", **keys))
    again = train(run_config(output_dir=tmp_path / "b", **keys))
    assert len(calls) == 1, "the same weights and pairs reuse the log-probs"
    assert _rows(again, "loss")[0]["loss"] == _rows(first, "loss")[0]["loss"]

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(base)
    changed = train(run_config(output_dir=tmp_path / "c", **keys))
    assert len(calls) == 2, "new starting weights: the log-probs are computed anew"
    step = _rows(changed, "rewards/chosen")[0]
    assert step["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # measured against the new start, not the old
    assert step["logps/chosen"] != _rows(first, "logps/chosen")[0]["logps/chosen"]


def test_packed_pairs_train_the_same_losses_as_padded_pairs(run_config, pref_file, tmp_path):
    keys = dict(COMMON, dataset=pref_file, val_size=0, group_by_length=False)
    packed = train(run_config(output_dir=tmp_path / "packed", packing=True, **keys))
    padded = train(run_config(output_dir=tmp_path / "padded", packing=False, **keys))
    assert packed.summary["packing"] and not padded.summary["packing"]
    for key in ("loss", "rewards/margins", "logps/chosen"):
        a, b = [m[key] for m in _rows(packed, key)], [m[key] for m in _rows(padded, key)]
        assert a == pytest.approx(b, abs=1e-4), key


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_train_like_one(engine, run_config, pref_file, tmp_path):
    keys = dict(COMMON, dataset=pref_file, val_size=0, lr_scheduler_type="constant", group_by_length=False)
    keys.pop("per_device_train_batch_size")
    one = train(run_config(output_dir=tmp_path / "one", nproc_per_node=1, per_device_train_batch_size=4, **keys))
    two = train(
        run_config(
            output_dir=tmp_path / "two", nproc_per_node=2, per_device_train_batch_size=2, distributed=engine, **keys
        )
    )
    assert two.summary["processes"] == 2 and two.summary["engine"] == engine
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        a, b = [m[key] for m in _rows(one, key)], [m[key] for m in _rows(two, key)]
        assert len(a) == 3 and a == pytest.approx(b, abs=1e-4), key


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(finetuning_type, llama_dir, pref_file, tmp_path):
    """Killed between checkpoints (full: with the reference's log-probs precomputed from the starting weights, not
    the checkpoint's), the resumed run ends with the uninterrupted run's weights."""
    import signal
    import time

    from safetensors.torch import load_file

    from tunelab.config import from_dict
    from tunelab.train import checkpoints

    from .test_resume import child

    keys = dict(
        COMMON,
        model=llama_dir,
        dataset=pref_file,
        finetuning_type=finetuning_type,
        precompute_ref=finetuning_type == "full",
        learning_rate=1e-3 if finetuning_type == "full" else 5e-3,
        lora_dropout=0.1,
        max_steps=6,
        save_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        warmup_ratio=0.2,
    )
    whole = train(from_dict({**keys, "output_dir": str(tmp_path / "whole")}))
    out = tmp_path / "killed"
    proc = child({**keys, "output_dir": str(out)}, STEP_PAUSE="0.3")
    deadline = time.time() + 120
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "run_summary.json").exists(), "the kill came after the run had finished"
    assert checkpoints.latest_checkpoint(out) is not None
    resumed = train(from_dict({**keys, "output_dir": str(out), "resume_from_checkpoint": "auto"}))
    name = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    got, want = load_file(out / name), load_file(whole.output_dir / name)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-6
    margins = {m["step"]: m["rewards/margins"] for m in _rows(resumed, "rewards/margins")}
    for m in _rows(whole, "rewards/margins"):
        assert margins[m["step"]] == pytest.approx(m["rewards/margins"], abs=1e-6), m["step"]


def test_bf16_autocast_trains_dpo_with_fp32_log_probs(run_config, pref_file, tmp_path):
    """The GPU recipe's precision on CPU (bf16 autocast): the head's log-probs still reduce in fp32, so the first
    step's rewards are exactly 0 and the run trains."""
    result = train(run_config(output_dir=tmp_path / "bf16", dataset=pref_file, bf16=True, **{**COMMON, "val_size": 0}))
    assert result.summary["dtype"] == "bfloat16"
    steps = _rows(result, "rewards/margins")
    assert steps[0]["rewards/margins"] == 0.0 and steps[-1]["rewards/margins"] > 0
    assert all(abs(m["logps/chosen"]) < 1e4 for m in steps)
