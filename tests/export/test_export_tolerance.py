"""The export proof's logit tolerance admits rounding to the export dtype and nothing more.

Why: `export` proves a merged folder by reloading it and comparing its logits with base + adapter,
allowing `TOLERANCE[dtype]` x the largest reference logit for rounding the merged weights to bf16
or fp16. A tolerance too loose for those dtypes (e.g. 1e9) would still pass every honest export, so
only a folder that is wrong by far more than rounding, yet verified, shows the proof cannot fail.

How: one small LoRA run, trained hard enough to matter, exported once per dtype. The untouched
export verifies. Then the merged weights are replaced by realistic wrong merges, each producing
logit differences at least 10x what rounding to the dtype produced: the adapter not merged at
all, merged twice, and `lm_head` scaled by 1.25. `verify_folder` must then report `verified` false
with a logit-difference problem.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.config import from_dict
from tunelab.export.merge import export_merged, verify_folder
from tunelab.train.run import train

DTYPES = ["bf16", "fp16", "fp32"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("export_tolerance")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} times two?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(12)
    ]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "lora"
    train(
        from_dict(
            dict(
                model=llama_dir,
                dataset=str(data),
                output_dir=str(out),
                max_steps=15,
                learning_rate=1e-2,
                per_device_train_batch_size=4,
                logging_steps=5,
                save_steps=1000,
            )
        )
    )
    return str(out)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, lora_run):
    """dtype -> (export folder, its report); never modified by the tests."""
    root = tmp_path_factory.mktemp("exports")
    return {dtype: (root / dtype, export_merged(lora_run, None, str(root / dtype), dtype=dtype)) for dtype in DTYPES}


def _not_merged(merged, base):
    return {k: base[k].to(v.dtype) for k, v in merged.items()}


def _merged_twice(merged, base):
    return {k: (2 * v.float() - base[k].float()).to(v.dtype) for k, v in merged.items()}


def _lm_head_scaled(merged, base):
    return {k: (v.float() * 1.25).to(v.dtype) if k == "lm_head.weight" else v for k, v in merged.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_honest_export_verifies_within_its_tolerance(dtype, exports, lora_run):
    folder, report = exports[dtype]
    assert report.verified and not report.problems
    assert 0 <= report.max_logit_diff <= report.tolerance
    saved = {t.dtype for t in load_file(next(folder.glob("model*.safetensors"))).values()}
    assert saved == {{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]}
    again = verify_folder(str(folder), lora_run)
    assert again.verified and again.max_logit_diff == pytest.approx(report.max_logit_diff, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("tamper", [_not_merged, _merged_twice, _lm_head_scaled])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])  # fp32 tampering: tests/export/test_merge.py
def test_a_wrong_merge_fails_the_logit_proof(dtype, tamper, exports, lora_run, llama_dir, tmp_path):
    honest_folder, honest = exports[dtype]
    folder = tmp_path / dtype
    shutil.copytree(honest_folder, folder)
    (path,) = folder.glob("model*.safetensors")
    base = load_file(f"{llama_dir}/model.safetensors")
    save_file(tamper(load_file(path), base), path, metadata={"format": "pt"})

    report = verify_folder(str(folder), lora_run)
    assert honest.max_logit_diff > 0 and report.max_logit_diff > 10 * honest.max_logit_diff, (
        "the tampering must be far beyond what rounding to the dtype produced"
    )
    assert not report.verified, (report.max_logit_diff, report.tolerance)
    assert any("logits differ" in p for p in report.problems), report.problems
    assert report.prompts_identical  # only the weights were touched
