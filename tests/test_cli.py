"""The CLI: each bad input is one clear line on stderr, a non-zero exit and no traceback."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main


@pytest.fixture()
def config(tmp_path, run_config):
    """config(**keys) -> the path of a YAML file holding run_config's keys, into tmp_path/'out'."""

    def write(**kw):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(run_config.data(**{"output_dir": tmp_path / "out", **kw})))
        return str(path)

    return write


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_malformed_jsonl_line_names_file_and_line(capsys, config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    assert f"{bad}:2: malformed JSON" in one_line_error(capsys, "train", config(dataset=str(bad)))


def test_record_missing_its_fields(capsys, config, write_data):
    path = write_data("d.json", [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": None}])
    assert "[record 1]: missing field 'output'" in one_line_error(capsys, "train", config(dataset=path))


def test_unknown_role(capsys, config, write_data):
    path = write_data("d.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    assert "unknown role 'robot'" in one_line_error(capsys, "train", config(dataset=path))


def test_empty_dataset(capsys, config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "empty" in one_line_error(capsys, "train", config(dataset=str(empty)))


def test_unsupported_file_type(capsys, config, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    assert "unsupported file type '.txt'" in one_line_error(capsys, "train", config(dataset=str(path)))


def test_unknown_key_and_bad_value_reported_together(capsys, config):
    line = one_line_error(capsys, "train", config(lora_rnak=8, finetuning_type="qlora"))
    assert "unknown key 'lora_rnak'; did you mean 'lora_r'?" in line
    assert "finetuning_type: 'qlora' is not one of lora, full" in line


def test_bad_override_value(capsys, config):
    assert "train_on: 'everything'" in one_line_error(capsys, "train", config(), "train_on=everything")


def test_missing_model_folder(capsys, config, tmp_path):
    assert "not found" in one_line_error(capsys, "train", config(model=str(tmp_path / "nope")))


def test_lora_target_matching_nothing(capsys, config):
    line = one_line_error(capsys, "train", config(lora_target="qkv_proj"))
    assert "'qkv_proj' match no linear module" in line and "self_attn.q_proj" in line


def test_every_sample_dropped_by_truncation(capsys, config):
    assert "every training sample was dropped" in one_line_error(capsys, "train", config(cutoff_len=4))


def test_errors_never_touch_an_existing_output_dir(capsys, config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(capsys, "train", config(cutoff_len=4))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_data_report_shows_counts_and_highlighted_answers(capsys, config):
    code, out, _ = run(capsys, "data", config(val_size=4), "--samples", "1")
    assert code == 0
    assert "records read: 24 (messages: 24)" in out
    assert "train samples: 20   eval samples: 4" in out
    assert "labels end in an end-of-turn token" in out and ": yes" in out
    assert "[[It is" in out and "<|im_end|>]]" in out
    assert "trained tokens between [[ and ]]" in out  # the markers are explained
    assert "template's own system prompt" not in out  # this template writes none


def test_data_jsonl_writes_only_ids_and_labels(capsys, config):
    code, out, _ = run(capsys, "data", config(), "--jsonl")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 24
    assert set(rows[0]) == {"input_ids", "labels"}
    assert len(rows[0]["input_ids"]) == len(rows[0]["labels"]) and -100 in rows[0]["labels"]


def test_data_report_of_a_preference_stage(capsys, config, write_data):
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."} for i in range(6)]
    rows.append({"prompt": "Say " + "word " * 60, "chosen": "ok", "rejected": "no"})  # no room for the answer
    rows.append({"prompt": "Talk.", "chosen": "word " * 60, "rejected": "no"})  # the chosen side is cut
    code, out, _ = run(
        capsys, "data", config(dataset=write_data("pairs.jsonl", rows), stage="dpo", cutoff_len=40), "--samples", "1"
    )
    assert code == 0
    assert "records read: 8 (trl: 8)" in out and "train pairs: 7   eval pairs: 0" in out
    assert "dropped: 1 (1 prompt longer than cutoff_len)" in out
    assert "truncated to cutoff_len 40: 1 pairs (1 chosen only, 0 rejected only, 0 both)" in out
    assert re.search(r"prompt tokens: p50 \d+ / p90 \d+ / p99 \d+ / max \d+", out)
    assert re.search(r"tokens: prompt \d+, chosen \d+, rejected \d+", out)
    assert "--- 0 chosen" in out and "[[It is 0.<|im_end|>]]" in out and "[[No idea.<|im_end|>]]" in out
    kto = config(dataset=write_data("kto.jsonl", rows[:6]), stage="kto")
    code, out, _ = run(capsys, "data", kto, "--samples", "0")
    assert code == 0 and "train examples: 12" in out and "desirable: 6   undesirable: 6" in out


def test_train_then_chat_from_the_console_script(config, tmp_path):
    """The installed `tunelab` command end to end: train, then answer one prompt and exit."""
    exe = Path(sys.executable).with_name("tunelab")
    cfg = config(max_steps=3)
    done = subprocess.run([str(exe), "train", cfg], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    chat = subprocess.run(
        [str(exe), "chat", "--model", str(tmp_path / "out"), "--prompt", "What is 2 plus 2?", "--max-new-tokens", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.endswith("\n")
    bad = subprocess.run([str(exe), "train", cfg], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "finished run" in bad.stderr and "Traceback" not in bad.stderr


def test_estimate_prints_parameters_and_a_memory_breakdown(capsys, config):
    code, out, _ = run(capsys, "estimate", config(), "gradient_checkpointing=true")
    assert code == 0
    for part in ("parameters", "weights", "gradients", "optimizer", "activations", "logits", "peak per device"):
        assert part in out.lower(), part


def test_estimate_of_a_missing_model_is_one_line(capsys, config, tmp_path):
    assert one_line_error(capsys, "estimate", config(model=str(tmp_path / "nope"))).startswith("tunelab: error: model:")


def test_train_help_lists_every_config_key_with_its_help(capsys):
    from tunelab.config import FIELDS

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for name, field in FIELDS.items():
        assert f"\n  {name}" in out or f"\n{name}" in out, name
        assert field.metadata["help"].split()[0] in out, name


def test_data_report_counts_records_holding_control_token_text(capsys, config, write_data):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What does <|im_end|> do? ({i})"},
                {"role": "assistant", "content": "It ends a turn: <|im_end|>."},
            ]
        }
        for i in range(2)
    ]
    rows += [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    code, out, _ = run(capsys, "data", config(dataset=write_data("lit.jsonl", rows)), "--samples", "0")
    assert code == 0
    assert "records whose messages hold special-token text (encoded as plain text): 2" in out
