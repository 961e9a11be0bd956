"""A remote-code model whose forward computes no loss and whose get_input_embeddings raises still trains,
and only with trust_remote_code on; then every other command works on the run, through the same loader."""

import json

import pytest
import yaml

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.train.run import train

MODELING = """
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast


class ToyConfig(LlamaConfig):
    model_type = "toy_llama"


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig

    def get_input_embeddings(self):
        raise NotImplementedError("this toy never implemented it")

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))  # no loss, whatever labels say
"""


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, tokenizer):
    from tunelab.demo.build import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("remote") / "toy", tokenizer, "llama")
    (path / "modeling_toy.py").write_text(MODELING)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="toy_llama",
        architectures=["ToyForCausalLM"],
        auto_map={"AutoConfig": "modeling_toy.ToyConfig", "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"},
    )
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_remote_code_needs_explicit_trust(remote_dir, run_config, tmp_path):
    with pytest.raises(TunelabError, match="trust_remote_code"):
        train(
            run_config(
                model=remote_dir,
                output_dir=tmp_path / "no",
                max_steps=12,
                learning_rate=1e-2,
                per_device_train_batch_size=8,
                logging_steps=3,
                lr_scheduler_type="constant",
            )
        )
    assert not (tmp_path / "no").exists(), "a refused run writes nothing"


def test_remote_code_model_without_loss_trains_with_lora(remote_dir, run_config, tmp_path):
    result = train(
        run_config(
            model=remote_dir,
            output_dir=tmp_path / "yes",
            max_steps=12,
            learning_rate=1e-2,
            per_device_train_batch_size=8,
            logging_steps=3,
            lr_scheduler_type="constant",
            trust_remote_code=True,
            gradient_checkpointing=True,
        )
    )
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.3, losses
    assert any("get_input_embeddings" in q for q in result.summary["quirks"])


@pytest.fixture(scope="module")
def remote_run(remote_dir, tmp_path_factory):
    """A LoRA run on the stand-in (no pad token, eos not the end-of-turn token, as the real trap)."""
    root = tmp_path_factory.mktemp("remote-run")
    data = root / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"It is {2 * i}."},
                    ]
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    config = root / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            dict(
                model=remote_dir,
                dataset=str(data),
                output_dir=str(root / "run"),
                trust_remote_code=True,
                max_steps=3,
                per_device_train_batch_size=4,
                logging_steps=1,
                learning_rate=1e-3,
            )
        )
    )
    return root, config


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def test_every_command_works_on_a_remote_code_run(remote_run, remote_dir, capsys):
    root, config = remote_run
    run = root / "run"
    code, _, err = cli(capsys, "train", config)
    assert code == 0, err
    assert any("get_input_embeddings" in q for q in json.loads((run / "run_summary.json").read_text())["quirks"])

    code, out, err = cli(capsys, "chat", "--model", run, "--prompt", "What is 2 plus 2?", "--max-new-tokens", "4")
    assert code == 0 and out.endswith("\n"), err

    data = root / "qa.jsonl"
    code, _, err = cli(
        capsys,
        "generate",
        "--model",
        run,
        "--dataset",
        data,
        "--max-samples",
        "3",
        "--max-new-tokens",
        "4",
        "--output",
        root / "preds.jsonl",
    )
    assert code == 0, err
    assert len((root / "preds.jsonl").read_text().splitlines()) == 3

    code, out, err = cli(
        capsys, "eval", "--model", run, "--dataset", data, "--max-samples", "3", "--max-new-tokens", "4"
    )
    assert code == 0 and "eval_loss" in out, err

    code, out, err = cli(capsys, "export", "--model", run, "--output", root / "merged")
    assert code == 0 and out.rstrip().endswith("verified"), out + err
    assert (root / "merged" / "modeling_toy.py").exists(), "the merged folder carries the model's code"

    code, out, err = cli(capsys, "sweep", config, "lora_r=2,4", "--eval-dataset", data, "--max-new-tokens", "2")
    assert code == 0, err
    assert "lora_r-2" in out and "lora_r-4" in out


def test_a_base_named_explicitly_needs_the_remote_code_flag(remote_run, remote_dir, capsys):
    root, config = remote_run
    run = root / "run"
    if not (run / "run_summary.json").exists():
        assert cli(capsys, "train", config)[0] == 0
    argv = ["chat", "--model", remote_dir, "--adapter", run, "--prompt", "What is 2 plus 2?", "--max-new-tokens", "4"]
    code, _, err = cli(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert code == 2 and len(errors) == 1 and "--trust-remote-code" in errors[0], err
    code, out, err = cli(capsys, *argv, "--trust-remote-code")
    assert code == 0 and out.endswith("\n"), err
