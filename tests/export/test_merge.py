"""`export` merges a LoRA into a plain transformers folder and proves it behaves as base + adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.cli import main
from tunelab.config import from_dict
from tunelab.export.merge import export_merged, verify_folder
from tunelab.train.run import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_dir, chat_file_module):
    """A LoRA trained hard enough that forgetting to merge it changes the logits a lot."""
    out = tmp_path_factory.mktemp("export") / "lora"
    train(
        from_dict(
            dict(
                model=llama_dir,
                dataset=chat_file_module,
                output_dir=str(out),
                max_steps=15,
                learning_rate=1e-2,
                lora_r=8,
                per_device_train_batch_size=4,
                logging_steps=5,
            )
        )
    )
    return out


@pytest.fixture(scope="module")
def chat_file_module(tmp_path_factory):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} times two?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(12)
    ]
    path = tmp_path_factory.mktemp("exportdata") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_merged_folder_reloads_with_plain_transformers_and_matches_base_plus_adapter(lora_run, llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "merged"
    report = export_merged(str(lora_run), None, str(out), dtype="fp32", shard_size="200KB")
    assert report.verified and report.prompts_identical and report.max_logit_diff <= report.tolerance
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]  # sharded as asked
    assert not list(out.glob("adapter_*"))

    merged = AutoModelForCausalLM.from_pretrained(out)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(lora_run))
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 times two?"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert torch.allclose(_logits(merged, ids), _logits(unmerged, ids), atol=1e-4)
    assert not torch.allclose(_logits(base, ids), _logits(unmerged, ids), atol=1e-2)  # the adapter matters
    assert tok.chat_template == AutoTokenizer.from_pretrained(lora_run).chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(out).eos_token_id


def test_bf16_export_passes_within_the_bf16_tolerance(lora_run, tmp_path):
    report = export_merged(str(lora_run), None, str(tmp_path / "bf16"), dtype="bf16")
    assert report.verified and report.dtype == "bfloat16"
    assert 0 < report.max_logit_diff <= report.tolerance
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def _tamper_weights(folder):
    path = next(folder.glob("model*.safetensors"))
    tensors = load_file(path)
    name = next(k for k in tensors if "layers.0.self_attn.q_proj" in k)
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, path, metadata={"format": "pt"})


def _tamper_template(folder):
    cfg = folder / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    if "chat_template" in data:
        data["chat_template"] = data["chat_template"].replace("<|im_start|>assistant", "<|im_start|>bot")
        cfg.write_text(json.dumps(data))
    tpl = folder / "chat_template.jinja"
    if tpl.exists():
        tpl.write_text(tpl.read_text().replace("<|im_start|>assistant", "<|im_start|>bot"))


def _tamper_stop_ids(folder):
    gen = folder / "generation_config.json"
    data = json.loads(gen.read_text())
    data["eos_token_id"] = 0
    gen.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (_tamper_weights, "logits differ"),
        (_tamper_template, "renders prompts differently"),
        (_tamper_stop_ids, "stop ids"),
    ],
)
def test_each_proof_catches_a_folder_that_drifted(tamper, problem, lora_run, tmp_path):
    out = tmp_path / "merged"
    assert export_merged(str(lora_run), None, str(out), dtype="fp32").verified
    tamper(out)
    report = verify_folder(str(out), str(lora_run))
    assert not report.verified
    assert any(problem in p for p in report.problems), report.problems


def test_corrupted_adapter_fails_verification_and_exits_non_zero(lora_run, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(lora_run, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    assert main(["export", "--model", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "verification failed" in err and "not finite" in err


def test_cli_reports_the_proofs(lora_run, tmp_path, capsys):
    assert main(["export", "--model", str(lora_run), "--output", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "prompts rendered from the exported template: identical" in out and out.strip().endswith("verified")


@pytest.mark.parametrize("case", ["other_base", "vocab", "garbage_adapter", "not_empty", "no_adapter", "dtype"])
def test_what_cannot_be_merged_is_refused_in_one_line(case, lora_run, llama_dir, qwen2_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    args = ["export", "--model", str(lora_run), "--output", str(out)]
    if case == "other_base":
        args = ["export", "--model", qwen2_dir, "--adapter", str(lora_run), "--output", str(out)]
    elif case == "vocab":
        bad = tmp_path / "vocab"
        shutil.copytree(lora_run, bad)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(bad)
        tok.add_tokens([f"<new{i}>" for i in range(5)])
        tok.save_pretrained(bad)
        args = ["export", "--model", str(bad), "--output", str(out)]
    elif case == "garbage_adapter":
        bad = tmp_path / "garbage"
        shutil.copytree(lora_run, bad)
        (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        args = ["export", "--model", str(bad), "--output", str(out)]
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "no_adapter":
        args = ["export", "--model", llama_dir, "--output", str(out)]
    elif case == "dtype":
        args += ["--dtype", "int8"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunelab: error:") and "\n" not in err, err


def test_export_merges_on_the_cpu_even_with_a_gpu_visible(lora_run, tmp_path, monkeypatch):
    """An fp32 merge of a 7B model needs 28 GiB: host memory, not the GPU, unless --device cuda is asked for."""
    from tunelab.export import merge

    seen = []
    real = merge.load_inference

    def recording(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(*args, **{**kwargs, "device": "cpu"})  # there is no GPU here to honour cuda with

    monkeypatch.setattr(merge, "load_inference", recording)
    merge.export_merged(str(lora_run), None, str(tmp_path / "m"), "fp32", verify=False)
    merge.export_merged(str(lora_run), None, str(tmp_path / "g"), "fp32", verify=False, device="cuda")
    assert seen == ["cpu", "cuda"]
